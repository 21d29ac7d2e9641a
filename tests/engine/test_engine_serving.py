"""One steering engine serving mixed traffic: identity with stock vLLM, batch vs solo runs,
prefix caching across steering settings, request validation, and start-up refusals."""

import math

import pytest
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from helpers import (
    OVERFLOW_MAX_ABS_ALPHA,
    SPIKE,
    close_llm,
    generate,
    make_llm,
    make_model,
    make_prompts,
    make_vector,
    oracle_greedy,
    spike_vector,
)
from steer_batch import SteeringVector
from steer_batch.driver import launch

N_TOKENS = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serving")
    model_dir = make_model("llama", folder / "model")
    vectors = {"a": make_vector(model_dir, [1, 2], seed=1), "b": make_vector(model_dir, [2, 3], seed=2)}
    paths = {name: folder / f"{name}.safetensors" for name in vectors}
    for name, v in vectors.items():
        v.save(paths[name])
    return folder, model_dir, vectors, paths


# The bound raised (helpers.OVERFLOW_MAX_ABS_ALPHA) so that requests whose states overflow reach
# the engine (the default, 1000, refuses them in the front end).
MAX_ABS_ALPHA = OVERFLOW_MAX_ABS_ALPHA


@pytest.fixture(scope="module")
def llm(setup):
    folder, model_dir, _, paths = setup
    spike_vector((1, 2), SPIKE).save(folder / "spike.safetensors")
    llm = make_llm(
        model_dir,
        {**paths, "spike": folder / "spike.safetensors"},
        max_num_batched_tokens=64,
        enable_prefix_caching=True,
        additional_config={"steering": {"max_abs_alpha": MAX_ABS_ALPHA}},
    )
    yield llm
    close_llm(llm)


@pytest.fixture(scope="module")
def stock(setup):
    """A stock engine (no `steering` key: the installed plugin stays inert)."""
    _, model_dir, _, _ = setup
    stock = make_llm(model_dir, max_num_batched_tokens=64)
    yield stock
    close_llm(stock)


@pytest.fixture(scope="module")
def stock_tokens(stock):
    """Greedy tokens of the stock engine."""
    prompts = make_prompts(12, seed=3)
    return prompts, generate(stock, prompts, N_TOKENS, [None] * len(prompts))


def test_stock_engine_matches_oracle(setup, stock_tokens):
    _, model_dir, _, _ = setup
    prompts, tokens = stock_tokens
    assert tokens == [oracle_greedy(model_dir, p, N_TOKENS) for p in prompts]


def test_unsteered_and_alpha_zero_equal_stock_vllm(llm, stock_tokens):
    prompts, tokens = stock_tokens
    steer = [None, ("a", 0.0), ("b", 0), None] * 3
    assert generate(llm, prompts, N_TOKENS, steer) == tokens


def test_batch_equals_solo_runs_and_oracle(setup, llm):
    _, model_dir, vectors, _ = setup
    prompts = make_prompts(6, seed=4, min_len=60, max_len=120)  # longer than the 64-token step budget
    steer = [("a", 2.0), ("a", -2.0), ("a", 0.7), ("b", 3.0), None, ("b", -1.0)]
    batch = generate(llm, prompts, N_TOKENS, steer)
    solo = [generate(llm, [p], N_TOKENS, [s])[0] for p, s in zip(prompts, steer)]
    oracle = [
        oracle_greedy(model_dir, p, N_TOKENS, vectors[s[0]] if s else None, s[1] if s else 0.0)
        for p, s in zip(prompts, steer)
    ]
    assert batch == solo
    assert batch == oracle


def _run(llm, prompt, steer):
    extra = {"steering_vector": steer[0], "steering_alpha": steer[1]} if steer else None
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True, extra_args=extra)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), out.num_cached_tokens


def test_prefix_cache_never_crosses_steering_settings(setup, llm):
    _, model_dir, vectors, _ = setup
    prompt = make_prompts(1, seed=5, min_len=300, max_len=300)[0]

    def oracle(steer):
        return oracle_greedy(
            model_dir, prompt, N_TOKENS, vectors[steer[0]] if steer else None, steer[1] if steer else 0.0
        )

    first, cached = _run(llm, prompt, ("a", 2.0))
    assert first == oracle(("a", 2.0)) and cached == 0
    plain, cached = _run(llm, prompt, None)
    assert plain == oracle(None) and cached == 0, "an unsteered request reused KV computed under steering"
    other, cached = _run(llm, prompt, ("a", -2.0))
    assert other == oracle(("a", -2.0)) and cached == 0, "a request reused KV computed under another alpha"
    # The cache still works within one setting, and alpha 0 shares it with unsteered traffic.
    again, cached = _run(llm, prompt, ("a", 2.0))
    assert again == first and cached > 0
    zero, cached = _run(llm, prompt, ("a", 0.0))
    assert zero == plain and cached > 0


