"""`steer-batch sweep`: which layers and which alpha, the whole grid in one batched pass.

Each layer set is the vector restricted to those layers (vectors/slices.py), saved as a slice
`NAME@LABEL` into OUT/slices/; one `run` generates every prompt x slice x alpha in one engine
(alpha 0, unsteered, once per prompt: every slice shares it), classifies and scores it. Per cell
(layer set, alpha), each with a 95% paired bootstrap interval:

- the effect: with a sentiment target, the paired shift of p_target from alpha 0 on the same
  prompts (eval/effects.py, the table `calibrate` makes for one layer set); with `ab` (an A/B
  behaviour file), the paired shift of p_match (of 1 - p_match for the target "not_match"),
  scored as `eval-ab` scores it into OUT/ab in one prefill pass of a second engine;
- the coherence cost: the nll increase of the generated text under the unsteered model.

The recommended cell: the largest effect toward the target whose nll increase stays within the
budget; and the best such cell of each layer set. Files in OUT, beside the run's own:
sweep.arrow (one row per cell), sweep.json (the recommendation), sweep.png (effect and nll
increase as layer sets x alpha heatmaps, the recommended cell boxed), sweep.md. Every input,
the folder and the engine's bank are checked before anything is written; the same command
resumes; a changed budget or target recomputes the table without generating.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from steer_batch.engine.config import MAX_BANK_ROWS
from steer_batch.errors import SteerBatchError
from steer_batch.eval.arrow_stream import write_table
from steer_batch.eval.choices import summarize
from steer_batch.eval.effects import AB_TARGETS, DEFAULT_MAX_NLL_INCREASE, TARGETS, cells, check_budget
from steer_batch.eval.runfiles import MANIFEST
from steer_batch.jobs.calibrate import DEFAULT_SAMPLE
from steer_batch.jobs.eval_ab import eval_ab
from steer_batch.jobs.extract import default_vector
from steer_batch.jobs.models import resolve_model
from steer_batch.jobs.run import AB_SCORES, DEFAULT_VECTOR_NAME, SLICES, run
from steer_batch.vectors.slices import layer_sets, slice_name
from steer_batch.vectors.vector import SteeringVector

SWEEP_ARROW = "sweep.arrow"
SWEEP_JSON = "sweep.json"
SWEEP_FIGURE = "sweep.png"
SWEEP_REPORT = "sweep.md"


def check_bank(count: int) -> None:
    """Refuse a grid whose slices do not fit one engine's vector bank (a bank row per slice)."""
    if count > MAX_BANK_ROWS:
        raise SteerBatchError(
            f"{count} layer sets need {count} bank rows (one per slice); an engine holds at most {MAX_BANK_ROWS}: "
            "sweep fewer sets (a larger --window or --stride, or fewer --layers ranges)",
            param="layers",
        )


def slices(vector: SteeringVector, name: str, sets: list[list[int]], folder: Path) -> dict[str, Path]:
    """Each layer set's slice of `vector`, name -> file in `folder`, in set order; a file already
    there (a resumed sweep) must hold the same slice."""
    sliced = {folder / f"{slice_name(name, layers)}.safetensors": vector.restricted(layers) for layers in sets}
    for path, part in sliced.items():
        if path.is_file() and not _same(SteeringVector.load(path), part):
            raise SteerBatchError(
                f"{path} is a slice of another vector; choose another --out, or delete that folder to replace it",
                param="vector",
            )
    folder.mkdir(parents=True, exist_ok=True)
    for path, part in sliced.items():
        if not path.is_file():
            part.save(path)
    return {slice_name(name, layers): path for layers, path in zip(sets, sliced)}


def _same(a: SteeringVector, b: SteeringVector) -> bool:
    return a.directions.keys() == b.directions.keys() and all(
        torch.equal(a.directions[i], b.directions[i]) for i in a.directions
    )


def sweep_table(out: Path, target: str, max_nll_increase: float) -> tuple[pa.Table, dict]:
    """(one row per cell, the recommendation) from a classified sweep folder; a target among
    AB_TARGETS reads the effect from the folder's eval-ab scores (OUT/ab)."""
    ab = target in AB_TARGETS
    check_budget(target, max_nll_increase, TARGETS + AB_TARGETS)
    costs = cells(out, "positive" if ab else target)
    shifts = {}
    if ab:
        sign = 1.0 if target == "match" else -1.0
        for r in summarize(out / AB_SCORES).to_pylist():
            lo, hi = sorted((sign * r["shift_lo"], sign * r["shift_hi"]))
            shifts[(r["vector"], r["alpha"])] = {
                "n": r["n"], "p_match": r["p_match"], "effect": sign * r["shift"], "effect_lo": lo, "effect_hi": hi,
            }  # fmt: skip
    table = []
    for name, rows in sorted(costs.items(), key=lambda item: _layer_order(item[0])):
        for row in rows:
            if row["alpha"] == 0.0:
                continue
            if ab:
                row = {k: v for k, v in row.items() if not k.startswith(("effect", "p_"))}
                row = {**shifts[(name, row["alpha"])], "n_generated": row.pop("n"), **row}
            table.append({"layers": name.partition("@")[2], "vector": name, **row})
    per_set = {}  # each layer set's largest effect within the budget
    for r in table:
        if r["nll_increase"] <= max_nll_increase and math.isfinite(r["effect"]):
            if r["layers"] not in per_set or r["effect"] > per_set[r["layers"]]["effect"]:
                per_set[r["layers"]] = r
    best = max(per_set.values(), key=lambda r: r["effect"], default=None)
    pick = ("layers", "alpha", "effect", "effect_lo", "effect_hi", "nll_increase")
    recommendation = {
        "target": target,
        "max_nll_increase": max_nll_increase,
        "recommended": {k: best[k] for k in pick} if best and best["effect"] > 0 else None,
        "best_per_layer_set": {s: {k: r[k] for k in pick} for s, r in per_set.items()},
    }
    return pa.Table.from_pylist(table), recommendation


