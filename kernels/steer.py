"""The steering op, torch implementation: the reference and the CPU path.

Shapes: h, x, residual [tokens, hidden]; coeff [>= tokens] float32 (0 for unsteered and padded
tokens); vid [>= tokens] int (the vector row of each token); bank [num_vectors, hidden]. Only
the first `tokens` entries of coeff/vid are read, so persistent buffers can be passed whole.

The steered sum is clamped into the finite range of its dtype, so the add itself never makes a
state inf (an absurd alpha in fp32, or a large one in fp16). Finite values in range pass
through bit for bit; a NaN that was already there stays NaN.
"""

import torch


def _steer(coeff: torch.Tensor, vid: torch.Tensor, bank: torch.Tensor, n: int) -> torch.Tensor:
    return coeff[:n, None] * bank.index_select(0, vid[:n]).float()  # [tokens, hidden] float32


def _finite(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    limit = torch.finfo(dtype).max
    return s.clamp(-limit, limit)


def steer_add(h: torch.Tensor, coeff: torch.Tensor, vid: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """h + coeff[t] * bank[vid[t]], the product formed in float32 and rounded once into h's dtype."""
    return _finite(h + _steer(coeff, vid, bank, h.shape[0]).to(h.dtype), h.dtype)


def fused_add_rms_norm_steer(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    coeff: torch.Tensor,
    vid: torch.Tensor,
    bank: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(s) * weight, s) with s = x + residual + coeff[t] * bank[vid[t]], summed in
    float32: vLLM's fused_add_rms_norm (vllm/ir/ops/layernorm.py) when no token is steered."""
    dtype = x.dtype
    s = _finite(x.float() + residual.float() + _steer(coeff, vid, bank, x.shape[0]), dtype)
    normed = s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed.to(weight.dtype) * weight).to(dtype), s.to(dtype)
