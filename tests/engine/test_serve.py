"""A real `steer-batch serve` process, driven with the official `openai` client: completions and
chat completions, streamed and not, equal to the HF-hook oracle; vectors added, used, listed,
removed and added again at runtime; the directory rule and the API key; a bounded load test
mixing good, bad and dropped streams while a vector comes and goes."""

import hashlib
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from transformers import AutoTokenizer

from helpers import make_model, make_tokenizer, make_vector, oracle_greedy
from steer_batch import steering

KEY = "sk-test-key"
N_TOKENS = 8
CONTEXT = 2048  # long enough that a stream the test drops is still running when it looks
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    model_dir = make_model("llama", folder / "model")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"max_position_embeddings": CONTEXT}))
    make_tokenizer(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    allowed = folder / "vectors"
    allowed.mkdir()
    vectors = {
        name: make_vector(model_dir, layers, seed=i + 1)
        for i, (name, layers) in enumerate({"a": [1, 2], "b": [0, 3], "c": [1, 3]}.items())
    }
    for name, v in vectors.items():
        v.save(allowed / f"{name}.safetensors")
    (folder / "outside").mkdir()
    vectors["a"].save(folder / "outside" / "x.safetensors")
    (allowed / "link.safetensors").symlink_to(folder / "outside" / "x.safetensors")
    return folder, model_dir, vectors, allowed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(setup):
    folder, model_dir, _, allowed = setup
    port = _free_port()
    command = [
        sys.executable, "-m", "steer_batch.cli", "serve", str(model_dir), "--vector", f"a={allowed / 'a.safetensors'}",
        "--allow-runtime-vectors", str(allowed), "--max-vectors", "3", "--host", "127.0.0.1", "--port", str(port),
        "--api-key", KEY, "--enforce-eager", "--max-model-len", str(CONTEXT), "--seed", "0",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with open(folder / "server.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while True:
                if process.poll() is not None:
                    pytest.fail(
                        f"the server exited with {process.returncode}:\n{(folder / 'server.log').read_text()[-4000:]}"
                    )
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "the server did not answer /health in 600 s"
                time.sleep(1)
            yield url, process
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=300)


def _vectors(url: str, method: str = "GET", body: dict | None = None, name: str = "", key: str | None = KEY):
    """(status, json) of a call to /v1/steering/vectors[/name]."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{url}/v1/steering/vectors{'/' + name if name else ''}", data, headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _oracle_text(setup, ids: list[int], spec: list | None) -> str:
    _, model_dir, vectors, _ = setup
    tokens = oracle_greedy(model_dir, ids, N_TOKENS, entries=[(vectors[n], a, o, s) for n, a, o, s in spec or []])
    return AutoTokenizer.from_pretrained(model_dir).decode(tokens, skip_special_tokens=True)


def _complete(client, prompt: str, xargs: dict | None, stream: bool = False) -> str:
    extra = {"ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})}
    kwargs = dict(
        model=client.models.list().data[0].id, prompt=prompt, max_tokens=N_TOKENS, temperature=0, extra_body=extra
    )
    if not stream:
        return client.completions.create(**kwargs).choices[0].text
    return "".join(chunk.choices[0].text for chunk in client.completions.create(**kwargs, stream=True) if chunk.choices)


def _chat(client, content: str, xargs: dict | None, stream: bool = False) -> str:
    extra = {"ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})}
    kwargs = dict(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": content}],
        max_tokens=N_TOKENS,
        temperature=0,
        extra_body=extra,
    )
    if not stream:
        return client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = client.chat.completions.create(**kwargs, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completions_and_chat_equal_the_oracle(setup, client, stream):
    _, model_dir, _, _ = setup
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cases = [
        (None, None),
        (steering("a", 2.0), [("a", 2.0, "add", "all")]),
        (steering("a", -1.5, "add", "generated"), [("a", -1.5, "add", "generated")]),
    ]
    steered_differs = 0
    for xargs, spec in cases:
        prompt = "The weather today"
        want = _oracle_text(setup, tokenizer(prompt)["input_ids"], spec)
        assert _complete(client, prompt, xargs, stream) == want, (xargs, stream)
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi there"}], add_generation_prompt=True, tokenize=False
        )
        chat_ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
        want_chat = _oracle_text(setup, chat_ids, spec)
        assert _chat(client, "Hi there", xargs, stream) == want_chat, (xargs, stream)
        steered_differs += spec is not None and want != _oracle_text(setup, tokenizer(prompt)["input_ids"], None)
    assert steered_differs >= 1, "the steering must change some text, or the test tests nothing"


def test_runtime_vectors_add_use_list_remove_and_add_again(setup, server, client):
    folder, model_dir, vectors, allowed = setup
    url = server[0]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("I think that")["input_ids"]
    # Not there yet: a request naming it is a 400 naming the field.
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, "I think that", steering("b", 2.0))
    assert "'b' is not a vector of this engine" in str(e.value)
    status, added = _vectors(url, "POST", {"name": "b", "path": str(allowed / "b.safetensors")})
    assert status == 200 and added["name"] == "b" and added["layers"] == [0, 3] and len(added["sha256"]) == 64
    assert _complete(client, "I think that", steering("b", 2.0)) == _oracle_text(setup, ids, [("b", 2.0, "add", "all")])
    status, listing = _vectors(url)
    assert status == 200 and [v["name"] for v in listing["data"]] == ["a", "b"]
    assert listing["data"][1]["concept"] == vectors["b"].concept and listing["data"][1]["method"] == "random"
    # Adding the name again is a conflict; removing it makes it unknown again.
    assert _vectors(url, "POST", {"name": "b", "path": str(allowed / "c.safetensors")})[0] == 409
    assert _vectors(url, "DELETE", name="b") == (200, {"name": "b", "deleted": True})
    assert _vectors(url, "DELETE", name="b")[0] == 404
    with pytest.raises(openai.BadRequestError):
        _complete(client, "I think that", steering("b", 2.0))
    # The name again, with another file: the new direction steers (no KV block of the old one reused).
    assert _vectors(url, "POST", {"name": "b", "path": str(allowed / "c.safetensors")})[0] == 200
    assert _complete(client, "I think that", steering("b", 2.0)) == _oracle_text(setup, ids, [("c", 2.0, "add", "all")])
    # The bank holds 3 rows (--max-vectors 3): a, b, and one more; the fourth is refused.
    assert _vectors(url, "POST", {"name": "c", "path": str(allowed / "c.safetensors")})[0] == 200
    status, full = _vectors(url, "POST", {"name": "d", "path": str(allowed / "a.safetensors")})
    assert status == 409 and "all 3 bank rows are in use" in full["error"]["message"]
    for name in ("b", "c"):
        assert _vectors(url, "DELETE", name=name)[0] == 200


def test_a_vector_removed_while_a_long_stream_uses_it_goes_only_when_the_stream_ends(setup, server, client):
    """DELETE of a vector a streaming request holds waits for exactly that request (front end,
    engine core and worker are three processes here): while the stream runs, the DELETE stays
    unanswered, a new request naming the vector is a 400, and every token the stream delivers is
    the oracle's (the vector stays in place); when the client drops the stream, the server aborts
    the request, the DELETE answers, and the row is free for the next vector. The stream asks for
    the whole context and the test reads only a part of it, so it is still running when the test
    looks, however fast the machine."""
    _, model_dir, vectors, allowed = setup
    url = server[0]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("Once upon a time")["input_ids"]
    read = 120
    assert _vectors(url, "POST", {"name": "held", "path": str(allowed / "c.safetensors")})[0] == 200
    stream = client.completions.create(
        model=client.models.list().data[0].id,
        prompt="Once upon a time",
        max_tokens=CONTEXT - len(ids),
        temperature=0,
        logprobs=0,
        stream=True,
        extra_body={"ignore_eos": True, "vllm_xargs": steering("held", 2.0)},
    )
    chunks = iter(stream)
    texts, tokens = [], 0

    def take():
        nonlocal tokens
        choice = next(chunks).choices[0]
        assert choice.finish_reason is None, "the stream ended before the test dropped it"
        texts.append(choice.text)
        tokens += len(choice.logprobs.tokens)

    take()  # the request runs
    deleted = {}

    def delete():
        deleted["asked"] = True
        deleted["answer"] = _vectors(url, "DELETE", name="held")

    thread = threading.Thread(target=delete)
    thread.start()
    while "asked" not in deleted:
        time.sleep(0.01)
    time.sleep(0.3)
    with pytest.raises(openai.BadRequestError, match="'held' is not a vector of this engine"):
        _complete(client, "Hello", steering("held", 1.0))
    while tokens < read:
        take()
    assert "answer" not in deleted, "the DELETE answered while a running request held the vector"
    stream.close()
    thread.join(timeout=120)
    assert deleted.get("answer") == (200, {"name": "held", "deleted": True})
    oracle = oracle_greedy(model_dir, ids, tokens, entries=[(vectors["c"], 2.0, "add", "all")])
    assert "".join(texts) == tokenizer.decode(oracle, skip_special_tokens=True)
    assert [v["name"] for v in _vectors(url)[1]["data"]] == ["a"]
    assert _vectors(url, "POST", {"name": "after", "path": str(allowed / "b.safetensors")})[0] == 200
    assert _complete(client, "I think that", steering("after", 2.0)) == _oracle_text(
        setup, tokenizer("I think that")["input_ids"], [("b", 2.0, "add", "all")]
    )
    assert _vectors(url, "DELETE", name="after")[0] == 200


def test_only_files_in_the_directory_and_only_with_the_key(setup, server):
    folder, _, _, allowed = setup
    url = server[0]
    status, body = _vectors(url, "POST", {"name": "x", "path": str(folder / "outside" / "x.safetensors")})
    assert status == 403 and "outside" in body["error"]["message"] and body["error"]["param"] == "path"
    status, body = _vectors(url, "POST", {"name": "x", "path": str(allowed / "link.safetensors")})  # a symlink out
    assert status == 403 and "resolves to" in body["error"]["message"]
    assert _vectors(url, "POST", {"name": "x", "path": str(allowed / "missing.safetensors")})[0] == 400
    assert _vectors(url, "POST", {"name": "x", "path": str(allowed / "b.safetensors")}, key=None)[0] == 401
    assert _vectors(url, key="wrong")[0] == 401
    assert _vectors(url, "POST", {"name": "x"})[0] == 400
    assert [v["name"] for v in _vectors(url)[1]["data"]] == ["a"]


def test_load_with_good_bad_and_dropped_requests_while_a_vector_comes_and_goes(setup, server, client):
    """>= 200 requests from 32 concurrent clients; every good answer equals its sequential
    reference, bad ones get 400, dropped streams hurt nobody, no 5xx, the server lives."""
    _, _, _, allowed = setup
    url, process = server
    prompts = ["Well,", "I told her that", "Our team", "After the meeting we", "It is", "Yesterday my friend"]
    specs = [
        None,
        steering("a", 2.0),
        steering("a", -2.0),
        steering("a", 1.0, "add", "generated"),
        steering("a", 1.5, "ablate"),
    ]
    good = [(p, s) for p in prompts for s in specs]
    reference = {(p, json.dumps(s)): _complete(client, p, s) for p, s in good}
    rng = random.Random(0)
    jobs = (
        [("good", *rng.choice(good)) for _ in range(160)]
        + [("bad", None, None)] * 24
        + [("drop", *rng.choice(good)) for _ in range(24)]
    )
    rng.shuffle(jobs)
    results, latencies, lock = [], [], threading.Lock()

    def one(job):
        kind, prompt, spec = job
        local = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)
        start = time.monotonic()
        try:
            if kind == "good":
                outcome = ("good", _complete(local, prompt, spec) == reference[(prompt, json.dumps(spec))])
            elif kind == "bad":
                try:
                    _complete(local, "Hello", {"steering_vector": "nope", "steering_alpha": 1})
                    outcome = ("bad", False)
                except openai.BadRequestError:
                    outcome = ("bad", True)
            else:  # a stream the client drops after its first chunk
                extra = {"ignore_eos": True, **({"vllm_xargs": spec} if spec else {})}
                stream = local.completions.create(
                    model=local.models.list().data[0].id,
                    prompt=prompt,
                    max_tokens=N_TOKENS,
                    temperature=0,
                    stream=True,
                    extra_body=extra,
                )
                next(iter(stream))
                stream.close()
                outcome = ("drop", True)
        except openai.APIStatusError as e:
            outcome = (kind, f"HTTP {e.status_code}")
        with lock:
            results.append(outcome)
            latencies.append(time.monotonic() - start)

    def churn():  # a vector added and removed meanwhile, used by nobody
        for _ in range(5):
            assert _vectors(url, "POST", {"name": "churn", "path": str(allowed / "b.safetensors")})[0] == 200
            time.sleep(0.5)
            assert _vectors(url, "DELETE", name="churn")[0] == 200

    start = time.monotonic()
    with ThreadPoolExecutor(33) as pool:
        churning = pool.submit(churn)
        list(pool.map(one, jobs))
        churning.result()
    seconds = time.monotonic() - start
    assert time.monotonic() - start < 900, "the load test is bounded"
    failures = [r for r in results if r[1] is not True]
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:5]}"
    assert process.poll() is None and urllib.request.urlopen(f"{url}/health", timeout=10).status == 200
    latencies.sort()
    print(
        f"\nload: {len(jobs)} requests from 32 clients in {seconds:.1f} s = {len(jobs) / seconds:.1f} req/s; "
        f"latency p50 {statistics.median(latencies):.2f} s, p99 {latencies[int(0.99 * (len(latencies) - 1))]:.2f} s"
    )


# -- hardening: every bad input a 4xx naming its field, never a 5xx or a reset --


def _raw(url: str, path: str, body: bytes, key: str | None = KEY, method: str = "POST") -> tuple[int | str, dict]:
    """(status, JSON body) of one raw HTTP request; ("reset", {}) when the connection breaks."""
    import http.client

    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        conn.request(method, path, body, headers)
        response = conn.getresponse()
        data = response.read()
    except (ConnectionError, http.client.HTTPException) as e:
        return "reset", {"error": repr(e)}
    finally:
        conn.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, {"raw": data.decode(errors="replace")}


def _completion_body(xargs: dict, stream: bool = False, model: str = "") -> bytes:
    """A completion request's body (`model` empty: the server's only model, as vLLM allows)."""
    body = {"prompt": "Hi", "max_tokens": 2, "ignore_eos": True, "stream": stream, "vllm_xargs": xargs}
    return json.dumps({**body, **({"model": model} if model else {})}).encode()


def test_unauthenticated_requests_get_401_before_their_body_is_read(server):
    url = server[0]
    deep = b'{"prompt": "Hi", "vllm_xargs": {"steering_alpha": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}"
    boolean = _completion_body({"steering_vector": "a", "steering_alpha": True})
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/steering/vectors"):
        for body in (deep, boolean):
            assert _raw(url, path, body, key=None)[0] == 401, path
            assert _raw(url, path, body, key="wrong")[0] == 401, path
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/steering/vectors"):
        status, _ = _raw(url, path, deep)
        assert status == 400, (path, status)  # vLLM's (or our) answer to JSON it cannot use, not a 500


def test_escaped_steering_keys_are_read_as_what_they_parse_to(server):
    url = server[0]
    xargs = b'{"steering\\u005fvector": "a", "steering\\u005falpha": true}'
    body = b'{"prompt": "Hi", "max_tokens": 2, "vllm_xargs": ' + xargs + b"}"
    status, answer = _raw(url, "/v1/completions", body)
    assert status == 400 and answer["error"]["param"] == "steering_alpha"


def test_every_name_that_can_be_added_can_be_deleted(setup, server):
    from urllib.parse import quote

    _, _, _, allowed = setup
    url = server[0]
    names = ["AZ", "az09", "a.b", "a_b", "a-b", "a@b", "@x", "_", "-", "9", "N" * 64, "a.b_c-d@e.0"]
    for name in names:
        status, added = _vectors(url, "POST", {"name": name, "path": str(allowed / "b.safetensors")})
        assert status == 200, (name, added)
        assert _vectors(url, "DELETE", name=quote(name, safe="")) == (200, {"name": name, "deleted": True}), name
    for bad in ("q?x#y", "a\nb", "a\tb", ".x", "..", "a/b", "a b", "N" * 65, "é", "", 7, None):
        status, body = _vectors(url, "POST", {"name": bad, "path": str(allowed / "b.safetensors")})
        assert status == 400 and body["error"]["param"] == "name", (bad, status, body)
        assert "a vector name is 1 to 64 letters" in body["error"]["message"]
    assert [v["name"] for v in _vectors(url)[1]["data"]] == ["a"]


def test_bad_vector_files_get_4xx_naming_the_problem(setup, server):
    from safetensors.torch import save_file

    _, _, vectors, allowed = setup
    url = server[0]
    for length in (300, 8000):
        status, body = _vectors(url, "POST", {"name": "x", "path": str(allowed / ("x" * length))})
        assert status == 400 and body["error"]["param"] == "path", (length, status)
    meta = {"model": "m", "hidden_size": "128", "num_layers": "4", "method": "x", "concept": "c", "format_version": "1"}
    cases = {
        "dup.safetensors": ({"layers.1": torch.ones(128), "layers.01": torch.ones(128)}, meta,
                            r"'layers.01' and 'layers.1' are both layer 1"),
        "abc.safetensors": ({"layers.1": torch.ones(128)}, {**meta, "hidden_size": "abc"},
                            r"metadata hidden_size='abc' must be an integer"),
        "huge.safetensors": ({"layers.2": torch.full((128,), 3e38)}, meta,
                             r"layers.2 has norm 3.39e\+39; times the engine's max_abs_alpha 1000 that exceeds"),
    }  # fmt: skip
    for file, (tensors, metadata, message) in cases.items():
        save_file(tensors, allowed / file, metadata=metadata)
        status, body = _vectors(url, "POST", {"name": "x", "path": str(allowed / file)})
        assert status == 400 and body["error"]["param"] == "path", (file, status, body)
        assert re.search(message, body["error"]["message"]), body["error"]["message"]
    # A file swapped while it is being added: each add sees one whole version, or a 4xx.
    swap = allowed / "swap.safetensors"
    versions = {}
    for name, v in (("b", vectors["b"]), ("c", vectors["c"])):
        v.save(allowed / f"swap-{name}.safetensors")
        versions[(allowed / f"swap-{name}.safetensors").read_bytes()] = name
    shas = {hashlib.sha256(data).hexdigest() for data in versions}
    stop = threading.Event()

    def swapper():
        while not stop.is_set():
            for data in versions:
                tmp = allowed / ".swap.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, swap)

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        outcomes = []
        for _ in range(20):
            status, body = _vectors(url, "POST", {"name": "swapped", "path": str(swap)})
            outcomes.append(status)
            if status == 200:
                assert body["sha256"] in shas
                assert _vectors(url, "DELETE", name="swapped")[0] == 200
            else:
                assert status in (400, 409), (status, body)
    finally:
        stop.set()
        thread.join()
    assert outcomes.count(200) >= 10, outcomes
    assert [v["name"] for v in _vectors(url)[1]["data"]] == ["a"]


def test_a_streamed_bad_spec_is_an_error_event_and_null_is_a_400(server):
    url = server[0]
    import urllib.request

    request = urllib.request.Request(
        f"{url}/v1/completions",
        _completion_body({"steering_vector": "nope", "steering_alpha": 1}, stream=True),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(request, timeout=300) as r:
        assert r.status == 200
        events = [json.loads(line[6:]) for line in r.read().decode().splitlines() if line.startswith("data: {")]
    errors = [e["error"] for e in events if "error" in e]
    assert len(errors) == 1 and errors[0]["code"] == 400 and errors[0]["param"] == "steering_vector", events
    status, body = _raw(url, "/v1/completions", _completion_body({"steering_vector": "a", "steering_alpha": None}))
    assert status == 400 and "steering_alpha" in body["error"]["param"], body


# -- a seeded fuzz of steering specs and runtime-vector requests against the same server --

KEYS = ["steering_vector", "steering_alpha", "steering_op", "steering_scope", "steering_positions"]
ODD = [None, True, False, 0, 1, -1, 3, 2**31, 2**63, -(2**70), 0.0, 0.5, -2.5, 1e308, -1e-300, 1e30, 999.9, 1000,
       1000.5, "", "a", "b", "nope", "add", "ablate", "clamp", "all", "prompt", "generated", "1.5", "x" * 5000,
       "\u0000", "é", [], ["a"], ["a", "a"], ["a"] * 5, [1.0, 2.0], [True], [0, -1], [0, 4], [3, 2], [-1, 5],
       [0, 2**63], [[0]], {}, {"a": 1}]  # fmt: skip


def _invalid_fields(xargs: dict) -> set[str]:
    """The steering fields the README's spec table refuses in `xargs` (empty: a valid spec),
    written from the README, independently of engine/config.py."""
    steer = {k: v for k, v in xargs.items() if k.startswith("steering_")}
    if not steer:
        return set()

    def scalar(v):  # what vLLM's schema takes and reads as sent (64-bit integers, no booleans)
        if isinstance(v, int) and not isinstance(v, bool):
            return -(2**63) <= v < 2**64
        return isinstance(v, (str, float))

    bad = {k for k, v in steer.items() if not (scalar(v) or (isinstance(v, list) and all(map(scalar, v))))}
    bad |= {k for k in steer if k not in KEYS}
    if bad:
        return bad  # the schema or the key itself refuses these, whatever the rest says
    bad |= {k for k in ("steering_vector", "steering_alpha") if k not in steer}
    names = steer.get("steering_vector")
    names = names if isinstance(names, list) else [names]
    if "steering_vector" in steer and not (1 <= len(names) <= 4 and all(n == "a" for n in names)):
        bad.add("steering_vector")
    count = len(names)

    def entries(key):
        v = steer[key]
        return v if isinstance(v, list) else [v] * count

    for key, ok in (
        ("steering_alpha", lambda a: isinstance(a, (int, float)) and abs(a) <= 1000),
        ("steering_op", lambda o: o in ("add", "ablate", "clamp")),
        ("steering_scope", lambda s: s in ("all", "prompt", "generated")),
    ):
        if key in steer and (len(entries(key)) != count or not all(map(ok, entries(key)))):
            bad.add(key)
    if "steering_positions" in steer:
        p = steer["steering_positions"]
        ints = isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) for v in p)
        if not (ints and p[0] >= 0 and (p[1] == -1 or p[1] > p[0])):
            bad.add("steering_positions")
    return bad


def _fuzz_xargs(rng: random.Random) -> dict:
    xargs = {}
    for key in rng.sample(KEYS, rng.randint(0, len(KEYS))):
        xargs[key] = rng.choice(ODD)
    if rng.random() < 0.5:  # often a mostly good spec with one field gone odd
        xargs.update({"steering_vector": "a", "steering_alpha": rng.choice([-2.0, 0.0, 1.5, 4])})
        key = rng.choice(KEYS + ["steering_bogus", "steering_"])
        xargs[key] = rng.choice(ODD)
    return xargs


def test_fuzz_every_answer_is_allowed_or_a_4xx_naming_the_field(setup, server, client):
    _, _, _, allowed = setup
    url = server[0]
    rng = random.Random(1234)
    good = [("Well,", None), ("Our team", steering("a", 2.0)), ("It is", steering("a", -1.5, "ablate", "generated"))]
    reference = {prompt: _complete(client, prompt, spec) for prompt, spec in good}
    start, counts = time.monotonic(), {}
    for i in range(300):
        if i % 100 == 0:  # the good requests still answer as before
            assert {p: _complete(client, p, s) for p, s in good} == reference, f"after {i} fuzz requests"
        if rng.random() < 0.15:  # a runtime-vector request with odd fields
            body = {
                k: rng.choice(ODD + [str(allowed / "b.safetensors"), "fz"]) for k in rng.sample(["name", "path"], 2)
            }
            status, answer = _vectors(
                url, rng.choice(["POST", "POST", "DELETE", "GET"]), body, name=rng.choice(["", "fz"])
            )
            assert isinstance(status, int) and status < 500, (body, status, answer)
            if status == 200 and answer.get("name") == "fz" and "deleted" not in answer:
                assert _vectors(url, "DELETE", name="fz")[0] == 200
            counts[status] = counts.get(status, 0) + 1
            continue
        xargs, stream = _fuzz_xargs(rng), rng.random() < 0.3
        bad = _invalid_fields(xargs)
        status, answer = _raw(url, "/v1/completions", _completion_body(xargs, stream))
        counts[status] = counts.get(status, 0) + 1
        assert status in (200, 400), (xargs, stream, status, answer)
        error = answer.get("error")
        if stream and status == 200:
            events = [json.loads(line[6:]) for line in answer["raw"].splitlines() if line.startswith("data: {")]
            error = next((e["error"] for e in events if "error" in e), None)
        if not bad:
            assert error is None, (xargs, error)
        else:
            assert error is not None, (xargs, bad, answer)
            assert any(field in (error.get("param") or "") for field in bad), (xargs, bad, error)
    seconds = time.monotonic() - start
    assert seconds < 120, f"the fuzz is bounded: {seconds:.0f} s"
    assert {p: _complete(client, p, s) for p, s in good} == reference
    assert server[1].poll() is None and [v["name"] for v in _vectors(url)[1]["data"]] == ["a"]
    print(f"\nfuzz: 300 requests in {seconds:.1f} s, statuses {sorted(counts.items(), key=str)}")
