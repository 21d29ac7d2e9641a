"""GGUF control vectors, as repeng writes and llama.cpp reads them: `general.architecture` =
"controlvector", `controlvector.model_hint`, `controlvector.layer_count`, and 1-D float32
tensors `direction.N`, N the 0-based block whose output gets the add (our `layers.N`).
llama.cpp refuses `direction.0`, so a vector with a layer 0 is refused on export unless the
caller agrees to drop that layer; indices are never shifted. Our metadata travels as
`steer_batch.*` strings, so a round trip keeps it."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from steer_batch.errors import SteerBatchError
from steer_batch.vectors.vector import SteeringVector

ARCH = "controlvector"
_OURS = "steer_batch."


def export_gguf(vector, path: str | Path, *, drop_layer_0: bool = False) -> list[int]:
    """Write `vector` as a GGUF control vector; returns the layers written."""
    layers = vector.layers
    if 0 in layers:
        if not drop_layer_0:
            raise SteerBatchError(
                "llama.cpp cannot steer block 0 (it rejects direction.0): drop layer 0 (drop_layer_0=True, "
                "CLI --drop-layer-0) or extract without it; indices are never shifted"
            )
        layers = [i for i in layers if i != 0]
        if not layers:
            raise SteerBatchError("the vector only holds layer 0, which llama.cpp cannot steer; nothing to export")
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_string(f"{ARCH}.model_hint", _model_hint(vector.model))
    writer.add_uint32(f"{ARCH}.layer_count", len(layers))
    meta = {
        "model": vector.model,
        "method": vector.method,
        "concept": vector.concept,
        "num_layers": str(vector.num_layers),
        **vector.metadata,
    }
    for key, value in meta.items():
        writer.add_string(_OURS + key, value)
    for i in layers:
        writer.add_tensor(f"direction.{i}", vector.directions[i].numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return layers


def import_gguf(path: str | Path, num_layers: int | None = None):
    """Read a GGUF control vector (ours, repeng's or llama.cpp's) into a SteeringVector."""
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    if fields.get("general.architecture") != ARCH:
        raise SteerBatchError(
            f"{path}: general.architecture is {fields.get('general.architecture')!r}; a control vector has {ARCH!r}"
        )
    directions = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise SteerBatchError(f"{path}: tensor {tensor.name!r} is not named direction.<N>")
        directions[int(index)] = np.array(tensor.data, dtype=np.float32).reshape(-1)
    if not directions:
        raise SteerBatchError(f"{path}: holds no direction.<N> tensors")
    ours = {k[len(_OURS) :]: v for k, v in fields.items() if k.startswith(_OURS)}
    num_layers = num_layers or int(ours.pop("num_layers", max(directions) + 1))
    ours.pop("num_layers", None)
    return SteeringVector(
        directions,
        num_layers,
        model=ours.pop("model", fields.get(f"{ARCH}.model_hint", "")),
        method=ours.pop("method", "gguf"),
        concept=ours.pop("concept", ""),
        metadata=ours,
    )


def _model_hint(model: str) -> str:
    """llama.cpp's hint is the model family ("llama"); ours records the model path or id."""
    return Path(model).name or model
