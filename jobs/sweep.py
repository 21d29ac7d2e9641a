"""`steer-batch sweep`: which layers and which alpha, the whole grid in one batched pass.

Each layer set is the vector restricted to those layers (vectors/slices.py), saved as a slice
`NAME@LABEL` into OUT/slices/; one `run` generates every prompt x slice x alpha in one engine
(alpha 0, unsteered, once per prompt: every slice shares it), classifies and reports. Per cell
(layer set, alpha): the effect, the paired shift of p_target from alpha 0 on the same prompts,
and the coherence cost, the nll increase, each with a 95% paired bootstrap interval
(jobs/calibrate.py's effect_rows). The recommended cell: the largest effect toward the target
whose nll increase stays within the budget; and the best such cell of each layer set.

Files in OUT, beside the run's own: sweep.arrow (one row per cell), sweep.json (the
recommendation), sweep.png (effect and nll increase as layer sets x alpha heatmaps, the
recommended cell marked), sweep.md. The same command resumes; a changed budget or target
recomputes the table without generating.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from steer_batch.errors import SteerBatchError
from steer_batch.eval.arrow_stream import read_table, write_table
from steer_batch.eval.runfiles import SENTIMENT, require
from steer_batch.jobs.calibrate import DEFAULT_MAX_NLL_INCREASE, DEFAULT_SAMPLE, TARGETS, effect_rows
from steer_batch.jobs.extract import default_vector
from steer_batch.jobs.models import resolve_model
from steer_batch.jobs.run import DEFAULT_VECTOR_NAME, SLICES, run
from steer_batch.vectors.slices import layer_sets, slice_name
from steer_batch.vectors.vector import SteeringVector

SWEEP_ARROW = "sweep.arrow"
SWEEP_JSON = "sweep.json"
SWEEP_FIGURE = "sweep.png"
SWEEP_REPORT = "sweep.md"


def slices(vector_name: str, vector_path: Path, sets: list[list[int]], folder: Path) -> dict[str, Path]:
    """Write each layer set's slice of the vector into `folder`; name -> file, in set order."""
    vector = SteeringVector.load(vector_path)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for layers in sets:
        name = slice_name(vector_name, layers)
        files[name] = folder / f"{name}.safetensors"
        if not files[name].is_file():
            vector.restricted(layers).save(files[name])
    return files


def sweep_table(out: Path, target: str, max_nll_increase: float) -> tuple[pa.Table, dict]:
    """(one row per cell, the recommendation) from a classified sweep folder."""
    if target not in TARGETS:
        raise SteerBatchError(f"target={target!r}; allowed: {list(TARGETS)}", param="target")
    rows = read_table(require(out, SENTIMENT, f"classify it with `steer-batch classify {out}`")).to_pylist()
    by_slice: dict[str, dict[float, dict[int, dict]]] = {}
    for r in rows:
        by_slice.setdefault(r["vector"], {}).setdefault(float(r["alpha"]), {})[r["prompt_id"]] = r
    base = next((cells[0.0] for cells in by_slice.values() if 0.0 in cells), None)
    if base is None:
        raise SteerBatchError(f"{out} has no alpha 0 to compare with", param="alphas")
    table = []
    for name, by_alpha in by_slice.items():
        steered = {a: part for a, part in by_alpha.items() if a != 0.0}
        for row in effect_rows(steered, base, target):
            table.append({"layers": name.partition("@")[2], "vector": name, **row})
    within = [r for r in table if r["nll_increase"] <= max_nll_increase and math.isfinite(r["effect"])]
    best = max(within, key=lambda r: r["effect"], default=None)
    per_set = {}
    for r in within:
        if r["layers"] not in per_set or r["effect"] > per_set[r["layers"]]["effect"]:
            per_set[r["layers"]] = r
    pick = ("layers", "alpha", "effect", "effect_lo", "effect_hi", "nll_increase")
    recommendation = {
        "target": target,
        "max_nll_increase": max_nll_increase,
        "recommended": {k: best[k] for k in pick} if best and best["effect"] > 0 else None,
        "best_per_layer_set": {s: {k: r[k] for k in pick} for s, r in per_set.items()},
    }
    return pa.Table.from_pylist(table), recommendation