def _layer_order(name: str) -> list[int]:
    """A slice's layers as numbers (`v@8-11` -> [8, 11], `v@3_5_7` -> [3, 5, 7]): sets by depth."""
    return [int(x) for x in re.split(r"[-_]", name.partition("@")[2]) if x.isdigit()]


def plot(table: pa.Table, recommendation: dict, path: Path, title: str) -> None:
    """Effect and nll increase as layer sets x alpha heatmaps side by side, the recommended cell
    marked."""
    # matplotlib loads only when a figure is drawn: jobs/bench.py imports this module for its slices.
    import matplotlib

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
            dark = abs(value) > 0.6 * (limit or 1.0)
            ax.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
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
    alphas: list[float] = (-8.0, -4.0, 4.0, 8.0),
    ab: Path | None = None,
    rows: str | None = None,
    sample: int = DEFAULT_SAMPLE,
    max_nll_increase: float = DEFAULT_MAX_NLL_INCREASE,
    target: str | None = None,
    classifier: str | None = None,
    prompts: Path | None = None,
    **run_kwargs,
) -> dict:
    """Sweep `vector` (name -> file; default: the model's happy - sad vector) over its layer sets
    (`layers`: "each", ranges like "8-11,12-15", or windows of `window` moved by `stride`;
    default windows of 4) at every alpha (0 added) into `out`; write and return sweep.json's
    content. The effect: on the target class of `sample` generations (target default
    "positive"), or with `ab` on that A/B file's records `rows` "START:STOP" (target "match" or
    "not_match", default "match"; the `sample` generations then give the nll cost only).
    `run_kwargs` go to jobs.run.run (sampling, op, scope, enforce_eager, progress)."""
    target = target or ("match" if ab is not None else "positive")
    check_budget(target, max_nll_increase, AB_TARGETS if ab is not None else TARGETS)
    if vector is not None and len(vector) != 1:
        raise SteerBatchError(f"sweep one vector at a time, got {len(vector)}", param="vector")
    if rows is not None and ab is None:
        raise SteerBatchError("rows select records of an A/B file: give --ab FILE with --rows", param="rows")
    out = Path(out)
    alphas = sorted({*map(float, alphas), 0.0})
    grid = dict(model=model, alphas=alphas, zero_once=True)
    ab_kwargs = dict(
        rows=rows,
        op=run_kwargs.get("op", "add"),
        scope=run_kwargs.get("scope", "all"),
        engine_kwargs={k: v for k, v in run_kwargs.items() if k == "enforce_eager" and v is not None},
        progress=run_kwargs.get("progress", True),
        **grid,
    )

    # What the run and the scoring would refuse, before a slice is written.
    run(out, vectors=vector, prompts=prompts, sample=sample, check_only=True, **grid, **run_kwargs)
    if ab is not None:
        eval_ab(ab, out / AB_SCORES, vectors=vector, check_only=True, **ab_kwargs)
    name, path = next(iter(vector.items())) if vector else (DEFAULT_VECTOR_NAME, None)
    path = Path(path) if path is not None else default_vector(resolve_model(model))
    full = SteeringVector.load(path)
    sets = layer_sets(layers, full.layers, window, stride)
    check_bank(len(sets))
    names = [slice_name(name, s) for s in sets]
    if (out / MANIFEST).is_file():
        before = list(json.loads((out / MANIFEST).read_text())["spec"]["vectors"])
        if before != names:
            raise SteerBatchError(
                f"{out} holds a sweep of other layer sets ({', '.join(before)}); choose another --out, or delete "
                "that folder to replace it",
                param="layers",
            )
    files = slices(full, name, sets, out / SLICES)
    result = run(out, vectors=files, prompts=prompts, sample=sample, classifier=classifier, **grid, **run_kwargs)
    if ab is not None:
        eval_ab(ab, out / AB_SCORES, vectors=files, **ab_kwargs)
    table, recommendation = sweep_table(out, target, max_nll_increase)
    spec = result.manifest["spec"]
    recommendation.update(
        vector={"name": name, "path": str(path.resolve())},
        layer_sets=[s.partition("@")[2] for s in names],
        alphas=alphas,
        model=spec["model"],
        sample=spec["num_prompts"],
        ab=None if ab is None else json.loads((out / AB_SCORES / MANIFEST).read_text())["spec"]["data"],
        classifier=result.classifier,
        folder=str(out),
    )
    write_table(out / SWEEP_ARROW, table)
    (out / SWEEP_JSON).write_text(json.dumps(recommendation, indent=2) + "\n")
    task = f"{Path(ab).name} rows {recommendation['ab']['rows']}" if ab is not None else f"{sample} prompts"
    title = f"{Path(spec['model']).name}, {name}: {len(sets)} layer sets x {len(alphas) - 1} alphas, {task}"
    plot(table, recommendation, out / SWEEP_FIGURE, title)
    write_report(table, recommendation, out / SWEEP_REPORT, title)
    return recommendation
