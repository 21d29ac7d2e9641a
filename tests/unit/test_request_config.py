"""Parsing of the engine's steering config and of each request's steering_* arguments."""

import math

import pytest

from steer_batch.engine.codec import decode, encode
from steer_batch.engine.config import Entry, SteeringConfig, SteeringRequestError, SteeringSpec, parse_request, steering
from steer_batch.kernels.step_inputs import HI, LO, VID

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
            r"unknown keys \['layerz'\]; allowed: \['vectors', 'capture', 'steer_op', 'max_abs_alpha', "
            r"'max_vectors_per_request', 'max_vectors', 'layers', 'runtime_vectors', 'code'\]",
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
    assert parse_request({"steering_vector": "calm", "steering_alpha": -4}, CONFIG) == SteeringSpec(
        (Entry("calm", -4.0),)
    )
    assert parse_request({"steering_vector": "happy", "steering_alpha": 0.5}, CONFIG) == SteeringSpec(
        (Entry("happy", 0.5),)
    )


def test_spec_parsing():
    """Lists, scalars that apply to every entry, None as absent, no-op specs as stock vLLM."""
    args = {
        "steering_vector": ["happy", "calm", "happy"],
        "steering_alpha": [4, 1.0, 2],
        "steering_op": ["add", "ablate", "clamp"],
        "steering_scope": "generated",
        "steering_positions": [2, -1],
    }
    want = (
        Entry("happy", 4.0, "add", "generated"),
        Entry("calm", 1.0, "ablate", "generated"),
        Entry("happy", 2.0, "clamp", "generated"),
    )
    assert parse_request(args, CONFIG) == SteeringSpec(want, (2, None))
    assert parse_request({**args, "steering_positions": None, "steering_scope": None}, CONFIG).positions == (0, None)
    assert (
        parse_request(
            {"steering_vector": ["happy", "calm"], "steering_alpha": 0, "steering_op": ["add", "ablate"]}, CONFIG
        )
        is None
    )
    clamp_zero = parse_request({"steering_vector": "calm", "steering_alpha": 0, "steering_op": "clamp"}, CONFIG)
    assert clamp_zero == SteeringSpec((Entry("calm", 0.0, "clamp"),)), "clamp to 0 is not a no-op"
    assert parse_request({"steering_vector": None, "steering_alpha": None}, CONFIG) is None


def test_entry_coefficients_and_bounds():
    """The one update h + p v + (q + r (h.u)) u of kernels/steer.py, and each scope's positions."""
    assert Entry("a", 3.0, "add").coefficients() == (3.0, 0.0, 0.0)
    assert Entry("a", 0.5, "ablate").coefficients() == (0.0, 0.0, -0.5)
    assert Entry("a", 2.0, "clamp").coefficients() == (0.0, 2.0, -1.0)

    def bounds(positions, scope):  # [lo, hi) that the workers decode for a 10-token prompt
        spec = SteeringSpec((Entry("a", 1.0, scope=scope),), positions)
        plan = decode(encode(spec, {"a": 2}, {"a": "f00d"}, "bank"), prompt_len=10, slots=3)
        assert plan[VID, 0] == 2 and not plan[:, 1:].any()
        return plan[LO, 0], plan[HI, 0]

    assert bounds((0, 4), "all") == (0, 4)
    assert bounds((0, 4), "generated") == (10, 4)  # empty: nothing steered
    assert bounds((3, None), "prompt") == (3, 10)
    assert bounds((3, None), "generated") == (10, math.inf)
    assert bounds((0, None), "all") == (0, math.inf)


