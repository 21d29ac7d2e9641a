"""Pick alpha by effect and coherence: one run over a sample of prompts at every alpha (one
batch holds them all), classified and scored, then per alpha

- effect: the mean shift of the target class probability from alpha 0, prompt by prompt;
- nll: the mean negative log-likelihood per token under the unsteered model (eval/coherence.py),
  and nll_increase, its mean shift from alpha 0, prompt by prompt;

each with a 95% paired bootstrap interval (the prompts resampled, eval/report.py's resampler),
and the recommended alphas: on each side of 0, walking outward, the last alpha before the first
whose nll increase exceeds the budget.

Files in the calibration folder, beside the run's own: calibration.arrow (one row per alpha),
calibration.json (the recommendation), calibration.png (effect and nll increase against alpha).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from steer_batch.errors import SteerBatchError
from steer_batch.eval.arrow_stream import read_table, write_table
from steer_batch.eval.report import bootstrap_interval
from steer_batch.eval.runfiles import SENTIMENT, require
from steer_batch.jobs.models import resolve_model

# cli.py imports this module for its defaults as it starts; jobs/run.py (vLLM, about 9 s) loads
# inside the functions that run a job, so `steer-batch --help` does not wait for it.

TARGETS = ("negative", "neutral", "positive")
DEFAULT_SAMPLE = 128
DEFAULT_ALPHAS = "-8:8:17"
# Nats per token: steered text may be up to e^0.5 = 1.65x less likely per token, on average, than
# the unsteered model finds it. On the default model the readable alpha +-4 costs about 0.4.
DEFAULT_MAX_NLL_INCREASE = 0.5
CALIBRATION_ARROW = "calibration.arrow"
CALIBRATION_JSON = "calibration.json"
CALIBRATION_FIGURE = "calibration.png"


def calibrate(
    out: Path,
    *,
    model: str | Path | None = None,
    vector: dict[str, Path] | None = None,
    alphas: list[float] | None = None,
    sample: int = DEFAULT_SAMPLE,
    max_nll_increase: float = DEFAULT_MAX_NLL_INCREASE,
    target: str = "positive",
    classifier: str | None = None,
    prompts: Path | None = None,
    **run_kwargs,
) -> dict:
    """Run `vector` (name -> file; default: the model's happy - sad vector) at every alpha (0 is
    added when missing) on `sample` prompts into `out`, then write and return the calibration
    (calibration.json's content). `run_kwargs` go to jobs.run.run (sampling, op, scope,
    enforce_eager...)."""
    from steer_batch.jobs.run import parse_alphas, run

    if target not in TARGETS:
        raise SteerBatchError(f"target={target!r}; allowed: {list(TARGETS)}", param="target")
    if not (max_nll_increase > 0 and math.isfinite(max_nll_increase)):
        raise SteerBatchError(
            f"max_nll_increase={max_nll_increase}; give a positive number of nats", param="max_nll_increase"
        )
    if vector is not None and len(vector) != 1:
        raise SteerBatchError(f"calibrate one vector at a time, got {len(vector)}", param="vector")
    alphas = sorted({*(parse_alphas(DEFAULT_ALPHAS) if alphas is None else alphas), 0.0})
    result = run(
        out,
        model=model,
        vectors=vector,
        alphas=alphas,
        prompts=prompts,
        sample=sample,
        classifier=classifier,
        **run_kwargs,
    )
    table, chosen = calibration_table(result.out, target, max_nll_increase)
    write_table(result.out / CALIBRATION_ARROW, table)
    spec = result.manifest["spec"]
    name, file = next(iter(spec["vectors"].items()))
    calibration = {
        "recommended": chosen,
        "toward_target": toward_target(table, chosen),
        "target": target,
        "max_nll_increase": max_nll_increase,
        "vector": {**file, "name": name},
        "model": spec["model"],
        "sample": spec["num_prompts"],  # the prompts the run sampled
        "alphas": alphas,
        "classifier": result.classifier,
        "folder": str(result.out),
    }
    (result.out / CALIBRATION_JSON).write_text(json.dumps(calibration, indent=2) + "\n")
    plot(table, calibration, result.out / CALIBRATION_FIGURE)
    return calibration


def calibration_table(out: Path, target: str, max_nll_increase: float) -> tuple[pa.Table, dict]:
    """(one row per alpha, {"negative": alpha or None, "positive": alpha or None}) from a
    classified run folder with one vector and alpha 0 among its alphas."""
    rows = read_table(require(out, SENTIMENT, f"classify it with `steer-batch classify {out}`")).to_pylist()
    by_alpha: dict[float, dict[int, dict]] = {}
    for r in rows:
        by_alpha.setdefault(float(r["alpha"]), {})[r["prompt_id"]] = r
    if 0.0 not in by_alpha:
        raise SteerBatchError(
            f"{out} has no alpha 0 to compare with; calibrate with 0 among the alphas", param="alphas"
        )
    table = pa.Table.from_pylist(effect_rows(by_alpha, by_alpha[0.0], target))
    return table, recommend(
        table.column("alpha").to_pylist(), table.column("nll_increase").to_pylist(), max_nll_increase
    )


def effect_rows(by_alpha: dict[float, dict[int, dict]], base: dict[int, dict], target: str) -> list[dict]:
    """Per alpha (sorted), over the prompts it shares with `base` (the unsteered rows, by
    prompt_id): n, the mean p_target, and the effect (p_target's shift from base), the nll and the
    nll increase over base, each with a 95% paired bootstrap interval."""
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


def recommend(alphas: list[float], nll_increase: list[float], budget: float) -> dict[str, float | None]:
    """On each side of 0, walking outward from it: the last alpha before the first whose nll
    increase exceeds `budget` (or is unknown: no tokens to score); None when the first does."""
    increase = dict(zip(alphas, nll_increase))
    chosen: dict[str, float | None] = {}
    for side, outward in (
        ("negative", sorted((a for a in alphas if a < 0), reverse=True)),
        ("positive", sorted(a for a in alphas if a > 0)),
    ):
        chosen[side] = None
        for alpha in outward:
            if not increase[alpha] <= budget:  # NaN counts as over
                break
            chosen[side] = alpha
    return chosen


def toward_target(table: pa.Table, chosen: dict[str, float | None]) -> str | None:
    """The side whose recommended alpha raises the target class more ("negative"/"positive"),
    None when neither raises it."""
    effects = dict(zip(table.column("alpha").to_pylist(), table.column("effect").to_pylist()))
    gains = {side: effects[a] for side, a in chosen.items() if a is not None and effects[a] > 0}
    return max(gains, key=gains.get) if gains else None


def plot(table: pa.Table, calibration: dict, path: Path) -> None:
    """Effect (left axis) and nll increase (right axis) against alpha, with their intervals, the
    budget and the recommended alphas."""
    import matplotlib  # only here, as in eval/report.py: cli.py imports this module as it starts

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = np.array(table.column("alpha").to_pylist())
    fig, ax = plt.subplots(figsize=(7.4, 4.4), dpi=130)
    cost = ax.twinx()
    for axis, name, color, label in (
        (ax, "effect", "#27ae60", f"effect: shift of p_{calibration['target']} from alpha 0"),
        (cost, "nll_increase", "#c0392b", "nll increase from alpha 0 (nats/token)"),
    ):
        axis.plot(alphas, table.column(name).to_numpy(), marker="o", color=color, label=label)
        axis.fill_between(
            alphas, table.column(f"{name}_lo").to_numpy(), table.column(f"{name}_hi").to_numpy(), color=color, alpha=0.2
        )
        axis.set_ylabel(label, color=color)
    cost.axhline(calibration["max_nll_increase"], color="#c0392b", linestyle=":", label="nll budget")
    for side, alpha in calibration["recommended"].items():
        if alpha is not None:
            ax.axvline(alpha, color="#2c3e50", linestyle="--")
            ax.annotate(
                f"{side}: {alpha:g}", (alpha, 0.02), xycoords=("data", "axes fraction"), rotation=90, fontsize=8
            )
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel(f"steering alpha ({calibration['vector']['name']})")
    ax.set_title(
        f"{Path(calibration['model']).name}, {calibration['sample']} prompts, {calibration['classifier']}", fontsize=8
    )
    ax.grid(alpha=0.3)
    fig.legend(loc="upper center", fontsize=7, ncol=3, bbox_to_anchor=(0.5, 0.93))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_auto(
    out: Path | None = None,
    *,
    model: str | Path | None = None,
    vectors: dict[str, Path] | None = None,
    max_nll_increase: float = DEFAULT_MAX_NLL_INCREASE,
    prompts: Path | None = None,
    classifier: str | None = None,
    **run_kwargs,
):
    """`run --alphas auto`: calibrate into OUT/calibration (the defaults above, the run's
    prompts, sampling, op and scope), then run every prompt at -a, 0, +a with a the smaller of
    the two recommended |alpha| (both sides within the budget), recorded in the manifest."""
    from steer_batch.jobs.run import CALIBRATION, DEFAULT_VECTOR_NAME, run

    if vectors is not None and len(vectors) != 1:
        raise SteerBatchError(f"--alphas auto calibrates one vector, got {len(vectors)}", param="alphas")
    label = next(iter(vectors)) if vectors else DEFAULT_VECTOR_NAME
    out = Path(out) if out is not None else Path("runs") / f"{resolve_model(model).name}-{label}-aauto"
    shared = dict(model=model, prompts=prompts, classifier=classifier, **run_kwargs)
    calibration = calibrate(out / CALIBRATION, vector=vectors, max_nll_increase=max_nll_increase, **shared)
    chosen = calibration["recommended"]
    if None in chosen.values():
        sides = " and ".join(side for side, alpha in chosen.items() if alpha is None)
        raise SteerBatchError(
            f"no alpha keeps the nll increase within {max_nll_increase} on the {sides} "
            f"side (see {out / CALIBRATION / CALIBRATION_JSON}); raise --max-nll-increase or give --alphas",
            param="alphas",
        )
    a = min(-chosen["negative"], chosen["positive"])
    record = {"alpha": a, **{k: calibration[k] for k in ("recommended", "max_nll_increase", "folder")}}
    return run(
        out,
        model=model,
        vectors=vectors,
        alphas=[-a, 0.0, a],
        prompts=prompts,
        classifier=classifier,
        calibration=record,
        **run_kwargs,
    )
