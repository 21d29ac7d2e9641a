"""Layer sets of a vector, for sweeps over "which layers": each set is the vector restricted to
those layers (`SteeringVector.restricted`), a slice named `NAME@LABEL` (`happy@8-11`), so every
cell of a layers x alpha grid is one more vector in the same engine's bank.

Sets come from `each` (every layer of the vector alone), an explicit list of ranges
(`8-11,12-15`, inclusive like `--layers`; they may overlap), or windows of W of the vector's
layers moved S at a time (the default: W = S = 4; a shorter last window is kept).
"""

from __future__ import annotations

from steer_batch.errors import SteerBatchError

DEFAULT_WINDOW = 4


def layer_sets(
    spec: str | None, layers: list[int], window: int | None = None, stride: int | None = None
) -> list[list[int]]:
    """The layer sets `spec` names over a vector with `layers` (see the module doc)."""
    layers = sorted(layers)
    if spec is not None and (window is not None or stride is not None):
        raise SteerBatchError("give --layers or --window/--stride, not both", param="layers")
    if spec == "each":
        return [[i] for i in layers]
    if spec:
        sets = []
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            try:
                chosen = list(range(int(lo), int(hi or lo) + 1))
            except ValueError:
                raise SteerBatchError(
                    f"{spec!r}: give 'each', or ranges like 8-11,12-15 (inclusive)", param="layers"
                ) from None
            missing = sorted(set(chosen) - set(layers))
            if not chosen or missing:
                raise SteerBatchError(
                    f"{part!r} in {spec!r}: layers {missing or chosen} are not among the vector's layers {layers}",
                    param="layers",
                )
            sets.append(chosen)
        if len({tuple(s) for s in sets}) != len(sets):
            raise SteerBatchError(f"{spec!r}: a layer set is given twice", param="layers")
        return sets
    window = DEFAULT_WINDOW if window is None else window
    stride = window if stride is None else stride
    if window < 1 or stride < 1:
        raise SteerBatchError(f"window={window}, stride={stride}: both must be at least 1", param="window")
    starts = range(0, max(len(layers) - window, 0) + 1, stride)
    sets = [layers[k : k + window] for k in starts]
    tail = layers[starts[-1] + stride :] if len(layers) > window else []
    return sets + ([tail] if tail and tail != sets[-1][-len(tail) :] else [])


def label(layers: list[int]) -> str:
    """`8-11` for a run of consecutive layers, else `3_5_7` (a vector name holds no comma)."""
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
        return f"{layers[0]}-{layers[-1]}"
    return "_".join(map(str, layers))


def slice_name(name: str, layers: list[int]) -> str:
    return f"{name}@{label(layers)}"
