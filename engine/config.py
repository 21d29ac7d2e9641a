"""What an engine is asked to steer with (`additional_config["steering"]`) and what one request
asks for (`SamplingParams.extra_args`): parsing and validation, one place for both.

Engine:  additional_config={"steering": {"vectors": {"happy": "happy.safetensors"}}}
         (a vector may also be {"path": ..., "sha256": ...}; the front end fills in `sha256` and
         `layers`, so vLLM's config hash, which covers additional_config, changes with them.)
         {"steering": {"capture": [8, 9, 10]}} makes an engine that records the residual-stream
         output of those layers at each prompt's last token (driver/capture.py).
         "steer_op": "add" (a separate add after the layer, fused by torch.compile; the default)
         or "fused" (folded into the next RMSNorm by the kernels/ op; opt-in).
         "max_abs_alpha": the largest |steering_alpha| a request may ask for (DEFAULT_MAX_ABS_ALPHA).
         "max_vectors_per_request": how many entries one request may list (default 4).
         "runtime_vectors": true, or a directory the files must lie in: vectors may be added and
         removed while the engine runs (driver/runtime.py); "max_vectors" (default 16) bank rows
         are allocated at start-up; "layers" ("all", or a list; default: the start-up vectors'
         layers, all layers with runtime vectors) are the layers any vector may steer.
Request: extra_args={"steering_vector": "happy", "steering_alpha": 4.0}, or several entries:
         {"steering_vector": ["happy", "refusal"], "steering_alpha": [4, 1], "steering_op": ["add", "ablate"],
          "steering_scope": "generated", "steering_positions": [0, -1]}
         Flat keys holding scalars or lists of scalars, so the same request works through
         `vllm serve` as `vllm_xargs`; `steering(...)` builds them.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer_batch.errors import SteerBatchError

CONFIG_KEY = "steering"
PLUGIN_NAME = "steer_batch"  # the vLLM plugin entry point's name in pyproject.toml
WORKER_EXTENSION = "steer_batch.engine.worker.SteeringWorkerExtension"  # vLLM's worker_extension_cls
REQUEST_PREFIX = "steering_"
VECTOR_KEY = "steering_vector"
ALPHA_KEY = "steering_alpha"
OP_KEY = "steering_op"
SCOPE_KEY = "steering_scope"
POSITIONS_KEY = "steering_positions"
REQUEST_KEYS = (VECTOR_KEY, ALPHA_KEY, OP_KEY, SCOPE_KEY, POSITIONS_KEY)
OPS = ("add", "ablate", "clamp")
SCOPES = ("all", "prompt", "generated")
# "code" is written by the front end (a hash of the steering code).
_CONFIG_FIELDS = (
    "vectors", "capture", "steer_op", "max_abs_alpha", "max_vectors_per_request", "max_vectors", "layers",
    "runtime_vectors", "code",
)  # fmt: skip
STEER_OPS = ("add", "fused")
_VECTOR_FIELDS = ("path", "sha256", "layers")
# Useful strengths are far below this: mean-difference vectors degrade text from |alpha| ~ 2, and
# unit-norm PCA directions need about the model's mean-difference norm (1 to a few hundred on
# common models). Above it a request is a typo (1e6 for 1e-6) or an attack, and is refused.
DEFAULT_MAX_ABS_ALPHA = 1000.0
DEFAULT_MAX_VECTORS_PER_REQUEST = 4
DEFAULT_MAX_VECTORS = 16  # bank rows per steered layer: start-up and runtime vectors together
MAX_BANK_ROWS = 4096  # the most max_vectors may ask for


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


@dataclass(frozen=True)
class VectorSpec:
    path: str
    sha256: str | None = None
    layers: tuple[int, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "layers": list(self.layers or ())}


@dataclass(frozen=True)
class SteeringConfig:
    """The engine's vectors, by the names requests use (their order gives their bank rows), and
    its settings (module doc). Unknown keys are errors."""

    vectors: dict[str, VectorSpec]
    capture: tuple[int, ...] = ()
    steer_op: str | None = None  # "add" or "fused"; None: the front end's default (engine/frontend.py)
    max_abs_alpha: float = DEFAULT_MAX_ABS_ALPHA
    max_vectors_per_request: int = DEFAULT_MAX_VECTORS_PER_REQUEST
    max_vectors: int = DEFAULT_MAX_VECTORS
    layers: str | tuple[int, ...] | None = None  # steerable layers: None = the vectors' own, "all", or a list
    runtime_vectors: bool | str = False  # vectors may be added at runtime: True (any file) or a directory

    @property
    def names(self) -> list[str]:
        return list(self.vectors)

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> SteeringConfig | None:
        """None when the engine was not asked to steer (the plugin then stays inert)."""
        if not asks_steering(additional_config):
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

        def field(key: str, default: Any, ok, expected: str) -> Any:
            value = raw.get(key, default)
            if not ok(value):
                raise SteerBatchError(f'additional_config["steering"]["{key}"]={value!r}; {expected}')
            return value

        runtime = field(
            "runtime_vectors", False, lambda v: isinstance(v, (bool, str)), "expected true, false or a directory"
        )
        vectors = field("vectors", {}, lambda v: isinstance(v, dict), "expected a dict of name -> vector file path")
        capture = field(
            "capture",
            [],
            lambda v: isinstance(v, (list, tuple)) and all(_is_int(i, 0, 1 << 20) for i in v),
            "must be a list of layer indices",
        )
        if not (vectors or capture or runtime):
            raise SteerBatchError(
                'additional_config["steering"]["vectors"] must be a non-empty dict of name -> vector file path '
                '(or set "capture" or "runtime_vectors")'
            )
        steer_op = field("steer_op", None, lambda v: v in (None, *STEER_OPS), f"allowed: {list(STEER_OPS)}")
        max_abs_alpha = field(
            "max_abs_alpha",
            DEFAULT_MAX_ABS_ALPHA,
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf,
            f"expected a finite number > 0 (default {DEFAULT_MAX_ABS_ALPHA:g})",
        )
        slots = field(
            "max_vectors_per_request",
            DEFAULT_MAX_VECTORS_PER_REQUEST,
            lambda v: _is_int(v, 1, 64),
            f"expected an integer from 1 to 64 (default {DEFAULT_MAX_VECTORS_PER_REQUEST})",
        )
        rows = field(
            "max_vectors",
            max(DEFAULT_MAX_VECTORS, len(vectors)),
            lambda v: _is_int(v, max(1, len(vectors)), MAX_BANK_ROWS),
            f"expected an integer from the number of vectors ({len(vectors)}) to {MAX_BANK_ROWS} "
            f"(default {DEFAULT_MAX_VECTORS})",
        )
        layers = field(
            "layers",
            None,
            lambda v: v in (None, "all") or (isinstance(v, (list, tuple)) and all(_is_int(i, 0, 1 << 20) for i in v)),
            'expected "all" or a list of layer indices',
        )
        layers = tuple(sorted(set(layers))) if isinstance(layers, (list, tuple)) else layers
        vectors = {_check_name(name): _vector_spec(name, spec) for name, spec in vectors.items()}
        return cls(vectors, tuple(sorted(set(capture))), steer_op, float(max_abs_alpha), slots, rows, layers, runtime)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vectors": {name: spec.as_dict() for name, spec in self.vectors.items()},
            "capture": list(self.capture),
            "steer_op": self.steer_op,
            "max_abs_alpha": self.max_abs_alpha,
            "max_vectors_per_request": self.max_vectors_per_request,
            "max_vectors": self.max_vectors,
            "layers": list(self.layers) if isinstance(self.layers, tuple) else self.layers,
            "runtime_vectors": self.runtime_vectors,
        }


def engine_config(additional_config: dict | None = None, vectors: dict | None = None, **settings: Any) -> dict:
    """vLLM's `additional_config` asking for steering, the one way steer-batch builds it:
    `additional_config` as given (other plugins' keys kept, its "steering" settings merged
    under), then `settings` (SteeringConfig's fields: capture, layers, runtime_vectors,
    max_vectors, ...; None leaves one out) and `vectors` (name -> file, added to any given).
    Checked like an engine's config (errors name the key)."""
    base = dict(additional_config or {})
    steering = {**base.get(CONFIG_KEY, {}), **{k: v for k, v in settings.items() if v is not None}}
    if vectors:
        steering["vectors"] = {**steering.get("vectors", {}), **{n: str(p) for n, p in vectors.items()}}
    config = {**base, CONFIG_KEY: steering}
    SteeringConfig.from_additional_config(config)
    return config


