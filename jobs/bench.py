"""`steer-batch bench` and `bench-extract`: throughput of steering inside vLLM, as ratios
measured in one run.

On one steering engine with two random vectors on every layer: unsteered requests, then every
layer steered with 1, 3, 64 and 256 distinct alphas, 256 distinct two-vector specs, an ablation
on every layer, and adds on generated tokens only; each as a ratio to unsteered. Then the same
prompts through a stock engine (no steering installed) and through HF generate + forward hooks,
the reference users would otherwise pick. And eval-ab's scoring pass (eval/choices.py): the
same A/B sequences scored steered at 64 alphas on the steering engine and by the stock engine,
in scored (prefill) tokens per second. Prefix caching is off so every configuration does the
same work. Unsteered traffic is timed first, before any steered request (`phases`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from vllm import SamplingParams

from steer_batch.data import sentence_beginnings
from steer_batch.driver.launch import close_llm, make_llm, on_cpu
from steer_batch.engine import hooks
from steer_batch.engine.config import DEFAULT_MAX_VECTORS_PER_REQUEST, engine_config, file_sha256, steering
from steer_batch.errors import SteerBatchError
from steer_batch.eval.arrow_stream import ArrowStream
from steer_batch.eval.choices import CHOICES, CHOICES_SCHEMA, Pair, score
from steer_batch.jobs.extract import default_vector, extract
from steer_batch.jobs.models import cache_dir, default_model_dir, model_hash, resolve_model
from steer_batch.jobs.run import RunSpec, Sampling, evenly_spaced, generate, vector_files
from steer_batch.jobs.sweep import slices
from steer_batch.vectors.datasets import ABItem, ab_sequences
from steer_batch.vectors.slices import layer_sets
from steer_batch.vectors.vector import SteeringVector

DISTINCT_ALPHAS = (1, 3, 64, 256)
AB_STEERED, AB_STOCK = "eval-ab, 64 alphas", "eval-ab, stock vLLM"  # scored tokens per second
STOCK = "stock vLLM"
AFTER_STEERED = "unsteered, after steered"  # the default engine's unsteered requests, among steered rounds
UNSTEERED_PHASE, STEERED_PHASE = "unsteered traffic", "steered traffic"  # the bench's phases, in order
BOOTSTRAP = 10_000  # resamples of the rounds for the interval of a per-round median


def spread(distinct: int) -> np.ndarray:
    return np.linspace(-4.0, 4.0, distinct) if distinct > 1 else np.array([4.0])


def _configurations(num_prompts: int) -> dict[str, list[dict | None]]:
    """Each configuration's extra_args, one per request."""
    configs: dict[str, list[dict | None]] = {"unsteered": [None] * num_prompts}
    for k in (k for k in DISTINCT_ALPHAS if k <= num_prompts):
        configs[f"{k} alpha{'s' if k > 1 else ''}"] = [
            steering("v", float(spread(k)[i % k])) for i in range(num_prompts)
        ]
    if num_prompts >= 256:
        a = spread(256)
        configs["256 two-vector specs"] = [
            steering(("v", float(a[i % 256])), ("w", float(a[-1 - i % 256]))) for i in range(num_prompts)
        ]
    configs["ablate, every layer"] = [steering("v", 1.0, "ablate")] * num_prompts
    configs["generated only"] = [steering("v", float(spread(3)[i % 3]), "add", "generated") for i in range(num_prompts)]
    return configs


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def random_vector(model_dir: Path, seed: int = 0):
    """A random unit direction on every layer: throughput does not depend on what it means."""
    config = AutoConfig.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(seed)
    dirs = {
        i: torch.nn.functional.normalize(torch.randn(config.hidden_size, generator=g), dim=0)
        for i in range(config.num_hidden_layers)
    }
    return SteeringVector(dirs, config.num_hidden_layers, model=str(model_dir), method="random", concept="bench")


def vllm_tok_s(llm, prompts: list[str], extra_args: list[dict | None], max_tokens: int) -> float:
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=a) for a in extra_args]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / seconds


