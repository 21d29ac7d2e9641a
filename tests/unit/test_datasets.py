"""Contrastive data files (vectors/datasets.py): pairs and A/B behaviour datasets are read whole,
rows picked by number, and every malformed record refused with the file, line and field named;
`extract --pairs/--ab` refuses them before any model loads and writes nothing. The five shared
Anthropic datasets read as they are."""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from helpers import make_model
from steer_batch.cli import main
from steer_batch.errors import SteerBatchError
from steer_batch.vectors.datasets import (
    ABItem,
    ab_extraction_ids,
    answer_ids,
    parse_rows,
    question_ids,
    read_ab,
    read_pairs,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "anthropic-evals"  # beside the checkout
Q = "Pick one.\n\nChoices:\n (A) Yes\n (B) No"


def _ab(a=" (A)", b=" (B)", question=Q):
    return {"question": question, "answer_matching_behavior": a, "answer_not_matching_behavior": b}


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_pairs_from_a_json_list_and_from_json_lines_with_rows(tmp_path):
    records = [{"positive": f"p{i}", "negative": f"n{i}"} for i in range(5)]
    (tmp_path / "l.json").write_text(json.dumps(records, indent=2))
    _jsonl(tmp_path / "l.jsonl", records)
    for name in ("l.json", "l.jsonl"):
        pairs = read_pairs(tmp_path / name, parse_rows("1:3"))
        assert [(p.row, p.positive, p.negative) for p in pairs] == [(1, "p1", "n1"), (2, "p2", "n2")]
        assert [p.row for p in read_pairs(tmp_path / name, parse_rows("3:"))] == [3, 4]
        assert [p.row for p in read_pairs(tmp_path / name, parse_rows(":2"))] == [0, 1]


def test_ab_items_hold_the_letters(tmp_path):
    path = _jsonl(tmp_path / "ab.jsonl", [_ab(), _ab(" (B)", " (A)"), _ab("(A)", "(B)")])
    items = read_ab(path)
    assert [(i.row, i.match, i.not_match) for i in items] == [(0, "A", "B"), (1, "B", "A"), (2, "A", "B")]


M, N = "'answer_matching_behavior'", "'answer_not_matching_behavior'"


@pytest.mark.parametrize(
    "records, message",
    [
        ([_ab(), {"question": Q, "answer_matching_behavior": " (A)"}], rf"line 2: field {N} is missing"),
        ([_ab(a="Yes")], rf"line 1: field {M} is 'Yes'; an answer is ' \(X\)'"),
        ([_ab(a=" (a)")], rf"line 1: field {M} is ' \(a\)'"),
        ([_ab(a=" (B)", b=" (B)")], f"line 1: fields {M} and {N} give the same answer"),
        ([_ab(), _ab(), _ab(a=" (C)")], rf"line 3: field {M} is ' \(C\)', but the question offers no choice \(C\)"),
        ([_ab(question=" ")], "line 1: field 'question' must be a non-empty string"),
        ([_ab(), ["a list"]], "line 2: a record must be a JSON object"),
    ],
)
def test_ab_refusals_name_file_line_and_field(tmp_path, records, message):
    path = _jsonl(tmp_path / "ab.jsonl", records)
    with pytest.raises(SteerBatchError, match=message) as e:
        read_ab(path)
    assert str(path) in str(e.value)


def test_file_level_refusals(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(_ab()).encode() + b"\n" + b'{"question": "\xff"}\n')
    with pytest.raises(SteerBatchError, match=r"bad.jsonl line 2: not UTF-8 text"):
        read_ab(bad)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(SteerBatchError, match="holds no records"):
        read_ab(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text(json.dumps(_ab()) + "\n{not json\n")
    with pytest.raises(SteerBatchError, match="broken.jsonl line 2: not valid JSON"):
        read_ab(tmp_path / "broken.jsonl")
    (tmp_path / "list.json").write_text('[\n  {"positive": "a", "negative": "b"},\n  {"positive": "a"}\n]')
    with pytest.raises(SteerBatchError, match=r"list.json line 3: field 'negative' is missing"):
        read_pairs(tmp_path / "list.json")
    path = _jsonl(tmp_path / "ab.jsonl", [_ab()] * 4)
    for rows in ("2:9", "4:", "9:10"):
        with pytest.raises(SteerBatchError, match=r"holds 4 records \(0..3\)"):
            read_ab(path, parse_rows(rows))
    for rows in ("3", "a:b", "5:2", "-1:2", "2:2"):
        with pytest.raises(SteerBatchError, match="give START:STOP"):
            parse_rows(rows)


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared Anthropic datasets are not beside this checkout")
@pytest.mark.parametrize("name", sorted(p.name for p in SHARED.glob("*.jsonl")) if SHARED.is_dir() else [])
def test_the_shared_anthropic_datasets_read_as_they_are(name):
    items = read_ab(SHARED / name)
    lines = [line for line in (SHARED / name).read_text().splitlines() if line.strip()]
    assert len(items) == len(lines) and all(i.match != i.not_match for i in items)
    first = json.loads(lines[0])
    assert f" ({items[0].match})" == first["answer_matching_behavior"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("llama", tmp_path_factory.mktemp("ds") / "model", tokenizer=True)


def test_both_answers_share_the_question_tokens_and_end_at_the_letter(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    head = question_ids(tokenizer, Q)
    # No chat template: the plain head (this tokenizer has no newline: those decode as <unk>, skipped).
    assert tokenizer.decode(head, skip_special_tokens=True) == f"Question: {Q}Answer: ".replace("\n", "")
    p, n = ab_extraction_ids(tokenizer, [ABItem(0, Q, "B", "A")])
    assert p[0][: len(head)] == n[0][: len(head)] == head
    assert tokenizer.decode(p[0][len(head) :]) == "(B" and tokenizer.decode(n[0][len(head) :]) == "(A"
    assert tokenizer.decode(answer_ids(tokenizer, "B")) == "(B)"
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    assert tokenizer.decode(question_ids(tokenizer, "Hi?")) == "<user>Hi?<assistant>"


def _extract(tmp_path, model_dir, *args):
    out = tmp_path / "v.safetensors"
    result = CliRunner().invoke(main, ["extract", "--model", str(model_dir), "--out", str(out), *args])
    return result, out


def _pairs(t, records):
    return ["--pairs", str(_jsonl(t / "p.jsonl", records))]


def _abs(t, records):
    return ["--ab", str(_jsonl(t / "a.jsonl", records))]


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda t: _abs(t, [_ab(), _ab(b=" (A)")]), "a.jsonl line 2: fields"),
        (lambda t: _pairs(t, [{"positive": "x"}]), "p.jsonl line 1: field 'negative' is missing"),
        (lambda t: _abs(t, [_ab()]) + ["--rows", "0:5"], "holds 1 records"),
        (lambda t: ["--ab", str(t / "missing.jsonl")], "cannot read"),
        (lambda t: _abs(t, [_ab()]) + ["--positive", "happy", "--negative", "sad"], "give the data once"),
        (lambda t: [], "give the data once"),
        (lambda t: ["--positive", "happy"], "--positive and --negative go together"),
        (lambda t: ["--positive", "happy", "--negative", "sad", "--rows", "0:2"], "--rows picks records of"),
        (lambda t: _pairs(t, [{"positive": "x", "negative": "y"}]) + ["--template", "{persona}"], "--template shapes"),
    ],
)
def test_extract_refuses_bad_data_before_any_model_loads(tmp_path, make_args, message):
    result, out = _extract(tmp_path, tmp_path / "no-model-here", *make_args(tmp_path))
    assert result.exit_code == 2, result.output
    assert re.search(re.escape(message), " ".join(result.output.split())), result.output
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_eval_ab_refuses_a_question_longer_than_the_context(model_dir, tmp_path):
    data = _jsonl(tmp_path / "a.jsonl", [_ab(), _ab(question=Q + " x" * 300)])  # the tiny model takes 512
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["eval-ab", str(data), "--model", str(model_dir), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "a.jsonl line 2: field 'question' makes a 6" in result.output and "the model takes 512" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "records, extra, message",
    [
        ([_ab(), {"question": Q}], [], "a.jsonl line 2: field 'answer_matching_behavior' is missing"),
        ([_ab(a=" (Z)")], [], "line 1: field 'answer_matching_behavior' is ' (Z)', but the question offers no choice"),
        ([_ab()], ["--rows", "1:"], "holds 1 records"),
        ([_ab()], ["--scope", "generated"], "scope 'generated' would steer nothing"),
        ([_ab()], ["--alphas", "1,,2"], "give comma-separated numbers"),
    ],
)
def test_eval_ab_refuses_bad_input_before_any_engine_starts(tmp_path, records, extra, message):
    data = _jsonl(tmp_path / "a.jsonl", records)
    out = tmp_path / "out"
    args = ["eval-ab", str(data), "--model", str(tmp_path / "no-model-here"), "--out", str(out), *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not out.exists()