def asks_steering(additional_config: Any) -> bool:
    """Whether an engine's additional_config asks for steering (cheap: no validation)."""
    return isinstance(additional_config, dict) and CONFIG_KEY in additional_config


# A vector's name, the same for start-up and runtime vectors: safe in a URL path segment (so every
# name that can be added can be deleted, DELETE /v1/steering/vectors/{name}), a file name and a log.
VECTOR_NAME = re.compile(r"[A-Za-z0-9_@-][A-Za-z0-9._@-]{0,63}")
VECTOR_NAME_RULE = "1 to 64 letters, digits, '.', '_', '-' or '@', not starting with '.'"


def check_vector_name(name: Any, where: str, param: str) -> str:
    """`name` if it is a valid vector name, else SteerBatchError naming `where` and the rule."""
    if not isinstance(name, str) or VECTOR_NAME.fullmatch(name) is None:
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:80] + "...")
        raise SteerBatchError(f"{where}={shown}: a vector name is {VECTOR_NAME_RULE}", param=param)
    return name


def _check_name(name: Any) -> str:
    return check_vector_name(name, 'additional_config["steering"]["vectors"] name', "vectors")


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


@dataclass(frozen=True)
class Entry:
    """One entry of a request's steering: at each layer where `vector` has a direction v, with
    u = v / |v| and h the layer's residual-stream output, add: h + alpha v; ablate:
    h - alpha (h . u) u; clamp: h + (alpha - h . u) u; applied to the tokens of `scope` ("all";
    "prompt": positions < prompt length; "generated": the others)."""

    vector: str
    alpha: float
    op: str = "add"
    scope: str = "all"

    @property
    def no_op(self) -> bool:
        return self.alpha == 0 and self.op != "clamp"

    def coefficients(self) -> tuple[float, float, float]:
        """(p, q, r) of the one update every op is: h + p v + (q + r (h . u)) u (kernels/steer.py)."""
        return {"add": (self.alpha, 0.0, 0.0), "ablate": (0.0, 0.0, -self.alpha), "clamp": (0.0, self.alpha, -1.0)}[
            self.op
        ]


