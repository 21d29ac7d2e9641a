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
    x, res, w, p, q, r, vid, V, U = inputs(tokens, hidden, dtype)
    want_out, want_res = reference(x, res, w, p, q, r, vid, V, U)
    out, res_out = fused_add_rms_norm_steer(x, res, w, EPS, p, q, r, vid, V, U)
    assert out.dtype == res_out.dtype == dtype and out.shape == x.shape
    assert rel(out, want_out) <= TOL[dtype] and rel(res_out, want_res) <= TOL[dtype]
    # The separate add returns the layer's `hidden` plus the change, so hidden + residual is steered.
    h = steer_add(x, res, p, q, r, vid, V, U)
    assert rel(h.double() + res.double(), want_res) <= TOL[dtype]
    unsteered = (p[:tokens] == 0).all(1) & (q[:tokens] == 0).all(1) & (r[:tokens] == 0).all(1)
    assert torch.equal(h[unsteered], x[unsteered]), "rows with all-zero coefficients must come back bit for bit"


@pytest.mark.parametrize("op", ["add", "ablate", "clamp"])
def test_each_operator_does_what_it_says(op):
    """One slot, checked by what the operator means rather than by its formula."""
    x, res, w, p, q, r, vid, V, U = inputs(5, 64, torch.float32, steered=0.0)
    vid[:, 0] = 1
    u = U[1]
    p[:5, 0], q[:5, 0], r[:5, 0] = {"add": (2.5, 0.0, 0.0), "ablate": (0.0, 0.0, -1.0), "clamp": (0.0, 3.0, -1.0)}[op]
    h = steer_add(x, res, p, q, r, vid, V, U) + res  # the steered state
    s = x + res
    rest = h - (h @ u)[:, None] * u  # everything but the component along u
    if op == "add":
        torch.testing.assert_close(h, s + 2.5 * V[1])
    elif op == "ablate":  # the component along u is gone, the rest untouched
        torch.testing.assert_close(h @ u, torch.zeros(5), atol=1e-5, rtol=0)
        torch.testing.assert_close(rest, s - (s @ u)[:, None] * u)
    else:  # the projection onto u becomes 3, the rest untouched
        torch.testing.assert_close(h @ u, torch.full((5,), 3.0), atol=1e-5, rtol=0)
        torch.testing.assert_close(rest, s - (s @ u)[:, None] * u)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_an_absurd_alpha_never_makes_a_state_non_finite(dtype):
    """The steered sum is clamped into the dtype's finite range: alpha 1e30 (or 3e38, whose
    product with the vector overflows float32) saturates its own row and touches no other."""
    x, res, w, p, q, r, vid, V, U = inputs(6, 576, dtype, steered=0.0)
    vid[0, 0] = vid[3, 0] = 0
    p[0, 0], p[3, 0] = 1e30, -3e38
    h = steer_add(x, res, p, q, r, vid, V, U)
    out, res_out = fused_add_rms_norm_steer(x, res, w, EPS, p, q, r, vid, V, U)
    for t in (h, out, res_out):
        assert bool(torch.isfinite(t).all())
    limit = torch.finfo(dtype).max
    assert float(h[3].abs().max()) == limit and float(res_out[3].abs().max()) == limit  # saturated, not inf
    rest = [1, 2, 4, 5]
    zero = torch.zeros_like(p)
    want_out, want_res = fused_add_rms_norm_steer(x, res, w, EPS, zero, zero, zero, vid, V, U)
    assert (
        torch.equal(h[rest], x[rest])
        and torch.equal(out[rest], want_out[rest])
        and torch.equal(res_out[rest], want_res[rest])
    )
    nan = x.clone()
    nan[1, 7] = float("nan")
    assert bool(torch.isnan(steer_add(nan, res, p, q, r, vid, V, U)[1, 7])), "a NaN that was there must stay visible"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_steered_state_is_rounded_once_to_the_models_dtype(dtype):
    """hidden + change is formed in float32 and rounded once: every value is within half a unit in
    the last place of the exact sum (rounding the change first, then the sum, is not)."""
    x, res, w, p, q, r, vid, V, U = inputs(64, 576, dtype)
    _, steered = reference(x, res, w, p, q, r, vid, V, U)  # float64
    change = steered - (x.double() + res.double())
    exact = x.double() + change
    got = steer_add(x, res, p, q, r, vid, V, U).double()
    _, exponent = torch.frexp(exact)
    ulp = torch.ldexp(torch.ones_like(exact), exponent - (8 if dtype == torch.bfloat16 else 11))
    slack = 1e-5 * change.abs() + 1e-30  # the float32 change's own error
    assert bool(((got - exact).abs() <= ulp / 2 + slack).all())