def test_the_steering_helper_spells_the_keys():
    assert steering("happy", 4) == {"steering_vector": "happy", "steering_alpha": 4}
    assert steering(("happy", 4), ("calm", 1.0, "ablate"), scope="generated") == {
        "steering_vector": ["happy", "calm"],
        "steering_alpha": [4, 1.0],
        "steering_op": ["add", "ablate"],
        "steering_scope": ["generated", "generated"],
    }
    actadd = steering("happy", 4, "add", "prompt", positions=(0, 4))
    assert actadd == {
        "steering_vector": "happy",
        "steering_alpha": 4,
        "steering_scope": "prompt",
        "steering_positions": [0, 4],
    }
    assert parse_request(actadd, CONFIG) == SteeringSpec((Entry("happy", 4.0, "add", "prompt"),), (0, 4))
    with pytest.raises(ValueError, match="expected \\(vector, alpha"):
        steering(("happy",))


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
            {"steering_vector": ["happy", "calm"], "steering_alpha": [1, 2, 3]},
            "steering_alpha",
            "lists 3 values for 2 vector",
        ),
        ({"steering_vector": [], "steering_alpha": 1}, "steering_vector", "lists 0 vectors; this engine takes 1 to 4"),
        (
            {"steering_vector": ["happy"] * 5, "steering_alpha": 1},
            "steering_vector",
            "lists 5 vectors; this engine takes 1 to 4 per request",
        ),
        (
            {"steering_vector": "happy", "steering_alpha": 1, "steering_op": "scale"},
            "steering_op",
            r"'scale'; allowed: \['add', 'ablate', 'clamp'\]",
        ),
        (
            {"steering_vector": "happy", "steering_alpha": 1, "steering_scope": ["prompt", "all"]},
            "steering_scope",
            "lists 2 values for 1 vector",
        ),
        (
            {"steering_vector": "happy", "steering_alpha": 1, "steering_scope": "decode"},
            "steering_scope",
            r"allowed: \['all', 'prompt', 'generated'\]",
        ),
        (
            {"steering_vector": "happy", "steering_alpha": 1, "steering_positions": [4]},
            "steering_positions",
            r"expected \[start, end\]",
        ),
        (
            {"steering_vector": "happy", "steering_alpha": 1, "steering_positions": [-1, 4]},
            "steering_positions",
            "0 <= start",
        ),
        (
            {"steering_vector": "happy", "steering_alpha": 1, "steering_positions": [4, 4]},
            "steering_positions",
            "end > start",
        ),
        (
            {"steering_vector": "happy", "steering_alpha": 1, "steering_positions": [0, 2.5]},
            "steering_positions",
            "integers",
        ),
        (
            {"steering_vector": "happy", "steering_alpha": 1, "steering_positions": [True, 3]},
            "steering_positions",
            "integers",
        ),
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
            r"unknown steering argument 'steering_scale'; allowed: \['steering_vector', 'steering_alpha', "
            r"'steering_op', 'steering_scope', 'steering_positions'\]",
        ),
    ],
)
def test_request_errors_name_the_field(args, field, message):
    with pytest.raises(SteeringRequestError, match=message) as e:
        parse_request(args, CONFIG)
    assert e.value.field == field


def test_the_alpha_bound_is_inclusive_and_configurable():
    assert parse_request({"steering_vector": "happy", "steering_alpha": -1000}, CONFIG) == SteeringSpec(
        (Entry("happy", -1000.0),)
    )
    wide = SteeringConfig.from_additional_config(
        {"steering": {"vectors": {"happy": "h.safetensors"}, "max_abs_alpha": 1e6}}
    )
    assert parse_request({"steering_vector": "happy", "steering_alpha": 1e6}, wide) == SteeringSpec(
        (Entry("happy", 1e6),)
    )
    with pytest.raises(SteeringRequestError, match=r"outside \[-1e\+06, 1e\+06\]"):
        parse_request({"steering_vector": "happy", "steering_alpha": 1.5e6}, wide)


def test_steering_request_to_an_engine_without_steering():
    with pytest.raises(SteeringRequestError, match="started without steering"):
        parse_request({"steering_vector": "happy", "steering_alpha": 1}, None)


def test_vector_names_follow_one_rule_for_start_up_and_runtime():
    import string

    from steer_batch.engine.config import check_vector_name

    for name in ("happy", "a", "v1.2", "user@team", "x_y-z", "9", "A" * 64, string.ascii_letters[:30] + "._-@09"):
        assert check_vector_name(name, "name", "name") == name
        SteeringConfig.from_additional_config({"steering": {"vectors": {name: "f.safetensors"}}})
    for bad in ("", ".hidden", "q?x#y", "a\nb", "a\tb", "a/b", "a b", "%41", "A" * 65, "é", None, 3):
        with pytest.raises(ValueError, match=r"a vector name is 1 to 64 letters, digits, '.', '_', '-' or '@'"):
            check_vector_name(bad, "name", "name")
        with pytest.raises(ValueError, match=r"a vector name is"):
            SteeringConfig.from_additional_config({"steering": {"vectors": {bad: "f.safetensors"}}})
