"""The front-end process: check the engine's vectors before anything starts, check every
request before it reaches the engine core (an exception in the core or the model runner would
kill the engine for everyone), and finish a request whose logits turned NaN with an error.
engine/hooks.py calls these from its wraps of vLLM."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from vllm import envs
from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger

from steer_batch.engine import codec, hooks
from steer_batch.engine.config import (
    CONFIG_KEY,
    VECTOR_KEY,
    WORKER_EXTENSION,
    SteeringConfig,
    SteeringRequestError,
    SteeringSpec,
    VectorSpec,
    asks_steering,
    parse_request,
)
from steer_batch.errors import SteerBatchError, SteeringNotInstalled
from steer_batch.vectors.vector import SteeringVector, read_file

logger = init_logger(__name__)

# Architectures whose *ForCausalLM the plugin replaces with a steerable subclass (engine/model.py).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "SteerableLlamaForCausalLM",
    "MistralForCausalLM": "SteerableMistralForCausalLM",
    "Qwen2ForCausalLM": "SteerableQwen2ForCausalLM",
    "Qwen3ForCausalLM": "SteerableQwen3ForCausalLM",
    "Gemma2ForCausalLM": "SteerableGemma2ForCausalLM",
    "Gemma3ForCausalLM": "SteerableGemma3ForCausalLM",
}


def prepare_engine_config(vllm_config) -> None:
    """Validate the steering setup against the model and pin it into additional_config: absolute
    paths, file sha256 and steered layers, so vLLM's config hash (and so its compile cache)
    tells apart engines that steer different layers or with different files."""
    config = SteeringConfig.from_additional_config(vllm_config.additional_config)
    if config is None:
        return
    model_config = vllm_config.model_config
    unsupported = [a for a in model_config.architectures if a not in SUPPORTED_ARCHITECTURES]
    if unsupported:
        raise SteerBatchError(
            f"steer-batch cannot steer architecture {unsupported[0]}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    hf = model_config.hf_text_config
    pinned = {}
    for name, spec in config.vectors.items():
        path = Path(spec.path).expanduser().resolve()
        data = read_file(path)  # read once: the sha256 is of the bytes validated
        vector = SteeringVector.for_model(
            name, data, str(path), hf.hidden_size, hf.num_hidden_layers, config.max_abs_alpha, model_config.dtype
        )
        sha = hashlib.sha256(data).hexdigest()
        if spec.sha256 is not None and spec.sha256 != sha:
            raise SteerBatchError(f"{path} (vector {name!r}): sha256 is {sha}; the config expects {spec.sha256}")
        pinned[name] = VectorSpec(str(path), sha, tuple(vector.layers))
    for key, layers in (("capture", config.capture), ("layers", config.layers)):
        bad = [i for i in layers if not 0 <= i < hf.num_hidden_layers] if isinstance(layers, tuple) else []
        if bad:
            raise SteerBatchError(
                f'additional_config["steering"]["{key}"]: layers {bad} are outside 0..{hf.num_hidden_layers - 1}'
            )
    # The steerable layers, pinned: those listed, all, or the start-up vectors' own.
    layers = config.layers
    if layers == "all" or (layers is None and config.runtime_vectors):
        layers = tuple(range(hf.num_hidden_layers))
    elif layers is None:
        layers = tuple(sorted({i for spec in pinned.values() for i in spec.layers}))
    outside = {name: sorted(set(spec.layers) - set(layers)) for name, spec in pinned.items()}
    outside = {name: bad for name, bad in outside.items() if bad}
    if outside:
        raise SteerBatchError(
            f'additional_config["steering"]["layers"]={list(layers)} leaves out layers the vectors steer: {outside}'
        )
    if config.runtime_vectors:
        # Runtime vectors reach the workers through the worker extension (engine/worker.py).
        parallel = vllm_config.parallel_config
        if parallel.worker_extension_cls not in ("", None, WORKER_EXTENSION):
            raise SteerBatchError(
                f"runtime steering vectors need worker_extension_cls={WORKER_EXTENSION!r}; "
                f"this engine has {parallel.worker_extension_cls!r}"
            )
        parallel.worker_extension_cls = WORKER_EXTENSION
    # "add" everywhere until kernels/gpu_check.py has passed on a GPU (docs/gpu.md, Kernels): the
    # fused op's Triton kernel has only run under the interpreter so far.
    steer_op = config.steer_op or "add"
    vllm_config.additional_config[CONFIG_KEY] = {
        **dataclasses.replace(config, vectors=pinned, steer_op=steer_op, layers=layers).to_dict(),
        "code": _code_hash(),
    }
    check_engine_modes(vllm_config)


def _code_hash() -> str:
    """Hash of the code that runs inside the compiled graph: vLLM's AOT compile cache is keyed
    by the config hash, so a new steer-batch must not load a graph compiled by an old one."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for source in (package / "engine" / "model.py", *sorted((package / "kernels").glob("*.py"))):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


