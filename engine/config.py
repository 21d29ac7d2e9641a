"""What an engine is asked to steer with (`additional_config["steering"]`) and what one request
asks for (`SamplingParams.extra_args`): parsing and validation, one place for both.

Engine:  additional_config={"steering": {"vectors": {"happy": "happy.safetensors"}}}
         (a vector may also be {"path": ..., "sha256": ...}; the front end fills in `sha256` and
         `layers`, so vLLM's config hash, which covers additional_config, changes with them.)
         {"steering": {"capture": [8, 9, 10]}} makes an engine that records the residual-stream
         output of those layers at each prompt's last token (engine/capture.py).
         "steer_op": "add" (a separate add after the layer, fused by torch.compile; the default)
         or "fused" (folded into the next RMSNorm by the kernels/ op; opt-in).
         "max_abs_alpha": the largest |steering_alpha| a request may ask for (DEFAULT_MAX_ABS_ALPHA).
Request: extra_args={"steering_vector": "happy", "steering_alpha": 4.0}
         Flat scalar keys, so the same request works through `vllm serve` as `vllm_xargs`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer_batch.errors import SteerBatchError

CONFIG_KEY = "steering"
REQUEST_PREFIX = "steering_"
VECTOR_KEY = "steering_vector"
ALPHA_KEY = "steering_alpha"
REQUEST_KEYS = (VECTOR_KEY, ALPHA_KEY)
_CONFIG_FIELDS = (
    "vectors",
    "capture",
    "steer_op",
    "max_abs_alpha",
    "code",
)  # "code" is written by the front end (a hash of the steering code)
STEER_OPS = ("add", "fused")
_VECTOR_FIELDS = ("path", "sha256", "layers")
# Useful strengths are far below this: mean-difference vectors degrade text from |alpha| ~ 2, and
# unit-norm PCA directions need about the model's mean-difference norm (1 to a few hundred on
# common models). Above it a request is a typo (1e6 for 1e-6) or an attack, and is refused.
DEFAULT_MAX_ABS_ALPHA = 1000.0


@dataclass(frozen=True)
class VectorSpec:
    path: str
    sha256: str | None = None
    layers: tuple[int, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "layers": list(self.layers or ())}


@dataclass(frozen=True)
class SteeringConfig:
    """The engine's vectors, by the names requests use, and the layers it captures. Unknown keys
    are errors."""

    vectors: dict[str, VectorSpec]
    capture: tuple[int, ...] = ()
    steer_op: str | None = None  # "add" or "fused"; None: the front end's default (engine/frontend.py)
    max_abs_alpha: float = DEFAULT_MAX_ABS_ALPHA

    @property
    def names(self) -> list[str]:
        return list(self.vectors)

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> SteeringConfig | None:
        """None when the engine was not asked to steer (the plugin then stays inert)."""
        if not isinstance(additional_config, dict) or CONFIG_KEY not in additional_config:
            return None
        raw = additional_config[CONFIG_KEY]
        if not isinstance(raw, dict):
            raise SteerBatchError(
                'additional_config["steering"] must be a dict like {"vectors": {"name": "file.safetensors"}}; '
                f"got {type(raw).__name__}"
            )
        unknown = sorted(set(raw) - set(_CONFIG_FIELDS))
        if unknown:
            raise SteerBatchError(
                f'additional_config["steering"] has unknown keys {unknown}; allowed: {list(_CONFIG_FIELDS)}'
            )
        vectors, capture = raw.get("vectors", {}), raw.get("capture", [])
        if not isinstance(vectors, dict) or not (vectors or capture):
            raise SteerBatchError(
                'additional_config["steering"]["vectors"] must be a non-empty dict of name -> vector file path'
            )
        if not isinstance(capture, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in capture
        ):
            raise SteerBatchError(
                f'additional_config["steering"]["capture"] must be a list of layer indices; got {capture!r}'
            )
        steer_op = raw.get("steer_op")
        if steer_op not in (None, *STEER_OPS):
            raise SteerBatchError(f'additional_config["steering"]["steer_op"]={steer_op!r}; allowed: {list(STEER_OPS)}')
        max_abs_alpha = raw.get("max_abs_alpha", DEFAULT_MAX_ABS_ALPHA)
        if (
            isinstance(max_abs_alpha, bool)
            or not isinstance(max_abs_alpha, (int, float))
            or not 0 < max_abs_alpha < math.inf
        ):
            raise SteerBatchError(
                f'additional_config["steering"]["max_abs_alpha"]={max_abs_alpha!r}; expected a finite number > 0 '
                f"(default {DEFAULT_MAX_ABS_ALPHA:g})"
            )
        vectors = {_check_name(name): _vector_spec(name, spec) for name, spec in vectors.items()}
        return cls(vectors, tuple(sorted(set(capture))), steer_op, float(max_abs_alpha))

    def to_dict(self) -> dict[str, Any]:
        return {
            "vectors": {name: spec.as_dict() for name, spec in self.vectors.items()},
            "capture": list(self.capture),
            "steer_op": self.steer_op,
            "max_abs_alpha": self.max_abs_alpha,
        }


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise SteerBatchError(
            f'additional_config["steering"]["vectors"]: names must be non-empty strings; got {name!r}'
        )
    return name


def _vector_spec(name: str, spec: Any) -> VectorSpec:
    where = f'additional_config["steering"]["vectors"][{name!r}]'
    if isinstance(spec, (str, Path)):
        return VectorSpec(str(spec))
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
        raise SteerBatchError(f"{where} must be a file path or a dict with a 'path'; got {spec!r}")
    unknown = sorted(set(spec) - set(_VECTOR_FIELDS))
    if unknown:
        raise SteerBatchError(f"{where} has unknown keys {unknown}; allowed: {list(_VECTOR_FIELDS)}")
    layers = spec.get("layers")
    return VectorSpec(spec["path"], spec.get("sha256"), tuple(layers) if layers else None)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SteeringRequestError(SteerBatchError):
    """A request's steering_* arguments are invalid; `field` names the offending key."""

    def __init__(self, message: str, field: str):
        super().__init__(message, param=field)
        self.field = field