def _ab_pairs(model_dir: Path, count: int, steered: bool) -> list[Pair]:
    """`count` A/B questions around the sentence beginnings (the question shared by its two
    answers, as in eval-ab), each steered at one of 64 alphas or not at all."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    beginnings, alphas = sentence_beginnings(), spread(64)
    pairs = []
    for i in range(count):
        question = f'Which way does "{beginnings[i % len(beginnings)]}" go on?\n\nChoices:\n (A) happily\n (B) sadly'
        sequences, start = ab_sequences(tokenizer, ABItem(i, question, "A", "B"))
        alpha = float(alphas[i % 64])
        pairs.append(Pair(i, "v", alpha, sequences, start, steering("v", alpha) if steered else None))
    return pairs


def ab_tok_s(llm, pairs: list[Pair]) -> float:
    """Scored tokens per second of eval-ab's scoring pass over `pairs` (both answers of each)."""
    with tempfile.TemporaryDirectory() as tmp, ArrowStream.open(Path(tmp) / CHOICES, CHOICES_SCHEMA)[0] as writer:
        start = time.perf_counter()
        counts = score(llm, pairs, writer, progress=False)
        return counts["tokens"] / (time.perf_counter() - start)


def _hf_tok_s(
    model_dir: Path, vector, prompts: list[str], alphas: list[float], max_tokens: int, batch: int, device: str, dtype
) -> float:
    """HF generate with a forward hook per layer adding alpha[row] * v (left-padded batches), on
    the engines' device and in their dtype."""
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    directions = {i: d.to(device, dtype) for i, d in vector.directions.items()}
    row_alpha = torch.zeros(0)  # [batch], set per batch below

    def hook(module, args, out, d):
        h = out[0] if isinstance(out, tuple) else out  # [batch, seq, hidden]
        h = h + row_alpha[: h.shape[0], None, None] * d
        return (h,) + out[1:] if isinstance(out, tuple) else h

    handles = [
        model.model.layers[i].register_forward_hook(lambda m, a, o, d=d: hook(m, a, o, d))
        for i, d in directions.items()
    ]
    tokens, start = 0, time.perf_counter()
    with torch.no_grad():
        for lo in range(0, len(prompts), batch):
            enc = tok(prompts[lo : lo + batch], return_tensors="pt", padding=True).to(device)
            row_alpha = torch.tensor(alphas[lo : lo + batch], device=device, dtype=dtype)
            out = model.generate(
                **enc,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            tokens += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    for h in handles:
        h.remove()
    return tokens / (time.perf_counter() - start)


def bench(
    model: str | Path | None = None,
    num_prompts: int = 256,
    max_tokens: int = 24,
    rounds: int = 5,
    stock: bool = True,
    hf: bool = True,
    eager: bool = False,
    slots: tuple[int, ...] = (1, 2, 4),
    only: tuple[str, ...] | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, list[float]]]]:
    """(tok/s of each configuration, best round; each phase's tok/s round by round, `phases`) on one steering engine
    with the default `max_vectors_per_request` (see the module doc), unsteered requests and 256
    distinct alphas on one more steering engine per other entry of `slots`, a stock engine, HF
    generate + hooks. `only`: these generation configurations (and no eval-ab block). Progress
    on stderr."""
    model_dir = resolve_model(model)
    beginnings = sentence_beginnings()
    prompts = [beginnings[i % len(beginnings)] for i in range(num_prompts)]
    vectors = {"v": random_vector(model_dir, seed=0), "w": random_vector(model_dir, seed=1)}
    configs = _configurations(num_prompts)
    if only is not None:
        unknown = sorted(set(only) - set(configs))
        if unknown:
            raise SteerBatchError(f"configurations {unknown}; allowed: {list(configs)}", param="only")
        configs = {name: args for name, args in configs.items() if name in only or name == "unsteered"}
    others = [k for k in slots if k != DEFAULT_MAX_VECTORS_PER_REQUEST]
    engine_args = bench_engine_args(eager, engines=1 + len(others) + stock)
    rounds_tok_s: dict[str, dict[str, list[float]]] = {}
    engines = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, vector in vectors.items():
            vector.save(Path(tmp) / f"{name}.safetensors")
        try:
            # The engines stay up and the configurations interleave round by round, so a slow
            # moment of the machine hits them alike (on 2 cores one 10 s measurement varies by
            # about +-5%); in two phases (`phases`).
            files = {n: Path(tmp) / f"{n}.safetensors" for n in vectors}
            engines["steer"] = make_llm(model_dir, files, **engine_args)
            dtype = hooks.engine_vllm_config(engines["steer"]).model_config.dtype  # the HF baseline runs in it too
            runs = [(name, engines["steer"], args) for name, args in configs.items()]
            for k in others:  # what unused slots cost: the same engine with k slots per token
                additional = engine_config(vectors=files, max_vectors_per_request=k)
                engines[k] = make_llm(model_dir, additional_config=additional, **engine_args)
                for name in ("unsteered", "256 alphas"):
                    if name in configs:
                        runs.append((f"{name}, {k} slot{'s' if k > 1 else ''}", engines[k], configs[name]))
            if stock:
                engines["stock"] = make_llm(model_dir, **engine_args)
            runs += [(STOCK, engines["stock"], configs["unsteered"])] if stock else []
            timed = [(name, partial(vllm_tok_s, llm, prompts, args, max_tokens)) for name, llm, args in runs]
            if stock and only is None:  # eval-ab: the same A/B sequences scored, steered at 64 alphas and by stock
                for name, llm, steered in ((AB_STEERED, engines["steer"], True), (AB_STOCK, engines["stock"], False)):
                    timed.append((name, partial(ab_tok_s, llm, _ab_pairs(model_dir, num_prompts, steered))))
            for _, llm, args in runs:  # warm-up
                vllm_tok_s(llm, prompts[:8], args[:8], max_tokens)
            for phase, phase_timed in phases(timed).items():
                rounds_tok_s[phase] = interleave(phase_timed, rounds, phase)
        finally:
            for llm in engines.values():
                close_llm(llm)
    results = {}
    for phase_tok_s in rounds_tok_s.values():
        for name, values in phase_tok_s.items():
            results[name] = max(results.get(name, 0.0), *values)
    if hf:
        alphas = [float(spread(3)[i % 3]) for i in range(num_prompts)]
        device = "cpu" if on_cpu() else "cuda"
        results["HF + hooks"] = _hf_tok_s(
            model_dir, vectors["v"], prompts, alphas, max_tokens, num_prompts, device, dtype
        )
    return results, rounds_tok_s