@pytest.mark.parametrize("dtype, change", [(torch.float16, 1e5), (torch.bfloat16, 3.395e38)])
def test_a_sum_beyond_the_dtype_but_finite_in_float32_saturates(dtype, change):
    """An alpha that overflows the model's dtype but not float32 (fp16: 1e5; bf16: past 3.39e38,
    below float32's 3.40e38) saturates at the dtype's largest value instead of becoming inf."""
    x, res, w, p, q, r, vid, V, U = inputs(3, 64, dtype, steered=0.0)
    V[0] = 0
    V[0, 5] = 1.0
    vid[1, 0], p[1, 0] = 0, change
    assert change < torch.finfo(torch.float32).max and change > torch.finfo(dtype).max
    h = steer_add(x, res, p, q, r, vid, V, U)
    out, res_out = fused_add_rms_norm_steer(x, res, w, EPS, p, q, r, vid, V, U)
    for t in (h, out, res_out):
        assert bool(torch.isfinite(t).all())
    assert float(h[1, 5]) == float(res_out[1, 5]) == torch.finfo(dtype).max


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("steered", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("adds_only", [False, True])
def test_the_cpu_in_place_add_equals_the_separate_add_and_skips_what_is_not_steered(dtype, steered, adds_only):
    """steer_add_ (the CPU's op) gives steer_add's rows bit for bit, computing only the steered
    tokens and the slots the step uses, on its own path for a step that only adds (in place where
    it can be); with nothing steered it leaves the output untouched. A saturating alpha and a NaN
    that was there take the same path."""
    from steer_batch.kernels.steer import steer_add_

    x, res, w, p, q, r, vid, V, U = inputs(40, 576, dtype, steered=steered)
    p[:, 2] = q[:, 2] = r[:, 2] = 0  # the step uses two of the three slots
    if adds_only:  # every ablate and clamp becomes an add
        p.add_(q).add_(r)
        q.zero_()
        r.zero_()
    if steered == 1.0:
        assert bool(p[:40, :2].ne(0).all(1).any())  # some tokens add two vectors
    if steered:
        p[3], q[3], r[3] = 0, 0, 0
        vid[3, 0], p[3, 0] = 0, -3e38  # alone in its row, past float32's range once times the vector
        x[4, 7] = float("nan")
    want = steer_add(x, res, p, q, r, vid, V, U)
    on = (p[:40] != 0) | (q[:40] != 0) | (r[:40] != 0)
    used = int(on.any(0).nonzero().max()) + 1 if steered else 0
    summary = [used, adds_only or not steered, bool(on.any(1).all()), -1]  # as kernels/step_inputs.py writes it
    got = x.clone()
    steer_add_(got, res, p, q, r, vid, V, U, torch.tensor(summary, dtype=torch.int32))
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    if steered:
        assert bool(got[4, 7].isnan()) and float(got[3].abs().max()) == torch.finfo(dtype).max
    else:
        assert torch.equal(got, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_one_row_step_adds_the_same_bits_as_the_separate_add(dtype):
    """Every token adding from one bank row in one slot (one vector at many alphas, the common
    sweep): the CPU op broadcasts the row instead of gathering it, with steer_add's bits,
    saturation and NaN included."""
    from steer_batch.kernels.steer import steer_add_

    x, res, w, p, q, r, vid, V, U = inputs(40, 576, dtype, steered=0.0)
    p[:40, 0] = torch.linspace(-4, 4, 40)
    p[20, 0] = 0.5  # linspace's 0 would leave a token unsteered
    p[3, 0] = -3e38
    vid[:, 0] = 2
    x[4, 7] = float("nan")
    want = steer_add(x, res, p, q, r, vid, V, U)
    got = x.clone()
    steer_add_(got, res, p, q, r, vid, V, U, torch.tensor([1, 1, 1, 2], dtype=torch.int32))
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    assert bool(got[4, 7].isnan()) and float(got[3].abs().max()) == torch.finfo(dtype).max
