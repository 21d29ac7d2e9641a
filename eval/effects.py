"""Steering's effect and coherence cost per cell (vector x alpha) of a classified run folder,
each paired prompt by prompt with the unsteered rows: the one table behind `calibrate` (one
vector) and `sweep` (one slice per layer set, alpha 0 generated once and shared).

Per cell: n, the mean p_target, the effect (p_target's shift from alpha 0), the nll under the
unsteered model (eval/coherence.py) and the nll increase over alpha 0, each with a 95% paired
bootstrap interval (the prompts resampled, eval/report.py's resampler).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from steer_batch.errors import SteerBatchError
from steer_batch.eval.arrow_stream import read_table
from steer_batch.eval.report import bootstrap_interval
from steer_batch.eval.runfiles import SENTIMENT, require

TARGETS = ("negative", "neutral", "positive")  # the sentiment classes a target may name
AB_TARGETS = ("match", "not_match")  # an A/B effect's targets: p_match up, or down (jobs/sweep.py)
# Nats per token: steered text may be up to e^0.5 = 1.65x less likely per token, on average, than
# the unsteered model finds it. On the default model the readable alpha +-4 costs about 0.4.
DEFAULT_MAX_NLL_INCREASE = 0.5


def check_budget(target: str, max_nll_increase: float, targets: tuple[str, ...] = TARGETS) -> None:
    if target not in targets:
        raise SteerBatchError(f"target={target!r}; allowed: {list(targets)}", param="target")
    if not (max_nll_increase > 0 and math.isfinite(max_nll_increase)):
        raise SteerBatchError(
            f"max_nll_increase={max_nll_increase}; give a positive number of nats", param="max_nll_increase"
        )


def cells(out: Path, target: str) -> dict[str, list[dict]]:
    """vector -> one row per alpha (sorted, alpha 0 where the vector has it), from a classified
    run folder. Each vector pairs with its own alpha 0 rows, else with the run's shared ones (a
    sweep generates alpha 0 under its first slice only)."""
    rows = read_table(require(out, SENTIMENT, f"classify it with `steer-batch classify {out}`")).to_pylist()
    by_vector: dict[str, dict[float, dict[int, dict]]] = {}
    for r in rows:
        by_vector.setdefault(r["vector"], {}).setdefault(float(r["alpha"]), {})[r["prompt_id"]] = r
    shared = next((by_alpha[0.0] for by_alpha in by_vector.values() if 0.0 in by_alpha), None)
    if shared is None:
        raise SteerBatchError(f"{out} has no alpha 0 to compare with; run it with 0 among the alphas", param="alphas")
    return {name: _rows(by_alpha, by_alpha.get(0.0, shared), target) for name, by_alpha in by_vector.items()}


def _rows(by_alpha: dict[float, dict[int, dict]], base: dict[int, dict], target: str) -> list[dict]:
    column = f"p_{target}"
    table = []
    for alpha in sorted(by_alpha):
        part = by_alpha[alpha]
        ids = sorted(set(part) & set(base))
        effect = np.array([part[i][column] - base[i][column] for i in ids], np.float64)
        nll = np.array([part[i]["nll"] for i in ids], np.float64)
        both = [i for i in ids if math.isfinite(part[i]["nll"]) and math.isfinite(base[i]["nll"])]
        increase = np.array([part[i]["nll"] - base[i]["nll"] for i in both], np.float64)
        row = {"alpha": alpha, "n": len(ids), column: float(np.mean([part[i][column] for i in ids]))}
        for name, values in (("effect", effect), ("nll", nll[np.isfinite(nll)]), ("nll_increase", increase)):
            row[name] = float(values.mean()) if len(values) else math.nan
            row[f"{name}_lo"], row[f"{name}_hi"] = bootstrap_interval(values) if len(values) else (math.nan,) * 2
        table.append(row)
    return table
