"""Hidden states captured inside vLLM equal the HF reference (forward hooks on the decoder
layers, last prompt token), under chunked prefill, including the last layer (not normed)."""

import numpy as np
import pytest

from helpers import hf_last_token_outputs, make_llm, make_model, make_prompts
from steer_batch.engine.capture import capture_last_token_states

LAYERS = [0, 2, 3]


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
    want = np.stack([hf_last_token_outputs(model_dir, p, LAYERS) for p in prompts])
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
