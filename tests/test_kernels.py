"""The steering op: the torch path against a float64 reference and against vLLM's own
fused_add_rms_norm, and the Triton kernels under the Triton interpreter (CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steer_batch.kernels import fused_add_rms_norm_steer, steer_add

EPS = 1e-6
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # max error / max |reference|
ROOT = Path(__file__).resolve().parent.parent


def inputs(tokens, hidden, dtype, steered=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, res = (torch.randn(tokens, hidden, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    bank = torch.randn(3, hidden, generator=g)
    vid = torch.randint(0, 3, (tokens + 5,), generator=g, dtype=torch.int32)  # longer than tokens, as the engine's buffers
    coeff = torch.where(torch.rand(tokens + 5, generator=g) < steered, 3 * torch.randn(tokens + 5, generator=g), torch.zeros(tokens + 5))
    return x, res, w, coeff, vid, bank


def reference(x, res, w, coeff, vid, bank):
    n = x.shape[0]
    s = x.double() + res.double() + coeff[:n].double()[:, None] * bank.double()[vid[:n].long()]
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * w.double(), s


def rel(got, want):
    return float((got.double() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens, hidden", [(1, 576), (7, 640), (33, 4096), (300, 64)])
def test_torch_path_matches_float64_reference(dtype, tokens, hidden):
    x, res, w, coeff, vid, bank = inputs(tokens, hidden, dtype)
    want_out, want_res = reference(x, res, w, coeff, vid, bank)
    out, res_out = fused_add_rms_norm_steer(x, res, w, EPS, coeff, vid, bank)
    assert out.dtype == res_out.dtype == dtype and out.shape == x.shape
    assert rel(out, want_out) <= TOL[dtype] and rel(res_out, want_res) <= TOL[dtype]
    want_h = x.double() + coeff[:tokens].double()[:, None] * bank.double()[vid[:tokens].long()]
    h = steer_add(x, coeff, vid, bank)
    assert rel(h, want_h) <= TOL[dtype]
    unsteered = coeff[:tokens] == 0
    assert torch.equal(h[unsteered], x[unsteered]), "rows with coeff 0 must come back bit for bit"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_an_absurd_alpha_never_makes_a_state_non_finite(dtype):
    """The steered sum is clamped into the dtype's finite range: alpha 1e30 (or 3e38, whose
    product with the vector overflows float32) saturates its own row and touches no other."""
    x, res, w, coeff, vid, bank = inputs(6, 576, dtype, steered=0.0)
    coeff[0], coeff[3] = 1e30, -3e38
    h = steer_add(x, coeff, vid, bank)
    out, res_out = fused_add_rms_norm_steer(x, res, w, EPS, coeff, vid, bank)
    for t in (h, out, res_out):
        assert bool(torch.isfinite(t).all())
    limit = torch.finfo(dtype).max
    assert float(h[3].abs().max()) == limit and float(res_out[3].abs().max()) == limit  # saturated, not inf
    rest = [1, 2, 4, 5]
    want_out, want_res = fused_add_rms_norm_steer(x, res, w, EPS, torch.zeros_like(coeff), vid, bank)
    assert torch.equal(h[rest], x[rest]) and torch.equal(out[rest], want_out[rest]) and torch.equal(res_out[rest], want_res[rest])
    nan = x.clone()
    nan[1, 7] = float("nan")
    assert bool(torch.isnan(steer_add(nan, coeff, vid, bank)[1, 7])), "a NaN that was there must stay visible"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_token_steered_is_exactly_vllms_fused_add_rms_norm(dtype):
    from vllm.ir.ops.layernorm import fused_add_rms_norm

    x, res, w, coeff, vid, bank = inputs(17, 576, dtype, steered=0.0)
    want_out, want_res = fused_add_rms_norm(x.clone(), res.clone(), w, EPS)
    out, res_out = fused_add_rms_norm_steer(x, res, w, EPS, coeff, vid, bank)
    assert torch.equal(out, want_out) and torch.equal(res_out, want_res)


def test_triton_kernels_under_the_interpreter():
    """kernels/gpu_check.py's correctness path, on CPU: every dtype, outputs poisoned with NaN."""
    pytest.importorskip("triton", reason="Triton is not installed: its interpreter cannot run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "kernels" / "gpu_check.py"), "--interpret"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.strip().endswith("all correct")
    assert done.stdout.count("ok  ") == 54  # 3 shapes x 3 dtypes x (4 outputs + 2 finiteness checks)


def test_custom_ops_compile_to_the_same_result():
    from steer_batch.kernels import ops

    x, res, w, coeff, vid, bank = inputs(9, 576, torch.float32)

    def layer_tail(x, res):
        out, res_out = ops.fused_add_rms_norm_steer(x, res, w, EPS, coeff, vid, bank)
        return steer_add(out, coeff, vid, bank), res_out

    eager = layer_tail(x, res)
    compiled = torch.compile(layer_tail, fullgraph=True, dynamic=True)(x, res)
    want_out, want_res = reference(x, res, w, coeff, vid, bank)
    want_h = want_out + coeff[:9].double()[:, None] * bank.double()[vid[:9].long()]
    for got in (eager, compiled):
        assert rel(got[0], want_h) <= 1e-5 and rel(got[1], want_res) <= 1e-5
