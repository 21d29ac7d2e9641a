"""Hidden-state capture through vLLM: prefill-only requests on an eager engine whose chosen
layers record their residual-stream output at each prompt's last token (engine/model.py), read
back from the workers through the worker extension (engine/worker.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def capture_last_token_states(model_dir: Path, prompts: list[str], layers: list[int], **engine_kwargs) -> np.ndarray:
    """[len(prompts), len(layers), hidden] float32: each layer's residual-stream output at each
    prompt's last token, computed by vLLM."""
    from vllm import SamplingParams

    from steer_batch.engine.launch import close_llm, make_llm

    llm = make_llm(
        model_dir,
        enforce_eager=True,
        enable_prefix_caching=False,
        additional_config={"steering": {"capture": list(layers)}},
        **engine_kwargs,
    )
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0))  # progress bar on stderr
        taken = llm.collective_rpc("steer_batch_take_captures")[0]
    finally:
        close_llm(llm)
    rows = np.frombuffer(taken["data"], dtype=np.float32).reshape(taken["shape"])
    # The workers see vLLM's internal request ids: the caller's id plus "-" and 8 random characters.
    by_external = {rid.rsplit("-", 1)[0]: row for rid, row in zip(taken["ids"], rows)}
    missing = [o.request_id for o in outs if o.request_id not in by_external]
    if missing:
        raise RuntimeError(
            f"vLLM returned no hidden states for {len(missing)} of {len(outs)} prompts (first: request {missing[0]})"
        )
    return np.stack([by_external[o.request_id] for o in outs])
