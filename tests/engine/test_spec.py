"""Steering spec v2 on the real engine against the HF-hook oracle, token for token: several
vectors per request, add / ablate / clamp, scopes and positions, all mixed in one shuffled batch
under chunked prefill and prefix caching, eager and compiled, Llama and Qwen2, and the fused
path; then the identities that must hold (ablate, clamp and capture; a + b; positions [0, -1])."""

import random

import numpy as np
import pytest
from vllm import SamplingParams

from helpers import close_llm, generate, make_llm, make_model, make_prompts, make_vector, oracle_greedy
from steer_batch import steering
from steer_batch.driver.capture import merge_captures

N_TOKENS = 12
# a on layers 1-2, b on 0 and 3, c on 1-3: c shares layers with both, so the order of entries matters.
LAYERS = {"a": [1, 2], "b": [0, 3], "c": [1, 2, 3]}
# (extra_args, oracle entries as (vector, alpha, op, scope), positions, prompt length range)
CASES = [
    ("unsteered", None, [], (0, None)),
    ("one add", steering("a", 1.5), [("a", 1.5, "add", "all")], (0, None)),
    ("two adds", steering(("a", 1.0), ("b", -1.5)), [("a", 1.0, "add", "all"), ("b", -1.5, "add", "all")], (0, None)),
    (
        "add then ablate",
        steering(("a", 1.5), ("c", 1.0, "ablate")),
        [("a", 1.5, "add", "all"), ("c", 1.0, "ablate", "all")],
        (0, None),
    ),
    (
        "ablate then add",
        steering(("c", 1.0, "ablate"), ("a", 1.5)),
        [("c", 1.0, "ablate", "all"), ("a", 1.5, "add", "all")],
        (0, None),
    ),
    ("ablate", steering("c", 1.0, "ablate"), [("c", 1.0, "ablate", "all")], (0, None)),
    ("clamp", steering("c", 4.0, "clamp"), [("c", 4.0, "clamp", "all")], (0, None)),
    ("scope prompt", steering("a", 2.0, "add", "prompt"), [("a", 2.0, "add", "prompt")], (0, None)),
    ("scope generated", steering("a", 2.0, "add", "generated"), [("a", 2.0, "add", "generated")], (0, None)),
    (
        "per-entry scopes",
        steering(("a", 2.0, "add", "prompt"), ("b", -2.0, "add", "generated")),
        [("a", 2.0, "add", "prompt"), ("b", -2.0, "add", "generated")],
        (0, None),
    ),
    (
        "ActAdd: prompt, positions [0, 4]",
        steering("a", 3.0, "add", "prompt", positions=(0, 4)),
        [("a", 3.0, "add", "prompt")],
        (0, 4),
    ),
    (
        "positions across chunks",
        steering(("b", 2.0), ("c", 3.0, "clamp"), positions=(50, 140)),
        [("b", 2.0, "add", "all"), ("c", 3.0, "clamp", "all")],
        (50, 140),
    ),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made = {}
    for family in ("llama", "qwen2"):
        folder = tmp_path_factory.mktemp(family)
        model_dir = make_model(family, folder / "model")
        vectors = {name: make_vector(model_dir, layers, seed=i + 1) for i, (name, layers) in enumerate(LAYERS.items())}
        paths = {}
        for name, v in vectors.items():
            paths[name] = folder / f"{name}.safetensors"
            v.save(paths[name])
        made[family] = (model_dir, vectors, paths)
    return made


@pytest.fixture(scope="module")
def requests():
    """Every case twice, on short prompts and on long ones (up to 180 tokens, prefilled in
    64-token chunks); one long prompt reused by three cases and twice by one, for the prefix cache."""
    prompts = make_prompts(len(CASES), seed=31, min_len=5, max_len=40) + make_prompts(
        len(CASES), seed=32, min_len=100, max_len=180
    )
    shared = make_prompts(1, seed=33, min_len=170, max_len=170)[0]
    items = [(prompts[i], CASES[i % len(CASES)]) for i in range(len(prompts))]
    items += [(shared, CASES[k]) for k in (0, 1, 11, 11)]
    random.Random(5).shuffle(items)
    return items


MODES = [
    ("llama", "eager"),
    ("llama", "compiled"),
    ("qwen2", "eager"),  # compiled, Qwen2's model code runs in test_engine_fidelity's qwen3-compiled
    ("llama", "fused-compiled"),
]


@pytest.fixture(scope="module", params=MODES, ids=lambda m: f"{m[0]}-{m[1]}")
def engine(request, models):
    family, mode = request.param
    model_dir, vectors, paths = models[family]
    steering_config = {"steering": {"steer_op": "fused" if mode.startswith("fused") else "add"}}
    llm = make_llm(
        model_dir,
        paths,
        eager=mode == "eager",
        max_num_batched_tokens=64,
        enable_prefix_caching=True,
        additional_config=steering_config,
    )
    yield llm, model_dir, vectors
    close_llm(llm)


def _oracle(model_dir, vectors, prompt, case):
    _, _, entries, positions = case
    return oracle_greedy(
        model_dir, prompt, N_TOKENS, entries=[(vectors[n], *rest) for n, *rest in entries], positions=positions
    )


def test_mixed_spec_batch_matches_oracle(engine, requests):
    llm, model_dir, vectors = engine
    got = generate(llm, [p for p, _ in requests], N_TOKENS, [case[1] for _, case in requests])
    want = [_oracle(model_dir, vectors, p, case) for p, case in requests]
    plain = [oracle_greedy(model_dir, p, N_TOKENS) for p, _ in requests]
    # The test can fail: every kind of spec changes what some of its requests generate.
    for name in [c[0] for c in CASES[1:]]:
        changed = [w != u for (_, case), w, u in zip(requests, want, plain) if case[0] == name]
        assert any(changed), f"{name!r} changed no request; the vectors are too weak to test it"
    mismatches = [(case[0], len(p), g, w) for (p, case), g, w in zip(requests, got, want) if g != w]
    assert not mismatches, (
        f"{len(mismatches)} of {len(requests)} requests differ from the oracle, first: {mismatches[0]}"
    )


@pytest.fixture(scope="module")
def capture_engine(models):
    """An eager engine that steers and captures layers 1 and 2 (after steering) at each prompt's last token."""
    model_dir, vectors, paths = models["llama"]
    llm = make_llm(model_dir, paths, additional_config={"steering": {"capture": [1, 2]}})
    yield llm, model_dir, vectors
    close_llm(llm)


def _captured(llm, prompts, extra_args):
    llm.collective_rpc("steer_batch_take_captures")  # drop what earlier requests left
    params = [SamplingParams(max_tokens=1, temperature=0.0, extra_args=a) for a in extra_args]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    taken = llm.collective_rpc("steer_batch_take_captures")
    return merge_captures(taken, [o.request_id for o in outs], [1, 2])  # [prompts, layers 1 and 2, hidden]


def test_ablate_removes_and_clamp_sets_the_projection(capture_engine):
    llm, _, vectors = capture_engine
    prompts = make_prompts(4, seed=41, max_len=90)
    u = {i: (vectors["c"].directions[i] / vectors["c"].directions[i].norm()).numpy() for i in (1, 2)}
    plain = _captured(llm, prompts, [None] * 4)
    ablated = _captured(llm, prompts, [steering("c", 1.0, "ablate")] * 4)
    clamped = _captured(llm, prompts, [steering("c", 7.5, "clamp")] * 4)
    for j, layer in enumerate((1, 2)):
        scale = np.abs(plain[:, j] @ u[layer]).max()
        assert scale > 0.5, "the unsteered projections must be far from 0 for the identity to mean anything"
        assert np.abs(ablated[:, j] @ u[layer]).max() <= 1e-4 * np.abs(plain[:, j]).max() * 10
        np.testing.assert_allclose(clamped[:, j] @ u[layer], 7.5, atol=1e-3)


def test_two_adds_equal_one_add_of_the_sum(capture_engine):
    llm, _, _ = capture_engine
    prompts = make_prompts(6, seed=42, max_len=90)
    two = generate(llm, prompts, N_TOKENS, [steering(("a", 1.25), ("a", -0.5))] * 6)
    one = generate(llm, prompts, N_TOKENS, [steering("a", 0.75)] * 6)
    assert two == one
    assert one != generate(llm, prompts, N_TOKENS, [None] * 6)


def test_positions_to_the_end_with_scope_all_equal_no_positions(capture_engine):
    llm, _, _ = capture_engine
    prompts = make_prompts(6, seed=43, max_len=90)
    assert generate(llm, prompts, N_TOKENS, [steering("b", 2.0, positions=(0, -1))] * 6) == generate(
        llm, prompts, N_TOKENS, [steering("b", 2.0)] * 6
    )


def test_preemption_keeps_the_prompt_generated_split(models):
    """A KV cache too small for the batch (18 blocks of 32 tokens) makes vLLM preempt running
    requests and recompute them later from their prompt and output so far; scopes and positions
    must still count from the sequence's own start."""
    model_dir, vectors, paths = models["llama"]
    llm = make_llm(
        model_dir, paths, block_size=32, num_gpu_blocks_override=18, max_num_batched_tokens=64, disable_log_stats=False
    )
    try:
        prompts = make_prompts(16, seed=44, min_len=20, max_len=40)
        cases = [CASES[k] for k in (8, 7, 9, 10)] * 4  # scope generated, prompt, per-entry, ActAdd positions
        got = generate(llm, prompts, 24, [case[1] for case in cases])
        preempted = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}["vllm:num_preemptions"]
    finally:
        close_llm(llm)
    assert preempted > 0, "no request was preempted: the test did not test anything"
    want = [
        oracle_greedy(model_dir, p, 24, entries=[(vectors[n], *rest) for n, *rest in case[2]], positions=case[3])
        for p, case in zip(prompts, cases)
    ]
    assert got == want
