"""A/B behaviour scoring: each answer's log-probability under the steered model, from one batched
prefill pass, and the summary, report and figure of an eval-ab folder.

For a row, vector and alpha, the two sequences are the question (vectors/datasets.py) followed by
each answer, `(B)`; an answer's score is the sum of its tokens' log-probabilities (vLLM's prompt
logprobs, the steered request's own), and p_match = exp(s_match) / (exp(s_match) +
exp(s_not_match)), CAA's normalisation over the two answers.

The prefix cache shares a question between its answers (and between rows that repeat it). vLLM
computes no prompt logprobs for the tokens a request read from the cache, so a score takes each
answer token's log-probability from its own request where it was computed, else from the other
answer's request where both sequences agree up to and including that token (same context, same
token: the same number), else scores that sequence again with the cache unread.

Files: choices.arrow (one row per row x vector x alpha), summary.arrow (per vector and alpha:
n, mean p_match with a 95% bootstrap interval over the rows, and its paired shift from alpha 0),
report.md and p_match.png.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm
from vllm import SamplingParams

from steer_batch.eval.arrow_stream import ArrowStream, read_table, write_table
from steer_batch.eval.report import bootstrap_interval
from steer_batch.eval.runfiles import MANIFEST, REPORT, SUMMARY, require

CHOICES = "choices.arrow"
FIGURE = "p_match.png"
CHOICES_SCHEMA = pa.schema(
    [
        ("row", pa.int32()),  # the record's 0-based number in the data file
        ("vector", pa.string()),
        ("alpha", pa.float32()),
        ("p_match", pa.float64()),
        ("logprob_match", pa.float64()),
        ("logprob_not_match", pa.float64()),
        ("match_token_ids", pa.list_(pa.int32())),  # the whole sequences scored
        ("not_match_token_ids", pa.list_(pa.int32())),
        ("answer_start", pa.int32()),  # the index of the first answer token in both
    ]
)
KEY = ["row", "vector", "alpha"]
FLUSH_SECONDS = 2.0


def p_match(logprob_match: float, logprob_not_match: float) -> float:
    """exp(m) / (exp(m) + exp(n)), without overflow."""
    return 1.0 / (1.0 + math.exp(logprob_not_match - logprob_match)) if logprob_not_match - logprob_match < 700 else 0.0


@dataclass
class Pair:
    """One (row, vector, alpha): both sequences, where the answers start, the request's steering."""

    row: int
    vector: str
    alpha: float
    sequences: tuple[list[int], list[int]]  # (match, not match)
    start: int
    extra_args: dict | None


class _Sides:
    """What the engine returned for a pair's two sequences: per side, each token's log-probability
    where its request computed it (None where the request read it from the prefix cache)."""

    def __init__(self, pair: Pair):
        self.pair = pair
        self.logprobs: list[list[float | None] | None] = [None, None]
        self.retried = [False, False]

    def take(self, side: int, output) -> None:
        ids = self.pair.sequences[side]
        computed_from = max(output.num_cached_tokens or 0, 0) + 1  # token i's logprob needs position i - 1 computed
        found = [None] * len(ids)
        for i in range(max(self.pair.start, computed_from), len(ids)):
            found[i] = output.prompt_logprobs[i][ids[i]].logprob
        self.logprobs[side] = found

    def missing(self) -> list[int]:
        """The sides to score again with the cache unread (neither request computed one of their
        answer tokens); [] when both scores are complete or a side is still running."""
        if None in self.logprobs:
            return []
        return [side for side in (0, 1) if None in self._answer(side)]

    def _answer(self, side: int) -> list[float | None]:
        mine, theirs = self.pair.sequences[side], self.pair.sequences[1 - side]
        common = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        own, other = self.logprobs[side], self.logprobs[1 - side]
        return [
            own[i] if own[i] is not None else other[i] if i < common else None
            for i in range(self.pair.start, len(mine))
        ]

    def row(self) -> dict:
        match, not_match = (float(np.sum(self._answer(side))) for side in (0, 1))
        p = self.pair
        return {
            "row": p.row,
            "vector": p.vector,
            "alpha": p.alpha,
            "p_match": p_match(match, not_match),
            "logprob_match": match,
            "logprob_not_match": not_match,
            "match_token_ids": p.sequences[0],
            "not_match_token_ids": p.sequences[1],
            "answer_start": p.start,
        }