def parse_request(extra_args: dict[str, Any] | None, config: SteeringConfig | None) -> tuple[str, float] | None:
    """(vector name, alpha) for a steered request; None when it is stock vLLM (no steering_*
    keys, or alpha 0). Raises SteeringRequestError naming the field and what is allowed."""
    args = {k: v for k, v in (extra_args or {}).items() if k.startswith(REQUEST_PREFIX)}
    if not args:
        return None
    unknown = sorted(set(args) - set(REQUEST_KEYS))
    if unknown:
        raise SteeringRequestError(
            f"unknown steering argument {unknown[0]!r}; allowed: {list(REQUEST_KEYS)}", unknown[0]
        )
    if config is None:
        raise SteeringRequestError(
            f"{list(args)[0]} given, but this engine was started without steering; start it with "
            'additional_config={"steering": {"vectors": {"name": "file.safetensors"}}}',
            list(args)[0],
        )
    for key in REQUEST_KEYS:
        if key not in args:
            raise SteeringRequestError(
                f"{key} is missing; a steered request sets both {VECTOR_KEY} and {ALPHA_KEY}", key
            )
    name, alpha = args[VECTOR_KEY], args[ALPHA_KEY]
    if not isinstance(name, str) or name not in config.vectors:
        raise SteeringRequestError(
            f"{VECTOR_KEY}={name!r} is not a vector of this engine; allowed: {config.names}", VECTOR_KEY
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise SteeringRequestError(f"{ALPHA_KEY}={alpha!r} must be a finite number (int or float)", ALPHA_KEY)
    if abs(alpha) > config.max_abs_alpha:
        bound = f"{config.max_abs_alpha:g}"
        raise SteeringRequestError(
            f"{ALPHA_KEY}={alpha!r} is outside [-{bound}, {bound}], this engine's max_abs_alpha; "
            'start the engine with a larger additional_config["steering"]["max_abs_alpha"] if you mean it',
            ALPHA_KEY,
        )
    return (name, float(alpha)) if alpha != 0 else None
