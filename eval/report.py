"""Per-(vector, alpha) summary of a classified run: OUT/summary.arrow, OUT/report.md (one
section per vector) and OUT/sentiment.png (one panel per vector).

For each vector and alpha: n, the mean of p_negative / p_neutral / p_positive with a 95% bootstrap
interval (2000 resamples of the texts, fixed seed), and the cost of steering: `nll`, the mean
negative log-likelihood per token of the texts under the unsteered model (eval/coherence.py),
with its interval, over texts with at least one token; and `repetition`, the share of repeated
token bigrams in a text (0 = every bigram new, near 1 = one bigram over and over), averaged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from steer_batch.eval.arrow_stream import read_table, write_table
from steer_batch.eval.runfiles import FIGURE, GENERATIONS, KEY, MANIFEST, REPORT, SENTIMENT, SUMMARY, require

CLASSES = ("p_negative", "p_neutral", "p_positive")
RESAMPLES = 2000


def repetition(token_ids: list[int]) -> float:
    bigrams = list(zip(token_ids, token_ids[1:]))
    return 1.0 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def bootstrap_interval(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (RESAMPLES, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize(out: Path) -> pa.Table:
    """One row per (vector, alpha), in the run's vector order and by alpha."""
    generations = read_table(require(out, GENERATIONS, f"run `steer-batch run --out {out}`"))
    sentiment = read_table(require(out, SENTIMENT, f"classify it with `steer-batch classify {out}`"))
    reps = pa.array([repetition(t) for t in generations.column("token_ids").to_pylist()], pa.float64())
    # Arrow joins cannot carry list columns: join the per-text repetition instead of token_ids.
    joined = sentiment.join(generations.select(KEY).append_column("repetition", reps), keys=KEY)
    vectors = list(dict.fromkeys(generations.column("vector").to_pylist()))
    rows = []
    for vector in vectors:
        of_vector = joined.filter(pc.equal(joined.column("vector"), vector))
        for alpha in sorted(set(of_vector.column("alpha").to_pylist())):
            part = of_vector.filter(pc.equal(of_vector.column("alpha"), pa.scalar(alpha, pa.float32())))
            part = part.sort_by("prompt_id")  # the resampling then does not depend on the order rows were written
            row = {
                "vector": vector,
                "alpha": alpha,
                "n": part.num_rows,
                "classifier": ",".join(sorted(set(part.column("classifier").to_pylist()))),
            }
            for name in CLASSES:
                values = part.column(name).to_numpy().astype(np.float64)
                row[name] = float(values.mean())
                row[f"{name}_lo"], row[f"{name}_hi"] = bootstrap_interval(values)
            nll = part.column("nll").to_numpy()
            nll = nll[np.isfinite(nll)]  # rows without tokens have none
            row["nll"] = float(nll.mean()) if len(nll) else float("nan")
            row["nll_lo"], row["nll_hi"] = bootstrap_interval(nll) if len(nll) else (float("nan"),) * 2
            row["repetition"] = float(part.column("repetition").to_numpy().mean())
            rows.append(row)
    return pa.Table.from_pylist(rows)


def plot(summary: pa.Table, path: Path, title: str) -> None:
    """One column per vector: the mean class probabilities against alpha above, the nll below."""
    # cli.py imports this module (through jobs/calibrate.py) as it starts: matplotlib loads only here.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vectors = list(dict.fromkeys(summary.column("vector").to_pylist()))
    fig, axes = plt.subplots(
        2, len(vectors), figsize=(6.4 * len(vectors), 6.8), dpi=130, squeeze=False, height_ratios=(3, 2), sharex="col"
    )
    for ax, low, vector in zip(axes[0], axes[1], vectors):
        part = summary.filter(pc.equal(summary.column("vector"), vector))
        alphas = part.column("alpha").to_numpy()
        for name, color in zip(CLASSES, ("#c0392b", "#7f8c8d", "#27ae60")):
            mean = part.column(name).to_numpy()
            lo, hi = part.column(f"{name}_lo").to_numpy(), part.column(f"{name}_hi").to_numpy()
            ax.plot(alphas, mean, marker="o", color=color, label=name.removeprefix("p_"))
            ax.fill_between(alphas, lo, hi, color=color, alpha=0.2)
        ax.set_ylabel("mean class probability (95% bootstrap interval)")
        ax.set_ylim(0, 1)
        ax.set_title(f"{title}\n{vector}", fontsize=8)
        ax.legend()
        ax.grid(alpha=0.3)
        nll = part.column("nll").to_numpy()
        low.plot(alphas, nll, marker="o", color="#2c3e50")
        low.fill_between(
            alphas, part.column("nll_lo").to_numpy(), part.column("nll_hi").to_numpy(), color="#2c3e50", alpha=0.2
        )
        low.set_xlabel(f"steering alpha ({vector})")
        low.set_ylabel("nll per token, unsteered model")
        low.set_xticks(alphas)
        low.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(out: Path) -> pa.Table:
    """Write summary.arrow, report.md and sentiment.png into `out`; return the summary."""
    summary = summarize(out)
    write_table(out / SUMMARY, summary)
    manifest = json.loads(require(out, MANIFEST, f"run `steer-batch run --out {out}`").read_text())
    spec = manifest["spec"]
    classifier = ",".join(sorted(set(summary.column("classifier").to_pylist())))
    title = f"{Path(spec['model']).name}, {classifier}, {spec['num_prompts']} prompts per alpha"
    lines = [
        f"# Steering report: {out.name}",
        "",
        f"- model: `{spec['model']}`",
        *(f"- vector `{name}`: `{v['path']}` (sha256 {v['sha256'][:12]})" for name, v in spec["vectors"].items()),
        f"- op `{spec['op']}`, scope `{spec['scope']}`",
        f"- prompts: {spec['num_prompts']} from `{spec['prompts_file']}`; sampling {spec['sampling']}",
        f"- classifier: {classifier}",
    ]
    rows = summary.to_pylist()
    for vector in dict.fromkeys(r["vector"] for r in rows):
        lines += [
            "",
            f"## {vector}",
            "",
            "| alpha | n | p_negative | p_neutral | p_positive | nll | repetition |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in (r for r in rows if r["vector"] == vector):
            cells = [f"{r[c]:.3f} [{r[c + '_lo']:.3f}, {r[c + '_hi']:.3f}]" for c in (*CLASSES, "nll")]
            lines.append(f"| {r['alpha']:+g} | {r['n']} | {' | '.join(cells)} | {r['repetition']:.3f} |")
    plot(summary, out / FIGURE, title)
    lines += [
        "",
        f"![sentiment by alpha]({FIGURE})",
        "",
        "Means with 95% bootstrap intervals. nll: mean negative log-likelihood per token (nats) of the texts under "
        "the unsteered model (higher: less coherent); repetition: share of repeated token bigrams.",
    ]
    (out / REPORT).write_text("\n".join(lines) + "\n")
    return summary
