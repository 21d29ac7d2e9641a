"""`steer-batch bench` on a GPU (emulated: torch answers that CUDA is available): the engines it
keeps up side by side share the GPU's memory instead of each claiming vLLM's default 90%; and its
ratios to stock vLLM taken round by round."""

import pytest
import torch

from steer_batch.jobs.bench import bench_engine_args


@pytest.mark.parametrize("engines", [1, 2, 4])
def test_engines_up_at_once_share_the_gpu(monkeypatch, engines):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = bench_engine_args(eager=False, engines=engines)
    assert args["gpu_memory_utilization"] * engines <= 0.9 + 1e-9
    assert args["enable_prefix_caching"] is False and args["enforce_eager"] is False


def test_on_cpu_each_engine_gets_a_kv_cache_of_its_own_size(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = bench_engine_args(eager=True, engines=4)
    assert "gpu_memory_utilization" not in args and args["kv_cache_memory_bytes"] == 2 << 30


def test_ratios_to_stock_are_taken_round_by_round():
    from steer_batch.jobs.bench import paired_ratios

    rounds = {"stock vLLM": [100.0, 50.0, 80.0, 90.0], "x": [99.0, 49.0, 90.0, 90.0]}
    ratios = paired_ratios(rounds, "stock vLLM")
    assert ratios["stock vLLM"] == (1.0, 1.0, 1.0)
    # Round by round 0.99, 0.98, 1.125, 1.0: the median 0.995; best rounds alone would say 0.99 / 1.0 = 0.99.
    assert ratios["x"] == pytest.approx((0.995, 0.98, 1.125))
