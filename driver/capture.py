"""Hidden-state capture through vLLM: prefill-only requests on an engine whose chosen layers copy
their residual-stream output at each prompt's last token into a persistent buffer from inside
the graph (compiled or eager; engine/model.py), read back from the workers through the worker
extension (engine/worker.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from steer_batch.driver.launch import close_llm, make_llm, on_cpu
from steer_batch.engine.config import engine_config


def capture_last_token_states(model_dir: Path, prompts: list, layers: list[int], **engine_kwargs) -> np.ndarray:
    """[len(prompts), len(layers), hidden] float32: each layer's residual-stream output at each
    prompt's last token, computed by a vLLM engine started for it (`capture_defaults` under
    `engine_kwargs`, which go to make_llm)."""
    llm = make_llm(model_dir, additional_config=engine_config(capture=list(layers)), **capture_defaults(engine_kwargs))
    try:
        return capture_states(llm, prompts, layers)
    finally:
        close_llm(llm)


def capture_defaults(engine_kwargs: dict) -> dict:
    """Engine arguments for an engine started to capture, under `engine_kwargs` (which win):
    eager (a prefill-only job: compiling would cost more start-up than it saves) and, on CPU,
    32-token KV blocks instead of vLLM's 128: contrastive prompts share a long head (chat
    template + persona, 32 of SmolLM2's ~41 tokens), and the prefix cache only reuses whole
    blocks, so with 128 every prompt is computed in full. 32 is the CPU attention's preferred
    multiple."""
    return {"enforce_eager": True, **({"block_size": 32} if on_cpu() else {}), **engine_kwargs}


def capture_states(llm, prompts: list, layers: list[int]) -> np.ndarray:
    """`capture_last_token_states` on a running engine that captures `layers` (it may steer and
    generate as well: prefill-only requests are the captured ones here)."""
    from vllm import SamplingParams  # vLLM loads with the engine, not when jobs/extract.py imports this

    llm.collective_rpc("steer_batch_take_captures")  # drop rows other requests left
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0))  # progress bar on stderr
    return merge_captures(llm.collective_rpc("steer_batch_take_captures"), [o.request_id for o in outs], list(layers))


def merge_captures(taken: list[dict], request_ids: list[str], layers: list[int]) -> np.ndarray:
    """[requests, layers, hidden] from every worker's `steer_batch_take_captures`: a pipeline
    stage holds its own layers, tensor-parallel ranks hold the same rows (the first counts)."""
    # The workers see vLLM's internal request ids: the caller's id plus "-" and 8 random characters.
    found: dict[tuple[str, int], np.ndarray] = {}
    for worker in taken:
        rows = np.frombuffer(worker["data"], dtype=np.float32).reshape(worker["shape"])
        for rid, row in zip(worker["ids"], rows):
            for layer, state in zip(worker["layers"], row):
                found.setdefault((rid.rsplit("-", 1)[0], layer), state)
    missing = [(rid, layer) for rid in request_ids for layer in layers if (rid, layer) not in found]
    if missing:
        raise RuntimeError(
            f"vLLM returned no hidden states for {len(missing)} (request, layer) pairs of {len(request_ids)} prompts "
            f"(first: request {missing[0][0]}, layer {missing[0][1]})"
        )
    return np.stack([np.stack([found[(rid, layer)] for layer in layers]) for rid in request_ids])
