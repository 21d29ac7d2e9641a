"""Steering under vLLM's tensor and pipeline parallelism on the CPU backend (two workers, one
core each): the mixed batch equals the HF-hook oracle token for token with steered layers on both
pipeline stages and at the stage boundary, both steer_ops; capture equals the HF reference; and
`steer-batch run --tensor-parallel-size 2` / `--pipeline-parallel-size 2` (a vector that leaves
the second stage without a steered layer, which the start-up check must accept)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import (
    close_llm,
    generate,
    hf_last_token_outputs,
    make_llm,
    make_model,
    make_prompts,
    make_run_inputs,
    make_vector,
    oracle_greedy,
)
from steer_batch import SteeringVector, steering
from steer_batch.cli import main
from steer_batch.driver.capture import capture_last_token_states
from steer_batch.eval.arrow_stream import read_table

N_TOKENS = 12
# With 4 layers and 2 stages, layers 0-1 run on the first and 2-3 on the second: a's layers 1 and
# 2 sit on both sides of the boundary, b's on both ends, c's on both stages.
LAYERS = {"a": [1, 2], "b": [0, 3], "c": [1, 3]}
REQUESTS = [
    (None, []),
    (steering("a", 0.0), []),
    (steering("a", 1.5), [("a", 1.5, "add", "all")]),
    (steering("a", -2.0), [("a", -2.0, "add", "all")]),
    (steering("b", 2.0), [("b", 2.0, "add", "all")]),
    (steering(("a", 1.0), ("c", 1.0, "ablate")), [("a", 1.0, "add", "all"), ("c", 1.0, "ablate", "all")]),
    (steering("c", 3.0, "clamp"), [("c", 3.0, "clamp", "all")]),
    (steering("b", -1.5, "add", "generated"), [("b", -1.5, "add", "generated")]),
] * 2
MODES = [("tp", "add", "eager"), ("tp", "fused", "compiled"), ("pp", "add", "eager"), ("pp", "fused", "compiled")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    model_dir = make_model("llama", folder / "model")
    vectors = {name: make_vector(model_dir, layers, seed=i + 1) for i, (name, layers) in enumerate(LAYERS.items())}
    paths = {}
    for name, v in vectors.items():
        paths[name] = folder / f"{name}.safetensors"
        v.save(paths[name])
    return folder, model_dir, vectors, paths


def _parallel(kind: str) -> dict:
    return {"tensor_parallel_size": 2} if kind == "tp" else {"pipeline_parallel_size": 2}


@pytest.fixture(scope="module", params=MODES, ids=lambda m: "-".join(m))
def engine(request, setup):
    kind, op, mode = request.param
    _, model_dir, vectors, paths = setup
    llm = make_llm(
        model_dir,
        paths,
        eager=mode == "eager",
        max_num_batched_tokens=64,
        enable_prefix_caching=True,
        additional_config={"steering": {"steer_op": op}},
        **_parallel(kind),
    )
    yield llm, model_dir, vectors, request.param
    close_llm(llm)


def test_every_worker_steers_its_own_layers(engine):
    llm, _, _, (kind, op, _) = engine
    layouts = llm.collective_rpc("steer_batch_layout")
    assert len(layouts) == 2
    if kind == "tp":  # both ranks hold every layer
        assert all(layout["stage"] == [0, 4] for layout in layouts)
        return
    first, second = layouts
    assert first["stage"] == [0, 2] and second["stage"] == [2, 4]
    steered = {
        "add": ({"added": [0, 1], "folded": []}, {"added": [2, 3], "folded": []}),
        # Layer 1's output crosses to the next stage before its norm: it keeps the separate add.
        "fused": ({"added": [1], "folded": [0]}, {"added": [], "folded": [2, 3]}),
    }[op]
    for layout, want in zip(layouts, steered):
        assert {k: layout[k] for k in want} == want


def test_mixed_batch_matches_oracle(engine):
    llm, model_dir, vectors, _ = engine
    prompts = make_prompts(len(REQUESTS), seed=61, max_len=90)
    got = generate(llm, prompts, N_TOKENS, [r[0] for r in REQUESTS])
    want = [
        oracle_greedy(model_dir, p, N_TOKENS, entries=[(vectors[n], *rest) for n, *rest in r[1]])
        for p, r in zip(prompts, REQUESTS)
    ]
    changed = sum(w != oracle_greedy(model_dir, p, N_TOKENS) for p, w, r in zip(prompts, want, REQUESTS) if r[1])
    assert changed >= 8, "the steering must change most steered requests, or the test tests nothing"
    mismatches = [(i, r[0], g, w) for i, (g, w, r) in enumerate(zip(got, want, REQUESTS)) if g != w]
    assert not mismatches, f"{len(mismatches)} requests differ from the oracle, first: {mismatches[0]}"


@pytest.mark.parametrize("kind", ["tp", "pp"])
def test_capture_equals_the_hf_reference(setup, kind):
    _, model_dir, _, _ = setup
    layers = [0, 1, 2, 3]  # both stages
    prompts = make_prompts(6, seed=62, max_len=120)
    got = capture_last_token_states(
        model_dir,
        [{"prompt_token_ids": p} for p in prompts],
        layers,
        skip_tokenizer_init=True,
        max_model_len=512,
        max_num_batched_tokens=64,
        enforce_eager=True,
        **_parallel(kind),
    )
    want = np.stack([hf_last_token_outputs(model_dir, p, layers) for p in prompts])
    assert got.shape == want.shape == (6, 4, 128)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("kind", ["tp", "pp"])
def test_run_command_under_parallelism(tmp_path, kind):
    """Rows of a parallel `steer-batch run` equal the oracle; under PP the vector's layers (0, 1)
    all sit on the first stage, so the second steers nothing and must still pass the check."""
    from transformers import AutoTokenizer

    folder, model_dir = make_run_inputs(tmp_path / "inputs", ["That game", "I can see", "Hmm, this"])
    make_vector(model_dir, [0, 1], seed=3).save(folder / "v.safetensors")
    flag = "--tensor-parallel-size" if kind == "tp" else "--pipeline-parallel-size"
    args = ["run", "--model", str(model_dir), "--vector", str(folder / "v.safetensors"), "--alphas", "-2,0,2"]
    args += ["--prompts", str(folder / "prompts.json"), "--max-tokens", "6", "--no-eval", "--enforce-eager"]
    result = CliRunner().invoke(main, [*args, flag, "2", "--out", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = read_table(tmp_path / "out" / "generations.arrow").to_pylist()
    assert len(rows) == 9
    vector, tokenizer = SteeringVector.load(folder / "v.safetensors"), AutoTokenizer.from_pretrained(model_dir)
    for r in rows:
        want = oracle_greedy(model_dir, tokenizer(r["prompt"])["input_ids"], 6, vector, r["alpha"])
        assert r["token_ids"] == want[: len(r["token_ids"])], r
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["finished"] and manifest["rows"] == 9
