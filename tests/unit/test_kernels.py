"""The steering op's torch path against a float64 reference, and its clamp (the engine tier,
tests/engine/test_kernels_compiled.py, holds it to vLLM's own fused_add_rms_norm and runs the
Triton kernel and torch.compile)."""

import pytest
import torch

from helpers import KERNEL_EPS as EPS
from helpers import kernel_inputs as inputs
from helpers import kernel_reference as reference
from helpers import rel_err as rel
from steer_batch.kernels import fused_add_rms_norm_steer, steer_add

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # max error / max |reference|


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
    assert (
        torch.equal(h[rest], x[rest])
        and torch.equal(out[rest], want_out[rest])
        and torch.equal(res_out[rest], want_res[rest])
    )
    nan = x.clone()
    nan[1, 7] = float("nan")
    assert bool(torch.isnan(steer_add(nan, coeff, vid, bank)[1, 7])), "a NaN that was there must stay visible"
