"""Who owns the vector bank, and who may change it.

Each steered layer holds `max_vectors` bank rows, allocated once (engine/model.py
SteeringState); a row holds one vector's direction at that layer, or zeros.

- `BankManager` (one per worker, on the model's SteeringState) owns the rows: which vector
  (name, file, sha256) each holds, adding into a free row and clearing one. It turns a
  request's encoded plan (engine/codec.py) into the per-token plan, after checking that every
  row the plan names still holds the vector the front end resolved it to: a request never runs
  with its vector gone or replaced (the front end's hand-over check and `in_use` below make the
  mismatch impossible; if one ever came, the step fails instead of steering with another vector).
- `in_use` answers, in the engine core, which requests hold a row: the scheduler's own requests,
  from the moment the core receives one to its finish or abort (waiting, running and preempted
  alike). engine/hooks.py runs it before a removal reaches the workers, in the core's order of
  requests, aborts and utility calls, so a removal never clears a row under a request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from steer_batch.engine import codec, hooks
from steer_batch.errors import SteerBatchError


@dataclass(frozen=True)
class BankRow:
    name: str
    path: str
    sha256: str | None


class BankManager:
    def __init__(self, state, vectors: dict):
        """`state`: the SteeringState whose tensors hold the rows; `vectors`: name -> VectorSpec
        of the start-up vectors, in row order."""
        self.state = state
        self.rows: dict[int, BankRow] = {
            row: BankRow(name, spec.path, spec.sha256) for row, (name, spec) in enumerate(vectors.items())
        }

    def add(self, row: int, name: str, path: str, sha256: str, vector) -> None:
        if row in self.rows:
            raise SteerBatchError(f"bank row {row} already holds vector {self.rows[row].name!r}; remove it first")
        self.state.write(row, vector)
        self.rows[row] = BankRow(name, path, sha256)

    def remove(self, row: int, name: str) -> None:
        held = self.rows.get(row)
        if held is None or held.name != name:
            raise SteerBatchError(f"bank row {row} does not hold vector {name!r} (it holds {held})")
        self.state.write(row, None)
        del self.rows[row]

    def plan(self, req_id: str, extra_args: dict | None, prompt_len: int) -> np.ndarray | None:
        """The [6, slots] per-token plan of a request (None: unsteered)."""
        plan = codec.plan_of(extra_args)
        if plan is None:
            return None
        for row, sha in codec.held_rows(plan):
            held = self.rows.get(row)
            if held is None or held.sha256 != sha:
                raise SteerBatchError(
                    f"request {req_id} was resolved to bank row {row} holding sha256 {sha}, which the row no "
                    f"longer holds ({held}): refusing to steer it with another vector"
                )
        return codec.decode(plan, prompt_len, self.state.p.shape[1])


def in_use(requests, row: int) -> list[str]:
    """Ids of the requests (the engine core scheduler's, request id -> Request) holding `row`."""
    users = []
    for rid, request in requests.items():
        plan = codec.plan_of(hooks.extra_args(request))
        if plan is not None and any(r == row for r, _ in codec.held_rows(plan)):
            users.append(rid)
    return users
