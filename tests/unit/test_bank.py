"""The request codec and who owns the bank (engine/codec.py, engine/bank.py, engine/frontend.py):
the front end resolves a request once and the workers decode it without validating again; a
plan is refused wherever a vector it was resolved to has left its row; the engine core names the
requests that hold a row. The engine-level proof is tests/engine/test_runtime.py."""

import math
import types

import numpy as np
import pytest
import torch
from vllm.exceptions import VLLMValidationError

from steer_batch.engine import codec
from steer_batch.engine.bank import BankManager, in_use
from steer_batch.engine.config import SteeringConfig, parse_request, steering
from steer_batch.engine.frontend import Registry, admit, check_request, hand_over
from steer_batch.errors import SteerBatchError
from steer_batch.kernels.step_inputs import HI, LO, VID, P, Q, R

CONFIG = {"steering": {"vectors": {"a": {"path": "a.st", "sha256": "aa"}, "b": {"path": "b.st", "sha256": "bb"}}}}


def _processor():
    return types.SimpleNamespace(vllm_config=types.SimpleNamespace(additional_config=CONFIG))


def _request(extra_args, prompt_len=10):
    params = types.SimpleNamespace(extra_args=extra_args)
    return types.SimpleNamespace(sampling_params=params, cache_salt=None, prompt_len=prompt_len)


def _admitted(processor, extra_args):
    spec = check_request(processor, types.SimpleNamespace(extra_args=extra_args))
    return admit(processor, _request(dict(extra_args)), spec)


def test_the_plan_carries_rows_coefficients_and_positions_and_decodes_to_the_specs_update():
    processor = _processor()
    args = steering(("b", 2.0), ("a", 0.5, "ablate", "prompt"), ("a", -1.0, "clamp", "generated"), positions=(1, 8))
    request = _admitted(processor, {**args, "other": 1})
    plan = request.sampling_params.extra_args[codec.PLAN_KEY]
    assert request.sampling_params.extra_args["other"] == 1
    assert plan["names"] == ["b", "a", "a"] and plan["sha256"] == ["bb", "aa", "aa"]
    assert plan["bank"] == Registry.of(processor).token
    decoded = codec.decode(plan, prompt_len=5, slots=4)
    spec = parse_request(args, SteeringConfig.from_additional_config(CONFIG))
    for m, entry in enumerate(spec.entries):  # the update each op is (kernels/steer.py), independently
        want = {"add": (entry.alpha, 0, 0), "ablate": (0, 0, -entry.alpha), "clamp": (0, entry.alpha, -1)}[entry.op]
        assert tuple(decoded[[P, Q, R], m]) == want
    assert list(decoded[VID, :3]) == [1, 0, 0]
    assert [(decoded[LO, m], decoded[HI, m]) for m in range(3)] == [(1, 8), (1, 5), (5, 8)]
    assert not decoded[:, 3].any()  # the unused slot
    assert request.cache_salt.startswith("steer-batch:b@bb:2.0:add:all;")


def test_a_clients_own_plan_never_reaches_the_engine():
    processor = _processor()
    forged = {codec.PLAN_KEY: {"entries": [[5, 1e30, 0, 0, 0]], "sha256": ["x"], "names": ["x"], "positions": [0, -1]}}
    request = _admitted(processor, dict(forged))
    assert request.sampling_params.extra_args == {}
    request = _admitted(processor, {**forged, **steering("a", 1.0)})
    assert request.sampling_params.extra_args[codec.PLAN_KEY]["entries"] == [[0, 1.0, 0.0, 0.0, 0]]


def test_hand_over_refuses_a_request_whose_vector_left_its_row_after_validation():
    processor = _processor()
    request = _admitted(processor, steering("b", 1.0))
    hand_over(request)  # still there
    registry = Registry.of(processor)
    vectors = registry.config.vectors
    registry.config = SteeringConfig(**{**registry.config.__dict__, "vectors": {"a": vectors["a"]}})  # withdrawn
    with pytest.raises(VLLMValidationError, match="vector 'b' was removed from this engine while the request"):
        hand_over(request)
    replaced = dict(vectors, b=type(vectors["b"])("b2.st", "other", ()))  # the name again, another file
    registry.config = SteeringConfig(**{**registry.config.__dict__, "vectors": replaced})
    with pytest.raises(VLLMValidationError, match="vector 'b' was removed"):
        hand_over(request)
    hand_over(_admitted(processor, {}))  # unsteered: nothing to check


def _bank(rows=3, hidden=8):
    """A BankManager over a stand-in state with real bank tensors."""

    class State:
        p = torch.zeros(4, 2)
        V = torch.zeros(rows, hidden)

        def write(self, row, vector):
            self.V[row] = 0 if vector is None else vector

    config = SteeringConfig.from_additional_config(CONFIG)
    return BankManager(State(), config.vectors)


def test_the_worker_decodes_a_plan_only_against_the_vectors_it_was_resolved_to():
    bank = _bank()
    plan = codec.encode(parse_request(steering("b", 3.0), SteeringConfig.from_additional_config(CONFIG)),
                        {"a": 0, "b": 1}, {"a": "aa", "b": "bb"}, "t")  # fmt: skip
    args = {codec.PLAN_KEY: plan}
    out = bank.plan("r1", args, prompt_len=4)
    assert out.shape == (6, 2) and out[P, 0] == 3.0 and out[VID, 0] == 1 and out[HI, 0] == math.inf
    assert bank.plan("r0", {"x": 1}, 4) is None
    bank.remove(1, "b")
    assert not bank.state.V[1].any()
    with pytest.raises(SteerBatchError, match=r"request r1 was resolved to bank row 1 holding sha256 bb"):
        bank.plan("r1", args, 4)
    bank.add(1, "b", "b.st", "cc", torch.ones(8))  # the row again, another file under the same name
    with pytest.raises(SteerBatchError, match="refusing to steer it with another vector"):
        bank.plan("r1", args, 4)
    with pytest.raises(SteerBatchError, match="bank row 1 already holds vector 'b'"):
        bank.add(1, "c", "c.st", "dd", torch.ones(8))
    with pytest.raises(SteerBatchError, match="bank row 0 does not hold vector 'b'"):
        bank.remove(0, "b")
    assert np.array_equal(bank.state.V[1].numpy(), np.ones(8))


def test_the_engine_core_names_the_requests_holding_a_row():
    config = SteeringConfig.from_additional_config(CONFIG)

    def request(*entries):
        extra = {codec.PLAN_KEY: codec.encode(parse_request(steering(*entries), config), {"a": 0, "b": 1},
                                              {"a": "aa", "b": "bb"}, "t")} if entries else None  # fmt: skip
        return types.SimpleNamespace(sampling_params=types.SimpleNamespace(extra_args=extra))

    requests = {"x": request(("a", 1.0)), "y": request(("b", 1.0), ("a", 2.0)), "z": request(), "w": request(("b", 1))}
    requests["p"] = types.SimpleNamespace(sampling_params=None)  # a pooling request
    assert in_use(requests, 0) == ["x", "y"]
    assert in_use(requests, 1) == ["y", "w"]
    assert in_use(requests, 2) == []
