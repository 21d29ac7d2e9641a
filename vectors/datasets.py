"""Contrastive data from a user's files, read whole and checked before any engine starts (an
error names the file, the line and the field), and the token sequences built from them.

- Pairs: a JSON list, or JSON lines, of {"positive": str, "negative": str}. Each text is used as
  given (no template), tokenized as vLLM tokenizes a text prompt; the state at its last token.
- A/B behaviour datasets (Anthropic's model-written evals, Perez et al. 2022; the format of
  Contrastive Activation Addition, Rimsky et al. 2024): JSON lines (or a JSON list) of
  {"question": "...Choices:\\n (A) ...\\n (B) ...", "answer_matching_behavior": " (B)",
  "answer_not_matching_behavior": " (A)"}. A row's sequences are the question as the user turn
  of the model's chat template (`Question: ...\\n\\nAnswer: ` for a model without one), then the
  assistant turn opening with an answer, tokenized apart so that both answers share the
  question's tokens exactly: extraction ends at the answer's letter (`(B`, as CAA does),
  evaluation scores the whole answer (`(B)`).

Rows: `START:STOP` picks records by their 0-based number in the file, end exclusive, so one file
splits into a training and a held-out part (`:200`, `200:`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from steer_batch.errors import SteerBatchError

MATCH = "answer_matching_behavior"
NOT_MATCH = "answer_not_matching_behavior"
ANSWER = re.compile(r" ?\(([A-Z])\)")  # " (B)": one capital letter in parentheses
PLAIN_HEAD = "Question: {question}\n\nAnswer: "  # for a model without a chat template


@dataclass(frozen=True)
class Pair:
    row: int  # the record's 0-based number in its file
    positive: str
    negative: str


@dataclass(frozen=True)
class ABItem:
    row: int
    question: str
    match: str  # the letter of the answer matching the behaviour, e.g. "B"
    not_match: str
    where: str = ""  # "line N" of its file, for errors found later


def parse_rows(text: str | None) -> tuple[int, int | None]:
    """ "START:STOP" (either side may be left out) -> (start, stop or None); None: every row."""
    if not text:
        return 0, None
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        lo, hi = int(start or 0), (int(stop) if stop else None)
        if lo < 0 or (hi is not None and hi <= lo):
            raise ValueError
    except ValueError:
        raise SteerBatchError(
            f"{text!r}: give START:STOP, 0-based record numbers with STOP > START and either side optional, "
            "e.g. 0:200 or 200:",
            param="rows",
        ) from None
    return lo, hi


def rows_text(rows: tuple[int, int | None]) -> str:
    return f"{rows[0]}:{'' if rows[1] is None else rows[1]}"


def _records(path: Path, param: str) -> list[tuple[str, object]]:
    """(where, value) of every record of a JSON list or JSON lines file; where: "line N"."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SteerBatchError(f"cannot read {path}: {e.strerror or e}", param=param) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SteerBatchError(f"{path} line {line}: not UTF-8 text", param=param) from None
    records: list[tuple[str, object]] = []
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise SteerBatchError(f"{path} line {e.lineno}: not valid JSON ({e.msg})", param=param) from None
        decoder, i = json.JSONDecoder(), text.index("[") + 1
        while True:  # the list again, item by item, for the line each starts on
            while text[i] in " \t\r\n,":
                i += 1
            if text[i] == "]":
                break
            value, end = decoder.raw_decode(text, i)
            records.append((f"line {text.count(chr(10), 0, i) + 1}", value))
            i = end
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise SteerBatchError(f"{path} line {number}: not valid JSON ({e.msg})", param=param) from None
    if not records:
        raise SteerBatchError(f"{path} holds no records", param=param)
    return records


def _selected(path: Path, rows: tuple[int, int | None], param: str) -> list[tuple[int, str, dict]]:
    records = _records(path, param)
    start, stop = rows
    if start >= len(records) or (stop is not None and stop > len(records)):
        raise SteerBatchError(
            f"rows {rows_text(rows)}: {path} holds {len(records)} records (0..{len(records) - 1})", param="rows"
        )
    chosen = []
    for row in range(start, len(records) if stop is None else stop):
        where, value = records[row]
        if not isinstance(value, dict):
            raise SteerBatchError(f"{path} {where}: a record must be a JSON object", param=param)
        chosen.append((row, where, value))
    return chosen


def _field(path: Path, where: str, record: dict, key: str, param: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        problem = "is missing" if key not in record else "must be a non-empty string"
        raise SteerBatchError(f"{path} {where}: field {key!r} {problem}", param=param)
    return value


def read_pairs(path: Path, rows: tuple[int, int | None] = (0, None), param: str = "pairs") -> list[Pair]:
    return [
        Pair(row, _field(path, where, r, "positive", param), _field(path, where, r, "negative", param))
        for row, where, r in _selected(path, rows, param)
    ]


def read_ab(path: Path, rows: tuple[int, int | None] = (0, None), param: str = "ab") -> list[ABItem]:
    items = []
    for row, where, record in _selected(path, rows, param):
        question = _field(path, where, record, "question", param)
        letters = []
        for key in (MATCH, NOT_MATCH):
            answer = _field(path, where, record, key, param)
            found = ANSWER.fullmatch(answer)
            if not found:
                raise SteerBatchError(
                    f"{path} {where}: field {key!r} is {answer[:40]!r}; an answer is ' (X)', one capital letter "
                    "in parentheses",
                    param=param,
                )
            if f"({found[1]})" not in question:
                raise SteerBatchError(
                    f"{path} {where}: field {key!r} is {answer!r}, but the question offers no choice ({found[1]})",
                    param=param,
                )
            letters.append(found[1])
        if letters[0] == letters[1]:
            raise SteerBatchError(
                f"{path} {where}: fields {MATCH!r} and {NOT_MATCH!r} give the same answer", param=param
            )
        items.append(ABItem(row, question, *letters, where))
    return items


def text_ids(tokenizer, text: str) -> list[int]:
    """`text`'s tokens as vLLM tokenizes a text prompt (the tokenizer's special tokens added)."""
    return tokenizer(text)["input_ids"]


def question_ids(tokenizer, question: str) -> list[int]:
    """The question as the user turn and the assistant turn's start (chat template, whose special
    tokens are its own), or PLAIN_HEAD for a model without a chat template."""
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(head, add_special_tokens=False)["input_ids"]
    return text_ids(tokenizer, PLAIN_HEAD.format(question=question))


def answer_ids(tokenizer, letter: str, whole: bool = True) -> list[int]:
    """`(B)` (whole) or `(B` (up to and including the letter), tokenized on its own."""
    return tokenizer(f"({letter}{')' if whole else ''}", add_special_tokens=False)["input_ids"]


def ab_sequences(tokenizer, item: ABItem, whole: bool = True) -> tuple[tuple[list[int], list[int]], int]:
    """((matching, other) sequences, where the answers start): the question, then each answer,
    whole (`(B)`, what evaluation scores) or up to its letter (`(B`, what extraction reads)."""
    head = question_ids(tokenizer, item.question)
    both = tuple(head + answer_ids(tokenizer, letter, whole) for letter in (item.match, item.not_match))
    return both, len(head)


def ab_extraction_ids(tokenizer, items: list[ABItem]) -> tuple[list[list[int]], list[list[int]]]:
    """(positive, negative) sequences: the question, then the matching / other answer up to its
    letter; the state at the letter's last token is the one extraction reads."""
    both = [ab_sequences(tokenizer, item, whole=False)[0] for item in items]
    return [p for p, _ in both], [n for _, n in both]
