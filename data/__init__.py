"""Prompts and persona templates shipped with steer-batch (see SOURCE.md for licenses)."""

from importlib.resources import files


def path(name: str):
    """The installed path of a data file, e.g. path("repe_sentence_beginnings.json")."""
    return files(__name__) / name