def phases(timed: list[tuple[str, Callable]]) -> dict[str, list[tuple[str, Callable]]]:
    """The bench's measurements in the order of its phases, each with stock vLLM's: unsteered
    traffic first, on steering engines that have served nothing else, then the steered
    configurations and, among them, the default engine's unsteered requests again (AFTER_STEERED).
    A steering engine zeroes a fresh KV block a steered request held when it is handed out again
    (engine/kv_blocks.py): a cost of steered traffic that, interleaved, falls on whichever pass
    follows it, and that the second phase's unsteered requests show. No second phase without a
    steered configuration."""
    stock = [t for t in timed if t[0] == STOCK]
    unsteered = [t for t in timed if t[0].startswith("unsteered")]
    steered = [t for t in timed if t not in stock and t not in unsteered]
    order = {UNSTEERED_PHASE: unsteered + stock}
    if steered:
        order[STEERED_PHASE] = steered + [(AFTER_STEERED, dict(unsteered)["unsteered"])] + stock
    return order


def interleave(timed: list[tuple[str, Callable]], rounds: int, phase: str) -> dict[str, list[float]]:
    """name -> tok/s of each round: every measurement once a round, the order rotated each round
    (whichever runs first after a pause tends to be slower)."""
    tok_s: dict[str, list[float]] = {}
    for r in range(rounds):
        for name, measure in timed[r % len(timed) :] + timed[: r % len(timed)]:
            tok_s.setdefault(name, []).append(measure())
            _log(f"{phase}, round {r + 1}/{rounds} {name:>24}: {tok_s[name][-1]:8.1f} tok/s")
    return tok_s


