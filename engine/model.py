"""Steerable vLLM models: the stock model classes, plus steering installed on chosen layers.

vLLM's decoder layers return (hidden_states, residual) and defer the residual add into the next
layer's fused add+RMSNorm, so the layer's output is hidden_states + residual. A steered layer
adds coeff[t] * bank[vid[t]] to hidden_states, which makes that sum the stock output plus
alpha * v: the HF layer output plus alpha * v. coeff/vid are per-token buffers allocated once,
at fixed addresses, and filled by the model runner before each forward (see runner.py), so
torch.compile and CUDA graphs stay on and the cost does not depend on how many distinct alphas
a batch holds.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn
from vllm.logger import init_logger
from vllm.model_executor.models.gemma2 import Gemma2ForCausalLM
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

import steer_batch.kernels.ops  # noqa: F401  (registers torch.ops.steer_batch.*)
from steer_batch.engine import hooks
from steer_batch.engine.bank import BankManager
from steer_batch.engine.config import SteeringConfig
from steer_batch.errors import SteerBatchError
from steer_batch.kernels import steer_add, steer_add_
from steer_batch.kernels.step_inputs import SUMMARY
from steer_batch.vectors.vector import SteeringVector, read_file

logger = init_logger(__name__)
NAN_COUNT_VARIABLE = "VLLM_COMPUTE_NANS_IN_LOGITS"


class SteeringState(nn.Module):
    """Per-token steering inputs shared by every steered layer, one column per entry slot:
    p, q, r [max_tokens, slots] float32 and vid [max_tokens, slots] int32, the coefficients of
    h + p v + (q + r (h . u)) u (kernels/steer.py), zero where a slot or token is not steered
    (and for CUDA-graph padding). The runner fills them before each forward (runner.py).

    Capture (eager and compiled): before each forward the runner writes `capture_rows`, the
    flat token index of every prompt that ends in this step (unused slots 0); each captured layer
    copies its output at those rows into its own buffer, `captured[layer]` [slots, hidden], from
    inside the graph (`steer_batch::capture_rows_`; a whole buffer, never a view of a shared one,
    which torch.compile would copy around), and the runner reads them back after the step.
    """

    def __init__(
        self,
        config: SteeringConfig,
        max_tokens: int,
        hidden: int,
        max_captures: int,
        capture_layers: tuple[int, ...] = (),
    ):
        super().__init__()
        self.bank = BankManager(self, config.vectors)  # which row holds which vector, from now on
        slots = config.max_vectors_per_request
        self.banks: dict[int, nn.Module] = {}  # steered layer -> the module holding its steer_v, steer_u
        self.capture_layers = capture_layers
        self.layout: dict[str, list[int]] = {"added": [], "folded": [], "captured": list(capture_layers), "stage": []}
        captures = max_captures if capture_layers else 0  # prompts that may end in one step
        self.register_buffer("capture_rows", torch.zeros(captures, dtype=torch.long), persistent=False)
        # float32 whatever the model's dtype (vLLM builds the model with its dtype as torch's
        # default): captured states are never rounded to bf16/fp16.
        self.captured = {
            layer: torch.zeros(captures, hidden, dtype=torch.float32) for layer in capture_layers
        }  # moved with the module below
        for name in ("p", "q", "r"):
            self.register_buffer(name, torch.zeros(max_tokens, slots, dtype=torch.float32), persistent=False)
        self.register_buffer("vid", torch.zeros(max_tokens, slots, dtype=torch.int32), persistent=False)
        # What the step steers (kernels/step_inputs.py), on the CPU only: kernels/steer.py steer_add_
        # skips the rest there (a CUDA graph cannot look at a step; the compiled add runs every slot).
        self.register_buffer("summary", torch.zeros(len(SUMMARY), dtype=torch.int32), persistent=False)

    def attach(self, layer: int, module: nn.Module, V: torch.Tensor) -> None:
        """Give `module` the per-token inputs and layer `layer`'s banks: V the raw directions
        [bank rows, hidden] (a zero row where a vector has none, or for a free row) and U the unit
        directions. Both banks are float32 whatever the model's dtype, so a start-up vector and
        the same file added at runtime (`write`) give bit-identical rows."""
        V = V.to(torch.float32)
        for name in ("p", "q", "r", "vid"):
            module.register_buffer(f"steer_{name}", getattr(self, name), persistent=False)
        on_cpu = self.summary.device.type == "cpu"
        module.register_buffer("steer_summary", self.summary if on_cpu else None, persistent=False)
        module.register_buffer("steer_v", V, persistent=False)
        module.register_buffer("steer_u", _unit(V), persistent=False)
        self.banks[layer] = module

    def write(self, row: int, vector: SteeringVector | None) -> None:
        """Put `vector` into bank row `row` of every steered layer in place (addresses stay, so
        compiled graphs and CUDA graphs see it), or clear the row (None). engine/bank.py decides
        which row holds what."""
        for layer, module in self.banks.items():
            v = vector.directions.get(layer) if vector is not None else None
            v = torch.zeros(module.steer_v.shape[1], dtype=torch.float32) if v is None else v.to(torch.float32)
            module.steer_v[row].copy_(v)
            module.steer_u[row].copy_(_unit(v[None])[0])

    @staticmethod
    def inputs(module: nn.Module) -> tuple[torch.Tensor, ...]:
        return module.steer_p, module.steer_q, module.steer_r, module.steer_vid, module.steer_v, module.steer_u

    def attach_capture(self, layer: int, module: nn.Module) -> None:
        """Give the decoder layer `module` its capture buffer and the shared row indices."""
        module.register_buffer("steer_capture_out", self.captured[layer].to(self.capture_rows.device), persistent=False)
        module.register_buffer("steer_capture_rows", self.capture_rows, persistent=False)
        self.captured[layer] = module.steer_capture_out


def _unit(V: torch.Tensor) -> torch.Tensor:
    return V / V.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # a zero row stays zero


class _SteeredLayer:
    """Mixed into a decoder layer's class; the layer's own forward runs unchanged first."""

    steer_v: torch.Tensor | None  # None where the add is folded into the next norm, or the layer only captures
    steer_summary: torch.Tensor | None  # what the step steers, on the CPU (SteeringState)
    steer_capture_out: torch.Tensor | None  # [slots, hidden] when this layer is captured (SteeringState)

    def forward(self, positions, hidden_states, residual, **kwargs):
        hidden_states, residual = super().forward(positions, hidden_states, residual, **kwargs)
        if self.steer_v is not None and self.steer_summary is not None:  # CPU: only what the step steers
            # Eager, the function itself: a custom op's dispatch would cost more than the skip saves.
            add_ = torch.ops.steer_batch.steer_add_ if torch.compiler.is_compiling() else steer_add_
            add_(hidden_states, residual, *SteeringState.inputs(self), self.steer_summary)
        elif self.steer_v is not None:
            hidden_states = steer_add(hidden_states, residual, *SteeringState.inputs(self))
        if self.steer_capture_out is not None:  # the layer's residual-stream output at the capture rows
            torch.ops.steer_batch.capture_rows_(
                self.steer_capture_out, hidden_states, residual, self.steer_capture_rows
            )
        return hidden_states, residual


class _SteeredNorm:
    """Mixed into the RMSNorm that consumes a steered layer's (hidden_states, residual): the
    residual add, the steering and the norm in one op (`steer_op="fused"`)."""

    def forward(self, x, residual=None):
        if residual is None:
            return super().forward(x)
        return torch.ops.steer_batch.fused_add_rms_norm_steer(
            x, residual, self.weight, self.variance_epsilon, *SteeringState.inputs(self)
        )


def _consumer_norm(decoder: nn.Module, i: int) -> nn.Module | None:
    """The plain RMSNorm that receives layer i's (hidden_states, residual) first: the next
    layer's input_layernorm, or the final norm. None where there is no such norm (Gemma's
    norms, a pipeline-stage boundary), and layer i then adds on its own."""
    norm, plain = hooks.next_norm(decoder, i)
    return norm if plain else None


def install_steering(model: nn.Module, config: SteeringConfig, vllm_config) -> SteeringState:
    """Turn the decoder layers that any vector touches into steered layers; return the state.
    The front end validated the config (engine/frontend.py); this re-checks only what it loads
    itself: each vector file against the sha256 pinned there."""
    hf = vllm_config.model_config.hf_text_config
    decoder, local = hooks.decoder_stack(model)  # local: this pipeline stage's layers
    vectors = {}
    for name, spec in config.vectors.items():
        data = read_file(spec.path)  # read once: what is checked is what is loaded
        if spec.sha256 is not None and hashlib.sha256(data).hexdigest() != spec.sha256:
            raise SteerBatchError(
                f"steering vector {name!r}: {spec.path} changed since the engine config was made (sha256 differs); "
                "start the engine again"
            )
        vectors[name] = SteeringVector.for_model(name, data, spec.path, hf.hidden_size, hf.num_hidden_layers)

    # vLLM's own per-request count of NaN logits (kept on the device under async scheduling),
    # which engine/frontend.py turns into an error finish. Set here, in the worker process while
    # the model is built, before vLLM freezes its environment: only this engine counts.
    if os.environ.setdefault(NAN_COUNT_VARIABLE, "1") != "1":
        logger.warning(
            "steer-batch: %s=%s: a request whose states turn NaN returns its tokens as a normal completion",
            NAN_COUNT_VARIABLE,
            os.environ[NAN_COUNT_VARIABLE],
        )
    sched = vllm_config.scheduler_config
    max_tokens = max(sched.max_num_batched_tokens, vllm_config.compilation_config.max_cudagraph_capture_size or 0)
    param = next(decoder.parameters())
    with torch.device(param.device):
        captured = tuple(i for i in config.capture if i in local)
        state = SteeringState(config, max_tokens, hf.hidden_size, sched.max_num_seqs, captured)
    steerable = config.layers if isinstance(config.layers, tuple) else {i for v in vectors.values() for i in v.layers}
    steered = sorted(i for i in steerable if i in local)
    fused = config.steer_op == "fused" and not state.capture_layers  # capture reads the layer's own output
    folded = []
    for i in sorted(set(steered) | set(state.capture_layers)):
        layer = decoder.layers[i]
        hooks.swap_class(layer, _SteeredLayer)
        if i in state.capture_layers:
            state.attach_capture(i, layer)
        else:
            layer.register_buffer("steer_capture_out", None, persistent=False)
        norm = _consumer_norm(decoder, i) if fused and i in steered else None
        if i not in steered or norm is not None:
            layer.register_buffer("steer_v", None, persistent=False)
        if i not in steered:
            continue
        # [bank rows, hidden] float32 (not the model's dtype); rows past the vectors are free
        V = torch.zeros(config.max_vectors, hf.hidden_size, dtype=torch.float32)
        for row, v in enumerate(vectors.values()):
            if i in v.directions:
                V[row] = v.directions[i]
        target = layer
        if norm is not None:
            hooks.swap_class(norm, _SteeredNorm)
            target = norm
            folded.append(i)
        state.attach(i, target, V.to(param.device))
    state.layout.update(added=[i for i in steered if i not in folded], folded=folded, stage=[local.start, local.stop])
    logger.info(
        "steer-batch: steering layers %s with vectors %s; capturing layers %s",
        steered,
        list(vectors),
        list(state.capture_layers),
    )
    logger.info(
        "steer-batch: steering op on %s: %s",
        param.device.type,
        f"fused into the next RMSNorm for layers {folded} (kernels/ops.py), a separate add for the rest"
        if fused
        else "a separate add after each steered layer (kernels/steer.py), left to torch.compile to fuse",
    )
    return state


class Steerable:
    """Mixed in front of a vLLM *ForCausalLM: builds the stock model, then installs steering
    when additional_config asks for it. Without the `steering` key the model is stock."""

    steering: SteeringState | None

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = SteeringConfig.from_additional_config(vllm_config.additional_config)
        self.steering = install_steering(self, config, vllm_config) if config is not None else None


class SteerableLlamaForCausalLM(Steerable, LlamaForCausalLM):
    pass


class SteerableMistralForCausalLM(Steerable, MistralForCausalLM):
    pass


class SteerableQwen2ForCausalLM(Steerable, Qwen2ForCausalLM):
    pass


class SteerableQwen3ForCausalLM(Steerable, Qwen3ForCausalLM):
    pass


class SteerableGemma2ForCausalLM(Steerable, Gemma2ForCausalLM):
    pass


class SteerableGemma3ForCausalLM(Steerable, Gemma3ForCausalLM):
    pass
