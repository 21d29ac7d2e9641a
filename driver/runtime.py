"""Steering vectors added to and removed from a running engine.

The front end keeps the registry requests are validated against (engine/frontend.py); the
workers keep the banks (engine/worker.py). Capacity is fixed at start-up, `max_vectors` rows per
steerable layer allocated once, so compiled graphs and CUDA graphs stay valid: adding writes a
row in place, removing clears it. An engine allows it when started with
`additional_config={"steering": {"runtime_vectors": True}}` (any file) or a directory the files
must lie in (after resolving symlinks).

    from steer_batch.driver.runtime import add_vector, list_vectors, remove_vector
    add_vector(llm, "calm", "calm.safetensors")      # usable by the next request
    remove_vector(llm, "calm")                       # 409 while a request in the engine holds it

The server runs the same steps through `add_vector_async` / `remove_vector_async`
(serve/middleware.py); there a removal refuses new requests naming the vector at once and waits
(up to a minute, 409 after) for exactly the requests the engine holds with it (engine/bank.py). A vector is validated
exactly like a start-up vector (hidden size, layers, finite values); a name is the file's until
removed, and a name added again with another file never shares KV blocks with the old one (the
cache salt covers the file's sha256).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from pathlib import Path
from typing import NamedTuple

from steer_batch.engine import hooks
from steer_batch.engine.config import VectorSpec, check_vector_name
from steer_batch.engine.frontend import Registry
from steer_batch.errors import SteerBatchError
from steer_batch.vectors.vector import SteeringVector, read_file

WAIT_SECONDS = 60.0  # how long a server's DELETE waits for the requests using the vector
POLL_SECONDS = 0.02  # how often that wait looks again


class RuntimeVectorError(SteerBatchError):
    """A runtime vector operation refused; `status` is its HTTP status (400, 403, 404, 409)."""

    def __init__(self, message: str, status: int, param: str | None = None):
        super().__init__(message, param)
        self.status = status


def list_vectors(engine) -> list[dict]:
    """Name, bank row, layers, sha256, method, concept and path of each vector of `engine` (an
    `LLM`, `LLMEngine` or `AsyncLLM`)."""
    registry = _registry(engine)
    if registry.config is None:
        return []
    listing = []
    for name, spec in registry.config.vectors.items():
        info = _describe(spec)
        listing.append({"name": name, "row": registry.rows[name], **info})
    return listing


def add_vector(llm, name: str, path: str | Path) -> dict:
    """Load the vector file `path` into `llm` (an `LLM` or `LLMEngine`) as `name`; returns its
    listing entry."""
    registry, add = _prepare_add(llm, name, path)
    try:
        llm.collective_rpc("steer_batch_add_vector", args=(name, add.spec.path, add.data, add.spec.sha256, add.row))
    except BaseException:
        _release(registry, name)
        raise
    return _commit_add(registry, name, add)


async def add_vector_async(engine_client, name: str, path: str | Path) -> dict:
    """`add_vector` for an `AsyncLLM` (the OpenAI-compatible server's engine client)."""
    registry, add = _prepare_add(engine_client, name, path)
    try:
        await engine_client.collective_rpc(
            "steer_batch_add_vector", args=(name, add.spec.path, add.data, add.spec.sha256, add.row)
        )
    except BaseException:
        _release(registry, name)
        raise
    return _commit_add(registry, name, add)


def remove_vector(llm, name: str) -> None:
    """Remove the vector `name` from `llm`: refused (409) while a request the engine has not
    finished or aborted holds it (engine/bank.py)."""
    registry, spec = _withdraw(llm, name)
    try:
        users = _in_use(llm.collective_rpc("steer_batch_remove_vector", args=(name, registry.rows[name])))
    except BaseException:
        _restore(registry, name, spec)
        raise
    if users:
        _restore(registry, name, spec)
        raise RuntimeVectorError(
            f"vector {name!r} is used by {_describe_users(llm, users)} not yet finished; remove it once "
            f"{'they finish' if len(users) > 1 else 'it finishes'}",
            409,
            "name",
        )
    _release(registry, name)


async def remove_vector_async(engine_client, name: str, wait: float = WAIT_SECONDS) -> None:
    """`remove_vector` for an `AsyncLLM`: new requests naming it are refused at once, and the
    removal waits for exactly the requests holding it when it was asked (up to `wait` seconds,
    409 after), then clears the row."""
    registry, spec = _withdraw(engine_client, name)
    deadline = time.monotonic() + wait
    states = hooks.live_requests(hooks.processors(engine_client)[1])
    try:
        while users := _in_use(
            await engine_client.collective_rpc("steer_batch_remove_vector", args=(name, registry.rows[name]))
        ):
            # No request can take the vector now (withdrawn); wait for these to leave the engine.
            while any(rid in states for rid in users) and time.monotonic() < deadline:
                await asyncio.sleep(POLL_SECONDS)
            if time.monotonic() >= deadline:
                raise RuntimeVectorError(
                    f"vector {name!r} is still used by {_describe_users(engine_client, users)} after {wait:g} s; "
                    "remove it once they finish",
                    409,
                    "name",
                )
            await asyncio.sleep(POLL_SECONDS)  # their finish reaches the engine core before the next call
    except BaseException:
        _restore(registry, name, spec)
        raise
    _release(registry, name)


def _in_use(results: list[dict]) -> list[str]:
    """The request ids the engine core found holding the row (engine/hooks.py); [] once cleared."""
    return sorted({rid for result in results for rid in result["in_use"]})


def _describe_users(engine, users: list[str]) -> str:
    output_processor = hooks.processors(engine)[1]
    ids = [hooks.external_id(output_processor, rid) for rid in users]
    shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
    return f"request{'s' if len(ids) > 1 else ''} {shown}"


def _registry(engine) -> Registry:
    return Registry.of(hooks.processors(engine)[0])


def _describe(spec: VectorSpec, vector: SteeringVector | None = None) -> dict:
    """A listing entry: from `vector` when given (what was loaded), else read from its file."""
    try:
        vector = vector or SteeringVector.load(spec.path)
    except SteerBatchError:  # the file changed or went away since it was loaded: list what is known
        return {
            "layers": list(spec.layers or ()),
            "sha256": spec.sha256,
            "method": "",
            "concept": "",
            "path": spec.path,
        }
    return {
        "layers": vector.layers,
        "sha256": spec.sha256,
        "method": vector.method,
        "concept": vector.concept,
        "path": spec.path,
    }


class _Addition(NamedTuple):
    """A validated addition: the file's bytes, read once, are what the workers load and what the
    listing describes (a file replaced meanwhile cannot reach them half validated)."""

    spec: VectorSpec
    row: int
    data: bytes
    vector: SteeringVector


def _prepare_add(engine, name: str, path: str | Path) -> tuple[Registry, _Addition]:
    """Validate an addition and reserve its name and bank row."""
    registry = _registry(engine)
    with registry.lock:
        add = _check_add(engine, registry, name, path)
        registry.rows[name] = add.row  # reserved: no other addition takes the name or the row
    return registry, add


def _check_add(engine, registry: Registry, name: str, path: str | Path) -> _Addition:
    config = registry.config
    if config is None or not config.runtime_vectors:
        raise RuntimeVectorError(
            "this engine was started without runtime vectors; start it with "
            'additional_config={"steering": {"runtime_vectors": "/dir/of/vectors"}} '
            "(steer-batch serve --allow-runtime-vectors DIR)",
            403,
        )
    try:
        check_vector_name(name, "name", "name")
    except SteerBatchError as e:
        raise RuntimeVectorError(str(e), 400, "name") from None
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte
        raise RuntimeVectorError(f"path={str(path)[:200]!r} cannot be resolved: {e}", 400, "path") from None
    if isinstance(config.runtime_vectors, str):
        allowed = Path(config.runtime_vectors).expanduser().resolve()
        if not resolved.is_relative_to(allowed):
            raise RuntimeVectorError(
                f"path={str(path)!r} resolves to {resolved}, outside {allowed}, the only directory this engine loads "
                "runtime vectors from",
                403,
                "path",
            )
    if name in registry.rows and name not in config.vectors:
        raise RuntimeVectorError(f"vector {name!r} is being added by another request", 409, "name")
    if name in config.vectors:
        raise RuntimeVectorError(
            f"vector {name!r} is already loaded (from {config.vectors[name].path}); remove it first "
            f"(DELETE /v1/steering/vectors/{name})",
            409,
            "name",
        )
    free = sorted(set(range(config.max_vectors)) - set(registry.rows.values()))
    if not free:
        raise RuntimeVectorError(
            f"all {config.max_vectors} bank rows are in use (the engine's max_vectors); remove a vector first",
            409,
        )
    model_config = hooks.processors(engine)[0].vllm_config.model_config
    hf = model_config.hf_text_config
    try:
        data = read_file(resolved)
        vector = SteeringVector.for_model(
            name, data, str(resolved), hf.hidden_size, hf.num_hidden_layers, config.max_abs_alpha, model_config.dtype
        )
    except SteerBatchError as e:
        raise RuntimeVectorError(str(e), 400, "path") from None
    outside = sorted(set(vector.layers) - set(config.layers))
    if outside:
        raise RuntimeVectorError(
            f"vector {name!r} steers layers {outside}, which this engine does not steer (its layers: "
            f'{list(config.layers)}); start it with more "layers"',
            400,
            "path",
        )
    spec = VectorSpec(str(resolved), hashlib.sha256(data).hexdigest(), tuple(vector.layers))
    return _Addition(spec, free[0], data, vector)


def _commit_add(registry: Registry, name: str, add: _Addition) -> dict:
    """The workers hold the vector: requests may name it from now on."""
    with registry.lock:
        registry.config = dataclasses.replace(registry.config, vectors={**registry.config.vectors, name: add.spec})
    return {"name": name, "row": add.row, **_describe(add.spec, add.vector)}


def _withdraw(engine, name: str) -> tuple[Registry, VectorSpec]:
    """Take `name` out of what requests may use, so that no new request names it."""
    registry = _registry(engine)
    with registry.lock:
        config = registry.config
        if config is None or not config.runtime_vectors:
            raise RuntimeVectorError("this engine was started without runtime vectors: its vectors are fixed", 403)
        if name not in config.vectors:
            raise RuntimeVectorError(f"no vector {name!r}; this engine has {config.names}", 404, "name")
        registry.config = dataclasses.replace(config, vectors={k: v for k, v in config.vectors.items() if k != name})
    return registry, config.vectors[name]


def _restore(registry: Registry, name: str, spec: VectorSpec) -> None:
    with registry.lock:
        registry.config = dataclasses.replace(registry.config, vectors={**registry.config.vectors, name: spec})


def _release(registry: Registry, name: str) -> None:
    """Free the bank row of `name` (removed, or an addition that failed)."""
    with registry.lock:
        registry.rows.pop(name, None)
