"""The steering op: h[t] += coeff[t] * bank[vid[t]] (torch reference, the CPU path)."""

from steer_batch.kernels.steer import steer_add

__all__ = ["steer_add"]
