"""Hidden states captured inside vLLM equal the HF reference (forward hooks on the decoder
layers, last prompt token), under chunked prefill, including the last layer (not normed)."""

import numpy as np
import pytest
import torch

from helpers import load_hf, make_llm, make_model, make_prompts
from steer_batch.engine.capture import capture_last_token_states

LAYERS = [0, 2, 3]


def hf_states(model_dir, prompt: list[int]) -> np.ndarray:
    """[len(LAYERS), hidden]: each layer's output at the last token, read by forward hooks."""
    model, got = load_hf(model_dir), {}
    handles = [
        model.model.layers[i].register_forward_hook(
            lambda m, a, out, i=i: got.__setitem__(i, (out[0] if isinstance(out, tuple) else out)[0, -1])
        )
        for i in LAYERS
    ]
    with torch.no_grad():
        model(torch.tensor([prompt]))
    for h in handles:
        h.remove()
    return torch.stack([got[i] for i in LAYERS]).numpy()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_vllm_capture_equals_hf_reference(family, tmp_path):
    model_dir = make_model(family, tmp_path / family)
    prompts = make_prompts(10, seed=7, max_len=150)  # longer than one 64-token step: chunked prefill
    got = capture_last_token_states(
        model_dir,
        [{"prompt_token_ids": p} for p in prompts],
        LAYERS,
        skip_tokenizer_init=True,
        max_model_len=512,
        max_num_batched_tokens=64,
    )
    want = np.stack([hf_states(model_dir, p) for p in prompts])
    assert got.shape == want.shape == (10, len(LAYERS), 128)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale, (
        f"max abs diff {np.abs(got - want).max():.3g} (values up to {scale:.3g})"
    )


def test_capture_refuses_compiled_engines_and_layers_out_of_range(tmp_path):
    model_dir = make_model("llama", tmp_path / "llama")
    with pytest.raises(ValueError, match="needs an eager engine"):
        make_llm(model_dir, eager=False, additional_config={"steering": {"capture": [1]}})
    with pytest.raises(ValueError, match=r"layers \[4\] are outside 0..3"):
        make_llm(model_dir, additional_config={"steering": {"capture": [1, 4]}})
