"""Pick alpha by effect and coherence: one run over a sample of prompts at every alpha (one
batch holds them all), classified and scored, then per alpha

- effect: the mean shift of the target class probability from alpha 0, prompt by prompt;
- nll: the mean negative log-likelihood per token under the unsteered model (eval/coherence.py),
  and nll_increase, its mean shift from alpha 0, prompt by prompt;

each with a 95% paired bootstrap interval (eval/effects.py: the table a sweep of one layer set
makes), and the recommended alphas: on each side of 0, walking outward, the last alpha before the first
whose nll increase exceeds the budget.

Files in the calibration folder, beside the run's own: calibration.arrow (one row per alpha),
calibration.json (the recommendation), calibration.png (effect and nll increase against alpha).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from steer_batch.errors import SteerBatchError
from steer_batch.eval.arrow_stream import write_table
from steer_batch.eval.effects import DEFAULT_MAX_NLL_INCREASE, cells, check_budget
from steer_batch.jobs.models import resolve_model

# cli.py imports this module for its defaults as it starts; jobs/run.py (vLLM, about 9 s) loads
# inside the functions that run a job, so `steer-batch --help` does not wait for it.

DEFAULT_SAMPLE = 128
DEFAULT_ALPHAS = "-8:8:17"
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

    check_budget(target, max_nll_increase)
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
    classified run folder with one vector and alpha 0 among its alphas: a sweep of one layer set
    (eval/effects.py's cells)."""
    (rows,) = cells(out, target).values()
    table = pa.Table.from_pylist(rows)
    return table, recommend(
        table.column("alpha").to_pylist(), table.column("nll_increase").to_pylist(), max_nll_increase
    )


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
