"""`steer-batch classify` in a real process: the cardiffnlp path (the default wherever the model
loads) on a stand-in with the same name in a private HF cache, against each text scored alone;
and the fallback to VADER, said and recorded, when the model cannot be loaded."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import make_tokenizer
from steer_batch.eval import runfiles
from steer_batch.eval.arrow_stream import ArrowStream, read_table
from steer_batch.eval.classify import CARDIFF, VADER

TEXTS = [
    "What a wonderful day, I love it!",
    "This is awful.",
    "ok",
    "The meeting is at noon on Tuesday, see you there.",
    "I hate waiting",
    "Great!!!",
    "Nothing much happened, really, just the usual things for a long while.",
]
# Not cardiffnlp's label order, so the test sees whether the columns follow the labels.
ID2LABEL = {0: "positive", 1: "Negative", 2: "neutral"}


def _run_folder(folder):
    out = folder / "run"
    out.mkdir()
    rows = [
        {
            "prompt_id": i,
            "prompt": "",
            "alpha": float(i % 3 - 1),
            "vector": "v",
            "text": t,
            "token_ids": [],
            "num_tokens": 0,
            "finish_reason": "length",
            "seed": 0,
        }
        for i, t in enumerate(TEXTS)
    ]
    with ArrowStream.open(out / runfiles.GENERATIONS, runfiles.GENERATIONS_SCHEMA)[0] as writer:
        writer.write(rows[:4])
        writer.write(rows[4:])
    return out


def _stand_in_cardiff(cache):
    """A tiny random RoBERTa classifier saved as `CARDIFF`'s snapshot in an HF hub cache."""
    import transformers as tf

    snapshot = cache / f"models--{CARDIFF.replace('/', '--')}" / "snapshots" / ("0" * 40)
    make_tokenizer(snapshot)
    tokenizer = tf.AutoTokenizer.from_pretrained(snapshot)
    tokenizer.pad_token = "<unk>"
    tokenizer.save_pretrained(snapshot)
    torch.manual_seed(0)
    config = tf.RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=300,
        pad_token_id=tokenizer.pad_token_id,
        id2label=ID2LABEL,
        label2id={v: k for k, v in ID2LABEL.items()},
        initializer_range=0.5,
    )
    tf.RobertaForSequenceClassification(config).save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    return snapshot


def _classify(out, cache, *extra):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", "from steer_batch.cli import main; main()", "classify", str(out), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_cardiff_path_scores_like_each_text_alone(tmp_path):
    import transformers as tf

    snapshot = _stand_in_cardiff(tmp_path / "hub")
    out = _run_folder(tmp_path)
    done = _classify(out, tmp_path / "hub")
    assert done.returncode == 0, done.stderr[-3000:]
    table = read_table(out / "sentiment.arrow").to_pylist()
    assert [r["prompt_id"] for r in table] == list(range(len(TEXTS))) and {r["classifier"] for r in table} == {CARDIFF}

    tokenizer = tf.AutoTokenizer.from_pretrained(snapshot)
    model = tf.AutoModelForSequenceClassification.from_pretrained(snapshot).eval()
    spread = []
    for row, text in zip(table, TEXTS):
        with torch.no_grad():
            probs = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0].tolist()
        by_label = {ID2LABEL[i].lower(): p for i, p in enumerate(probs)}
        got = [row["p_negative"], row["p_neutral"], row["p_positive"]]
        assert got == pytest.approx([by_label["negative"], by_label["neutral"], by_label["positive"]], abs=1e-5)
        spread.append(max(probs) - min(probs))
    assert max(spread) > 0.05  # the stand-in's classes differ enough that a column swap shows

    before = (out / "sentiment.arrow").read_bytes()
    other = _classify(out, tmp_path / "hub", "--classifier", VADER)  # one classifier per run folder
    assert other.returncode == 1 and f"was made with ['{CARDIFF}']; move it away to classify with vader" in other.stderr
    assert (out / "sentiment.arrow").read_bytes() == before


def test_without_the_model_it_falls_back_to_vader_and_says_so(tmp_path):
    out = _run_folder(tmp_path)
    asked = _classify(out, tmp_path / "empty", "--classifier", CARDIFF)
    assert asked.returncode == 1 and f"cannot load {CARDIFF}" in asked.stderr and "--classifier vader" in asked.stderr
    assert not (out / "sentiment.arrow").exists()
    done = _classify(out, tmp_path / "empty")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{CARDIFF} cannot be loaded" in done.stderr and f"falling back to {VADER}" in done.stderr
    table = read_table(out / "sentiment.arrow").to_pylist()
    assert len(table) == len(TEXTS) and {r["classifier"] for r in table} == {VADER}
    assert [(r["p_negative"], r["p_neutral"], r["p_positive"]) for r in table][:2] == [(0, 0, 1), (1, 0, 0)]
