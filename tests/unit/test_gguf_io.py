"""GGUF control-vector interop: round trip, what the gguf reader sees, and the layer-0 rule."""

import gguf
import numpy as np
import pytest
import torch

from steer_batch import SteeringVector
from steer_batch.vectors.gguf_io import export_gguf, import_gguf


def vec(layers=(3, 7, 12)):
    g = torch.Generator().manual_seed(0)
    return SteeringVector(
        {i: torch.randn(16, generator=g) for i in layers},
        30,
        model="/cache/SmolLM2-135M-Instruct",
        method="mean_diff",
        concept="happy - sad",
        metadata={"template": "Act as if you're extremely {persona}."},
    )


def test_round_trip_keeps_names_shapes_values_metadata(tmp_path):
    v = vec()
    assert export_gguf(v, tmp_path / "v.gguf") == [3, 7, 12]
    w = import_gguf(tmp_path / "v.gguf")
    assert w.layers == v.layers and w.num_layers == 30 and w.hidden_size == 16
    for i in v.layers:
        assert torch.equal(w.directions[i], v.directions[i])
    assert (w.model, w.method, w.concept, w.metadata) == (v.model, v.method, v.concept, v.metadata)


def test_gguf_reader_sees_a_control_vector(tmp_path):
    export_gguf(vec(), tmp_path / "v.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "v.gguf"))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "SmolLM2-135M-Instruct"
    assert reader.fields["controlvector.layer_count"].contents() == 3
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.12", "direction.3", "direction.7"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [16] for t in tensors.values())
    np.testing.assert_array_equal(np.asarray(tensors["direction.7"].data), vec().directions[7].numpy())


def test_layer_0_is_refused_or_dropped_never_shifted(tmp_path):
    v = vec(layers=(0, 4))
    with pytest.raises(ValueError, match="llama.cpp cannot steer block 0"):
        export_gguf(v, tmp_path / "v.gguf")
    assert export_gguf(v, tmp_path / "v.gguf", drop_layer_0=True) == [4]
    w = import_gguf(tmp_path / "v.gguf")
    assert w.layers == [4] and torch.equal(w.directions[4], v.directions[4])
    with pytest.raises(ValueError, match="only holds layer 0"):
        export_gguf(vec(layers=(0,)), tmp_path / "w.gguf", drop_layer_0=True)


def test_import_refuses_other_gguf_files(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="general.architecture is 'llama'; a control vector has 'controlvector'"):
        import_gguf(tmp_path / "m.gguf")
