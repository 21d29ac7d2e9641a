"""serve/middleware.py finds a JSON boolean among the steering_* values of `vllm_xargs` (the
server test sends one through a real server)."""

import json

import pytest

from steer_batch.serve.middleware import steering_type_error


def bool_steering_field(body: bytes) -> str | None:
    found = steering_type_error(body)
    return found[0] if found else None


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


def test_escaped_keys_are_read_as_the_parsed_body_reads_them():
    """`steering\\u005falpha` is `steering_alpha` once parsed: the raw bytes never hold `steering_`."""
    for raw in (
        rb'{"vllm_xargs": {"steering\u005fvector": "a", "steering\u005falpha": true}}',
        rb'{"vllm_xargs": {"\u0073teering_vector": "a", "\u0073teering_alpha": [false]}}',
        rb'{"vllm\u005fxargs": {"steering_vector": "a", "steering_alpha": true}}',
    ):
        assert b"steering_" not in raw or b"vllm_xargs" not in raw
        assert bool_steering_field(raw) in ("steering_alpha", "\u0073teering_alpha")


def test_a_body_nested_too_deep_is_left_to_vllm():
    deep = b'{"vllm_xargs": {"steering_alpha": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}"
    assert bool_steering_field(deep) is None
    assert bool_steering_field(b"[" * 100_000) is None


def test_integers_beyond_64_bits_are_named():
    for value in (2**64, -(2**63) - 1, [1, 2**70]):
        body = json.dumps({"vllm_xargs": {"steering_vector": "a", "steering_positions": value}}).encode()
        assert steering_type_error(body) == (
            "steering_positions",
            "steering_positions: integers must be between -2**63 and 2**64 - 1",
        )
    ok = json.dumps({"vllm_xargs": {"steering_positions": [0, 2**64 - 1], "other": 2**70}}).encode()
    assert steering_type_error(ok) is None
