"""The arithmetic of `steer-batch calibrate` without an engine: the alpha range syntax, the
recommendation walk, and the per-alpha table against a synthetic classified run whose
answers are known by construction (tests/engine/test_calibrate.py runs the real thing)."""

import math

import numpy as np
import pytest

from steer_batch.errors import SteerBatchError
from steer_batch.eval import runfiles
from steer_batch.eval.arrow_stream import ArrowStream
from steer_batch.jobs.calibrate import calibration_table, recommend, toward_target
from steer_batch.jobs.run import evenly_spaced, parse_alphas


def test_alpha_ranges_and_lists():
    assert parse_alphas("-8:8:17") == [float(a) for a in range(-8, 9)]
    assert parse_alphas("-1:1:5,3") == [-1.0, -0.5, 0.0, 0.5, 1.0, 3.0]
    assert parse_alphas("0.1:0.3:3") == [0.1, 0.2, 0.3]  # rounded, so 0.2 is 0.2
    for bad in ("-8:8", "-8:8:1", "a:b:3", "1,1", "4,,x", "nan"):
        with pytest.raises(SteerBatchError, match="START:STOP:N") as e:
            parse_alphas(bad)
        assert e.value.param == "alphas"


def test_evenly_spaced_sample():
    assert evenly_spaced(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert evenly_spaced(list(range(3)), 5) == [0, 1, 2]
    with pytest.raises(SteerBatchError):
        evenly_spaced([1], 0)


def test_recommend_walks_outward_and_stops_at_the_first_over_budget():
    alphas = [-3, -2, -1, 0, 1, 2, 3]
    # Positive side: 1 and 2 within 0.5, 3 over. Negative side: -1 over, so -2 (within) never counts.
    increase = [0.1, 0.2, 0.9, 0.0, 0.1, 0.5, 0.7]
    assert recommend(alphas, increase, 0.5) == {"negative": None, "positive": 2}
    assert recommend(alphas, increase, 1.0) == {"negative": -3, "positive": 3}
    assert recommend(alphas, [0.1, 0.2, 0.3, 0.0, math.nan, 0.1, 0.1], 0.5) == {"negative": -3, "positive": None}
    assert recommend([0, 1], [0.0, 0.2], 0.5) == {"negative": None, "positive": 1}


def _classified_run(out, p_positive, nll):
    """A run folder's sentiment.arrow: p_positive[alpha][prompt], nll[alpha][prompt]."""
    out.mkdir()
    rows = [
        {
            "prompt_id": i,
            "vector": "v",
            "alpha": alpha,
            "classifier": "vader",
            "p_negative": 0.0,
            "p_neutral": 1.0 - p,
            "p_positive": p,
            "nll": nll[alpha][i],
        }
        for alpha, ps in p_positive.items()
        for i, p in enumerate(ps)
    ]
    with ArrowStream.open(out / runfiles.SENTIMENT, runfiles.SENTIMENT_SCHEMA)[0] as writer:
        writer.write(rows)
    return out


def test_table_is_paired_by_prompt(tmp_path):
    rng = np.random.default_rng(0)
    base_p, base_nll = rng.uniform(0, 0.5, 40), rng.uniform(1, 3, 40)
    # Each alpha shifts every prompt by the same amount: the paired means are those shifts, with
    # zero-width intervals, however spread the prompts are.
    shift = {-2.0: (-0.2, 0.9), 0.0: (0.0, 0.0), 1.0: (0.3, 0.2), 2.0: (0.45, 0.6)}
    p = {a: base_p + s for a, (s, _) in shift.items()}
    nll = {a: base_nll + d for a, (_, d) in shift.items()}
    nll[2.0][5] = math.nan  # a row without tokens: left out of the nll means only
    out = _classified_run(tmp_path / "run", p, nll)
    table, chosen = calibration_table(out, "positive", 0.5)
    rows = {r["alpha"]: r for r in table.to_pylist()}
    assert list(rows) == [-2.0, 0.0, 1.0, 2.0]
    for alpha, (effect, increase) in shift.items():
        r = rows[alpha]
        assert r["n"] == 40
        assert r["effect"] == pytest.approx(effect) and r["effect_lo"] == pytest.approx(effect)
        assert r["effect_hi"] == pytest.approx(effect)
        assert r["nll_increase"] == pytest.approx(increase) and r["nll_increase_hi"] == pytest.approx(increase)
        assert r["p_positive"] == pytest.approx(p[alpha].mean())
    assert rows[2.0]["nll"] == pytest.approx(np.nanmean(nll[2.0]))
    assert rows[-2.0]["nll"] == pytest.approx(base_nll.mean() + 0.9)
    assert chosen == {"negative": None, "positive": 1.0}
    assert toward_target(table, chosen) == "positive"
    negative, _ = calibration_table(out, "negative", 0.5)
    assert negative.column("effect").to_pylist() == [0.0] * 4  # p_negative never moves here
    assert toward_target(negative, chosen) is None


def test_table_needs_alpha_zero(tmp_path):
    out = _classified_run(tmp_path / "run", {1.0: [0.5, 0.5]}, {1.0: [1.0, 1.0]})
    with pytest.raises(SteerBatchError, match="no alpha 0"):
        calibration_table(out, "positive", 0.5)
