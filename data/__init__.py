"""Prompts and persona templates shipped with steer-batch (see SOURCE.md for licenses)."""

import json
from importlib.resources import files


def path(name: str):
    """The installed path of a data file, e.g. path("repe_sentence_beginnings.json")."""
    return files(__name__) / name


REPE_BEGINNINGS = "repe_sentence_beginnings.json"


def sentence_beginnings() -> list[str]:
    """The 581 RepE sentence beginnings (the file's one empty entry left out)."""
    return [s for s in json.loads(path(REPE_BEGINNINGS).read_text()) if s]
