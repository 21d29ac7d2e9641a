"""`steer-batch eval-ab`: an A/B behaviour dataset scored at every vector x alpha in one batched,
prefill-only pass of one steering engine (eval/choices.py), then summarised, reported and
plotted. Like `run`: every input is checked before the engine starts, the folder's manifest
holds the spec, a rerun resumes the rows not yet written, and another job's folder is refused.

    from steer_batch.jobs.eval_ab import eval_ab
    folder = eval_ab("survival-instinct.jsonl", "runs/eval", vectors={"s": "s.safetensors"}, rows="400:")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

from transformers import AutoConfig, AutoTokenizer

from steer_batch.driver.capture import capture_defaults
from steer_batch.driver.launch import check_plugin_allowed, close_llm, make_llm
from steer_batch.engine.config import OPS, SCOPES, steering
from steer_batch.errors import SteerBatchError
from steer_batch.eval.arrow_stream import ArrowStream, read_table
from steer_batch.eval.choices import CHOICES, CHOICES_SCHEMA, KEY, Pair, report, score
from steer_batch.eval.runfiles import MANIFEST, row_keys
from steer_batch.jobs.extract import default_vector, source
from steer_batch.jobs.models import model_hash, resolve_model
from steer_batch.jobs.run import (
    DEFAULT_VECTOR_NAME,
    check_vectors_fit,
    f32,
    grid_rows,
    now,
    prepare_out,
    same_spec,
    vector_files,
    versions,
)
from steer_batch.vectors.datasets import ABItem, ab_sequences, parse_rows, read_ab


@dataclass
class EvalSpec:
    """Everything that determines an eval-ab folder's rows; a resumed job must match it exactly."""

    SETTINGS: ClassVar[str] = "model, data file, rows, vectors, alphas, op or scope"

    model: str
    model_hash: str
    data: dict[str, str]  # file, sha256, rows
    first_row: int
    num_rows: int
    vectors: dict[str, dict[str, str]]
    alphas: list[float]
    op: str = "add"
    scope: str = "all"
    zero_once: bool = False  # alpha 0 (unsteered) with the first vector only (a sweep's slices share it)

    @property
    def rows(self) -> list[tuple[int, str, float]]:
        """(row, vector, alpha) of every row, in submission order."""
        questions = range(self.first_row, self.first_row + self.num_rows)
        return grid_rows(questions, self.vectors, self.alphas, self.zero_once)

    def same_run(self, other: dict, vectors: bool = True) -> bool:
        keys = ("model_hash", "first_row", "num_rows", "alphas", "op", "scope", "zero_once")
        same_data = self.data["sha256"] == other.get("data", {}).get("sha256")
        return same_data and same_spec(self, other, keys, vectors)


def eval_ab(
    data: str | Path,
    out: str | Path | None = None,
    *,
    model: str | Path | None = None,
    vectors: dict[str, Path] | None = None,
    alphas: list[float] = (-4.0, 0.0, 4.0),
    rows: str | None = None,
    op: str = "add",
    scope: str = "all",
    engine_kwargs: dict | None = None,
    progress: bool = True,
    zero_once: bool = False,
    check_only: bool = False,
) -> Path:
    """Score `data` (an A/B behaviour dataset, its records `rows` "START:STOP") at every vector x
    alpha (alpha 0 added when missing: the shifts are paired with it) into `out`; write
    choices.arrow, summary.arrow, report.md, p_match.png and manifest.json; return `out`. vectors: name ->
    file (default: the happy - sad vector of `model`); engine_kwargs go to the engine; zero_once:
    alpha 0 with the first vector only (every vector's shift pairs with it); check_only: refuse
    what can be refused without the vector files' content, write nothing and return."""
    check_plugin_allowed()
    for name, value, allowed in (("op", op, OPS), ("scope", scope, SCOPES)):
        if value not in allowed:
            raise SteerBatchError(f"{name}={value!r}; allowed: {list(allowed)}", param=name)
    if scope == "generated":
        raise SteerBatchError("eval-ab scores the prompt; scope 'generated' would steer nothing", param="scope")
    alphas = [float(a) for a in alphas] + ([] if 0.0 in alphas else [0.0])
    selected = parse_rows(rows)
    items = read_ab(Path(data), selected, param="data")
    model_dir = resolve_model(model)
    sequences = _sequences(model_dir, Path(data), items, (engine_kwargs or {}).get("max_model_len"))
    vectors = {n: Path(p) for n, p in (vectors or {}).items()}
    check_vectors_fit(model_dir, vectors)
    out = Path(out) if out is not None else Path("runs") / f"{model_dir.name}-{Path(data).stem}-eval-ab"
    spec_of = partial(_spec, model_dir, data, selected, items, alphas=alphas, op=op, scope=scope, zero_once=zero_once)
    if not vectors or check_only:  # refuse a wrong folder before the default vector may be extracted
        prepare_out(out, spec_of({}), check_only=True)
        if check_only:
            return out
        vectors = {DEFAULT_VECTOR_NAME: default_vector(model_dir)}
    spec = spec_of(vectors)
    manifest = prepare_out(out, spec)
    writer, done = ArrowStream.open(out / CHOICES, CHOICES_SCHEMA, resume=True)
    with writer:
        done_keys = row_keys(done, KEY)
        by_row = {item.row: found for item, found in zip(items, sequences)}
        pairs = [
            Pair(row, vector, alpha, *by_row[row], steering(vector, alpha, op, scope))
            for row, vector, alpha in spec.rows
            if (row, vector, f32(alpha)) not in done_keys
        ]
        if pairs:
            kwargs = capture_defaults({"enable_prefix_caching": True, **(engine_kwargs or {})})
            llm = make_llm(model_dir, {n: v["path"] for n, v in spec.vectors.items()}, **kwargs)
            try:
                counts = score(llm, pairs, writer, progress)
            finally:
                close_llm(llm)
            manifest["scoring"] = counts
    written = len(row_keys(read_table(out / CHOICES), KEY))  # what is on disk, after the writer closed
    finished = written == len(spec.rows)
    manifest.update(rows=written, finished=now() if finished else None, versions=versions())
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    report(out)
    return out


def _sequences(model_dir: Path, data: Path, items: list[ABItem], max_model_len: int | None):
    """Each item's ((match, not match) token sequences, answer start); a sequence longer than the
    model's context is refused, naming its line."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    limit = max_model_len or getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    found = []
    for item in items:
        both, start = ab_sequences(tokenizer, item)
        longest = max(map(len, both))
        if limit is not None and longest > limit:
            raise SteerBatchError(
                f"{data} {item.where}: field 'question' makes a {longest}-token sequence with its answer; "
                f"the model takes {limit}",
                param="data",
            )
        found.append((both, start))
    return found


def _spec(model_dir, data, selected, items, vectors, *, alphas, op, scope, zero_once) -> EvalSpec:
    return EvalSpec(
        model=str(model_dir),
        model_hash=model_hash(model_dir),
        data=source(Path(data), selected),
        first_row=items[0].row,
        num_rows=len(items),
        vectors=vector_files(vectors),
        alphas=alphas,
        op=op,
        scope=scope,
        zero_once=zero_once,
    )