# Features for which vLLM's config forces Model Runner V2 whatever the environment says.
_V2_ONLY = (
    ("attention_config.hisparse_config", "HiSparse attention"),
    ("watermark_config", "watermarking"),
)


def choose_model_runner(vllm_config, original) -> bool:
    """`VllmConfig.use_v2_model_runner` (engine/hooks.py): vLLM's own answer for an engine
    without steering; False for a steering engine, which fills its buffers in the V1 runner's
    `_prepare_inputs` (engine/runner.py). Asked while vLLM builds the config, so everything it
    decides from the answer is decided for V1, and in every process of the engine alike.
    `check_engine_modes` then refuses what asked for V2."""
    return original(vllm_config) if not asks_steering(vllm_config.additional_config) else False


def check_engine_modes(vllm_config) -> None:
    """Refuse, naming the setting, the vLLM modes whose batches the per-token steering and
    capture buffers do not follow (docs/gpu.md): they would steer or capture the wrong tokens."""
    parallel, sched = vllm_config.parallel_config, vllm_config.scheduler_config
    if vllm_config.use_v2_model_runner:  # engine/hooks.py decides V1 for every steering engine
        raise SteeringNotInstalled("a steering engine was configured for Model Runner V2: the runner hook is missing")
    for path, feature in _V2_ONLY:
        value = vllm_config
        for part in path.split("."):
            value = getattr(value, part, None)
        if value is not None:
            raise SteerBatchError(
                f"{feature} ({path}) runs only on vLLM's Model Runner V2, and steering runs on the V1 runner; "
                f"start this engine without {feature}, or without steering"
            )
    if envs.VLLM_USE_V2_MODEL_RUNNER:
        raise SteerBatchError(
            "VLLM_USE_V2_MODEL_RUNNER=1 asks for vLLM's Model Runner V2, and steering runs on the V1 runner; "
            "unset it (or set VLLM_USE_V2_MODEL_RUNNER=0) for steering engines"
        )
    refused = []
    if parallel.enable_dbo or parallel.ubatch_size > 1:
        refused.append(
            "micro-batching (enable_dbo / ubatch_size: vLLM splits each step into micro-batches, and the steering "
            "buffers hold one row per token of the whole step)"
        )
    if vllm_config.speculative_config is not None:
        refused.append(
            "speculative decoding (speculative_config: a draft model would inherit the vectors at the wrong hidden "
            "size, and rejected drafts move the positions steering_positions counts)"
        )
    if parallel.data_parallel_size > 1:
        refused.append(
            "data parallelism (data_parallel_size > 1: idle ranks run dummy batches over the steering and capture "
            "buffers); scale out with Ray Data replicas instead (steer-batch run --ray --replicas N)"
        )
    if sched.async_scheduling and parallel.pipeline_parallel_size > 1:
        refused.append(
            "async scheduling with pipeline parallelism (async_scheduling=True, pipeline_parallel_size > 1: vLLM's "
            "V1 runner does not support it); pass --no-async-scheduling (async_scheduling=False)"
        )
    if refused:
        raise SteerBatchError("steering cannot run with " + "; nor with ".join(refused))


