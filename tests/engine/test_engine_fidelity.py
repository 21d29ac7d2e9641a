"""Steered vLLM equals the HF forward-hook oracle, token for token, for every supported family,
eager and compiled, in one batch mixing vectors and alphas under chunked prefill."""

import pytest

from helpers import close_llm, generate, make_llm, make_model, make_prompts, make_vector, oracle_greedy

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
# Random Gemma models put most logit mass on a few tokens: they need stronger vectors to flip them.
VECTOR_SCALE = {"gemma2": 4.0, "gemma3": 4.0}
N_TOKENS = 16
# 24 requests: none, alpha 0, three alphas of both signs on vector a, one on vector b.
STEER = [None, ("a", 0.0), ("a", 1.0), ("a", -1.5), ("a", 2.5), ("b", -2.0)] * 4


# "fused": the steering add folded into the next layer's RMSNorm (the GPU default), run here
# through the same custom op's CPU implementation. Every family eager; compiled, every family
# whose model code is its own: vLLM's Mistral is its Llama (MistralModel(LlamaModel), layers
# subclassing LlamaDecoderLayer), and Qwen3's model is Qwen2's (Qwen3Model(Qwen2Model)), so
# llama-compiled and qwen3-compiled compile those graphs.
COMPILED = ["llama", "qwen3", "gemma2", "gemma3"]
MODES = (
    [(f, "eager") for f in FAMILIES]
    + [(f, "compiled") for f in COMPILED]
    + [
        ("llama", "fused-eager"),
        ("llama", "fused-compiled"),
        ("qwen3", "fused-compiled"),
        ("gemma2", "fused-eager"),
    ]
)


@pytest.fixture(scope="module", params=MODES, ids=lambda p: f"{p[0]}-{p[1]}")
def engine(request, tmp_path_factory):
    family, mode = request.param
    folder = tmp_path_factory.mktemp(family)
    model_dir = make_model(family, folder / "model")
    scale = VECTOR_SCALE.get(family, 1.0)
    vectors = {
        "a": make_vector(model_dir, [1, 2], seed=1, scale=scale),
        "b": make_vector(model_dir, [0, 3], seed=2, scale=scale),
    }
    paths = {}
    for name, v in vectors.items():
        paths[name] = folder / f"{name}.safetensors"
        v.save(paths[name])
    # max_num_batched_tokens 64 < the longest prompts: prefill is chunked and mixed with decodes.
    steering = {"steering": {"steer_op": "fused" if mode.startswith("fused") else "add"}}
    llm = make_llm(
        model_dir, paths, eager=mode.endswith("eager"), max_num_batched_tokens=64, additional_config=steering
    )
    yield llm, model_dir, vectors, (family, mode)
    close_llm(llm)


def test_steering_sits_where_the_mode_says(engine):
    llm, _, _, (family, mode) = engine
    layout = llm.collective_rpc("steer_batch_layout")[0]
    # Vectors a (layers 1, 2) and b (0, 3); fused: every layer's add moves into the next RMSNorm
    # (layer 3's into the final norm), except on Gemma, whose norms are not plain RMSNorm.
    if mode.startswith("fused") and not family.startswith("gemma"):
        assert layout == {"added": [], "folded": [0, 1, 2, 3], "captured": [], "stage": [0, 4]}
    else:
        assert layout == {"added": [0, 1, 2, 3], "folded": [], "captured": [], "stage": [0, 4]}


def test_mixed_batch_matches_oracle(engine):
    llm, model_dir, vectors, _ = engine
    prompts = make_prompts(len(STEER), seed=0, max_len=90)
    got = generate(llm, prompts, N_TOKENS, STEER)
    want = [
        oracle_greedy(model_dir, p, N_TOKENS, vectors[s[0]] if s else None, s[1] if s else 0.0)
        for p, s in zip(prompts, STEER)
    ]
    plain = [oracle_greedy(model_dir, p, N_TOKENS) for p in prompts]
    # The test can fail: steering must change what most steered requests generate.
    changed = sum(w != u for w, u, s in zip(want, plain, STEER) if s and s[1])
    assert changed >= 8, (
        f"steering changed only {changed} of 16 steered requests; the vectors are too weak to test anything"
    )
    mismatches = [(i, s, g, w) for i, (g, w, s) in enumerate(zip(got, want, STEER)) if g != w]
    assert not mismatches, f"{len(mismatches)} requests differ from the oracle, first: {mismatches[0]}"


# Every request on vector a at its own nonzero alpha: every token of every step adds from one bank
# row, the CPU op's path that broadcasts that row (kernels/steer.py steer_add_); the mixed batch
# above never takes it (its unsteered requests leave tokens unsteered).
ONE_VECTOR = [("a", a) for a in (1.0, -1.5, 2.5, -0.5, 0.75, -2.0, 3.0, -3.0)]


def test_a_batch_on_one_vector_matches_oracle(engine):
    llm, model_dir, vectors, (family, mode) = engine
    if family != "llama" or mode not in ("eager", "compiled"):
        pytest.skip("the CPU's separate add, eager and compiled, on one family")
    prompts = make_prompts(len(ONE_VECTOR), seed=1, max_len=90)
    got = generate(llm, prompts, N_TOKENS, ONE_VECTOR)
    want = [oracle_greedy(model_dir, p, N_TOKENS, vectors["a"], alpha) for p, (_, alpha) in zip(prompts, ONE_VECTOR)]
    plain = [oracle_greedy(model_dir, p, N_TOKENS) for p in prompts]
    assert sum(w != u for w, u in zip(want, plain)) >= 4, "the vector must change some requests' tokens"
    mismatches = [(i, s, g, w) for i, (g, w, s) in enumerate(zip(got, want, ONE_VECTOR)) if g != w]
    assert not mismatches, f"{len(mismatches)} requests differ from the oracle, first: {mismatches[0]}"
