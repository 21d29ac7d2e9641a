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
    assert ratios["stock vLLM"] == {"median": 1.0, "low": 1.0, "high": 1.0, "lowest": 1.0, "highest": 1.0}
    # Round by round 0.99, 0.98, 1.125, 1.0: the median 0.995; best rounds alone would say 0.99 / 1.0 = 0.99.
    x = ratios["x"]
    assert (x["median"], x["lowest"], x["highest"]) == pytest.approx((0.995, 0.98, 1.125))
    assert x["lowest"] <= x["low"] <= x["median"] <= x["high"] <= x["highest"]


def test_the_interval_of_the_median_says_what_a_run_resolves():
    """Rounds with a known ratio (0.99) and noise: the 95% interval holds it, narrows with more
    rounds, and with the bench's noise on 2 cores (about 3% a round) 15 rounds resolve no better
    than about 1%, where a steadier machine's 15 rounds resolve 0.1%."""
    import numpy as np

    from steer_batch.jobs.bench import paired_ratios

    def interval(n, noise, seed):
        rng = np.random.default_rng(seed)
        stock = rng.uniform(500, 600, n)
        r = paired_ratios({"stock vLLM": list(stock), "x": list(stock * 0.99 * (1 + noise * rng.standard_normal(n)))},
                          "stock vLLM")["x"]  # fmt: skip
        return r["low"], r["high"]

    held = [low <= 0.99 <= high for low, high in (interval(15, 0.03, seed) for seed in range(40))]
    assert sum(held) >= 34  # a 95% interval (bootstrap intervals of a median run a little narrow)
    widths = {n: np.mean([np.subtract(*interval(n, 0.03, s)[::-1]) for s in range(20)]) for n in (8, 30, 120)}
    assert widths[8] > widths[30] > widths[120]
    noisy, steady = interval(15, 0.03, 1), interval(15, 0.002, 1)
    assert noisy[1] - noisy[0] > 0.01 > 0.002 > steady[1] - steady[0] and steady[0] <= 0.99 <= steady[1]


def test_unsteered_traffic_is_timed_before_any_steered_request_then_again_among_them():
    """The phases: unsteered requests on each steering engine with stock vLLM first, so no zeroing
    of blocks steered requests held (engine/kv_blocks.py) lands on them; then the steered
    configurations with the default engine's unsteered requests among them, and stock again.
    Every measurement runs once a round, the order rotated; no steered phase without steered
    configurations."""
    from steer_batch.jobs.bench import AFTER_STEERED, STEERED_PHASE, STOCK, UNSTEERED_PHASE, interleave, phases

    calls = []

    def measure(name):
        return lambda: calls.append(name) or float(len(calls))

    names = ["unsteered", "256 alphas", "unsteered, 1 slot", "256 alphas, 1 slot", STOCK, "eval-ab, 64 alphas"]
    order = phases([(n, measure(n)) for n in names])
    assert list(order) == [UNSTEERED_PHASE, STEERED_PHASE]
    assert [n for n, _ in order[UNSTEERED_PHASE]] == ["unsteered", "unsteered, 1 slot", STOCK]
    assert [n for n, _ in order[STEERED_PHASE]] == [
        "256 alphas", "256 alphas, 1 slot", "eval-ab, 64 alphas", AFTER_STEERED, STOCK
    ]  # fmt: skip
    assert dict(order[STEERED_PHASE])[AFTER_STEERED] is dict(order[UNSTEERED_PHASE])["unsteered"]  # the same engine
    tok_s = {phase: interleave(timed, 3, phase) for phase, timed in order.items()}
    first_steered = calls.index("256 alphas")
    assert set(calls[:first_steered]) == {"unsteered", "unsteered, 1 slot", STOCK} and len(calls) == 3 * 3 + 3 * 5
    assert all(len(v) == 3 for phase in tok_s.values() for v in phase.values())
    assert calls[3:6] == ["unsteered, 1 slot", STOCK, "unsteered"]  # round 2 starts one further on
    only_unsteered = phases([(n, measure(n)) for n in ("unsteered", STOCK)])
    assert list(only_unsteered) == [UNSTEERED_PHASE]
