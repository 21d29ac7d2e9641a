"""Hidden states captured inside vLLM equal the HF reference (forward hooks on the decoder
layers, last prompt token), under chunked prefill, including the last layer (not normed)."""

import numpy as np
import pytest

from helpers import hf_last_token_outputs, make_llm, make_model, make_prompts
from steer_batch.driver.capture import capture_last_token_states

LAYERS = [0, 2, 3]


@pytest.mark.parametrize("family, mode", [("llama", "eager"), ("llama", "compiled"), ("gemma2", "compiled")])
def test_vllm_capture_equals_hf_reference(family, mode, tmp_path):
    """Eager, and compiled: the rows are copied by a custom op inside the compiled graph."""
    model_dir = make_model(family, tmp_path / family)
    prompts = make_prompts(10, seed=7, max_len=150)  # longer than one 64-token step: chunked prefill
    got = capture_last_token_states(
        model_dir,
        [{"prompt_token_ids": p} for p in prompts],
        LAYERS,
        skip_tokenizer_init=True,
        max_model_len=512,
        max_num_batched_tokens=64,
        enforce_eager=mode == "eager",
    )
    want = np.stack([hf_last_token_outputs(model_dir, p, LAYERS) for p in prompts])
    assert got.shape == want.shape == (10, len(LAYERS), 128)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale, (
        f"max abs diff {np.abs(got - want).max():.3g} (values up to {scale:.3g})"
    )


def test_capture_refuses_layers_out_of_range(tmp_path):
    model_dir = make_model("llama", tmp_path / "llama")
    with pytest.raises(ValueError, match=r"layers \[4\] are outside 0..3"):
        make_llm(model_dir, additional_config={"steering": {"capture": [1, 4]}})


def test_capture_reads_prompts_served_from_the_prefix_cache(tmp_path):
    """Contrastive prompts share a long head, which the prefix cache serves after the first one
    (32-token blocks, capture's default on CPU): the last token is still computed and captured."""
    from vllm import SamplingParams

    from helpers import close_llm
    from steer_batch.driver.capture import capture_defaults, capture_states

    model_dir = make_model("llama", tmp_path / "llama")
    head = make_prompts(1, seed=3, min_len=70, max_len=71)[0]
    prompts = [{"prompt_token_ids": head + tail} for tail in make_prompts(8, seed=9, min_len=1, max_len=20)]
    kwargs = capture_defaults(dict(skip_tokenizer_init=True, max_model_len=512))
    llm = make_llm(model_dir, additional_config={"steering": {"capture": LAYERS}}, **kwargs)
    try:
        first = capture_states(llm, prompts, LAYERS)
        cached = [o.num_cached_tokens for o in llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)]
        second = capture_states(llm, prompts, LAYERS)  # every head from the cache now
    finally:
        close_llm(llm)
    assert kwargs["block_size"] == 32 and min(cached) >= 64
    want = np.stack([hf_last_token_outputs(model_dir, p["prompt_token_ids"], LAYERS) for p in prompts])
    scale = np.abs(want).max()
    for got in (first, second):
        assert np.abs(got - want).max() <= 1e-4 * scale
