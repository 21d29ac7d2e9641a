"""The steering-vector file format and the `SteeringVector` object.

A vector file is safetensors: one float32 tensor `layers.{i}` of shape [hidden] per steered
decoder layer i (0-based), and string metadata `model`, `hidden_size`, `num_layers`, `method`,
`concept`, `format_version` (more keys may follow). Steering with alpha adds alpha * layers.{i}
to the residual-stream output of decoder layer i at every token position: Hugging Face's
`hidden_states[i + 1]` for every layer but the last (whose HF entry is already normed).
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file

from steer_batch.errors import MissingFile, SteerBatchError

FORMAT_VERSION = "1"
_LAYER_KEY = re.compile(r"layers\.(\d+)")
_REQUIRED_METADATA = ("model", "hidden_size", "num_layers", "method", "concept", "format_version")


@dataclass
class SteeringVector:
    """Per-layer directions plus metadata; supports `2 * v`, `v - w`, `v + w`, `-v`, `v / 2`."""

    directions: dict[int, torch.Tensor]  # layer -> [hidden] float32
    num_layers: int
    model: str = ""
    method: str = ""
    concept: str = ""
    metadata: dict[str, str] = field(default_factory=dict)  # any further string metadata

    def __post_init__(self) -> None:
        if not self.directions:
            raise SteerBatchError("a SteeringVector needs at least one layer direction")
        self.directions = {
            int(i): torch.as_tensor(d, dtype=torch.float32).detach().cpu().contiguous()
            for i, d in sorted(self.directions.items())
        }
        sizes = {tuple(d.shape) for d in self.directions.values()}
        if len(sizes) != 1 or len(next(iter(sizes))) != 1:
            raise SteerBatchError(f"every direction must be 1-D of one hidden size; got shapes {sorted(sizes)}")
        bad = [i for i in self.directions if not 0 <= i < self.num_layers]
        if bad:
            raise SteerBatchError(
                f"layer indices {bad} are outside 0..{self.num_layers - 1} (num_layers={self.num_layers})"
            )

    @property
    def hidden_size(self) -> int:
        return next(iter(self.directions.values())).shape[0]

    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    # -- arithmetic -----------------------------------------------------------------------
    def _with(self, directions: dict[int, torch.Tensor]) -> SteeringVector:
        return SteeringVector(directions, self.num_layers, self.model, self.method, self.concept, dict(self.metadata))

    def __mul__(self, scale: float) -> SteeringVector:
        return self._with({i: d * float(scale) for i, d in self.directions.items()})

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> SteeringVector:
        return self * (1.0 / float(scale))

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def __add__(self, other: SteeringVector) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if (other.hidden_size, other.num_layers) != (self.hidden_size, self.num_layers):
            raise SteerBatchError(
                f"cannot combine vectors of different models: hidden_size/num_layers "
                f"{self.hidden_size}/{self.num_layers} vs {other.hidden_size}/{other.num_layers}"
            )
        zero = torch.zeros(self.hidden_size)
        layers = sorted(set(self.directions) | set(other.directions))
        return self._with({i: self.directions.get(i, zero) + other.directions.get(i, zero) for i in layers})

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self + (-other)

    def restricted(self, layers: list[int]) -> SteeringVector:
        """The same directions at `layers` only (each must be one of this vector's), the layers
        recorded in the metadata ("restricted_to")."""
        missing = sorted(set(layers) - set(self.directions))
        if missing or not layers:
            raise SteerBatchError(
                f"layers {missing or layers} are not among the vector's layers {self.layers}", param="layers"
            )
        sliced = self._with({i: self.directions[i] for i in sorted(layers)})
        sliced.metadata["restricted_to"] = ",".join(map(str, sorted(layers)))
        return sliced

    # -- file format ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the vector file whole or not at all (a temporary file beside it, then renamed)."""
        metadata = {
            **self.metadata,
            "model": self.model,
            "hidden_size": str(self.hidden_size),
            "num_layers": str(self.num_layers),
            "method": self.method,
            "concept": self.concept,
            "format_version": FORMAT_VERSION,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({f"layers.{i}": d for i, d in self.directions.items()}, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        """Read and validate a vector file; every problem names the file and the fix."""
        return cls.from_bytes(read_file(path), str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "vector") -> SteeringVector:
        """Parse and validate the bytes of a vector file (read once, so a file replaced while it
        is read cannot give one version's metadata and another's tensors); `source` names it."""
        try:
            tensors = load_tensors(data)
            metadata = _header_metadata(data)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise SteerBatchError(f"{source}: not a readable safetensors file ({e})") from e
        missing = [k for k in _REQUIRED_METADATA if k not in metadata]
        if missing:
            raise SteerBatchError(
                f"{source}: metadata lacks {missing}; a steer-batch vector file has {list(_REQUIRED_METADATA)}"
            )
        if metadata["format_version"] != FORMAT_VERSION:
            raise SteerBatchError(
                f"{source}: format_version {metadata['format_version']!r}; this steer-batch reads {FORMAT_VERSION!r}"
            )
        directions, keys = {}, {}
        for key, t in sorted(tensors.items()):
            m = _LAYER_KEY.fullmatch(key)
            if m is None:
                raise SteerBatchError(f"{source}: tensor {key!r} is not named layers.<i>")
            if t.dtype != torch.float32 or t.dim() != 1:
                raise SteerBatchError(
                    f"{source}: {key} must be a 1-D float32 tensor; found {t.dtype} of shape {list(t.shape)}"
                )
            layer = int(m.group(1))
            if layer in keys:
                raise SteerBatchError(
                    f"{source}: tensors {keys[layer]!r} and {key!r} are both layer {layer}; keep one (layers.{layer})"
                )
            directions[layer], keys[layer] = t, key
        if not directions:
            raise SteerBatchError(f"{source}: holds no layers.<i> tensors")
        hidden, num_layers = (_int_field(metadata, k, source) for k in ("hidden_size", "num_layers"))
        vector = cls(
            directions,
            num_layers,
            model=metadata.pop("model"),
            method=metadata.pop("method"),
            concept=metadata.pop("concept"),
            metadata={k: v for k, v in metadata.items() if k not in ("format_version", "hidden_size", "num_layers")},
        )
        vector.check_fits(hidden, num_layers, source=source)
        return vector

    @classmethod
    def for_model(
        cls,
        name: str,
        data: bytes,
        source: str,
        hidden_size: int,
        num_layers: int,
        max_abs_alpha: float | None = None,
        dtype: torch.dtype | None = None,
    ) -> SteeringVector:
        """The engine's vector `name` from its file's bytes, checked to fit the model and, given the
        engine's `max_abs_alpha` and `dtype`, its alpha bound; errors name the vector and `source`."""
        try:
            vector = cls.from_bytes(data, source)
            vector.check_fits(hidden_size, num_layers, source=source)
            if max_abs_alpha is not None:
                vector.check_alpha_bound(max_abs_alpha, dtype, source=source)
        except SteerBatchError as e:
            raise type(e)(f"steering vector {name!r}: {e}") from None
        return vector

    def check_alpha_bound(self, max_abs_alpha: float, dtype: torch.dtype, source: str = "vector") -> None:
        """Raise naming the layer and the bound when alpha * v could leave `dtype`'s finite range
        for an alpha the engine allows (|alpha| <= max_abs_alpha): every request using the
        vector would end in overflow."""
        limit = torch.finfo(dtype).max
        for i, d in self.directions.items():
            norm = float(d.double().norm())
            if norm * max_abs_alpha > limit:
                raise SteerBatchError(
                    f"{source}: layers.{i} has norm {norm:.3g}; times the engine's max_abs_alpha "
                    f"{max_abs_alpha:g} that exceeds the largest {str(dtype).removeprefix('torch.')} "
                    f"({limit:.3g}); rescale the vector, or start the engine with a smaller max_abs_alpha"
                )

    def check_fits(self, hidden_size: int, num_layers: int, source: str = "vector") -> None:
        """Raise ValueError naming the layer, expected and found when this vector cannot steer
        a model of `hidden_size` x `num_layers`, or holds NaN/inf."""
        if self.num_layers != num_layers:
            raise SteerBatchError(f"{source}: made for {self.num_layers} layers; expected {num_layers}")
        for i, d in self.directions.items():
            if d.shape[0] != hidden_size:
                raise SteerBatchError(f"{source}: layers.{i} has hidden size {d.shape[0]}; expected {hidden_size}")
            if not bool(torch.isfinite(d).all()):
                raise SteerBatchError(f"{source}: layers.{i} holds NaN or inf; expected finite values")

    def __repr__(self) -> str:
        norms = ", ".join(f"{i}: {d.norm():.3g}" for i, d in self.directions.items())
        return (
            f"SteeringVector(concept={self.concept!r}, method={self.method!r}, model={self.model!r}, norms={{{norms}}})"
        )


def read_file(path: str | Path) -> bytes:
    """A vector file's bytes; a missing, unreadable or unnameable path is a one-line error."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MissingFile(f"steering vector file {str(path)!r} does not exist") from None
    except OSError as e:  # a directory, a name too long for the filesystem, no permission
        raise SteerBatchError(f"steering vector file {str(path)[:200]!r} cannot be read: {e.strerror}") from None
    except ValueError as e:  # a NUL byte in the path
        raise SteerBatchError(f"steering vector file {str(path)[:200]!r} cannot be read: {e}") from None


def _header_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors file: its header is 8 bytes of length, then JSON."""
    (size,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8 : 8 + size]).get("__metadata__") or {})


def _int_field(metadata: dict[str, str], key: str, source: str) -> int:
    value = metadata.pop(key)
    try:
        return int(value)
    except ValueError:
        raise SteerBatchError(f"{source}: metadata {key}={value!r} must be an integer") from None
