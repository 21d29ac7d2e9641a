"""Contrastive steering vectors from pairs of prompts.

For pair k and layer i, p_k and n_k are the residual-stream outputs of decoder layer i at the
last token of the positive and the negative prompt (the vector format's convention).

- `mean_diff` (ActAdd, Turner et al. 2023; CAA): mean_k (p_k - n_k), not normalized: alpha 1
  moves the average negative example onto the average positive one.
- `pca_diff` (RepE, Zou et al. 2023; repeng's default): the first principal component of the
  d_k = p_k - n_k (centered first, as scikit-learn's PCA does), unit norm.
- `pca_center` (RepE): with c_k = (p_k + n_k) / 2, the first principal component of the 2K rows
  p_k - c_k and n_k - c_k (centered as well), unit norm.
- Sign rule for both PCA methods: flip the direction if p_k projects below n_k for more pairs
  than above.

Diagnostics per layer: `separation`, the fraction of held-out pairs (every 5th pair, the
direction fit on the others) where p projects above n; `mean_diff_norm`, the norm of
mean_k (p_k - n_k); `median_token_norm`, the median norm of the captured states.
"""

from __future__ import annotations

import json

import torch

from steer_batch.errors import SteerBatchError
from steer_batch.vectors.vector import SteeringVector

REFERENCES = {
    "mean_diff": "ActAdd (Turner et al. 2023) / CAA: mean of p - n, not normalized",
    "pca_diff": "RepE (Zou et al. 2023), repeng default: first PC of centered p - n, unit norm",
    "pca_center": "RepE (Zou et al. 2023): first PC of p - c and n - c, c = (p + n) / 2, unit norm",
}
METHODS = tuple(REFERENCES)
SIGN_RULE = "PCA directions flip if p projects below n for more pairs than above"
HELD_OUT_EVERY = 5


def _first_pc(rows):
    """Unit first principal component of rows [N, hidden], centered first."""
    centered = rows - rows.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centered.double(), full_matrices=False)
    return vh[0].to(rows.dtype)


def direction(p, n, method: str):
    """One layer's direction from p, n [pairs, hidden] float32, by `method` (see module doc)."""
    if method == "mean_diff":
        return (p - n).mean(0)
    if method == "pca_diff":
        d = _first_pc(p - n)
    elif method == "pca_center":
        c = (p + n) / 2
        d = _first_pc(torch.cat([p - c, n - c]))
    else:
        raise SteerBatchError(f"unknown method {method!r}; choose one of {list(METHODS)}", param="method")
    above = int(((p - n) @ d > 0).sum())
    return d if above >= len(p) - above else -d


def diagnostics(p, n, method: str) -> dict[str, float]:
    """separation on held-out pairs, mean-difference norm, median token norm (one layer)."""
    held = torch.arange(len(p)) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    d = direction(p[~held], n[~held], method)
    return {
        "separation": float(((p[held] - n[held]) @ d > 0).float().mean()),
        "mean_diff_norm": float((p - n).mean(0).norm()),
        "median_token_norm": float(torch.cat([p, n]).norm(dim=-1).median()),
    }


def build_vector(
    p,
    n,
    layers: list[int],
    num_layers: int,
    method: str,
    *,
    model: str,
    concept: str,
    extra: dict[str, str] | None = None,
):
    """A SteeringVector from captured states p, n [pairs, len(layers), hidden], with the method,
    its reference, the sign rule and per-layer diagnostics in the metadata."""
    dirs, diags = {}, {}  # direction() refuses an unknown method
    for j, layer in enumerate(layers):
        dirs[layer] = direction(p[:, j], n[:, j], method)
        diags[str(layer)] = diagnostics(p[:, j], n[:, j], method)
    metadata = {
        "reference": REFERENCES[method],
        "sign_rule": SIGN_RULE,
        "pairs": str(len(p)),
        "diagnostics": json.dumps(diags),
        **(extra or {}),
    }
    return SteeringVector(dirs, num_layers, model=model, method=method, concept=concept, metadata=metadata)