@dataclass(frozen=True)
class SteeringSpec:
    """What one request asks for: its entries, applied in order at each layer (each sees the
    result of the ones before), on the tokens of each entry's scope that also lie in
    `positions` ([start, end) of the sequence, prompt position 0 first; end None: to the end)."""

    entries: tuple[Entry, ...]
    positions: tuple[int, int | None] = (0, None)


def parse_request(extra_args: dict[str, Any] | None, config: SteeringConfig | None) -> SteeringSpec | None:
    """The steering spec of a request; None when it is stock vLLM (no steering_* keys, or every
    entry a no-op: add or ablate with alpha 0). A key set to None counts as absent (Arrow fills
    a row's missing keys with None). A scalar alpha, op or scope applies to every listed vector.
    Raises SteeringRequestError naming the field and what is allowed."""
    args = {k: v for k, v in (extra_args or {}).items() if k.startswith(REQUEST_PREFIX) and v is not None}
    if not args:
        return None
    unknown = sorted(set(args) - set(REQUEST_KEYS))
    if unknown:
        raise SteeringRequestError(
            f"unknown steering argument {unknown[0]!r}; allowed: {list(REQUEST_KEYS)}", unknown[0]
        )
    if config is None:
        first = next(iter(args))
        raise SteeringRequestError(
            f"{first} given, but this engine was started without steering; start it with "
            'additional_config={"steering": {"vectors": {"name": "file.safetensors"}}}',
            first,
        )
    for key in (VECTOR_KEY, ALPHA_KEY):
        if key not in args:
            raise SteeringRequestError(
                f"{key} is missing; a steered request sets both {VECTOR_KEY} and {ALPHA_KEY}", key
            )
    names = _as_list(args[VECTOR_KEY])
    if not 1 <= len(names) <= config.max_vectors_per_request:
        raise SteeringRequestError(
            f"{VECTOR_KEY} lists {len(names)} vectors; this engine takes 1 to {config.max_vectors_per_request} "
            "per request (its max_vectors_per_request)",
            VECTOR_KEY,
        )
    for name in names:
        if not isinstance(name, str) or name not in config.vectors:
            raise SteeringRequestError(
                f"{VECTOR_KEY}={name!r} is not a vector of this engine; allowed: {config.names}", VECTOR_KEY
            )
    alphas = _per_entry(args, ALPHA_KEY, len(names))
    for alpha in alphas:
        _check_alpha(alpha, config)
    ops = _choices(args, OP_KEY, len(names), OPS)
    scopes = _choices(args, SCOPE_KEY, len(names), SCOPES)
    spec = SteeringSpec(
        tuple(Entry(n, float(a), o, s) for n, a, o, s in zip(names, alphas, ops, scopes)),
        _positions(args.get(POSITIONS_KEY)),
    )
    return None if all(e.no_op for e in spec.entries) else spec


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _per_entry(args: dict[str, Any], key: str, count: int, default: Any = None) -> list[Any]:
    """One value per listed vector: a scalar applies to all; a list must have one per vector."""
    value = args.get(key, default)
    if not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) != count:
        raise SteeringRequestError(
            f"{key} lists {len(value)} values for {count} vector(s) in {VECTOR_KEY}; give one per vector, "
            "or one value for all",
            key,
        )
    return list(value)


