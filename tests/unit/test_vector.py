"""The vector file format: round trip, arithmetic, and every refusal naming file, layer, expected, found."""

import pytest
import torch
from safetensors.torch import save_file

from steer_batch import SteeringVector


def vec(layers=(1, 3), hidden=8, num_layers=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SteeringVector(
        {i: torch.randn(hidden, generator=g) for i in layers},
        num_layers,
        model="m",
        method="mean_diff",
        concept="happy",
    )


def test_round_trip_keeps_directions_and_metadata(tmp_path):
    v = vec()
    v.metadata["note"] = "x"
    v.save(tmp_path / "v.safetensors")
    w = SteeringVector.load(tmp_path / "v.safetensors")
    assert w.layers == [1, 3] and w.hidden_size == 8 and w.num_layers == 4
    assert (w.model, w.method, w.concept, w.metadata) == ("m", "mean_diff", "happy", {"note": "x"})
    for i in v.layers:
        assert torch.equal(w.directions[i], v.directions[i])


def test_file_holds_the_documented_keys(tmp_path):
    from safetensors import safe_open

    vec().save(tmp_path / "v.safetensors")
    with safe_open(str(tmp_path / "v.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["layers.1", "layers.3"]
        meta = f.metadata()
    assert {k: meta[k] for k in ("hidden_size", "num_layers", "format_version")} == {
        "hidden_size": "8",
        "num_layers": "4",
        "format_version": "1",
    }


def test_arithmetic():
    v, w = vec(seed=0), vec(layers=(3, 2), seed=1)
    assert torch.allclose((2 * v).directions[1], v.directions[1] * 2)
    assert torch.allclose((v * -0.5).directions[3], -0.5 * v.directions[3])
    assert torch.allclose((v / 4).directions[1], v.directions[1] / 4)
    d = v - w
    assert d.layers == [1, 2, 3]
    assert torch.allclose(d.directions[3], v.directions[3] - w.directions[3])
    assert torch.allclose(d.directions[2], -w.directions[2])
    assert torch.allclose(d.directions[1], v.directions[1])
    with pytest.raises(ValueError, match="different models"):
        v + vec(hidden=16)


def test_refuses_layers_outside_the_model():
    with pytest.raises(ValueError, match=r"layer indices \[4\] are outside 0..3"):
        vec(layers=(4,))


@pytest.mark.parametrize(
    "hidden, num_layers, poison, message",
    [
        (16, 4, False, r"layers.1 has hidden size 8; expected 16"),
        (8, 6, False, r"made for 4 layers; expected 6"),
        (8, 4, True, r"layers.3 holds NaN or inf"),
    ],
)
def test_check_fits_names_layer_expected_found(tmp_path, hidden, num_layers, poison, message):
    v = vec()
    if poison:
        v.directions[3][2] = float("inf")
    with pytest.raises(ValueError, match=message):
        v.check_fits(hidden, num_layers, source="f.safetensors")


def test_load_refuses_foreign_files(tmp_path):
    p = tmp_path / "bad.safetensors"
    save_file({"layers.0": torch.zeros(8)}, str(p), metadata={"model": "m"})
    with pytest.raises(ValueError, match="metadata lacks"):
        SteeringVector.load(p)
    meta = {"model": "m", "hidden_size": "8", "num_layers": "2", "method": "x", "concept": "y", "format_version": "1"}
    save_file({"layer0": torch.zeros(8)}, str(p), metadata=meta)
    with pytest.raises(ValueError, match="not named layers.<i>"):
        SteeringVector.load(p)
    save_file({"layers.0": torch.zeros(8, dtype=torch.float16)}, str(p), metadata=meta)
    with pytest.raises(ValueError, match="must be a 1-D float32 tensor; found torch.float16"):
        SteeringVector.load(p)
    save_file({"layers.0": torch.zeros(8)}, str(p), metadata={**meta, "hidden_size": "9"})
    with pytest.raises(ValueError, match="layers.0 has hidden size 8; expected 9"):
        SteeringVector.load(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SteeringVector.load(tmp_path / "missing.safetensors")


def _meta(**change):
    return {"model": "m", "hidden_size": "8", "num_layers": "4", "method": "x", "concept": "c",
            "format_version": "1", **change}  # fmt: skip


def test_two_keys_for_one_layer_are_refused_naming_both(tmp_path):
    save_file({"layers.8": torch.ones(8), "layers.08": torch.zeros(8)}, tmp_path / "v.safetensors",
              metadata=_meta(num_layers="10"))  # fmt: skip
    with pytest.raises(ValueError, match=r"tensors 'layers.08' and 'layers.8' are both layer 8; keep one"):
        SteeringVector.load(tmp_path / "v.safetensors")


@pytest.mark.parametrize("field", ["hidden_size", "num_layers"])
def test_non_integer_metadata_names_the_field(tmp_path, field):
    save_file({"layers.1": torch.ones(8)}, tmp_path / "v.safetensors", metadata=_meta(**{field: "abc"}))
    with pytest.raises(ValueError, match=rf"metadata {field}='abc' must be an integer"):
        SteeringVector.load(tmp_path / "v.safetensors")


def test_unreadable_paths_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"cannot be read: File name too long"):
        SteeringVector.load(tmp_path / ("x" * 300))
    with pytest.raises(ValueError, match=r"cannot be read: Is a directory"):
        SteeringVector.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        SteeringVector.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "dtype, norm, bound, ok",
    [
        (torch.float32, 3e35, 1000.0, True),
        (torch.float32, 3e36, 1000.0, False),
        (torch.bfloat16, 3e35, 1000.0, True),
        (torch.float16, 60.0, 1000.0, True),
        (torch.float16, 70.0, 1000.0, False),
        (torch.float32, float("inf"), 1.0, False),  # entries near 3e38: the norm overflows float32
    ],
)
def test_a_vector_that_would_overflow_the_engines_dtype_is_refused(dtype, norm, bound, ok):
    v = SteeringVector({2: torch.tensor([3e38, 3e38]) if norm == float("inf") else torch.tensor([norm, 0.0])}, 4)
    if ok:
        v.check_alpha_bound(bound, dtype, source="v")
    else:
        with pytest.raises(ValueError, match=r"v: layers.2 has norm .* times the engine's max_abs_alpha .* exceeds"):
            v.check_alpha_bound(bound, dtype, source="v")
