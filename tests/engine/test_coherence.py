"""The nll scorer (eval/coherence.py) on a steering engine equals plain transformers, token by
token: the log-softmax of the unsteered model's logits at each continuation token."""

import numpy as np
import pytest
import torch

from helpers import close_llm, load_hf, make_llm, make_model, make_vector
from steer_batch.eval.coherence import mean_nll, token_nlls

PROMPTS = ["That game", "I can see", "Hmm, this", "Who is", "Ugh,", "It was my pleasure", "x", "Well, well"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("llama", tmp_path_factory.mktemp("coh") / "model", tokenizer=True)


def _hf_nlls(model_dir, prompt: str, continuation: list[int]) -> np.ndarray:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(prompt).input_ids + continuation
    with torch.no_grad():
        logprobs = load_hf(model_dir)(torch.tensor([ids])).logits[0].log_softmax(-1).double()
    start = len(ids) - len(continuation)
    return np.array([-logprobs[i - 1, ids[i]].item() for i in range(start, len(ids))])


def test_token_nlls_equal_transformers_per_token(model_dir, tmp_path):
    make_vector(model_dir, [1, 2], seed=1).save(tmp_path / "v.safetensors")
    g = torch.Generator().manual_seed(0)
    # Random continuations of several lengths (one empty, one a single token), so most are
    # unlikely under the model and the values spread.
    lengths = [12, 1, 0, 30, 7, 5, 16, 3]
    continuations = [torch.randint(3, 90, (n,), generator=g).tolist() for n in lengths]
    # A steering engine, asked without steering; with its tokenizer, for the text prompts.
    llm = make_llm(model_dir, {"v": tmp_path / "v.safetensors"}, skip_tokenizer_init=False)
    try:
        got = token_nlls(llm, PROMPTS, continuations)
    finally:
        close_llm(llm)
    spread = []
    for prompt, continuation, nlls in zip(PROMPTS, continuations, got):
        want = _hf_nlls(model_dir, prompt, continuation)
        assert nlls.shape == want.shape
        np.testing.assert_allclose(nlls, want, rtol=1e-4, atol=1e-4)
        spread += list(want)
    assert max(spread) - min(spread) > 1.0  # values that differ, so a shifted position would show
    assert np.isnan(mean_nll(got[2])) and mean_nll(got[0]) == pytest.approx(got[0].mean())