def score(llm, pairs: list[Pair], writer: ArrowStream, progress: bool = True) -> dict[str, int]:
    """Score every pair on `llm` (one batch, prefill only), writing each finished row to `writer`
    every FLUSH_SECONDS; returns counts: sequences, their tokens, the tokens read from the prefix
    cache, and the sequences scored again."""
    engine = llm.llm_engine
    sides = [_Sides(p) for p in pairs]
    # vLLM's engine input of each distinct sequence (its renderer, as LLM.generate uses it), made
    # once however many vectors and alphas score it.
    distinct = list(dict.fromkeys(tuple(seq) for p in pairs for seq in p.sequences))
    rendered = dict(zip(distinct, llm.renderer.render_cmpl([{"prompt_token_ids": list(s)} for s in distinct])))
    counts = {"sequences": 0, "tokens": 0, "cached_tokens": 0, "rescored": 0}

    def submit(k: int, side: int, fresh: bool) -> None:
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
            skip_reading_prefix_cache=fresh,
            detokenize=False,
            extra_args=pairs[k].extra_args,
        )
        engine.add_request(f"{k}-{side}-{int(fresh)}", dict(rendered[tuple(pairs[k].sequences[side])]), params)

    for k in range(len(pairs)):
        for side in (0, 1):
            submit(k, side, fresh=False)
    pending, last_flush, start = [], time.monotonic(), time.monotonic()
    bar = tqdm(total=len(pairs), unit="row", disable=not progress, file=sys.stderr, desc="scoring", mininterval=1.0)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if not output.finished:
                continue
            k, side, fresh = (int(x) for x in output.request_id.split("-"))
            s = sides[k]
            s.take(side, output)
            counts["sequences"] += 1
            counts["tokens"] += len(pairs[k].sequences[side])
            counts["cached_tokens"] += max(output.num_cached_tokens or 0, 0)
            again = s.missing()
            for other in again:
                if s.retried[other]:  # a request that read no cache computed every position
                    raise RuntimeError(f"vLLM returned no prompt logprobs for request {output.request_id}")
                s.logprobs[other], s.retried[other] = None, True
                counts["rescored"] += 1
                submit(k, other, fresh=True)
            if None not in s.logprobs and not again:
                pending.append(s.row())
                bar.update(1)
                bar.set_postfix_str(f"{counts['tokens'] / (time.monotonic() - start):.0f} tok/s", refresh=False)
        if pending and time.monotonic() - last_flush >= FLUSH_SECONDS:
            writer.write(pending)
            pending, last_flush = [], time.monotonic()
    writer.write(pending)
    bar.close()
    return counts


