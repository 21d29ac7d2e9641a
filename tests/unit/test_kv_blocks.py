"""A steering engine zeroes exactly the fresh KV blocks a steered request held (engine/kv_blocks.py):
vLLM's own KVCacheManager hands out the blocks, through the patched `allocate_slots`, and
vLLM's own `Scheduler._get_new_block_ids_to_zero`, patched, lists what the runner zeroes (the
scheduler stand-in carries only the two attributes that method reads). The engine-level
consequence, no request changed after others overflowed into their blocks, is
tests/engine/test_engine_serving.py::test_extreme_requests_change_no_other_request."""

import copy
from types import SimpleNamespace

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request

from steer_batch.engine import codec, hooks, plugin
from steer_batch.engine.kv_blocks import SteeredBlocks

BLOCK = 16
USABLE = 4  # the pool's blocks besides vLLM's null block


@pytest.fixture
def manager():
    plugin.register()  # the patches, as in every vLLM process
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=64, dtype=torch.float32)
    config = KVCacheConfig(
        num_blocks=USABLE + 1, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)]
    )
    config = copy.copy(config)
    hooks.swap_class(config, hooks._ZeroFreshBlocks)  # as the scheduler of a steering engine does
    manager = KVCacheManager(
        config, max_model_len=4 * BLOCK, scheduler_block_size=BLOCK, hash_block_size=BLOCK, enable_caching=False
    )
    hooks.keep(manager, "steered_blocks", SteeredBlocks())
    return manager


_ids = iter(range(10**6))


def request(steered: bool, tokens: int = BLOCK) -> Request:
    extra = {codec.PLAN_KEY: {"entries": [], "sha256": []}} if steered else None
    return Request(f"r{next(_ids)}", list(range(tokens)), SamplingParams(max_tokens=1, extra_args=extra), None)


def step(manager, *requests, **allocate) -> tuple[list[list[int]], list[int] | None]:
    """Allocate each request's prompt, then the ids the step zeroes: (each request's block ids, zeroed)."""
    held = []
    for r in requests:
        assert manager.allocate_slots(r, r.num_prompt_tokens, **allocate) is not None
        held.append(manager.get_block_ids(r.request_id)[0])
    scheduler = SimpleNamespace(kv_cache_manager=manager, needs_kv_cache_zeroing=True)
    return held, Scheduler._get_new_block_ids_to_zero(scheduler)


def free(manager, *requests):
    for r in requests:
        manager.free(r)


def test_only_blocks_a_steered_request_held_are_zeroed_when_handed_out_again(manager):
    s, u = request(True), request(False)
    held, zeroed = step(manager, s, u)
    steered_block = held[0]
    assert zeroed is None  # blocks fresh from the pool: no steered request held them
    free(manager, s, u)
    everyone = [request(False) for _ in range(USABLE)]  # takes every block, the steered one's too
    held, zeroed = step(manager, *everyone)
    assert zeroed == steered_block and sorted(sum(held, [])) == list(range(1, USABLE + 1))
    free(manager, *everyone)
    again = [request(False) for _ in range(USABLE)]
    assert step(manager, *again)[1] is None  # zeroed once; since then only unsteered requests held it
    free(manager, *again)


def test_every_block_of_a_steered_request_counts_and_a_steered_block_is_zeroed_for_a_steered_request(manager):
    long = request(True, tokens=2 * BLOCK + 1)  # three blocks
    (blocks,), zeroed = step(manager, long)
    assert zeroed is None and len(blocks) == 3
    free(manager, long)
    s = [request(True) for _ in range(USABLE)]
    held, zeroed = step(manager, *s)
    assert sorted(zeroed) == sorted(blocks)
    free(manager, *s)
    u = [request(False) for _ in range(USABLE)]
    assert sorted(step(manager, *u)[1]) == sorted(sum(held, []))


def test_blocks_a_kv_connector_fills_for_a_steered_request_count_too(manager):
    """A connector's blocks join the request without being returned by allocate_slots."""
    s = request(True, tokens=2 * BLOCK)
    manager.allocate_slots(s, BLOCK, num_external_computed_tokens=BLOCK, delay_cache_blocks=True)
    held = manager.get_block_ids(s.request_id)[0]
    assert len(held) == 2
    scheduler = SimpleNamespace(kv_cache_manager=manager, needs_kv_cache_zeroing=True)
    Scheduler._get_new_block_ids_to_zero(scheduler)
    free(manager, s)
    u = [request(False) for _ in range(USABLE)]
    assert sorted(step(manager, *u)[1]) == sorted(held)


def test_an_engine_without_the_record_lists_what_vllm_lists(manager):
    """A stock engine's scheduler, or one where vLLM zeroes every fresh block itself (Mamba, mixed
    precision): no record on the manager, vLLM's list untouched."""
    hooks.keep(manager, "steered_blocks", None)
    u = [request(False) for _ in range(2)]
    held, zeroed = step(manager, *u)
    assert zeroed == sum(held, [])
