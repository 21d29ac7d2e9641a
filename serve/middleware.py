"""HTTP middleware for vLLM's OpenAI-compatible server (its `--middleware` option), which
`steer-batch serve` installs:

    python -m vllm.entrypoints.openai.api_server ... --middleware steer_batch.serve.middleware.steering

- Runtime vectors: `GET /v1/steering/vectors` lists the engine's vectors; `POST` with
  `{"name": ..., "path": ...}` loads a vector file (the engine must allow runtime vectors, and a
  file outside its directory is refused with 403); `DELETE /v1/steering/vectors/{name}` removes
  one, refused with 409 while a request uses it (driver/runtime.py). They honour the server's
  API key (`--api-key` / VLLM_API_KEY) as vLLM's own endpoints do.
- Strict types: vLLM's request schema reads `vllm_xargs` values as `str | int | float`, and
  pydantic turns a JSON `true` into 1 before `extra_args` is built, so `"steering_alpha": true`
  would arrive as alpha 1. The parsed body still tells a boolean from a number: such a request
  gets HTTP 400 naming the field, as does an integer outside 64 bits (which vLLM would refuse
  naming only `extra_args`). Requests without the key (401) are answered before their body
  is read.

Errors use vLLM's own error format (`{"error": {"message", "type", "param", "code"}}`).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from urllib.parse import unquote

from fastapi.responses import JSONResponse
from vllm import envs
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX, AuthenticationMiddleware

from steer_batch.driver import runtime
from steer_batch.engine.config import REQUEST_PREFIX

VECTORS_PATH = "/v1/steering/vectors"


def steering_type_error(body: bytes) -> tuple[str, str] | None:
    """(field, message) for the first `vllm_xargs` steering_* value that vLLM's request schema
    would take but misread: a JSON boolean (read as 1 or 0) or an integer outside 64 bits (which
    vLLM refuses naming only `extra_args`). Decided on the parsed body (a key may be written with
    escapes, `steering\\u005falpha`); a body that holds neither `steering` nor an escape cannot
    name such a key and is not parsed; one that is not a JSON object, or nests too deep to
    parse, is left to vLLM, which answers it with a 400."""
    if b"steering" not in body and b"\\u" not in body:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    xargs = parsed.get("vllm_xargs") if isinstance(parsed, dict) else None
    if not isinstance(xargs, dict):
        return None
    for key, value in xargs.items():
        if not key.startswith(REQUEST_PREFIX):
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, bool):
                return key, (
                    f"{key}: a JSON boolean is not allowed here (vLLM's request schema would read true as 1); "
                    "send a number or a string"
                )
            if isinstance(v, int) and not -(2**63) <= v < 2**64:
                return key, f"{key}: integers must be between -2**63 and 2**64 - 1"
    return None


def _error(message: str, status: int, param: str | None = None):
    kind = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError"}
    error = create_error_response(message, kind.get(status, "ConflictError"), HTTPStatus(status), param)
    return JSONResponse(error.model_dump(), status_code=status)


def _authorized(request) -> bool:
    """The server's API key check, as vLLM's AuthenticationMiddleware makes it (the key, on the
    paths it guards), for the requests this middleware answers or reads before vLLM's own
    middleware runs: an unauthenticated request gets 401 before anything reads its body."""
    args = request.app.state.args
    tokens = [key for key in (args.api_key or [envs.VLLM_API_KEY]) if key]
    path = request.scope["path"].removeprefix(request.scope.get("root_path", ""))
    if not tokens or request.method == "OPTIONS" or not path.startswith(GUARDED_PREFIX):
        return True
    return AuthenticationMiddleware(None, tokens).verify_token(request.headers)


async def _vectors(request):
    engine = request.app.state.engine_client
    name = unquote(request.url.path[len(VECTORS_PATH) :]).strip("/")  # DELETE /v1/steering/vectors/{name}
    if request.method == "GET" and not name:
        return {"object": "list", "data": runtime.list_vectors(engine)}
    if request.method == "POST" and not name:
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError) as e:
            raise runtime.RuntimeVectorError(
                f'the body is not JSON ({e}); send {{"name": ..., "path": ...}}', 400
            ) from None
        if not isinstance(body, dict) or set(body) != {"name", "path"} or not isinstance(body["path"], str):
            raise runtime.RuntimeVectorError(
                'send {"name": "...", "path": "/dir/file.safetensors"} and nothing else', 400
            )
        return await runtime.add_vector_async(engine, body["name"], body["path"])
    if request.method == "DELETE" and name:
        await runtime.remove_vector_async(engine, name)
        return {"name": name, "deleted": True}
    raise runtime.RuntimeVectorError(
        f"{request.method} {request.url.path}: use GET or POST {VECTORS_PATH}, or DELETE {VECTORS_PATH}/NAME", 404
    )


async def steering(request, call_next):
    path = request.url.path
    if path == VECTORS_PATH or path.startswith(VECTORS_PATH + "/"):
        if not _authorized(request):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        try:
            return JSONResponse(await _vectors(request))
        except runtime.RuntimeVectorError as e:
            return _error(str(e), e.status, e.param)
    if request.method == "POST":
        if not _authorized(request):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)  # vLLM's answer, before the body is read
        found = steering_type_error(await request.body())  # Starlette keeps the body for the endpoint
        if found is not None:
            return _error(found[1], 400, found[0])
    return await call_next(request)