def summarize(out: Path) -> pa.Table:
    """One row per (vector, alpha), in the file's vector order and by alpha: n, p_match and its
    paired shift from alpha 0 (the same rows: the vector's own alpha 0, else the first vector's,
    which a sweep's slices share), each with a 95% bootstrap interval."""
    choices = read_table(require(out, CHOICES, f"run `steer-batch eval-ab ... --out {out}`"))
    by_vector: dict[str, dict[float, dict[int, float]]] = {}
    for vector in dict.fromkeys(choices.column("vector").to_pylist()):
        of_vector = choices.filter(pc.equal(choices.column("vector"), vector))
        by_alpha = by_vector[vector] = {}
        for alpha in sorted(set(of_vector.column("alpha").to_pylist())):
            part = of_vector.filter(pc.equal(of_vector.column("alpha"), pa.scalar(alpha, pa.float32())))
            by_alpha[alpha] = dict(zip(part.column("row").to_pylist(), part.column("p_match").to_pylist()))
    shared = next((by_alpha[0.0] for by_alpha in by_vector.values() if 0.0 in by_alpha), {})
    rows = []
    for vector, by_alpha in by_vector.items():
        base = by_alpha.get(0.0, shared)
        for alpha, values in by_alpha.items():
            keys = sorted(values)  # the resampling does not depend on the order rows were written
            p = np.array([values[r] for r in keys])
            paired = [r for r in keys if r in base]
            shift = np.array([values[r] - base[r] for r in paired])
            row = {"vector": vector, "alpha": alpha, "n": len(p), "p_match": float(p.mean())}
            row["p_match_lo"], row["p_match_hi"] = bootstrap_interval(p)
            row["shift"] = float(shift.mean()) if len(shift) else float("nan")
            row["shift_lo"], row["shift_hi"] = bootstrap_interval(shift) if len(shift) else (float("nan"),) * 2
            rows.append(row)
    return pa.Table.from_pylist(rows)


def plot(summary: pa.Table, path: Path, title: str) -> None:
    """p_match against alpha, one line per vector, with the intervals; 0.5 marked."""
    # matplotlib loads only when a figure is drawn: jobs/bench.py imports this module to score, not to plot.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.4), dpi=130)
    for vector in dict.fromkeys(summary.column("vector").to_pylist()):
        part = summary.filter(pc.equal(summary.column("vector"), vector))
        alphas = part.column("alpha").to_numpy()
        line = ax.plot(alphas, part.column("p_match").to_numpy(), marker="o", label=vector)[0]
        lo, hi = part.column("p_match_lo").to_numpy(), part.column("p_match_hi").to_numpy()
        ax.fill_between(alphas, lo, hi, color=line.get_color(), alpha=0.2)
    ax.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
    ax.set_ylim(0, 1)
    ax.set_xlabel("steering alpha")
    ax.set_ylabel("p(answer matching the behaviour), mean and 95% interval")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(out: Path) -> pa.Table:
    """Write summary.arrow, report.md and p_match.png into `out`; return the summary."""
    summary = summarize(out)
    write_table(out / SUMMARY, summary)
    manifest = json.loads(require(out, MANIFEST, f"run `steer-batch eval-ab ... --out {out}`").read_text())
    spec = manifest["spec"]
    data = spec["data"]
    title = f"{Path(spec['model']).name}, {Path(data['file']).name} rows {data['rows']} ({spec['num_rows']} questions)"
    lines = [
        f"# Behaviour eval: {out.name}",
        "",
        f"- model: `{spec['model']}`",
        f"- data: `{data['file']}` rows {data['rows']} ({spec['num_rows']} questions, sha256 {data['sha256'][:12]})",
        *(f"- vector `{name}`: `{v['path']}` (sha256 {v['sha256'][:12]})" for name, v in spec["vectors"].items()),
        f"- op `{spec['op']}`, scope `{spec['scope']}`",
        "",
        "| vector | alpha | n | p_match | shift from alpha 0 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in summary.to_pylist():
        lines.append(
            f"| {r['vector']} | {r['alpha']:+g} | {r['n']} | {r['p_match']:.3f} [{r['p_match_lo']:.3f}, "
            f"{r['p_match_hi']:.3f}] | {r['shift']:+.3f} [{r['shift_lo']:+.3f}, {r['shift_hi']:+.3f}] |"
        )
    plot(summary, out / FIGURE, title)
    lines += [
        "",
        f"![p_match by alpha]({FIGURE})",
        "",
        "p_match: the probability of the answer matching the behaviour, normalised over the two answers, under the "
        "steered model; means over the questions with 95% bootstrap intervals; shift: paired with the same "
        "questions at alpha 0.",
    ]
    (out / REPORT).write_text("\n".join(lines) + "\n")
    return summary
