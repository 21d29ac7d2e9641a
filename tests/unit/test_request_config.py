"""Parsing of the engine's steering config and of each request's steering_* arguments."""

import math

import pytest

from steer_batch.engine.config import SteeringConfig, SteeringRequestError, parse_request

CONFIG = SteeringConfig.from_additional_config(
    {"steering": {"vectors": {"happy": "h.safetensors", "calm": {"path": "c.safetensors"}}}}
)


def test_engine_config_shapes():
    assert SteeringConfig.from_additional_config({}) is None
    assert SteeringConfig.from_additional_config({"other_plugin": 1}) is None
    assert CONFIG.names == ["happy", "calm"]
    assert CONFIG.vectors["calm"].path == "c.safetensors"
    assert CONFIG.capture == ()
    assert SteeringConfig.from_additional_config({"steering": {"capture": [3, 1, 3]}}).capture == (1, 3)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"steering": ["a"]}, "must be a dict"),
        (
            {"steering": {"vectors": {"a": "x"}, "layerz": 1}},
            r"unknown keys \['layerz'\]; allowed: \['vectors', 'capture', 'steer_op', 'max_abs_alpha', 'code'\]",
        ),
        (
            {"steering": {"vectors": {"a": "x"}, "steer_op": "triton"}},
            r"\[\"steer_op\"\]='triton'; allowed: \['add', 'fused'\]",
        ),
        ({"steering": {"capture": [1, "2"]}}, "must be a list of layer indices"),
        ({"steering": {"vectors": {}}}, "non-empty dict"),
        ({"steering": {"vectors": {"a": {"file": "x"}}}}, "must be a file path or a dict with a 'path'"),
        ({"steering": {"vectors": {"a": {"path": "x", "alpha": 1}}}}, r"unknown keys \['alpha'\]"),
        (
            {"steering": {"vectors": {"a": "x"}, "max_abs_alpha": 0}},
            r'\["max_abs_alpha"\]=0; expected a finite number > 0 \(default 1000\)',
        ),
        ({"steering": {"vectors": {"a": "x"}, "max_abs_alpha": math.inf}}, "expected a finite number > 0"),
        ({"steering": {"vectors": {"a": "x"}, "max_abs_alpha": True}}, "expected a finite number > 0"),
    ],
)
def test_engine_config_errors(raw, message):
    with pytest.raises(ValueError, match=message):
        SteeringConfig.from_additional_config(raw)


def test_request_parsing():
    assert parse_request(None, CONFIG) is None
    assert parse_request({"other": 1}, CONFIG) is None
    assert parse_request({"steering_vector": "happy", "steering_alpha": 0}, CONFIG) is None
    assert parse_request({"steering_vector": "calm", "steering_alpha": -4}, CONFIG) == ("calm", -4.0)
    assert parse_request({"steering_vector": "happy", "steering_alpha": 0.5}, CONFIG) == ("happy", 0.5)


@pytest.mark.parametrize(
    "args, field, message",
    [
        (
            {"steering_vector": "sad", "steering_alpha": 1},
            "steering_vector",
            r"'sad' is not a vector of this engine; allowed: \['happy', 'calm'\]",
        ),
        ({"steering_vector": 3, "steering_alpha": 1}, "steering_vector", "is not a vector of this engine"),
        ({"steering_vector": "happy", "steering_alpha": math.nan}, "steering_alpha", "must be a finite number"),
        ({"steering_vector": "happy", "steering_alpha": math.inf}, "steering_alpha", "must be a finite number"),
        ({"steering_vector": "happy", "steering_alpha": "4"}, "steering_alpha", "must be a finite number"),
        ({"steering_vector": "happy", "steering_alpha": True}, "steering_alpha", "must be a finite number"),
        (
            {"steering_vector": "happy", "steering_alpha": 1000.5},
            "steering_alpha",
            r"steering_alpha=1000.5 is outside \[-1000, 1000\], this engine's max_abs_alpha",
        ),
        ({"steering_vector": "happy", "steering_alpha": -1e30}, "steering_alpha", r"outside \[-1000, 1000\]"),
        ({"steering_vector": "happy"}, "steering_alpha", "steering_alpha is missing"),
        ({"steering_alpha": 2.0}, "steering_vector", "steering_vector is missing"),
        (
            {"steering_vector": "happy", "steering_alpha": 1, "steering_scale": 2},
            "steering_scale",
            r"unknown steering argument 'steering_scale'; allowed: \['steering_vector', 'steering_alpha'\]",
        ),
    ],
)
def test_request_errors_name_the_field(args, field, message):
    with pytest.raises(SteeringRequestError, match=message) as e:
        parse_request(args, CONFIG)
    assert e.value.field == field


def test_the_alpha_bound_is_inclusive_and_configurable():
    assert parse_request({"steering_vector": "happy", "steering_alpha": -1000}, CONFIG) == ("happy", -1000.0)
    wide = SteeringConfig.from_additional_config(
        {"steering": {"vectors": {"happy": "h.safetensors"}, "max_abs_alpha": 1e6}}
    )
    assert parse_request({"steering_vector": "happy", "steering_alpha": 1e6}, wide) == ("happy", 1e6)
    with pytest.raises(SteeringRequestError, match=r"outside \[-1e\+06, 1e\+06\]"):
        parse_request({"steering_vector": "happy", "steering_alpha": 1.5e6}, wide)


def test_steering_request_to_an_engine_without_steering():
    with pytest.raises(SteeringRequestError, match="started without steering"):
        parse_request({"steering_vector": "happy", "steering_alpha": 1}, None)