def paired_ratios(rounds: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    """name -> {median, low, high, lowest, highest} over rounds of its tok/s divided by `base`'s
    in the same round: a slow moment of the machine hits both sides of a round alike, so these
    spread less than the best rounds' ratio can tell. [low, high] is a 95% interval of the median
    (a seeded bootstrap over the rounds): how finely this run resolves the ratio, so a goal is met
    where the interval lies above it, and undecided where the interval straddles it."""
    rng = np.random.default_rng(0)
    ratios = {}
    for name, values in rounds.items():
        per_round = np.array(values) / np.array(rounds[base])
        medians = np.median(rng.choice(per_round, (BOOTSTRAP, len(per_round))), axis=1)
        low, high = np.percentile(medians, [2.5, 97.5])
        ratios[name] = {
            "median": float(np.median(per_round)),
            "low": float(low),
            "high": float(high),
            "lowest": float(per_round.min()),
            "highest": float(per_round.max()),
        }
    return ratios


def bench_engine_args(eager: bool, engines: int) -> dict:
    """Engine arguments for `engines` engines up at once in this process: prefix caching off (every
    configuration does the same work) and, on a GPU, an equal share of 90% of its memory each
    (vLLM's default 0.9 apiece would leave the second engine none)."""
    args = dict(enforce_eager=eager, enable_prefix_caching=False, seed=0)
    if on_cpu():  # a KV cache of its own size for each, not 30% of the machine's memory apiece
        return {**args, "kv_cache_memory_bytes": 2 << 30}
    return {**args, "gpu_memory_utilization": round(0.9 / engines, 3)}


def bench_extract(model: str | Path | None = None, method: str = "mean_diff") -> dict:
    """Extraction time for the 581 RepE happy/sad pairs on every layer: capture in vLLM vs the HF
    path; {"seconds": {"vllm": s, "hf": s}, "worst_relative_difference": d, ...}."""
    model_dir = resolve_model(model)
    suffixes = sentence_beginnings()
    layers = list(range(AutoConfig.from_pretrained(model_dir).num_hidden_layers))
    seconds, vectors = {}, {}
    for capture in ("vllm", "hf"):
        start = time.perf_counter()
        vectors[capture] = extract(model_dir, "happy", "sad", suffixes, layers, method, capture=capture)
        seconds[capture] = time.perf_counter() - start
        _log(f"{capture}: {seconds[capture]:.1f} s")
    worst = max(
        float((vectors["vllm"].directions[i] - vectors["hf"].directions[i]).norm() / vectors["hf"].directions[i].norm())
        for i in layers
    )
    return {
        "model": str(model_dir),
        "pairs": len(suffixes),
        "layers": len(layers),
        "method": method,
        "seconds": seconds,
        "worst_relative_difference": worst,
    }


def bench_ray(model: str | Path | None = None, num_prompts: int = 256, max_tokens: int = 24, replicas=(1, 2),
              eager: bool = False) -> dict[str, float]:  # fmt: skip
    """Wall seconds of one run's generation (every prompt at alphas -4, 0, 4 with a random vector,
    engine start-up included): in one engine, then through Ray Data LLM on each number of
    `replicas`, on the Ray cluster this process joins (a local one by default)."""
    model_dir = resolve_model(model)
    beginnings = sentence_beginnings()
    prompts = [beginnings[i % len(beginnings)] for i in range(num_prompts)]
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        vector = Path(tmp) / "v.safetensors"
        random_vector(model_dir).save(vector)
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        spec = RunSpec(
            model=str(model_dir),
            model_hash=model_hash(model_dir),
            vectors=vector_files({"v": vector}),
            alphas=[-4.0, 0.0, 4.0],
            prompts_file=str(prompts_file),
            prompts_sha256=file_sha256(prompts_file),
            num_prompts=num_prompts,
            sampling=Sampling(max_tokens=max_tokens),
        )
        for name, count in [("one engine", None), *((f"Ray, {r} replica{'s' if r > 1 else ''}", r) for r in replicas)]:
            start = time.perf_counter()
            generate(
                Path(tmp) / name.replace(" ", "_").replace(",", ""),
                spec,
                prompts,
                {"enforce_eager": eager},
                False,
                count,
            )
            seconds[name] = time.perf_counter() - start
            _log(f"{name}: {seconds[name]:.1f} s")
    return seconds


SWEEP_ONE, SWEEP_SEPARATE = "sweep, one engine", "separate runs, one per cell"


def bench_sweep(
    model: str | Path | None = None, num_prompts: int = 32, max_tokens: int = 32, window: int = 3,
    alphas: tuple[float, ...] = (-16.0, -8.0, 0.0, 8.0, 16.0), eager: bool = True,
) -> dict:  # fmt: skip
    """Wall seconds (engine start-up included, generation only) of a layers x alpha grid of the
    model's happy - sad vector (windows of `window` of its layers, every alpha) on `num_prompts`
    RepE beginnings: as `sweep` generates it (every slice in one engine's bank, one batched pass,
    alpha 0 once), then every cell as a separate run (its slice at its alpha, an engine each)."""
    model_dir = resolve_model(model)
    prompts = evenly_spaced(sentence_beginnings(), num_prompts)
    vector = SteeringVector.load(default_vector(model_dir))
    sets = layer_sets(None, vector.layers, window)
    result = {"model": str(model_dir), "prompts": num_prompts, "max_tokens": max_tokens, "eager": eager}
    result.update(layer_sets=len(sets), alphas=list(alphas), cells=len(sets) * len(alphas), seconds={}, rows={})
    with tempfile.TemporaryDirectory() as tmp:
        files = slices(vector, "happy", sets, Path(tmp) / "slices")
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))

        def spec(vectors: dict[str, Path], cell_alphas: list[float], zero_once: bool) -> RunSpec:
            return RunSpec(
                model=str(model_dir),
                model_hash=model_hash(model_dir),
                vectors=vector_files(vectors),
                alphas=cell_alphas,
                prompts_file=str(prompts_file),
                prompts_sha256=file_sha256(prompts_file),
                num_prompts=num_prompts,
                sampling=Sampling(max_tokens=max_tokens),
                zero_once=zero_once,
            )

        cells = [({name: file}, [alpha]) for name, file in files.items() for alpha in alphas]
        for name, jobs in ((SWEEP_ONE, [(files, list(alphas))]), (SWEEP_SEPARATE, cells)):
            start, rows = time.perf_counter(), 0
            for k, (vectors, cell_alphas) in enumerate(jobs):
                manifest = generate(
                    Path(tmp) / f"{name[:5]}{k}", spec(vectors, cell_alphas, len(vectors) > 1), prompts,
                    {"enforce_eager": eager}, False,
                )  # fmt: skip
                rows += manifest["rows"]
            result["seconds"][name], result["rows"][name] = time.perf_counter() - start, rows
            _log(f"{name}: {len(jobs)} engine start(s), {rows} rows, {result['seconds'][name]:.1f} s")
    result["ratio"] = result["seconds"][SWEEP_SEPARATE] / result["seconds"][SWEEP_ONE]
    return result


