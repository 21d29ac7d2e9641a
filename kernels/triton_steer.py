"""The steering op in Triton (GPU; also runs under TRITON_INTERPRET=1 on CPU for tests).

One program per token row. A row whose coeff is 0 never reads the bank, so unsteered tokens
cost exactly what vLLM's fused add+RMSNorm costs. Same arithmetic as kernels/steer.py.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _fused_add_rms_norm_steer_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    coeff_ptr,
    vid_ptr,
    bank_ptr,
    out_ptr,
    res_out_ptr,
    hidden,
    eps,
    limit,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    stride_b,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0)
    s = x.to(tl.float32) + tl.load(res_ptr + t * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(coeff_ptr + t)
    row = tl.load(vid_ptr + t).to(tl.int64)
    steered = (tl.zeros([BLOCK], dtype=tl.float32) + c) != 0.0  # the bank is not read for unsteered rows
    b = tl.load(bank_ptr + row * stride_b + cols, mask=mask & steered, other=0.0).to(tl.float32)
    s = s + c * b
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


def fused_add_rms_norm_steer(x, residual, weight, eps, coeff, vid, bank, out=None, residual_out=None):
    """(out, residual_out) as kernels.steer.fused_add_rms_norm_steer; pass out=x,
    residual_out=residual for vLLM's in-place form."""
    for name, t in (("x", x), ("residual", residual)):
        _check(name, t)
    out = torch.empty_like(x) if out is None else out
    residual_out = torch.empty_like(residual) if residual_out is None else residual_out
    n, hidden = x.shape
    if n:
        block = triton.next_power_of_2(hidden)
        _fused_add_rms_norm_steer_kernel[(n,)](
            x,
            residual,
            weight,
            coeff,
            vid,
            bank,
            out,
            residual_out,
            hidden,
            eps,
            torch.finfo(x.dtype).max,
            x.stride(0),
            residual.stride(0),
            out.stride(0),
            residual_out.stride(0),
            bank.stride(0),
            BLOCK=block,
            num_warps=min(max(block // 256, 1), 16),
        )
    return out, residual_out
