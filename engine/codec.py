"""The request codec: what the front end hands the engine for one steered request.

The front end parses and validates a request's `steering_*` keys once (engine/config.py
`parse_request`) and resolves them against its registry (engine/frontend.py): each entry's
vector becomes its bank row and that row's file sha256, its op becomes the coefficients
(p, q, r) of the one update every op is (kernels/steer.py). The result travels in the request's
`extra_args` under PLAN_KEY, set only by the front end (a client's own value is dropped), to the
engine core, which reads the rows a request holds (engine/bank.py `in_use`), and to the
workers, which turn it into the per-token plan without validating anything again:

    {"entries": [[row, p, q, r, scope], ...], "sha256": [each row's sha256], "names": [each
     vector's name, for messages], "positions": [start, end or -1], "bank": the registry that
     resolved it}

scope: 0 every token, 1 the prompt's, 2 the generated ones. Pure Python and numpy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from steer_batch.kernels.step_inputs import HI, LO, VID, P, R

PLAN_KEY = "steer_batch_plan"
SCOPE_CODES = {"all": 0, "prompt": 1, "generated": 2}


def encode(spec, rows: dict[str, int], shas: dict[str, str], bank: str) -> dict[str, Any]:
    """The compact form of a validated SteeringSpec whose vectors sit in `rows` with `shas`."""
    return {
        "entries": [[rows[e.vector], *e.coefficients(), SCOPE_CODES[e.scope]] for e in spec.entries],
        "sha256": [shas[e.vector] for e in spec.entries],
        "names": [e.vector for e in spec.entries],
        "positions": [spec.positions[0], -1 if spec.positions[1] is None else spec.positions[1]],
        "bank": bank,
    }


def plan_of(extra_args: dict[str, Any] | None) -> dict[str, Any] | None:
    """The encoded plan a request carries, or None (stock vLLM)."""
    return (extra_args or {}).get(PLAN_KEY)


def held_rows(plan: dict[str, Any]) -> list[tuple[int, str]]:
    """(bank row, sha256) of each entry."""
    return [(int(entry[0]), sha) for entry, sha in zip(plan["entries"], plan["sha256"])]


def decode(plan: dict[str, Any], prompt_len: int, slots: int) -> np.ndarray:
    """The [6, slots] plan of kernels/step_inputs.py: rows VID, P, Q, R and the [LO, HI) absolute
    positions each entry steers in a sequence whose prompt has `prompt_len` tokens."""
    out = np.zeros((6, slots))
    start, end = plan["positions"]
    end = math.inf if end == -1 else end
    for m, (row, p, q, r, scope) in enumerate(plan["entries"]):
        lo, hi = ((0, math.inf), (0, prompt_len), (prompt_len, math.inf))[scope]
        out[VID, m] = row
        out[P : R + 1, m] = p, q, r
        out[LO, m], out[HI, m] = max(lo, start), min(hi, end)
    return out
