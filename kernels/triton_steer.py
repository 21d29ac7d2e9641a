"""The fused steering op in Triton (GPU; also runs under TRITON_INTERPRET=1 on CPU for tests).

One program per token row, the whole row in registers: s = x + residual, then the M entries in
order, each h <- h + p v + (q + r (h . u)) u, then the clamp into the dtype's range, the RMSNorm
and the weight. A slot whose coefficients are all 0 never reads the banks, so unsteered tokens
cost what vLLM's fused add+RMSNorm costs. Same arithmetic as kernels/steer.py.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _fused_add_rms_norm_steer_kernel(
    x_ptr, res_ptr, w_ptr, p_ptr, q_ptr, r_ptr, vid_ptr, v_ptr, u_ptr, out_ptr, res_out_ptr,
    hidden, eps, limit, stride_x, stride_r, stride_o, stride_ro, stride_c, stride_b,
    SLOTS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0)
    s = x.to(tl.float32) + tl.load(res_ptr + t * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    delta = tl.zeros([BLOCK], dtype=tl.float32)
    for m in tl.static_range(SLOTS):
        p = tl.load(p_ptr + t * stride_c + m)
        q = tl.load(q_ptr + t * stride_c + m)
        r = tl.load(r_ptr + t * stride_c + m)
        row = tl.load(vid_ptr + t * stride_c + m).to(tl.int64)
        used = (tl.zeros([BLOCK], dtype=tl.float32) + tl.abs(p) + tl.abs(q) + tl.abs(r)) != 0.0
        v = tl.load(v_ptr + row * stride_b + cols, mask=mask & used, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_b + cols, mask=mask & used, other=0.0).to(tl.float32)
        dot = tl.sum((s + delta) * u, axis=0)
        # r = 0 takes no part of the projection, even when an overflow upstream made it inf.
        projected = tl.where(r != 0.0, r * dot, 0.0)
        delta = delta + p * v + (q + projected) * u
    s = s + delta
    # Clamped into the output dtype's finite range (`limit`); comparisons keep a NaN as it is.
    s = tl.where(s > limit, limit, tl.where(s < -limit, -limit, s))
    tl.store(res_out_ptr + t * stride_ro + cols, s.to(x.dtype), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    # vLLM rounds the normed row to the weight's dtype before the product (done here in float32:
    # the same result, and the interpreter has no bf16 arithmetic).
    y = (s * rstd).to(w.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + t * stride_o + cols, y.to(x.dtype), mask=mask)


def _check(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def fused_add_rms_norm_steer(x, residual, weight, eps, p, q, r, vid, V, U, out=None, residual_out=None):
    """(out, residual_out) as kernels.steer.fused_add_rms_norm_steer; pass out=x,
    residual_out=residual for vLLM's in-place form."""
    for name, t in (("x", x), ("residual", residual), ("p", p), ("q", q), ("r", r), ("vid", vid), ("V", V), ("U", U)):
        _check(name, t)
    assert p.stride() == q.stride() == r.stride() == vid.stride() and V.stride() == U.stride()
    out = torch.empty_like(x) if out is None else out
    residual_out = torch.empty_like(residual) if residual_out is None else residual_out
    n, hidden = x.shape
    if n:
        block = triton.next_power_of_2(hidden)
        _fused_add_rms_norm_steer_kernel[(n,)](
            x, residual, weight, p, q, r, vid, V, U, out, residual_out, hidden, eps, torch.finfo(x.dtype).max,
            x.stride(0), residual.stride(0), out.stride(0), residual_out.stride(0), p.stride(0), V.stride(0),
            SLOTS=p.shape[1], BLOCK=block, num_warps=min(max(block // 256, 1), 16),
        )  # fmt: skip
    return out, residual_out
