"""The fused steering op as a torch custom op (`torch.ops.steer_batch.fused_add_rms_norm_steer`)
with a fake implementation, so torch.compile and CUDA graphs treat it as one opaque node: the
torch implementation on CPU, the Triton kernel on CUDA. Arguments as kernels/steer.py."""

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
    from . import triton_steer

    return triton_steer.fused_add_rms_norm_steer(x, residual, weight, eps, p, q, r, vid, V, U)


@fused_add_rms_norm_steer.register_fake
def _(x, residual, weight, eps, p, q, r, vid, V, U):
    return torch.empty_like(x), torch.empty_like(residual)
