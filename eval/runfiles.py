"""The files of a run folder: their names, the Arrow schemas, and the (prompt_id, vector, alpha)
key that ties their rows together. Written by jobs/run.py, eval/classify.py and eval/report.py."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from steer_batch.errors import MissingFile

MANIFEST = "manifest.json"
GENERATIONS = "generations.arrow"
SENTIMENT = "sentiment.arrow"
SUMMARY = "summary.arrow"
REPORT = "report.md"
FIGURE = "sentiment.png"

GENERATIONS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int32()),
        ("prompt", pa.string()),
        ("alpha", pa.float32()),
        ("vector", pa.string()),
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("num_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("seed", pa.int64()),
        # The generated tokens' mean NLL from the generation's own logprobs, kept for rows generated
        # without steering, whose model is the unsteered one (the coherence nll, eval/coherence.py);
        # null for steered rows, which classification scores under the unsteered model.
        ("nll", pa.float64()),
    ]
)
SENTIMENT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int32()),
        ("vector", pa.string()),
        ("alpha", pa.float32()),
        ("classifier", pa.string()),
        ("p_negative", pa.float32()),
        ("p_neutral", pa.float32()),
        ("p_positive", pa.float32()),
        ("nll", pa.float64()),  # mean negative log-likelihood per token under the unsteered model; NaN: no tokens
    ]
)


KEY = ["prompt_id", "vector", "alpha"]


def row_keys(table: pa.Table, key: list[str] = KEY) -> set[tuple]:
    """The keys of a table's rows: (prompt_id, vector, alpha) for a run table (generations or
    sentiment), or the columns `key` names (eval-ab's (row, vector, alpha))."""
    return set(zip(*(table.column(k).to_pylist() for k in key)))


def require(out: Path, name: str, made_by: str) -> Path:
    """`out/name`, or an error saying which command makes it."""
    path = Path(out) / name
    if not path.is_file():
        raise MissingFile(f"{out} holds no {name}: {made_by} first")
    return path
