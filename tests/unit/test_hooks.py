"""engine/hooks.py refuses a vLLM it was not checked against, and a wrapped method whose
signature moved, naming the supported versions (the wraps themselves run in every engine test)."""

import pytest

from steer_batch.engine.hooks import PATCHES, Patch, check_signature, check_version
from steer_batch.errors import SteerBatchError, SteeringNotInstalled


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1", "0.33.0"])
def test_checked_versions_pass(version):
    check_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0", "0.3.2"])
def test_other_versions_are_refused_naming_the_checked_ones(version):
    with pytest.raises(
        SteeringNotInstalled, match=rf"checked against vLLM 0\.32\.x, 0\.33\.x; this is vLLM {version}\b"
    ):
        check_version(version)


def test_a_moved_signature_is_refused():
    patch = Patch("m:C", "f", ("self", "scheduler_output", "num_scheduled_tokens"), "why", lambda f: f)

    def same(self, scheduler_output, num_scheduled_tokens, extra=None):
        pass

    def moved(self, num_scheduled_tokens, scheduler_output):
        pass

    check_signature(patch, same, "0.32.0")
    with pytest.raises(SteerBatchError, match=r"vLLM 0\.32\.0 changed m\.C\.f: its parameters are \('self', 'num_sch"):
        check_signature(patch, moved, "0.32.0")


def test_every_patch_says_why_and_what_it_relies_on():
    assert len({p.name for p in PATCHES}) == len(PATCHES) == 12
    assert all(p.params[0] == "self" and len(p.why) > 40 for p in PATCHES)


def test_every_accessed_attribute_exists_and_a_missing_one_is_refused(monkeypatch):
    from steer_batch.engine import hooks

    hooks.check_accessed("0.32.0")  # the installed vLLM has every one
    monkeypatch.setattr(hooks, "ACCESSED", (*hooks.ACCESSED, ("vllm.v1.utils:CpuGpuBuffer", "moved_away")))
    with pytest.raises(SteeringNotInstalled, match=r"vLLM 0\.32\.0 has no vllm\.v1\.utils\.CpuGpuBuffer\.moved_away"):
        hooks.check_accessed("0.32.0")


def test_a_steering_engine_flags_the_steered_rows_vllm_would_count_nans_in():
    """The NaN flag of a steering engine (a fake runner: only the batch's request index is read)
    against vLLM's own count: a steered request's row is flagged exactly when vLLM counts a NaN
    in it, whatever else the row holds (huge finite values, one-sided infinities); rows map onto
    request ids as vLLM maps them; unsteered requests are not reported (a step without a steered
    request reports nothing, as stock vLLM), nor is a request without a row."""
    from types import SimpleNamespace

    import torch
    from vllm.v1.worker.gpu_model_runner import count_nans_per_row, nans_to_dict

    from steer_batch.engine.hooks import _nan_rows

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4099, generator=g) * 30
    logits[1, 7] = float("nan")
    logits[2, :] = float("nan")
    logits[3, 100] = float("inf")  # one-sided infinities: no NaN, no flag
    logits[3, 200] = 3e38
    logits[4, 5] = -float("inf")
    logits[5, 4098] = float("nan")
    index = {f"r{i}": i for i in (5, 0, 2, 1, 4, 3)}
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_id_to_index={**index, "r6": 6}))  # r6: no row
    want = nans_to_dict(count_nans_per_row(logits).tolist(), index)
    got = _nan_rows(runner, logits, set(index) | {"r6"})
    assert got.keys() == want.keys() and {r: v > 0 for r, v in got.items()} == {r: v > 0 for r, v in want.items()}
    assert got == {"r0": 0, "r1": 1, "r2": 1, "r3": 0, "r4": 0, "r5": 1}
    assert _nan_rows(runner, logits, {"r1", "r3", "r5"}) == {"r1": 1, "r3": 0, "r5": 1}
    assert _nan_rows(runner, logits, {"r2"}) == {"r2": 1}
    assert _nan_rows(runner, logits, set()) == {} and _nan_rows(runner, logits, {"r6"}) == {}
    for dtype in (torch.bfloat16, torch.float16):
        assert _nan_rows(runner, logits.to(dtype), set(index))["r1"] == 1
        assert _nan_rows(runner, logits.to(dtype), {"r4", "r5"}) == {"r4": 0, "r5": 1}