def _check_alpha(alpha: Any, config: SteeringConfig) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise SteeringRequestError(f"{ALPHA_KEY}={alpha!r} must be a finite number (int or float)", ALPHA_KEY)
    if abs(alpha) > config.max_abs_alpha:
        bound = f"{config.max_abs_alpha:g}"
        raise SteeringRequestError(
            f"{ALPHA_KEY}={alpha!r} is outside [-{bound}, {bound}], this engine's max_abs_alpha; "
            'start the engine with a larger additional_config["steering"]["max_abs_alpha"] if you mean it',
            ALPHA_KEY,
        )


def _choices(args: dict[str, Any], key: str, count: int, allowed: tuple[str, ...]) -> list[str]:
    values = _per_entry(args, key, count, allowed[0])
    for value in values:
        if value not in allowed:
            raise SteeringRequestError(f"{key}={value!r}; allowed: {list(allowed)}", key)
    return values


def _positions(value: Any) -> tuple[int, int | None]:
    if value is None:
        return (0, None)
    ints = isinstance(value, (list, tuple)) and len(value) == 2
    ints = ints and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ints or value[0] < 0 or not (value[1] == -1 or value[1] > value[0]):
        raise SteeringRequestError(
            f"{POSITIONS_KEY}={value!r}; expected [start, end]: integers with 0 <= start and end > start, "
            "or end -1 for the end of the sequence",
            POSITIONS_KEY,
        )
    return (value[0], None if value[1] == -1 else value[1])


def steering(*entries, scope: str | None = None, positions: tuple[int, int] | None = None) -> dict[str, Any]:
    """The `extra_args` of a steered request, so nobody spells the keys by hand:

        steering("happy", 4)
        steering(("happy", 4), ("refusal", 1.0, "ablate"), scope="generated")
        steering("happy", 4, "add", "prompt", positions=(0, 4))      # ActAdd: the first 4 prompt tokens

    Each entry is (vector, alpha[, op[, scope]]); `scope` applies to entries that name none. The
    engine validates the result (errors name the field); pass it as
    `SamplingParams(extra_args=...)` or as `vllm_xargs` to a server."""
    if entries and isinstance(entries[0], str):
        entries = (entries,)
    if not entries:
        raise SteerBatchError("steering() needs at least one entry, e.g. steering('happy', 4)")
    rows = []
    for entry in entries:
        if not isinstance(entry, (tuple, list)) or not 2 <= len(entry) <= 4:
            raise SteerBatchError(f"steering() entry {entry!r}: expected (vector, alpha[, op[, scope]])")
        vector, alpha, op, entry_scope = (*entry, None, None)[:4]
        rows.append((vector, alpha, op or OPS[0], entry_scope or scope or SCOPES[0]))
    args = {}
    for key, values, default in zip((VECTOR_KEY, ALPHA_KEY, OP_KEY, SCOPE_KEY), zip(*rows), (None, None, *_DEFAULTS)):
        if default is None or any(v != default for v in values):
            args[key] = values[0] if len(rows) == 1 else list(values)
    if positions is not None:
        args[POSITIONS_KEY] = list(positions)
    return args


_DEFAULTS = (OPS[0], SCOPES[0])
