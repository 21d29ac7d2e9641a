"""Start a vLLM engine with steering, with the settings this project measured for CPU machines."""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path

import torch

from steer_batch.engine.config import CONFIG_KEY, PLUGIN_NAME, WORKER_EXTENSION, engine_config
from steer_batch.errors import SteerBatchError, SteeringNotInstalled

# What this project measured for CPU machines (make_llm's docstring), the one place for them:
# engine arguments (a caller's own win) and the environment of the engine's processes.
CPU_ENGINE_ARGS = {"dtype": "float32", "gpu_memory_utilization": 0.3}
CPU_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
SHUTDOWN_SECONDS = 30  # how long close_llm lets the engine's processes exit before they are killed


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def make_llm(model: str | Path, vectors: dict[str, str | Path] | None = None, **kwargs):
    """An `LLM` steering with `vectors` (name -> file), or a stock one when there are none.

    On CPU: fp32 (this CPU has no AVX-512 bf16; bf16 ran several times slower), 30% of memory
    for the engine, and no core reserved for the scheduler (VLLM_CPU_NUM_OF_RESERVED_CPU=0 took
    SmolLM2 from 241 to 430 tok/s on 2 cores). Keyword arguments override any of these. The
    worker extension (engine/worker.py) answers `llm.collective_rpc("steer_batch_layout")` and
    carries captured hidden states back.
    """
    from vllm import LLM  # vLLM loads with the first engine, not when jobs/extract.py imports this

    kwargs = engine_defaults(kwargs)
    if on_cpu():
        for name, value in CPU_ENV.items():
            os.environ.setdefault(name, value)
        workers = kwargs.get("tensor_parallel_size", 1) * kwargs.get("pipeline_parallel_size", 1)
        if workers > 1:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(workers))
    kwargs.setdefault("worker_extension_cls", WORKER_EXTENSION)
    if vectors:  # merged into any steering settings passed in additional_config
        kwargs["additional_config"] = engine_config(kwargs.get("additional_config"), vectors)
    asks_steering = CONFIG_KEY in (kwargs.get("additional_config") or {})
    if asks_steering:
        check_plugin_allowed()
    llm = LLM(model=str(model), **kwargs)
    if asks_steering and kwargs["worker_extension_cls"] == WORKER_EXTENSION:
        try:
            require_steering(llm)
        except SteeringNotInstalled:
            close_llm(llm)
            raise
    return llm


def engine_defaults(kwargs: dict) -> dict:
    """The engine arguments this project measured for CPU machines (make_llm's docstring) under
    `kwargs`, which win; `kwargs` as they are on a GPU."""
    return {**CPU_ENGINE_ARGS, **kwargs} if on_cpu() else dict(kwargs)


def cpu_binding(workers: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND giving each of `workers` CPU workers its own share of this
    process's cores, e.g. "0|1" for 2 workers on 2 cores ("0-3|4-7" on 8)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        raise SteerBatchError(f"{workers} CPU workers need {workers} cores; this process may use {len(cores)}")
    share = len(cores) // workers
    groups = [cores[k * share : (k + 1) * share] for k in range(workers)]
    return "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


def check_plugin_allowed() -> None:
    """vLLM loads only the plugins named in VLLM_PLUGINS when it is set, and an engine without
    ours would ignore `additional_config["steering"]` and run unsteered."""
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        raise SteeringNotInstalled(
            f"VLLM_PLUGINS={allowed!r} leaves out {PLUGIN_NAME!r}, so vLLM would start without steering; "
            f"add it (VLLM_PLUGINS={allowed},{PLUGIN_NAME}) or unset VLLM_PLUGINS"
        )


def require_steering(llm) -> None:
    """Raise unless every worker of `llm` runs a model with steering installed (the plugin can
    be left out of a process without an error: vLLM only logs a plugin that fails to load)."""
    check_layouts(llm.collective_rpc("steer_batch_layout"))


def check_layouts(layouts: list[dict]) -> None:
    """The check of `require_steering`, on the workers' answers to "steer_batch_layout"."""
    if not all(layout.get("stage") for layout in layouts):  # a stage may steer no layer, but must have steering
        raise SteeringNotInstalled(
            f"steering was asked for but is not installed in the engine (worker layouts: {layouts}); "
            f"check that the {PLUGIN_NAME!r} plugin loads (vLLM's log says 'Failed to load plugin' "
            "when it does not) and that VLLM_PLUGINS, if set, names it"
        )


class SharedEngine:
    """One engine for several jobs in a row (generation, then the nll pass of classification):
    `with shared() as llm:` gives `llm` if one is running, else starts one with `start()`, and
    keeps it for the next; `close()` (or leaving `with SharedEngine(...)`) shuts it down."""

    def __init__(self, start=None, llm=None):
        self.start, self.llm = start, llm

    @contextlib.contextmanager
    def __call__(self):
        if self.llm is None:
            self.llm = self.start()
        yield self.llm

    def close(self) -> None:
        if self.llm is not None:
            close_llm(self.llm)
            self.llm = None

    def __enter__(self) -> SharedEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def close_llm(llm) -> None:
    """Shut the engine's processes down now rather than at interpreter exit."""
    from steer_batch.engine import hooks  # imports vLLM: loaded by now, not before make_llm

    # With vLLM's default grace its CPU worker, which takes a few seconds to exit, is killed, and
    # leaks a shared-memory segment (a warning at exit); given the time it exits cleanly, as fast.
    hooks.shutdown(llm, SHUTDOWN_SECONDS)
    del llm
    gc.collect()
