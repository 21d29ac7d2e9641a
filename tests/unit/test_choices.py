"""eval/choices.py without an engine: an answer token a request read from the prefix cache is
taken from the other answer's request where both sequences agree through that token, and a
sequence is scored again where neither request computed it; p_match is CAA's normalisation; the
summary pairs each alpha with alpha 0 over the same rows."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from steer_batch.eval.arrow_stream import write_table
from steer_batch.eval.choices import CHOICES, CHOICES_SCHEMA, Pair, _Sides, p_match, report

HEAD = [5, 6, 7, 8]  # answers start at 4
MATCH, OTHER = HEAD + [40, 41, 50], HEAD + [40, 42, 50]  # "(", letter, ")": the first answer token shared


def _output(seq, cached, logprob_of):
    """What vLLM returns: prompt logprobs for every position (numbers it never computed are left
    as they are in its buffer: garbage, here NaN) and how many tokens came from the cache."""
    entries = [None] + [
        {seq[i]: SimpleNamespace(logprob=logprob_of(i) if i > cached else float("nan"))} for i in range(1, len(seq))
    ]
    return SimpleNamespace(num_cached_tokens=cached, prompt_logprobs=entries)


def _sides():
    return _Sides(Pair(0, "v", 1.0, (MATCH, OTHER), len(HEAD), None))


def test_a_token_read_from_the_cache_comes_from_the_twin_where_both_agree():
    s = _sides()
    s.take(0, _output(MATCH, 0, lambda i: -float(i)))  # computed in full
    s.take(1, _output(OTHER, 4, lambda i: -10.0 * i))  # its first answer token "(" (i = 4) not computed
    assert s.missing() == []
    row = s.row()
    assert row["logprob_match"] == -(4 + 5 + 6)
    assert row["logprob_not_match"] == -4 - 50 - 60  # "(" from the twin: same context, same token
    assert row["p_match"] == pytest.approx(1 / (1 + math.exp(row["logprob_not_match"] - row["logprob_match"])))


def test_where_the_sequences_differ_a_cached_token_is_scored_again():
    s = _sides()
    s.take(0, _output(MATCH, 0, lambda i: -1.0))
    s.take(1, _output(OTHER, 5, lambda i: -1.0))  # the letter (i = 5) differs from the twin's: not computed
    assert s.missing() == [1]
    s.logprobs[1] = None
    assert s.missing() == []  # waits for the new request
    s.take(1, _output(OTHER, 0, lambda i: -2.0))
    assert s.missing() == [] and s.row()["logprob_not_match"] == -6.0


def test_p_match_is_stable_at_extremes():
    assert p_match(0.0, 0.0) == 0.5
    assert p_match(-1000.0, 0.0) == 0.0 and p_match(0.0, -1000.0) == 1.0
    assert p_match(-2.0, -3.0) == pytest.approx(math.e / (math.e + 1))


def test_summary_pairs_each_alpha_with_alpha_0(tmp_path):
    rows = []
    for r in range(6):
        for alpha, p in ((0.0, 0.2 + 0.1 * r), (2.0, 0.5 + 0.1 * r), (-2.0, 0.1)):
            rows.append(
                {
                    "row": r, "vector": "v", "alpha": alpha, "p_match": p, "logprob_match": 0.0,
                    "logprob_not_match": 0.0, "match_token_ids": [1], "not_match_token_ids": [2], "answer_start": 0,
                }
            )  # fmt: skip
    write_table(tmp_path / CHOICES, pa.Table.from_pylist(rows[::-1], schema=CHOICES_SCHEMA))
    spec = {
        "model": "m", "data": {"file": "/d/ab.jsonl", "rows": "0:", "sha256": "0" * 64}, "num_rows": 6,
        "vectors": {"v": {"path": "v.safetensors", "sha256": "1" * 64}}, "op": "add", "scope": "all",
    }  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps({"spec": spec}))
    summary = {r["alpha"]: r for r in report(tmp_path).to_pylist()}
    assert list(summary) == [-2.0, 0.0, 2.0]
    assert summary[2.0]["shift"] == pytest.approx(0.3) and summary[2.0]["shift_lo"] == pytest.approx(0.3)
    assert summary[0.0]["p_match"] == pytest.approx(np.mean([0.2 + 0.1 * r for r in range(6)]))
    assert summary[-2.0]["shift"] == pytest.approx(np.mean([0.1 - (0.2 + 0.1 * r) for r in range(6)]))
    assert summary[0.0]["p_match_lo"] < summary[0.0]["p_match"] < summary[0.0]["p_match_hi"]
    assert (tmp_path / "p_match.png").stat().st_size > 0 and "| v | +2 | 6 |" in (tmp_path / "report.md").read_text()