PREVIOUS = "previous: two engines, compiled"
NOT_CACHED = "not cached, one engine"
CACHED = "cached"


def bench_seed(alphas: str = "-4,0,4", keep: Path | None = None, evaluate: bool = True) -> dict[str, float]:
    """Wall seconds of the seed job (`steer-batch run --alphas ...` on the embedded default, each
    in its own process, caches in a temporary folder), the default vector not cached: in the
    previous pipeline (--two-engines --compile), in two eager engines, and as `run` does it now;
    then cached; and a compiled engine's start-up with an empty vLLM compile cache, then again
    from it. `keep`: a folder for the run folders (default: deleted); `evaluate=False`: every job
    with --no-eval (generation only: no classification, no nll pass)."""
    models = default_model_dir().parent  # converted once, shared by the fresh caches below
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:

        def job(name: str, cache: str, *flags: str) -> None:
            (Path(tmp) / cache).mkdir(exist_ok=True)
            if not (Path(tmp) / cache / "models").exists():
                (Path(tmp) / cache / "models").symlink_to(models)
            env = {
                **os.environ,
                "STEER_BATCH_CACHE": str(Path(tmp) / cache),
                "VLLM_CACHE_ROOT": str(Path(tmp) / "vllm"),
            }
            out = (keep or Path(tmp)) / re.sub(r"[^a-z0-9]+", "_", name)
            command = [sys.executable, "-m", "steer_batch.cli", "run", "--alphas", alphas, "--out", str(out), *flags]
            command += [] if evaluate else ["--no-eval"]
            start = time.perf_counter()
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
            seconds[name] = time.perf_counter() - start
            _log(f"{name}: {seconds[name]:.1f} s")

        # One vLLM compile cache, empty at first. The previous pipeline (an extraction engine, then
        # a compiled generation engine) compiles its graph from nothing, as a first run did; the
        # same two engines eager; then the default, one engine (eager on CPU), vector not cached
        # and cached.
        job(PREVIOUS, "b", "--two-engines", "--compile")
        job("not cached, two engines, eager", "c", "--two-engines", "--enforce-eager")
        job(NOT_CACHED, "a")
        job(CACHED, "a")
        vector = next((Path(tmp) / "a" / "vectors").glob("*.safetensors"))
        script = (
            "import sys, time; from steer_batch.driver.launch import make_llm, close_llm; "
            "from steer_batch.jobs.models import default_model_dir; t = time.perf_counter(); "
            "llm = make_llm(default_model_dir(), {'happy': sys.argv[1]}); "
            "print(time.perf_counter() - t); close_llm(llm)"
        )
        env = {**os.environ, "VLLM_CACHE_ROOT": str(Path(tmp) / "vllm-cache"), "STEER_BATCH_CACHE": str(cache_dir())}
        for name in ("engine start-up, empty compile cache", "engine start-up, from the compile cache"):
            done = subprocess.run(
                [sys.executable, "-c", script, str(vector)], env=env, check=True, capture_output=True, text=True
            )
            seconds[name] = float(done.stdout.strip().splitlines()[-1])
            _log(f"{name}: {seconds[name]:.1f} s")
    return seconds