def plot(table: pa.Table, recommendation: dict, path: Path, title: str) -> None:
    """Effect and nll increase as layer sets x alpha heatmaps side by side, the recommended cell
    marked."""
    import matplotlib  # only here, as in eval/report.py: cli.py imports this module as it starts

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.to_pylist()
    sets = list(dict.fromkeys(r["layers"] for r in rows))
    alphas = sorted({r["alpha"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(sets) + 2.4), dpi=130)
    for ax, name, cmap, label in (
        (axes[0], "effect", "RdBu", f"effect: shift of p_{recommendation['target']} from alpha 0"),
        (axes[1], "nll_increase", "Reds", "nll increase from alpha 0 (nats/token)"),
    ):
        grid = np.full((len(sets), len(alphas)), np.nan)
        for r in rows:
            grid[sets.index(r["layers"]), alphas.index(r["alpha"])] = r[name]
        limit = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
        image = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=-limit if name == "effect" else 0, vmax=limit or 1.0)
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_yticks(range(len(sets)), sets)
        ax.set_xlabel("alpha")
        ax.set_ylabel("layers")
        ax.set_title(label, fontsize=8)
        fig.colorbar(image, ax=ax)
        chosen = recommendation["recommended"]
        if chosen:
            i, j = sets.index(chosen["layers"]), alphas.index(chosen["alpha"])
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
    fig.suptitle(f"{title}; budget {recommendation['max_nll_increase']} nats (box: recommended)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(table: pa.Table, recommendation: dict, path: Path, title: str) -> None:
    chosen = recommendation["recommended"]
    lines = [
        f"# Sweep: {title}",
        "",
        f"Target `{recommendation['target']}`, nll budget {recommendation['max_nll_increase']} nats per token.",
        "Recommended: "
        + (
            f"layers {chosen['layers']} at alpha {chosen['alpha']:g} (effect {chosen['effect']:+.3f})"
            if chosen
            else "none"
        ),
        "",
        "| layers | alpha | n | effect [95% CI] | nll increase [95% CI] |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in table.to_pylist():
        lines.append(
            f"| {r['layers']} | {r['alpha']:+g} | {r['n']} | {r['effect']:+.3f} [{r['effect_lo']:+.3f}, "
            f"{r['effect_hi']:+.3f}] | {r['nll_increase']:+.3f} [{r['nll_increase_lo']:+.3f}, "
            f"{r['nll_increase_hi']:+.3f}] |"
        )
    lines += ["", f"![sweep]({SWEEP_FIGURE})", ""]
    path.write_text("\n".join(lines))


def sweep(
    out: Path,
    *,
    model: str | Path | None = None,
    vector: dict[str, Path] | None = None,
    layers: str | None = None,
    window: int | None = None,
    stride: int | None = None,
    alphas: list[float] = (-8.0, -4.0, 0.0, 4.0, 8.0),
    sample: int = DEFAULT_SAMPLE,
    max_nll_increase: float = DEFAULT_MAX_NLL_INCREASE,
    target: str = "positive",
    classifier: str | None = None,
    prompts: Path | None = None,
    **run_kwargs,
) -> dict:
    """Sweep `vector` (name -> file; default: the model's happy - sad vector) over its layer sets
    (`layers`: "each", ranges like "8-11,12-15", or windows of `window` moved by `stride`;
    default windows of 4) at every alpha (0 added) on `sample` prompts into `out`; write and return
    sweep.json's content. `run_kwargs` go to jobs.run.run."""
    if target not in TARGETS:
        raise SteerBatchError(f"target={target!r}; allowed: {list(TARGETS)}", param="target")
    if not (max_nll_increase > 0 and math.isfinite(max_nll_increase)):
        raise SteerBatchError(
            f"max_nll_increase={max_nll_increase}; give a positive number of nats", param="max_nll_increase"
        )
    if vector is not None and len(vector) != 1:
        raise SteerBatchError(f"sweep one vector at a time, got {len(vector)}", param="vector")
    out = Path(out)
    name, path = next(iter(vector.items())) if vector else (DEFAULT_VECTOR_NAME, None)
    path = Path(path) if path is not None else default_vector(resolve_model(model))
    sets = layer_sets(layers, SteeringVector.load(path).layers, window, stride)
    files = slices(name, path, sets, out / SLICES)
    run(
        out,
        model=model,
        vectors=files,
        alphas=sorted({*alphas, 0.0}),
        prompts=prompts,
        sample=sample,
        classifier=classifier,
        zero_once=True,
        **run_kwargs,
    )
    table, recommendation = sweep_table(out, target, max_nll_increase)
    write_table(out / SWEEP_ARROW, table)
    (out / SWEEP_JSON).write_text(json.dumps(recommendation, indent=2))
    title = f"{name}, {len(sets)} layer sets x {len(table) // max(len(sets), 1)} alphas, {sample} prompts"
    plot(table, recommendation, out / SWEEP_FIGURE, title)
    write_report(table, recommendation, out / SWEEP_REPORT, title)
    return recommendation
