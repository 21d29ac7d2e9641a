"""The per-token inputs of the steering op for one step, filled on the host and copied to the
device before the forward (torch and numpy only: kernels/gpu_check.py drives it without vLLM).

A request's plan is [6, slots]: rows VID, P, Q, R (its entries' bank rows and coefficients, see
steer.py) and LO, HI (the [lo, hi) absolute positions each entry steers). Every scheduled token
gets its request's plan, zeroed in the slots whose bounds leave its absolute position out; rows
past this step's tokens keep zero, including those the previous, larger step wrote (CUDA-graph
padding reads them).
"""

import numpy as np
import torch

VID, P, Q, R, LO, HI = range(6)
# The step's summary for the CPU op (StepInputs `summary`, steer.py `steer_add_`), in this order.
SUMMARY = ("slots used", "adds only", "every token steered", "the one bank row of a one-slot step, else -1")


class StepInputs:
    """Host staging for the device buffers p, q, r [max_tokens, slots] float32 and vid
    [max_tokens, slots] int32 (allocated once; compiled graphs and CUDA graphs hold their
    addresses). On a GPU the staging is pinned and copied without blocking, as vLLM stages its
    own inputs; on the CPU the staging is the buffer itself."""

    NAMES = ("p", "q", "r", "vid")

    def __init__(self, p, q, r, vid, summary: torch.Tensor | None = None):
        """`summary`, a [len(SUMMARY)] int32 tensor on the CPU, if given, receives what the CPU op
        needs to skip the rest (steer.py `steer_add_`), read on the host where the step is built:
        the number of slots any token uses (0: nothing is steered), whether those slots only add
        (q = r = 0), whether every token has a nonzero coefficient in them, and, where every token
        adds in one slot from the same bank row, that row."""
        self.device = dict(zip(self.NAMES, (p, q, r, vid)))
        self.summary = summary.numpy() if summary is not None else None
        self.host = {
            name: t if t.device.type == "cpu" else torch.zeros(t.shape, dtype=t.dtype, pin_memory=True)
            for name, t in self.device.items()
        }
        self.np = {name: t.numpy() for name, t in self.host.items()}
        self.filled = 0  # tokens written by the last step

    def fill(self, plans: np.ndarray | None, num_scheduled_tokens: np.ndarray, num_computed: np.ndarray) -> None:
        """One step: plans [requests, 6, slots] in the batch's order (None: nothing steered),
        each request's scheduled token count and the tokens it had computed before the step."""
        n = int(num_scheduled_tokens.sum())
        for buffer in self.np.values():
            buffer[n : self.filled] = 0
        if plans is None:
            for buffer in self.np.values():
                buffer[:n] = 0
        else:
            request = np.repeat(np.arange(len(num_scheduled_tokens)), num_scheduled_tokens)  # [tokens]
            starts = np.cumsum(num_scheduled_tokens) - num_scheduled_tokens
            position = num_computed[request] + np.arange(n) - starts[request]
            token_plans = plans[request]  # [tokens, 6, slots]
            inside = (position[:, None] >= token_plans[:, LO]) & (position[:, None] < token_plans[:, HI])
            for name, row in (("p", P), ("q", Q), ("r", R)):
                self.np[name][:n] = np.where(inside, token_plans[:, row], 0.0)
            self.np["vid"][:n] = token_plans[:, VID]
        if self.summary is not None:
            self.summary[:] = self.summarize(n)
        used = max(n, self.filled)
        for name, host in self.host.items():
            if host is not self.device[name]:
                self.device[name][:used].copy_(host[:used], non_blocking=True)
        self.filled = n

    def summarize(self, n: int) -> np.ndarray:
        """SUMMARY of the first n tokens as filled."""
        p, q, r, vid = (self.np[name][:n] for name in self.NAMES)
        on = (p != 0) | (q != 0) | (r != 0)  # [tokens, slots]
        used = np.flatnonzero(on.any(axis=0))
        k = int(used[-1]) + 1 if len(used) else 0
        adds_only = not (q[:, :k].any() or r[:, :k].any())
        every = bool(on[:, :k].any(axis=1).all())
        one_row = k == 1 and adds_only and every and bool((vid[:, 0] == vid[0, 0]).all())
        return np.array([k, adds_only, every, vid[0, 0] if one_row else -1], dtype=np.int32)
