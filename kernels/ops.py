"""The steering ops as torch custom ops, with fake implementations, so torch.compile and CUDA
graphs treat each as one opaque node: `fused_add_rms_norm_steer` (the torch implementation on
CPU, the Triton kernel on CUDA; arguments as kernels/steer.py), `steer_add_` (the CPU's separate
add, which skips what a step does not steer) and `capture_rows_`, which copies
chosen token rows of a layer's output into a persistent buffer from inside a compiled graph."""

import torch

from . import steer


@torch.library.custom_op("steer_batch::fused_add_rms_norm_steer", mutates_args=())
def fused_add_rms_norm_steer(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    p: torch.Tensor,
    q: torch.Tensor,
    r: torch.Tensor,
    vid: torch.Tensor,
    V: torch.Tensor,
    U: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return steer.fused_add_rms_norm_steer(x, residual, weight, eps, p, q, r, vid, V, U)


@fused_add_rms_norm_steer.register_kernel("cuda")
def _(x, residual, weight, eps, p, q, r, vid, V, U):
    from . import triton_steer  # Triton only where CUDA runs: a CPU install may lack it

    return triton_steer.fused_add_rms_norm_steer(x, residual, weight, eps, p, q, r, vid, V, U)


@fused_add_rms_norm_steer.register_fake
def _(x, residual, weight, eps, p, q, r, vid, V, U):
    return torch.empty_like(x), torch.empty_like(residual)


@torch.library.custom_op("steer_batch::steer_add_", mutates_args=("hidden",))
def steer_add_(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    r: torch.Tensor,
    vid: torch.Tensor,
    V: torch.Tensor,
    U: torch.Tensor,
    summary: torch.Tensor,
) -> None:
    """The separate add in place on the CPU, skipping unused slots and unsteered tokens
    (kernels/steer.py `steer_add_`); one opaque node for torch.compile."""
    steer.steer_add_(hidden, residual, p, q, r, vid, V, U, summary)


@steer_add_.register_fake
def _(hidden, residual, p, q, r, vid, V, U, summary):
    return None


@torch.library.custom_op("steer_batch::capture_rows_", mutates_args=("out",))
def capture_rows_(out: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor) -> None:
    """out[k] = hidden[rows[k]] + residual[rows[k]] for every k, summed in float32 (a bf16/fp16
    layer's deferred output is never rounded to its dtype on the way): out [slots, hidden]
    float32, rows [slots] int64 token indices (unused slots point at row 0 and are ignored by the
    reader). Only the chosen rows are read."""
    out.copy_(hidden.index_select(0, rows).float() + residual.index_select(0, rows).float())


@capture_rows_.register_fake
def _(out, hidden, residual, rows):
    return None
