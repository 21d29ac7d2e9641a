"""The contrastive prompts: a persona instruction (`{persona}` filled with e.g. happy / sad) as
the user turn, and a sentence beginning opening the assistant turn; and reading prompt lists."""

from __future__ import annotations

import json
from pathlib import Path

from steer_batch.data import REPE_BEGINNINGS
from steer_batch.data import path as data_path
from steer_batch.errors import SteerBatchError

DEFAULT_TEMPLATE = "Act as if you're extremely {persona}."


def check_template(template: str) -> str:
    if "{persona}" not in template:
        raise SteerBatchError(f"{template!r} has no {{persona}} placeholder", param="template")
    return template


def pair_prompts(tokenizer, template: str, persona: str, suffixes: list[str]) -> list[str]:
    """Persona instruction as the user turn, the suffix opening the assistant turn (chat template
    when the model has one; plain concatenation otherwise)."""
    instruction = check_template(template).format(persona=persona)
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
        return [head + s for s in suffixes]
    return [f"{instruction} {s}" for s in suffixes]


def read_strings(source: str | Path | None, param: str, item: str) -> tuple[Path, list[str]]:
    """(file, its non-empty strings) from a JSON list of strings; None: the 581 RepE sentence
    beginnings shipped in data/. Errors name `param`, the argument that gave the file, and call
    its entries `item`s."""
    source = Path(str(data_path(REPE_BEGINNINGS))) if source is None else Path(source)
    try:
        strings = json.loads(source.read_text())
    except (OSError, ValueError) as e:
        raise SteerBatchError(f"cannot read {source}: {e}", param=param) from None
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        raise SteerBatchError(f"{source} must hold a JSON list of strings", param=param)
    strings = [s for s in strings if s]  # the RepE file holds one empty string
    if not strings:
        raise SteerBatchError(f"{source} holds no non-empty {item}", param=param)
    return source, strings
