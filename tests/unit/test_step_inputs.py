"""The step's summary that the CPU op skips by (kernels/step_inputs.py): written as the step's
buffers are filled, from what the tokens actually carry."""

import numpy as np
import pytest
import torch

from steer_batch.kernels.step_inputs import HI, LO, SUMMARY, VID, P, Q, R, StepInputs

SLOTS = 3


def plan(p=(), q=(), r=(), vid=(), lo=0, hi=1 << 30):
    """A request's [6, slots] plan: coefficients per slot (bank row slot + 1 unless given),
    steering [lo, hi)."""
    out = np.zeros((6, SLOTS))
    out[VID] = np.arange(1, SLOTS + 1)
    for row, values in ((P, p), (Q, q), (R, r), (VID, vid)):
        out[row, : len(values)] = values
    out[LO], out[HI] = lo, hi
    return out


@pytest.mark.parametrize(
    "plans, want",
    [
        (None, [0, 1, 0, -1]),  # nothing steered
        ([plan(p=[2.0]), plan(p=[-1.0])], [1, 1, 1, 1]),  # every token adds in slot 0, from bank row 1
        ([plan(p=[2.0]), plan(p=[-1.0], vid=[3])], [1, 1, 1, -1]),  # ... from two rows
        ([plan(p=[2.0]), None, plan(p=[0.0, 3.0])], [2, 1, 0, -1]),  # an unsteered request; slot 1 used
        ([plan(p=[2.0]), plan(r=[-1.0])], [1, 0, 1, -1]),  # an ablation: not adds only
        ([plan(p=[2.0]), plan(q=[0.0, 0.0, 1.5], r=[0.0, 0.0, -1.0])], [3, 0, 1, -1]),  # a clamp in slot 2
        ([plan(p=[2.0], lo=5), plan(p=[1.0], lo=100)], [1, 1, 0, -1]),  # positions before lo carry nothing
        ([plan(p=[2.0], lo=100), plan(r=[1.0], lo=100)], [0, 1, 0, -1]),  # no token inside its bounds
    ],
)
def test_the_summary_says_what_the_steps_tokens_carry(plans, want):
    p, q, r = (torch.zeros(16, SLOTS) for _ in range(3))
    vid = torch.zeros(16, SLOTS, dtype=torch.int32)
    summary = torch.full((len(SUMMARY),), -2, dtype=torch.int32)
    inputs = StepInputs(p, q, r, vid, summary)
    every_slot = np.stack([plan(p=[1.0, 1.0, 1.0])] * 4)
    inputs.fill(every_slot, np.array([4, 4, 4, 4]), np.zeros(4, int))  # a larger step first
    assert summary.tolist() == [3, 1, 1, -1]
    if plans is not None:
        plans = np.stack([np.zeros((6, SLOTS)) if x is None else x for x in plans])
    num = len(plans) if plans is not None else 2
    inputs.fill(plans, np.full(num, 4), np.full(num, 3))  # 4 tokens each at positions 3-6
    assert summary.tolist() == want
    assert not p[4 * num :].any()  # the larger step's rows are gone
