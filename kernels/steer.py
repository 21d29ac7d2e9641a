"""The steering add, torch implementation (the reference and the CPU path)."""

import torch


def steer_add(h: torch.Tensor, coeff: torch.Tensor, vid: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Return h + coeff[t] * bank[vid[t]] for every token t.

    h: [tokens, hidden]; coeff: [>= tokens] float32 (0 for unsteered and padded tokens);
    vid: [>= tokens] int (vector row per token); bank: [num_vectors, hidden]. Only the first
    `tokens` entries of coeff/vid are read, so persistent buffers can be passed whole.
    The product is formed in float32 and rounded once into h's dtype.
    """
    n = h.shape[0]
    steer = coeff[:n, None] * bank.index_select(0, vid[:n]).float()  # [tokens, hidden]
    return h + steer.to(h.dtype)
