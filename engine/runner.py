"""Fill the per-token steering buffers from the scheduled requests, once per step, before the
forward: called after V1's `GPUModelRunner._prepare_inputs` (inherited by the CPU runner) by
engine/hooks.py."""

from __future__ import annotations

import numpy as np
import torch
from vllm.distributed import get_pp_group
from vllm.logger import init_logger
from vllm.v1.utils import CpuGpuBuffer
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from steer_batch.engine.config import SteeringConfig, asks_steering
from steer_batch.engine.model import SteeringState
from steer_batch.errors import SteeringNotInstalled
from steer_batch.kernels.step_inputs import StepInputs

logger = init_logger(__name__)


class StepFiller:
    """Writes the per-token coefficients for one step: each request's plan, repeated over its
    scheduled tokens and zeroed where a token's absolute position lies outside an entry's
    bounds. Positions are the sequence's own (num_computed_tokens + offset), so chunked prefill,
    prefix-cache hits and recompute after preemption all see the same prompt/generated split."""

    def __init__(self, runner: GPUModelRunner, state: SteeringState):
        self.state = state
        active = state.active if state.active.device.type == "cpu" else None
        self.inputs = StepInputs(state.p, state.q, state.r, state.vid, active)
        self.capture_staging = self._staging(state.capture_rows)
        self.plans: dict[str, np.ndarray | None] = {}  # req_id -> [6, slots] plan (kernels/step_inputs.py)
        self.unsteered = np.zeros((6, state.p.shape[1]))
        self.capture_ids: list[str] = []  # requests whose prompt ends in the step being run
        # (request ids, [capture layers, requests, hidden] float32 on the host, copy-done event or None)
        self.pending: list[tuple[list[str], torch.Tensor, torch.cuda.Event | None]] = []
        self.captured: dict[str, torch.Tensor] = {}  # req_id -> [capture layers, hidden] float32

    @staticmethod
    def _staging(target: torch.Tensor) -> CpuGpuBuffer:
        # Host staging with vLLM's own buffer type (pinned, copied without blocking), filled while
        # vLLM's runner holds its input-preparation event. On CPU the staging is the buffer itself.
        buffer = CpuGpuBuffer(*target.shape, dtype=target.dtype, device=target.device)
        if target.device.type == "cpu":
            buffer.cpu, buffer.np = target, target.numpy()
        buffer.gpu = target
        return buffer

    def plan(self, req_id: str, runner: GPUModelRunner) -> np.ndarray | None:
        if req_id not in self.plans:
            request = runner.requests[req_id]
            self.plans[req_id] = self.state.bank.plan(
                req_id, request.sampling_params.extra_args, request.num_prompt_tokens
            )
        return self.plans[req_id]

    def flush_captures(self) -> None:
        """Start copying the last step's captured rows to the host, without waiting for that step:
        called before the next forward, so the copy is queued behind the step that wrote the rows
        and ahead of the one that overwrites them. On a GPU it lands in pinned memory with an
        event (vLLM's own pattern for its outputs), so async scheduling keeps the host ahead."""
        if self.capture_ids:
            k = len(self.capture_ids)
            rows = torch.stack([self.state.captured[layer][:k] for layer in self.state.capture_layers])
            event = None
            if rows.device.type == "cuda":
                host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
                host.copy_(rows, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host = rows  # torch.stack made a copy
            self.pending.append((self.capture_ids, host, event))
        self.capture_ids = []

    def collect_captures(self, wait: bool) -> None:
        """File the copied rows under their request ids: those whose copy is done, or all (`wait`)."""
        while self.pending:
            ids, host, event = self.pending[0]
            if event is not None and not wait and not event.query():
                return
            if event is not None:
                event.synchronize()
            for k, rid in enumerate(ids):
                self.captured[rid] = host[:, k]
            self.pending.pop(0)

    def plan_captures(self, runner: GPUModelRunner, req_ids: list[str], num_scheduled_tokens: np.ndarray) -> None:
        """Flat index of the last prompt token of every prefill-only request (max_tokens 1, as
        capture asks) whose prompt ends in this step. Requests that generate are not captured:
        an engine that captures and generates (`run`'s one engine) would otherwise copy and keep
        a row for each of them until the engine stops."""
        rows, ids = [], []
        start = 0
        for r, rid in enumerate(req_ids):
            request = runner.requests[rid]
            prompt_len = request.num_prompt_tokens
            computed = int(runner.input_batch.num_computed_tokens_cpu[r])
            prefill_only = request.sampling_params is not None and request.sampling_params.max_tokens == 1
            if prefill_only and computed < prompt_len <= computed + num_scheduled_tokens[r]:
                rows.append(start + prompt_len - 1 - computed)
                ids.append(rid)
            start += int(num_scheduled_tokens[r])
        self.capture_ids = ids
        staging = self.capture_staging
        staging.np[:] = 0
        staging.np[: len(rows)] = rows
        if staging.cpu is not staging.gpu:
            staging.copy_to_gpu()

    def fill(self, runner: GPUModelRunner, num_scheduled_tokens: np.ndarray) -> None:
        req_ids = runner.input_batch.req_ids[: len(num_scheduled_tokens)]
        if self.state.capture_layers:
            self.flush_captures()
            self.collect_captures(wait=False)
            self.plan_captures(runner, req_ids, num_scheduled_tokens)
        plans = [self.plan(rid, runner) for rid in req_ids]
        # Kept for the batch's requests only, so finished ones drop out by themselves.
        self.plans = {rid: plan for rid, plan in zip(req_ids, plans)}
        steered = any(plan is not None for plan in plans)
        stacked = np.stack([self.unsteered if plan is None else plan for plan in plans]) if steered else None
        computed = runner.input_batch.num_computed_tokens_cpu[: len(num_scheduled_tokens)]
        self.inputs.fill(stacked, num_scheduled_tokens, computed)


def fill_step(runner: GPUModelRunner, num_scheduled_tokens: np.ndarray) -> None:
    """After `_prepare_inputs`, before the forward (engine/hooks.py): fill this step's buffers."""
    filler = getattr(runner, "_steer_batch_filler", False)
    if filler is False:  # first step: resolve once whether this engine steers
        filler = runner._steer_batch_filler = _make_filler(runner)
    if filler is not None:
        filler.fill(runner, num_scheduled_tokens)


def _make_filler(runner: GPUModelRunner) -> StepFiller | None:
    state = getattr(runner.get_model(), "steering", None)
    config = SteeringConfig.from_additional_config(runner.vllm_config.additional_config)
    if config is None:
        return None
    if not isinstance(state, SteeringState):
        raise SteeringNotInstalled(
            f"steering was asked for, but model {type(runner.get_model()).__name__} has no steering "
            "installed: its architecture is not one steer-batch supports, or the plugin did not load"
        )
    # vLLM 0.32 allocates a later pipeline stage's buffer for the activations it receives only
    # in its warm-up dummy run, which eager CPU engines skip (stock vLLM then fails the first
    # step with an AssertionError): allocate it as that run does.
    if runner.intermediate_tensors is None and not get_pp_group().is_first_rank:
        runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
            batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
        )
    return StepFiller(runner, state)


def build_kv_zeroer(runner: GPUModelRunner) -> None:
    """Once the KV cache is allocated (engine/hooks.py): the scheduler of a steering engine asks
    for freshly allocated KV blocks to be zeroed (hooks.py, `_ZeroFreshBlocks`). The CPU runner
    zeroes them itself; the GPU runner needs its zeroer, which vLLM builds here only for Mamba or
    mixed-precision caches, and then warms (compiles its Triton kernel) in its kernel warm-up."""
    if not asks_steering(runner.vllm_config.additional_config):
        return
    if runner.device.type == "cuda" and not hasattr(runner, "_kv_block_zeroer"):
        runner._init_kv_zero_meta()
