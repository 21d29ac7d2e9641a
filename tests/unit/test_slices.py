"""Layer sets for sweeps (vectors/slices.py) and SteeringVector.restricted: the sets each spec
names, written out by hand; bad specs refused naming the layers; a slice keeps exactly its
layers' directions."""

import pytest
import torch

from steer_batch import SteeringVector
from steer_batch.errors import SteerBatchError
from steer_batch.vectors.slices import label, layer_sets, slice_name

LAYERS = list(range(8, 21))  # a vector at layers 8-20, as the default happy vector on SmolLM2


@pytest.mark.parametrize(
    "spec, window, stride, want",
    [
        (None, None, None, [[8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19], [20]]),
        (None, 6, 4, [[8, 9, 10, 11, 12, 13], [12, 13, 14, 15, 16, 17], [16, 17, 18, 19, 20]]),
        (None, 13, None, [LAYERS]),
        (None, 20, 1, [LAYERS]),
        ("each", None, None, [[i] for i in LAYERS]),
        ("8-12,12-16,16-20", None, None, [[8, 9, 10, 11, 12], [12, 13, 14, 15, 16], [16, 17, 18, 19, 20]]),
        ("10,15-16", None, None, [[10], [15, 16]]),
    ],
)
def test_layer_sets(spec, window, stride, want):
    assert layer_sets(spec, LAYERS, window, stride) == want


@pytest.mark.parametrize(
    "spec, window, stride, message",
    [
        ("4-9", None, None, r"layers \[4, 5, 6, 7\] are not among"),
        ("8-x", None, None, "give 'each', or ranges"),
        ("8-9,8-9", None, None, "given twice"),
        ("each", 4, None, "not both"),
        (None, 0, None, "at least 1"),
    ],
)
def test_bad_layer_sets(spec, window, stride, message):
    with pytest.raises(SteerBatchError, match=message):
        layer_sets(spec, LAYERS, window, stride)


def test_labels_are_vector_names():
    assert label([8, 9, 10, 11]) == "8-11" and label([10]) == "10" and label([3, 5, 7]) == "3_5_7"
    assert slice_name("happy", [12, 13, 14, 15]) == "happy@12-15"


def test_restricted_keeps_its_layers_directions():
    v = SteeringVector({i: torch.full((8,), float(i)) for i in (1, 2, 3)}, 6, model="m", method="mean_diff")
    s = v.restricted([3, 1])
    assert s.layers == [1, 3] and all(torch.equal(s.directions[i], v.directions[i]) for i in (1, 3))
    assert s.metadata["restricted_to"] == "1,3" and "restricted_to" not in v.metadata
    with pytest.raises(SteerBatchError, match=r"layers \[4\] are not among"):
        v.restricted([1, 4])
