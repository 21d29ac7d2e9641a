"""Which freshly allocated KV blocks a steering engine zeroes: those a steered request has held.

A request whose steered states overflow writes NaN/inf into its KV blocks, and the attention
kernels multiply the unused tail of a reused block by a zero probability (0 * NaN = NaN), so the
next request to get such a block fresh would read them. vLLM can zero fresh blocks (the scheduler
lists their ids each step, the runner zeroes them before the forward) but does it only where its
own cache needs it (Mamba, mixed precision). A steering engine turns that path on
(engine/hooks.py) and lists only the blocks a steered request has held since they were last
zeroed: an unsteered request writes what it would write in stock vLLM, which zeroes nothing, so
blocks only unsteered requests held are handed on as stock vLLM hands them on, and a steering
engine serving unsteered traffic does stock vLLM's KV work. The scheduler's own requests tell
steered from not (a steering plan in their extra_args), in the engine core, as they get blocks.
"""

from __future__ import annotations

from steer_batch.engine import codec, hooks


class SteeredBlocks:
    """One engine core's record, kept on its KV cache manager (engine/hooks.py): the ids of the
    blocks steered requests held, not zeroed since. Block ids are the block pool's, shared by
    every KV cache group."""

    def __init__(self):
        self.held: set[int] = set()
        self.new: list[int] = []  # given to steered requests since the last step's list

    def allocated(self, manager, request, blocks, external_tokens: int) -> None:
        """After `KVCacheManager.allocate_slots(request, ...)` returned `blocks` (None: no room)."""
        if blocks is None or codec.plan_of(hooks.extra_args(request)) is None:
            return
        if external_tokens:  # a KV connector's blocks join the request's without being returned
            groups = hooks.request_block_ids(manager, request)
        else:
            groups = hooks.block_ids(blocks)
        for ids in groups:
            self.new.extend(ids)

    def to_zero(self, fresh: list[int] | None) -> list[int] | None:
        """The step's fresh block ids to zero (vLLM's list, None for none): those a steered
        request held. Then this step's blocks of steered requests join the record."""
        zero = [b for b in fresh if b in self.held] if fresh else []
        self.held.difference_update(zero)
        self.held.update(self.new)
        self.new = []
        return zero or None
