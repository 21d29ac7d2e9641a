"""Sentiment and coherence of every generated text: OUT/sentiment.arrow with p_negative,
p_neutral, p_positive and nll (the mean negative log-likelihood per token of the continuation
under the unsteered model, eval/coherence.py).

Classifiers:
- `cardiffnlp/twitter-roberta-base-sentiment-latest` (the seed's; the default whenever it loads,
  from the local HF cache or the hub): its softmax over negative/neutral/positive.
- `vader` (vaderSentiment, MIT; offline): VADER's usual 3-class rule on the compound score,
  positive if >= 0.05, negative if <= -0.05, neutral otherwise, as a one-hot probability row,
  so the per-alpha means are the fractions of texts in each class.
Every row records the classifier that produced it.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import ExitStack
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from steer_batch.errors import SteerBatchError
from steer_batch.eval.arrow_stream import ArrowStream, read_table
from steer_batch.eval.coherence import mean_nll, token_nlls
from steer_batch.eval.runfiles import GENERATIONS, KEY, SENTIMENT, SENTIMENT_SCHEMA, require, row_keys

CARDIFF = "cardiffnlp/twitter-roberta-base-sentiment-latest"
VADER = "vader"
CLASSIFIERS = (CARDIFF, VADER)
Scorer = Callable[[list[str]], list[tuple[float, float, float]]]


def vader_scorer() -> Scorer:
    analyzer = SentimentIntensityAnalyzer()

    def score(texts: list[str]) -> list[tuple[float, float, float]]:
        rows = []
        for text in texts:
            compound = analyzer.polarity_scores(text)["compound"]
            rows.append((float(compound <= -0.05), float(-0.05 < compound < 0.05), float(compound >= 0.05)))
        return rows

    return score


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def cardiff_scorer(batch_size: int = 64) -> Scorer:
    # cli.py imports this module for CLASSIFIERS as it starts: transformers loads only here.
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # From the local cache when it is there; the hub only when it answers (its client would
    # otherwise spend about a minute on retries before giving up).
    local = not _hub_reachable()
    tokenizer = AutoTokenizer.from_pretrained(CARDIFF, local_files_only=local)
    model = AutoModelForSequenceClassification.from_pretrained(CARDIFF, local_files_only=local).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    labels = [model.config.id2label[i].lower() for i in range(3)]
    order = [labels.index(name) for name in ("negative", "neutral", "positive")]

    def score(texts: list[str]) -> list[tuple[float, float, float]]:
        rows = []
        with torch.no_grad():
            for lo in range(0, len(texts), batch_size):
                enc = tokenizer(
                    texts[lo : lo + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=256
                ).to(device)
                probs = model(**enc).logits.softmax(-1)[:, order].cpu()
                rows.extend(tuple(map(float, p)) for p in probs)
        return rows

    return score


def load_scorer(name: str | None) -> tuple[str, Scorer]:
    """(classifier name, scorer). None: cardiffnlp when it can be loaded, else VADER (said on stderr)."""
    if name not in (None, *CLASSIFIERS):
        raise SteerBatchError(f"unknown classifier {name!r}; choose one of {list(CLASSIFIERS)}", param="classifier")
    if name == VADER:
        return VADER, vader_scorer()
    try:
        return CARDIFF, cardiff_scorer()
    except Exception as e:  # no hub and no local copy: OSError, or the hub client's own errors
        if name == CARDIFF:
            raise SteerBatchError(
                f"cannot load {CARDIFF} ({type(e).__name__}); put it in the HF cache or use --classifier vader"
            ) from None
        print(f"steer-batch: {CARDIFF} cannot be loaded ({type(e).__name__}); falling back to {VADER}", file=sys.stderr)
        return VADER, vader_scorer()


def classify(out: Path, engine: Callable[[], ContextManager], classifier: str | None = None, batch: int = 256) -> str:
    """Score every row of out/generations.arrow not yet in out/sentiment.arrow (class
    probabilities and nll); returns the classifier used. `engine()` gives the vLLM engine for
    the nll pass (as a context manager; asked for only when a steered row has tokens to score:
    unsteered rows carry their nll from generation). A run
    folder is classified by one classifier: another one is refused."""
    generations = read_table(require(out, GENERATIONS, f"run `steer-batch run --out {out}`"))
    if "nll" not in generations.column_names:  # generated by an older steer-batch: every row is scored
        generations = generations.append_column("nll", pa.nulls(generations.num_rows, pa.float64()))
    path = out / SENTIMENT
    existing = read_table(path) if path.exists() else None
    if existing is not None and "nll" not in existing.column_names:
        raise SteerBatchError(f"{path} was made by an older steer-batch (no nll); move it away and classify again")
    used = set(existing.column("classifier").to_pylist()) if existing is not None else set()
    name, scorer = load_scorer(classifier or (next(iter(used)) if used else None))
    if used and used != {name}:
        raise SteerBatchError(f"{path} was made with {sorted(used)}; move it away to classify with {name}")
    writer, done = ArrowStream.open(path, SENTIMENT_SCHEMA, resume=True)
    with writer, ExitStack() as stack:
        done_keys = row_keys(done)
        columns = [*KEY, "prompt", "text", "token_ids", "nll"]
        rows = [r for r in generations.select(columns).to_pylist() if tuple(r[k] for k in KEY) not in done_keys]
        llm = None
        for lo in tqdm(range(0, len(rows), batch), desc="scoring", unit="batch", file=sys.stderr, disable=not rows):
            chunk = rows[lo : lo + batch]
            # Unsteered rows bring their nll from generation; the others are scored here.
            todo = [r for r in chunk if r["nll"] is None]
            if llm is None and any(r["token_ids"] for r in todo):
                llm = stack.enter_context(engine())
            scores = scorer([r["text"] for r in chunk])
            scored = iter(token_nlls(llm, [r["prompt"] for r in todo], [r["token_ids"] for r in todo]))
            nlls = [r["nll"] if r["nll"] is not None else mean_nll(next(scored)) for r in chunk]
            writer.write(
                [
                    {
                        **{k: r[k] for k in KEY},
                        "classifier": name,
                        "p_negative": s[0],
                        "p_neutral": s[1],
                        "p_positive": s[2],
                        "nll": n,
                    }
                    for r, s, n in zip(chunk, scores, nlls)
                ]
            )
    return name
