"""The steering op: h[t] += coeff[t] * bank[vid[t]], alone or fused into vLLM's add+RMSNorm.

`steer.py` is the torch implementation (the reference and the CPU path); `triton_steer.py` the
GPU kernels. Relative imports only: `kernels/gpu_check.py` runs from a bare checkout.
"""

from .steer import fused_add_rms_norm_steer, steer_add, steer_add_

__all__ = ["fused_add_rms_norm_steer", "steer_add", "steer_add_"]