@pytest.mark.parametrize(
    "extra, field, message",
    [
        (
            {"steering_vector": "sad", "steering_alpha": 1.0},
            "steering_vector",
            r"'sad' is not a vector of this engine; allowed: \['a', 'b', 'spike'\]",
        ),
        (
            {"steering_vector": "a", "steering_alpha": math.nan},
            "steering_alpha",
            "steering_alpha=nan must be a finite number",
        ),
        (
            {"steering_vector": "a", "steering_alpha": math.inf},
            "steering_alpha",
            "steering_alpha=inf must be a finite number",
        ),
        (
            {"steering_vector": "a", "steering_alpha": "4"},
            "steering_alpha",
            "steering_alpha='4' must be a finite number",
        ),
        ({"steering_vector": [["a"]], "steering_alpha": 1.0}, "steering_vector", "is not a vector of this engine"),
        ({"steering_vector": ["a", "b"], "steering_alpha": [1.0]}, "steering_alpha", "lists 1 values for 2 vector"),
        ({"steering_vector": "a", "steering_alpha": 1.0, "steering_op": "scale"}, "steering_op", "allowed: \\['add'"),
        ({"steering_vector": ["a"] * 5, "steering_alpha": 1.0}, "steering_vector", "takes 1 to 4 per request"),
        (
            {"steering_vector": "a", "steering_alpha": 1.0, "steering_layers": [1]},
            "steering_layers",
            "unknown steering argument 'steering_layers'",
        ),
        ({"steering_alpha": 1.0}, "steering_vector", "steering_vector is missing"),
        (
            {"steering_vector": "a", "steering_alpha": 1e39},
            "steering_alpha",
            r"steering_alpha=1e\+39 is outside \[-1e\+36, 1e\+36\], this engine's max_abs_alpha",
        ),
    ],
)
def test_bad_request_fails_alone(setup, llm, extra, field, message):
    _, model_dir, vectors, _ = setup
    prompt = make_prompts(1, seed=6)[0]
    with pytest.raises(VLLMValidationError, match=message) as e:
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=4, extra_args=extra), use_tqdm=False)
    assert e.value.parameter == field
    # The engine keeps serving.
    assert _run(llm, prompt, ("b", 1.5))[0] == oracle_greedy(model_dir, prompt, N_TOKENS, vectors["b"], 1.5)


# Requests whose steered states overflow: the spike makes the logits NaN, the others
# push the states far out and make the request's own text degenerate.
EXTREME = [
    {"steering_vector": "a", "steering_alpha": 1e30},
    {"steering_vector": "a", "steering_alpha": -1e30},
    {"steering_vector": "spike", "steering_alpha": MAX_ABS_ALPHA},
    {"steering_vector": "a", "steering_alpha": 1e6},
]


def test_extreme_requests_change_no_other_request(llm):
    """Regression (issue 8): requests whose states overflowed left NaN/inf in their KV blocks, and
    the attention kernel read the unused tail of a reused block (0 * NaN = NaN), so later requests,
    unsteered ones included, changed. Each request alone, then extremes, then the same requests
    batched and shuffled: every output equals its solo reference."""
    import random

    prompts = make_prompts(24, seed=20, min_len=5, max_len=60)
    steer = [("a", -1.0), None, ("a", 0.0), ("b", 1.5)] * 6
    solo = [generate(llm, [p], N_TOKENS, [s])[0] for p, s in zip(prompts, steer)]
    extreme = [
        SamplingParams(
            max_tokens=N_TOKENS,
            temperature=0.0,
            ignore_eos=True,
            extra_args=extra,
        )
        for extra in EXTREME
    ]
    # Longer than any request that follows (one 128-token KV block each on CPU), so a request that
    # gets a freed block later always reads slots the extreme one wrote.
    long_prompts = make_prompts(len(EXTREME), seed=21, min_len=100, max_len=120)
    outs = llm.generate([{"prompt_token_ids": p} for p in long_prompts], extreme, use_tqdm=False)
    # The request whose logits turned NaN ends in an error, with none of its garbage tokens.
    assert (outs[2].outputs[0].finish_reason, list(outs[2].outputs[0].token_ids)) == ("error", [])
    for r in range(3):
        order = random.Random(r).sample(range(len(prompts)), len(prompts))
        got = generate(llm, [prompts[i] for i in order], N_TOKENS, [steer[i] for i in order])
        changed = [(i, steer[i]) for i, g in zip(order, got) if g != solo[i]]
        assert not changed, f"round {r}: {len(changed)} requests changed after the extreme ones: {changed}"


