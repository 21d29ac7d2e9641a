"""serve/middleware.py finds a JSON boolean among the steering_* values of `vllm_xargs` (the
server test sends one through a real server)."""

import json

import pytest

from steer_batch.serve.middleware import bool_steering_field


@pytest.mark.parametrize(
    "body, field",
    [
        ({"vllm_xargs": {"steering_vector": "a", "steering_alpha": True}}, "steering_alpha"),
        ({"vllm_xargs": {"steering_vector": "a", "steering_alpha": [1.0, False]}}, "steering_alpha"),
        ({"vllm_xargs": {"steering_vector": "a", "steering_alpha": 1}}, None),
        ({"vllm_xargs": {"other": True, "steering_alpha": 1.5}}, None),
        ({"prompt": "steering_alpha: true"}, None),
        ([1, 2], None),
    ],
)
def test_bool_steering_field(body, field):
    assert bool_steering_field(json.dumps(body).encode()) == field


def test_not_json_is_left_to_vllm():
    assert bool_steering_field(b"steering_alpha=true") is None
