"""The steering-vector file format and the `SteeringVector` object.

A vector file is safetensors: one float32 tensor `layers.{i}` of shape [hidden] per steered
decoder layer i (0-based), and string metadata `model`, `hidden_size`, `num_layers`, `method`,
`concept`, `format_version` (more keys may follow). Steering with alpha adds alpha * layers.{i}
to the residual-stream output of decoder layer i at every token position: Hugging Face's
`hidden_states[i + 1]` for every layer but the last (whose HF entry is already normed).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

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

    # -- file format ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the vector file whole or not at all (a temporary file beside it, then renamed)."""
        from safetensors.torch import save_file

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
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MissingFile(f"steering vector file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise SteerBatchError(f"{path}: not a readable safetensors file ({e})") from e
        missing = [k for k in _REQUIRED_METADATA if k not in metadata]
        if missing:
            raise SteerBatchError(
                f"{path}: metadata lacks {missing}; a steer-batch vector file has {list(_REQUIRED_METADATA)}"
            )
        if metadata["format_version"] != FORMAT_VERSION:
            raise SteerBatchError(
                f"{path}: format_version {metadata['format_version']!r}; this steer-batch reads {FORMAT_VERSION!r}"
            )
        directions = {}
        for key, t in tensors.items():
            m = _LAYER_KEY.fullmatch(key)
            if m is None:
                raise SteerBatchError(f"{path}: tensor {key!r} is not named layers.<i>")
            if t.dtype != torch.float32 or t.dim() != 1:
                raise SteerBatchError(
                    f"{path}: {key} must be a 1-D float32 tensor; found {t.dtype} of shape {list(t.shape)}"
                )
            directions[int(m.group(1))] = t
        if not directions:
            raise SteerBatchError(f"{path}: holds no layers.<i> tensors")
        hidden, num_layers = int(metadata.pop("hidden_size")), int(metadata.pop("num_layers"))
        vector = cls(
            directions,
            num_layers,
            model=metadata.pop("model"),
            method=metadata.pop("method"),
            concept=metadata.pop("concept"),
            metadata={k: v for k, v in metadata.items() if k != "format_version"},
        )
        vector.check_fits(hidden, num_layers, source=str(path))
        return vector

    @classmethod
    def load_for_model(cls, name: str, path: str | Path, hidden_size: int, num_layers: int) -> SteeringVector:
        """Load the engine's vector `name` and check it fits the model; errors name both."""
        try:
            vector = cls.load(path)
            vector.check_fits(hidden_size, num_layers, source=str(path))
        except SteerBatchError as e:
            raise type(e)(f"steering vector {name!r}: {e}") from None
        return vector

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
