"""Fill the per-token steering buffers from the scheduled requests, once per step, before the
forward: called after V1's `GPUModelRunner._prepare_inputs` (inherited by the CPU runner) by
engine/hooks.py."""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.utils import CpuGpuBuffer
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from steer_batch.engine.config import SteeringConfig, parse_request
from steer_batch.engine.model import SteeringState
from steer_batch.errors import SteeringNotInstalled


class StepFiller:
    """Writes coeff/vid for one step: per request (vector row, alpha), repeated over its tokens."""

    def __init__(self, runner: GPUModelRunner, state: SteeringState):
        self.state = state
        self.config = SteeringConfig.from_additional_config(runner.vllm_config.additional_config)
        n = state.coeff.shape[0]
        device = state.coeff.device
        # Host staging with vLLM's own buffer type, so the copy follows the same ordering rules as
        # the runner's input ids and positions. On CPU the staging is the model's buffer itself.
        self.coeff = CpuGpuBuffer(n, dtype=torch.float32, device=device)
        self.vid = CpuGpuBuffer(n, dtype=torch.int32, device=device)
        if device.type == "cpu":
            self.coeff.cpu, self.coeff.np, self.vid.cpu, self.vid.np = (
                state.coeff,
                state.coeff.numpy(),
                state.vid,
                state.vid.numpy(),
            )
        self.coeff.gpu, self.vid.gpu = state.coeff, state.vid
        self.requests: dict[str, tuple[int, float]] = {}  # req_id -> (vector row, alpha); alpha 0 = unsteered
        self.filled = 0  # tokens written last step; zeroed again before the next
        self.capture_ids: list[str] = []  # requests whose prompt ends in the step being run
        self.captured: dict[str, torch.Tensor] = {}  # req_id -> [capture layers, hidden] float32

    def row(self, req_id: str, runner: GPUModelRunner) -> tuple[int, float]:
        cached = self.requests.get(req_id)
        if cached is None:
            parsed = parse_request(runner.requests[req_id].sampling_params.extra_args, self.config)
            cached = (self.state.index[parsed[0]], parsed[1]) if parsed else (0, 0.0)
        return cached

    def flush_captures(self) -> None:
        """File the last step's captured rows under their request ids."""
        state = self.state
        for k, rid in enumerate(self.capture_ids):
            self.captured[rid] = torch.stack([state.pending[layer][k] for layer in state.capture_layers])
        self.capture_ids = []
        state.pending = {}

    def plan_captures(self, runner: GPUModelRunner, req_ids: list[str], num_scheduled_tokens: np.ndarray) -> None:
        """Flat index of the last prompt token of every request whose prompt ends in this step."""
        rows, ids = [], []
        start = 0
        for r, rid in enumerate(req_ids):
            prompt_len = len(runner.requests[rid].prompt_token_ids)
            computed = int(runner.input_batch.num_computed_tokens_cpu[r])
            if computed < prompt_len <= computed + num_scheduled_tokens[r]:
                rows.append(start + prompt_len - 1 - computed)
                ids.append(rid)
            start += int(num_scheduled_tokens[r])
        self.capture_ids = ids
        self.state.capture_rows = torch.tensor(rows, dtype=torch.long)

    def fill(self, runner: GPUModelRunner, num_scheduled_tokens: np.ndarray) -> None:
        req_ids = runner.input_batch.req_ids[: len(num_scheduled_tokens)]
        if self.state.capture_layers:
            self.flush_captures()
            self.plan_captures(runner, req_ids, num_scheduled_tokens)
        # Rebuilt every step from the live batch, so finished requests drop out by themselves.
        self.requests = {rid: self.row(rid, runner) for rid in req_ids}
        rows = np.fromiter((r for r, _ in self.requests.values()), dtype=np.int32, count=len(req_ids))
        alphas = np.fromiter((a for _, a in self.requests.values()), dtype=np.float32, count=len(req_ids))
        n = int(num_scheduled_tokens.sum())
        self.coeff.np[n : self.filled] = 0.0
        self.vid.np[n : self.filled] = 0
        self.coeff.np[:n] = np.repeat(alphas, num_scheduled_tokens)
        self.vid.np[:n] = np.repeat(rows, num_scheduled_tokens)
        if self.coeff.cpu is not self.coeff.gpu:
            m = max(n, self.filled)
            self.coeff.copy_to_gpu(m)
            self.vid.copy_to_gpu(m)
        self.filled = n


def fill_step(runner: GPUModelRunner, scheduler_output, num_scheduled_tokens: np.ndarray) -> None:
    """After `_prepare_inputs`, before the forward (engine/hooks.py): fill this step's buffers."""
    filler = getattr(runner, "_steer_batch_filler", False)
    if filler is False:  # first step: resolve once whether this engine steers
        filler = runner._steer_batch_filler = _make_filler(runner, scheduler_output)
    if filler is not None:
        filler.fill(runner, num_scheduled_tokens)


def _make_filler(runner: GPUModelRunner, scheduler_output) -> StepFiller | None:
    state = getattr(runner.get_model(), "steering", None)
    config = SteeringConfig.from_additional_config(runner.vllm_config.additional_config)
    if config is None:
        return None
    if not isinstance(state, SteeringState):
        raise SteeringNotInstalled(
            f"steering was asked for, but model {type(runner.get_model()).__name__} has no steering "
            "installed: its architecture is not one steer-batch supports, or the plugin did not load"
        )
    # The scheduler of a steering engine asks for freshly allocated KV blocks to be zeroed
    # (engine/hooks.py). The CPU runner zeroes them as they come; the GPU runner only once its
    # zeroer exists, which vLLM builds at start-up for Mamba or mixed-precision caches alone:
    # build it now, and zero this first step's blocks, which its _update_states passed over.
    if runner.device.type == "cuda" and not hasattr(runner, "_kv_block_zeroer"):
        runner._init_kv_zero_meta()
        if scheduler_output.new_block_ids_to_zero:
            runner._zero_block_ids(scheduler_output.new_block_ids_to_zero)
    return StepFiller(runner, state)
