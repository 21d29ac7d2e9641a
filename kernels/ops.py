"""The steering ops as torch custom ops (`torch.ops.steer_batch.*`), with fake implementations,
so torch.compile and CUDA graphs treat them as single opaque nodes: the torch implementation on
CPU, the Triton kernels on CUDA."""

import torch

from . import steer


@torch.library.custom_op("steer_batch::fused_add_rms_norm_steer", mutates_args=())
def fused_add_rms_norm_steer(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    coeff: torch.Tensor,
    vid: torch.Tensor,
    bank: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return steer.fused_add_rms_norm_steer(x, residual, weight, eps, coeff, vid, bank)


@fused_add_rms_norm_steer.register_kernel("cuda")
def _(x, residual, weight, eps, coeff, vid, bank):
    from . import triton_steer

    return triton_steer.fused_add_rms_norm_steer(x, residual, weight, eps, coeff, vid, bank)


@fused_add_rms_norm_steer.register_fake
def _(x, residual, weight, eps, coeff, vid, bank):
    return torch.empty_like(x), torch.empty_like(residual)
