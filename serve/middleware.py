"""HTTP middleware for vLLM's OpenAI-compatible server (its `--middleware` option).

vLLM's request schema reads `vllm_xargs` values as `str | int | float`, and pydantic turns a JSON
`true` into 1 before `extra_args` is built, so `"steering_alpha": true` would arrive in the
plugin as alpha 1. The raw body still tells a boolean from a number: this middleware answers
such a request with HTTP 400 naming the field, in vLLM's own error format.

    python -m vllm.entrypoints.openai.api_server ... --middleware steer_batch.serve.middleware.strict_steering_json
"""

from __future__ import annotations

import json

from steer_batch.engine.config import REQUEST_PREFIX


def bool_steering_field(body: bytes) -> str | None:
    """The first `vllm_xargs` steering_* key whose value is (or holds) a JSON boolean."""
    if REQUEST_PREFIX.encode() not in body:
        return None
    try:
        xargs = json.loads(body).get("vllm_xargs")
    except (ValueError, AttributeError):
        return None  # not a JSON object: vLLM answers it
    if not isinstance(xargs, dict):
        return None
    for key, value in xargs.items():
        values = value if isinstance(value, list) else [value]
        if key.startswith(REQUEST_PREFIX) and any(isinstance(v, bool) for v in values):
            return key
    return None


async def strict_steering_json(request, call_next):
    if request.method == "POST":
        field = bool_steering_field(await request.body())  # Starlette keeps the body for the endpoint
        if field is not None:
            from fastapi.responses import JSONResponse
            from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
            from vllm.exceptions import VLLMValidationError

            error = create_error_response(
                VLLMValidationError(
                    f"{field}: a JSON boolean is not allowed here (vLLM's request schema would read true as 1); "
                    "send a number or a string",
                    parameter=field,
                )
            )
            return JSONResponse(error.model_dump(), status_code=error.error.code)
    return await call_next(request)