def _bad_vector(folder, model_dir, name, **change):
    v = make_vector(model_dir, [1], seed=9)
    hidden, layers = v.hidden_size, v.num_layers
    if "hidden" in change:
        v = SteeringVector({1: torch.ones(change["hidden"])}, layers)
    if "num_layers" in change:
        v = SteeringVector({6: torch.ones(hidden)}, change["num_layers"])
    if "nan" in change:
        v.directions[1][5] = math.nan
    path = folder / name
    v.save(path)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden": 64}, r"steering vector 'x': \S+/bad\.safetensors: layers\.1 has hidden size 64; expected 128"),
        ({"num_layers": 8}, r"steering vector 'x': \S+/bad\.safetensors: made for 8 layers; expected 4"),
        ({"nan": True}, r"steering vector 'x': \S+/bad\.safetensors: layers\.1 holds NaN or inf"),
    ],
)
def test_engine_refuses_vectors_that_do_not_fit(setup, change, message):
    folder, model_dir, _, _ = setup
    path = _bad_vector(folder, model_dir, "bad.safetensors", **change)
    with pytest.raises(ValueError, match=message):
        make_llm(model_dir, {"x": path})


def test_engine_refuses_unsupported_architecture(setup, tmp_path):
    folder, _, _, paths = setup
    gpt2 = make_model("gpt2", tmp_path / "gpt2")
    with pytest.raises(
        ValueError, match=r"cannot steer architecture GPT2LMHeadModel; supported: \['Gemma2ForCausalLM'"
    ):
        make_llm(gpt2, {"a": paths["a"]})


def _config_hash(model_dir, vectors, **steering):
    from vllm.engine.arg_utils import EngineArgs

    if vectors:
        steering["vectors"] = {k: str(v) for k, v in vectors.items()}
    extra = {"additional_config": {"steering": steering}} if steering else {}
    args = EngineArgs(model=str(model_dir), skip_tokenizer_init=True, dtype="float32", **extra)
    return args.create_engine_config().compute_hash()


def test_compile_cache_key_follows_the_steered_layers(setup, tmp_path):
    """vLLM keys its compile cache by the config hash: a graph compiled for other steered layers
    (or none) must never be reused, even when the vector file keeps its name."""
    _, model_dir, _, _ = setup
    path = tmp_path / "v.safetensors"
    make_vector(model_dir, [1, 2], seed=1).save(path)
    first = _config_hash(model_dir, {"v": path})
    assert _config_hash(model_dir, {"v": path}) == first
    # Every other setting that shapes the graph changes the key too.
    others = [
        _config_hash(model_dir, {"v": path}, steer_op="fused"),
        _config_hash(model_dir, {"v": path}, max_vectors_per_request=2),
        _config_hash(model_dir, {"v": path}, max_vectors=4),
        _config_hash(model_dir, {"v": path}, capture=[3]),
        _config_hash(model_dir, None, runtime_vectors=True),
        _config_hash(model_dir, None, runtime_vectors=True, layers=[1, 2]),
    ]
    assert len({first, *others}) == 1 + len(others)
    make_vector(model_dir, [0, 3], seed=1).save(path)
    assert _config_hash(model_dir, {"v": path}) != first
    assert _config_hash(model_dir, None) != first


def test_steering_left_out_of_vllm_plugins_is_refused_before_start(setup, monkeypatch):
    _, model_dir, _, paths = setup
    monkeypatch.setenv("VLLM_PLUGINS", "some_other_plugin")
    with pytest.raises(
        RuntimeError,
        match=r"VLLM_PLUGINS='some_other_plugin' leaves out 'steer_batch'.*VLLM_PLUGINS=some_other_plugin,steer_batch",
    ):
        make_llm(model_dir, paths)


def test_an_engine_without_steering_installed_fails_the_start_up_check(llm, stock):
    launch.require_steering(llm)  # the steering engine passes
    with pytest.raises(RuntimeError, match="steering was asked for but is not installed"):
        launch.require_steering(stock)  # what a process that did not load the plugin looks like
