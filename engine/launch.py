"""Start a vLLM engine with steering, with the settings this project measured for CPU machines."""

from __future__ import annotations

import os
from pathlib import Path


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def make_llm(model: str | Path, vectors: dict[str, str | Path] | None = None, **kwargs):
    """An `LLM` steering with `vectors` (name -> file), or a stock one when there are none.

    On CPU: fp32 (this CPU has no AVX-512 bf16; bf16 ran several times slower), 30% of memory
    for the engine, and no core reserved for the scheduler (VLLM_CPU_NUM_OF_RESERVED_CPU=0 took
    SmolLM2 from 241 to 430 tok/s on 2 cores). Keyword arguments override any of these. The
    worker extension (engine/worker.py) answers `llm.collective_rpc("steer_batch_layout")` and
    carries captured hidden states back.
    """
    from vllm import LLM

    if on_cpu():
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        kwargs = {"dtype": "float32", "gpu_memory_utilization": 0.3, **kwargs}
    kwargs.setdefault("worker_extension_cls", "steer_batch.engine.worker.SteeringWorkerExtension")
    if vectors:  # merged into any steering settings passed in additional_config
        steering = kwargs.setdefault("additional_config", {}).setdefault("steering", {})
        steering["vectors"] = {name: str(path) for name, path in vectors.items()}
    return LLM(model=str(model), **kwargs)


def close_llm(llm) -> None:
    """Shut the engine's processes down now rather than at interpreter exit."""
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
