"""vLLM's advice for other setups, left out of steer-batch's commands unless -v is given.

A default `steer-batch` command on a CPU machine would print a dozen vLLM warnings that are
advice for setups other than the one running (preload tcmalloc, install triton-cpu, eager mode
turns off compilation: the CLI chose it), several times over, once per vLLM process. The CLI sets
QUIET_VARIABLE (engine/plugin.py and cli.py read it in each process: the engine's processes
inherit it) and each listed message is dropped at its vLLM logger. Every other warning shows: a
vector that barely separates, a model or dtype fallback, an engine that stops. Python code that
uses vLLM without the CLI sees vLLM's messages as they are.
"""

from __future__ import annotations

import logging
import os

QUIET_VARIABLE = "STEER_BATCH_QUIET"

# vLLM logger -> the starts of its messages that advise other setups, as vLLM 0.32/0.33 word them.
ADVICE = {
    "vllm.triton_utils.importing": ("Triton is installed, but doesn't include CPU backend",),
    "vllm.platforms.cpu": ("Triton is not installed", "Reset SSM cache type"),
    "vllm.config.vllm": ("Enforce eager set", "Inductor compilation was disabled"),
    "vllm.utils.ompmultiprocessing": ("VLLM_CPU_NUM_OF_RESERVED_CPU is less than",),
    "vllm.v1.worker.cpu_worker": ("libtcmalloc is not found in LD_PRELOAD", "libiomp is not found in LD_PRELOAD"),
    "vllm.utils.torch_utils": ("OMP_NUM_THREADS=",),
}


class _Advice(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def install() -> None:
    """Drop the listed advice in this process (once; vLLM's loggers keep their filters when it
    configures logging)."""
    for name, starts in ADVICE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Advice) for f in logger.filters):
            logger.addFilter(_Advice(starts))


def install_if_asked() -> None:
    if os.environ.get(QUIET_VARIABLE) == "1":
        install()
