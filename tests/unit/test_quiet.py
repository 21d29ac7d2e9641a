"""quiet.py drops exactly the listed advice of vLLM's loggers: other messages, other loggers and
the same message without the CLI's setting all pass."""

import logging

import pytest

from steer_batch import quiet


@pytest.fixture
def captured():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("vllm.v1.worker.cpu_worker", "vllm.other")]
    kept = {logger: list(logger.filters) for logger in loggers}  # an in-process CLI test may have installed it
    for logger in loggers:
        logger.filters.clear()
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)
        logger.filters[:] = kept[logger]


def test_only_the_listed_advice_is_dropped(captured, monkeypatch):
    worker, other = logging.getLogger("vllm.v1.worker.cpu_worker"), logging.getLogger("vllm.other")
    monkeypatch.delenv(quiet.QUIET_VARIABLE, raising=False)
    quiet.install_if_asked()  # not asked: vLLM as it is
    worker.warning("%s is not found in LD_PRELOAD. For best performance...", "libtcmalloc")
    assert len(captured) == 1
    monkeypatch.setenv(quiet.QUIET_VARIABLE, "1")
    quiet.install_if_asked()
    quiet.install_if_asked()  # once per process, however often the plugin runs
    assert len(worker.filters) == 1
    worker.warning("%s is not found in LD_PRELOAD. For best performance...", "libtcmalloc")
    worker.warning("%s is not found in LD_PRELOAD. For best performance...", "libiomp")
    worker.warning("the model's dtype bfloat16 is not supported here: falling back to float32")
    other.warning("libtcmalloc is not found in LD_PRELOAD")  # another logger: not vLLM's advice
    assert [r.getMessage()[:20] for r in captured[1:]] == ["the model's dtype bf", "libtcmalloc is not f"]
