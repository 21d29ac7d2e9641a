"""Fill the per-token steering buffers from the scheduled requests, once per step, before the
forward: called after V1's `GPUModelRunner._prepare_inputs` (inherited by the CPU runner) by
engine/hooks.py."""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from steer_batch.engine import hooks
from steer_batch.engine.config import SteeringConfig, asks_steering
from steer_batch.engine.model import SteeringState
from steer_batch.errors import SteeringNotInstalled
from steer_batch.kernels.step_inputs import StepInputs


class StepFiller:
    """Writes the per-token coefficients for one step: each request's plan, repeated over its
    scheduled tokens and zeroed where a token's absolute position lies outside an entry's
    bounds. Positions are the sequence's own (num_computed_tokens + offset), so chunked prefill,
    prefix-cache hits and recompute after preemption all see the same prompt/generated split."""

    def __init__(self, runner: GPUModelRunner, state: SteeringState):
        self.state = state
        summary = state.summary if state.summary.device.type == "cpu" else None
        self.inputs = StepInputs(state.p, state.q, state.r, state.vid, summary)
        self.capture_staging = hooks.staging_buffer(state.capture_rows)  # filled while vLLM's runner holds
        # its input-preparation event, copied without blocking
        self.plans: dict[str, np.ndarray | None] = {}  # req_id -> [6, slots] plan (kernels/step_inputs.py)
        self.unsteered = np.zeros((6, state.p.shape[1]))
        self.capture_ids: list[str] = []  # requests whose prompt ends in the step being run
        # (request ids, [capture layers, requests, hidden] float32 on the host, copy-done event or None)
        self.pending: list[tuple[list[str], torch.Tensor, torch.cuda.Event | None]] = []
        self.captured: dict[str, torch.Tensor] = {}  # req_id -> [capture layers, hidden] float32

    def plan(self, req_id: str, runner: GPUModelRunner) -> np.ndarray | None:
        if req_id not in self.plans:
            extra_args, prompt_len, _ = hooks.runner_request(runner, req_id)
            self.plans[req_id] = self.state.bank.plan(req_id, extra_args, prompt_len)
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
        _, computed_tokens = hooks.batch_requests(runner, len(req_ids))
        for r, rid in enumerate(req_ids):
            _, prompt_len, max_tokens = hooks.runner_request(runner, rid)
            computed = int(computed_tokens[r])
            if max_tokens == 1 and computed < prompt_len <= computed + num_scheduled_tokens[r]:
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
        req_ids, computed = hooks.batch_requests(runner, len(num_scheduled_tokens))
        if self.state.capture_layers:
            self.flush_captures()
            self.collect_captures(wait=False)
            self.plan_captures(runner, req_ids, num_scheduled_tokens)
        plans = [self.plan(rid, runner) for rid in req_ids]
        # Kept for the batch's requests only, so finished ones drop out by themselves.
        self.plans = {rid: plan for rid, plan in zip(req_ids, plans)}
        steered = any(plan is not None for plan in plans)
        stacked = np.stack([self.unsteered if plan is None else plan for plan in plans]) if steered else None
        self.inputs.fill(stacked, num_scheduled_tokens, computed)


def fill_step(runner: GPUModelRunner, num_scheduled_tokens: np.ndarray) -> None:
    """After `_prepare_inputs`, before the forward (engine/hooks.py): fill this step's buffers."""
    filler = hooks.keep(runner, "filler", default=False)
    if filler is False:  # first step: resolve once whether this engine steers
        filler = hooks.keep(runner, "filler", _make_filler(runner))
    if filler is not None:
        filler.fill(runner, num_scheduled_tokens)


def steered_requests(runner: GPUModelRunner) -> set[str]:
    """The ids of the last step's requests that carry a steering spec (engine/hooks.py reads
    their rows of logits for NaN)."""
    filler = hooks.keep(runner, "filler")
    return {rid for rid, plan in filler.plans.items() if plan is not None} if filler else set()


def _make_filler(runner: GPUModelRunner) -> StepFiller | None:
    model = hooks.runner_model(runner)
    state = getattr(model, "steering", None)
    config = SteeringConfig.from_additional_config(runner.vllm_config.additional_config)
    if config is None:
        return None
    if not isinstance(state, SteeringState):
        raise SteeringNotInstalled(
            f"steering was asked for, but model {type(model).__name__} has no steering "
            "installed: its architecture is not one steer-batch supports, or the plugin did not load"
        )
    hooks.ensure_stage_input(runner)
    return StepFiller(runner, state)


def build_kv_zeroer(runner: GPUModelRunner) -> None:
    """Once the KV cache is allocated (engine/hooks.py): the scheduler of a steering engine asks
    for freshly allocated KV blocks to be zeroed (hooks.py, `_ZeroFreshBlocks`). The CPU runner
    zeroes them itself; the GPU runner needs its zeroer, which vLLM builds here only for Mamba or
    mixed-precision caches, and then warms (compiles its Triton kernel) in its kernel warm-up."""
    if asks_steering(runner.vllm_config.additional_config):
        hooks.build_kv_zeroer(runner)