@dataclass(eq=False)
class Registry:
    """One engine's steering, as its front end knows it: the config requests are validated
    against (with the vectors added at runtime, less those being removed) and each vector's bank
    row. vLLM's server validates requests on a thread pool: `lock` orders that against runtime
    changes (driver/runtime.py)."""

    config: SteeringConfig | None
    rows: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # names it in the plans it resolves

    @classmethod
    def of(cls, processor) -> Registry:
        """The registry of the engine whose InputProcessor is `processor` (made on first use)."""
        registry = hooks.keep(processor, "registry")
        if registry is None:
            config = SteeringConfig.from_additional_config(processor.vllm_config.additional_config)
            rows = {name: row for row, name in enumerate(config.vectors)} if config else {}
            registry = hooks.keep(processor, "registry", cls(config, rows))
            _REGISTRIES[registry.token] = registry
        return registry

    def resolves(self, plan: dict) -> str | None:
        """None if every vector the plan was resolved to still sits in its row; else the name of
        one that was removed or replaced since. Called under `lock`."""
        held = {
            (row, self.config.vectors[name].sha256) for name, row in self.rows.items() if name in self.config.vectors
        }
        for (row, sha), name in zip(codec.held_rows(plan), plan["names"]):
            if (row, sha) not in held:
                return name
        return None


_REGISTRIES: weakref.WeakValueDictionary[str, Registry] = weakref.WeakValueDictionary()


def check_request(processor, params) -> SteeringSpec | None:
    """A request's steering spec (None: stock vLLM), or VLLMValidationError naming the field."""
    extra_args = getattr(params, "extra_args", None)
    registry = Registry.of(processor)
    with registry.lock:
        try:
            return parse_request(extra_args, registry.config)
        except SteeringRequestError as e:
            raise VLLMValidationError(str(e), parameter=e.field, value=(extra_args or {}).get(e.field)) from None


def admit(processor, request, spec: SteeringSpec | None):
    """Give a steered request its plan (engine/codec.py: bank rows and coefficients, resolved
    here once) and its prefix-cache salt. Unsteered requests (every entry a no-op included) get
    neither, so they share KV blocks with stock traffic; otherwise the salt covers the whole
    spec: each entry's vector file (sha256), alpha, op and scope, and the positions."""
    given = hooks.extra_args(request)
    extra_args = {k: v for k, v in (given or {}).items() if k != codec.PLAN_KEY}
    if given is not None:
        hooks.set_extra_args(request, extra_args)  # a client's own plan never reaches the engine
    if spec is None:
        return request
    registry = Registry.of(processor)
    with registry.lock:
        sha = {name: vector.sha256 for name, vector in registry.config.vectors.items()}
        plan = codec.encode(spec, registry.rows, sha, registry.token)
    hooks.set_extra_args(request, {**extra_args, codec.PLAN_KEY: plan})
    entries = ";".join(f"{e.vector}@{sha[e.vector]}:{e.alpha!r}:{e.op}:{e.scope}" for e in spec.entries)
    salt = f"steer-batch:{entries}:{spec.positions}"
    request.cache_salt = salt if request.cache_salt is None else f"{salt}|{request.cache_salt}"
    return request


def hand_over(request) -> None:
    """As the request enters the output processor, on the thread that then sends it to the engine
    core (engine/hooks.py): refuse it if a vector it was resolved to has been removed or replaced
    since its validation (which may run on another thread). A removal first withdraws the name
    under the same lock, so once it has, no request holding the vector reaches the core after it."""
    plan = codec.plan_of(hooks.extra_args(request))
    if plan is None:
        return
    registry = _REGISTRIES.get(plan.get("bank"))
    if registry is None:
        raise VLLMValidationError("this request's steering plan was not resolved by this engine", parameter=VECTOR_KEY)
    with registry.lock:
        gone = registry.resolves(plan)
    if gone is not None:
        raise VLLMValidationError(
            f"{VECTOR_KEY}: vector {gone!r} was removed from this engine while the request was being read; "
            "send it again with a vector the engine has",
            parameter=VECTOR_KEY,
            value=gone,
        )


def fail_non_finite(processor, outputs) -> list[str]:
    """Requests whose logits held NaN this step (vLLM's per-request count): their step output
    becomes an error finish without its garbage tokens. Returns the ids the engine core still
    runs, which must be aborted there."""
    running = []
    for output in outputs:
        nans = hooks.nan_logits(output)
        if not nans or hooks.is_error_finish(output) or output.request_id not in hooks.live_requests(processor):
            continue
        logger.warning(
            "steer-batch: request %s: %d NaN values in its logits (its hidden states overflowed); "
            "finished with an error instead of returning them as text",
            hooks.external_id(processor, output.request_id),
            nans,
        )
        if hooks.finish_with_error(output):
            running.append(output.request_id)
    return running
