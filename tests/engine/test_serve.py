"""A real `steer-batch serve` process, driven with the official `openai` client: completions and
chat completions, streamed and not, equal to the HF-hook oracle; vectors added, used, listed,
removed and added again at runtime; the directory rule and the API key; a bounded load test
mixing good, bad and dropped streams while a vector comes and goes."""

import json
import random
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
from transformers import AutoTokenizer

from helpers import make_model, make_tokenizer, make_vector, oracle_greedy
from steer_batch import steering

KEY = "sk-test-key"
N_TOKENS = 8
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    model_dir = make_model("llama", folder / "model")
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
        "--api-key", KEY, "--enforce-eager", "--max-model-len", "512", "--seed", "0",
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
