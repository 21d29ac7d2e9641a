"""Vectors added to and removed from a running compiled engine from Python (driver/runtime.py):
the bank rows are written in place, so the compiled graph steers with a vector it never saw at
start-up, token for token like the HF-hook oracle; capacity, names and removal are enforced."""

import pytest
from vllm.exceptions import VLLMValidationError

from helpers import close_llm, generate, make_llm, make_model, make_prompts, make_vector, oracle_greedy
from steer_batch import steering
from steer_batch.driver.runtime import RuntimeVectorError, add_vector, list_vectors, remove_vector

N_TOKENS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runtime")
    model_dir = make_model("llama", folder / "model")
    vectors = {"a": make_vector(model_dir, [1, 2], seed=1), "b": make_vector(model_dir, [0, 3], seed=2)}
    for name, v in vectors.items():
        v.save(folder / f"{name}.safetensors")
    llm = make_llm(
        model_dir,
        eager=False,
        max_num_batched_tokens=64,
        enable_prefix_caching=True,
        additional_config={"steering": {"runtime_vectors": True, "max_vectors": 2}},
    )
    yield llm, folder, model_dir, vectors
    close_llm(llm)


def _check(llm, model_dir, name, vector, prompts):
    """A mixed batch with `name` at two alphas and unsteered requests equals the oracle."""
    steer = [steering(name, 1.5), None, steering(name, -2.0, "add", "generated")] * (len(prompts) // 3)
    entries = [[(vector, 1.5, "add", "all")], [], [(vector, -2.0, "add", "generated")]] * (len(prompts) // 3)
    got = generate(llm, prompts, N_TOKENS, steer)
    want = [oracle_greedy(model_dir, p, N_TOKENS, entries=e) for p, e in zip(prompts, entries)]
    assert got == want
    assert sum(w != oracle_greedy(model_dir, p, N_TOKENS) for p, w, e in zip(prompts, want, entries) if e) >= 2


def test_add_use_remove_and_reuse_a_row_in_a_compiled_engine(setup):
    llm, folder, model_dir, vectors = setup
    prompts = make_prompts(6, seed=51, max_len=80)
    with pytest.raises(VLLMValidationError, match="'a' is not a vector of this engine"):
        generate(llm, prompts[:1], N_TOKENS, [steering("a", 1.0)])
    added = add_vector(llm, "a", folder / "a.safetensors")
    assert added["row"] == 0 and added["layers"] == [1, 2]
    _check(llm, model_dir, "a", vectors["a"], prompts)
    add_vector(llm, "b", folder / "b.safetensors")
    assert [(v["name"], v["row"]) for v in list_vectors(llm)] == [("a", 0), ("b", 1)]
    with pytest.raises(RuntimeVectorError, match="all 2 bank rows are in use") as e:
        add_vector(llm, "c", folder / "a.safetensors")
    assert e.value.status == 409
    with pytest.raises(RuntimeVectorError, match="already loaded"):
        add_vector(llm, "b", folder / "a.safetensors")
    remove_vector(llm, "a")
    with pytest.raises(VLLMValidationError, match="'a' is not a vector of this engine"):
        generate(llm, prompts[:1], N_TOKENS, [steering("a", 1.0)])
    # Row 0 again, now holding b's file under another name: the new direction steers.
    assert add_vector(llm, "again", folder / "b.safetensors")["row"] == 0
    _check(llm, model_dir, "again", vectors["b"], prompts)
    with pytest.raises(RuntimeVectorError, match="no vector 'a'") as e:
        remove_vector(llm, "a")
    assert e.value.status == 404


def test_an_engine_without_runtime_vectors_refuses_them(tmp_path):
    from steer_batch.driver.launch import close_llm as close
    from steer_batch.driver.launch import make_llm as launch

    model_dir = make_model("llama", tmp_path / "model")
    make_vector(model_dir, [1], seed=1).save(tmp_path / "v.safetensors")
    llm = launch(
        model_dir, {"v": tmp_path / "v.safetensors"}, skip_tokenizer_init=True, max_model_len=256, enforce_eager=True
    )
    try:
        with pytest.raises(RuntimeVectorError, match="started without runtime vectors") as e:
            add_vector(llm, "w", tmp_path / "v.safetensors")
        assert e.value.status == 403
    finally:
        close(llm)


def test_a_vector_held_by_requests_in_the_engine_is_never_removed_under_them(setup):
    """Across the front end, the engine core and the workers: removing a vector that a running
    request and a queued one hold is refused (409, naming both) and changes nothing; both finish
    steered by it, token for token like the oracle; then it goes, and its row takes another
    vector that steers the next request."""
    from vllm import SamplingParams

    llm, folder, model_dir, vectors = setup
    for listed in list_vectors(llm):  # whatever the tests before left
        remove_vector(llm, listed["name"])
    add_vector(llm, "held", folder / "a.safetensors")
    engine = llm.llm_engine
    prompts = make_prompts(2, seed=71, max_len=30)
    # Long enough that neither can finish before the removal below: the engine core runs ahead of step().
    long = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True, extra_args=steering("held", 1.5))
    engine.add_request("running", {"prompt_token_ids": prompts[0]}, long)
    outputs = {}
    for _ in range(3):
        for out in engine.step():
            outputs[out.request_id] = out
    assert "running" in outputs and not outputs["running"].finished
    engine.add_request("queued", {"prompt_token_ids": prompts[1]}, long)
    with pytest.raises(RuntimeVectorError, match=r"vector 'held' is used by requests queued, running not yet") as e:
        remove_vector(llm, "held")
    assert e.value.status == 409
    assert [v["name"] for v in list_vectors(llm)] == ["held"]  # refused: still listed and usable
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    for rid, prompt in zip(("running", "queued"), prompts):
        want = oracle_greedy(model_dir, prompt, 300, vectors["a"], 1.5)
        assert list(outputs[rid].outputs[0].token_ids) == want, rid
    assert want != oracle_greedy(model_dir, prompts[1], 300), "the vector must steer, or the test tests nothing"
    remove_vector(llm, "held")
    assert add_vector(llm, "next", folder / "b.safetensors")["row"] == 0  # the row it left
    assert generate(llm, prompts[:1], N_TOKENS, [steering("next", 2.0)]) == [
        oracle_greedy(model_dir, prompts[0], N_TOKENS, vectors["b"], 2.0)
    ]
    remove_vector(llm, "next")
