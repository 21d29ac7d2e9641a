"""The extraction methods hold to their definitions: a planted direction is recovered with the
right sign, PCA matches an independent eigen-decomposition, diagnostics tell signal from noise."""

import json

import numpy as np
import pytest
import torch

from steer_batch.vectors.methods import METHODS, build_vector, diagnostics, direction

HIDDEN = 32


def planted(pairs=200, noise=0.05, seed=0):
    """p = base + s_k u + e, n = base - s_k u + e', with s_k varying so PCA of p - n sees u."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(HIDDEN, generator=g), dim=0)
    base = torch.randn(pairs, HIDDEN, generator=g) * 3
    s = 0.5 + torch.rand(pairs, 1, generator=g)
    p = base + s * u + noise * torch.randn(pairs, HIDDEN, generator=g)
    n = base - s * u + noise * torch.randn(pairs, HIDDEN, generator=g)
    return p, n, u


@pytest.mark.parametrize("method", METHODS)
def test_planted_direction_is_recovered_with_its_sign(method):
    p, n, u = planted()
    d = direction(p, n, method)
    cos = float(torch.nn.functional.cosine_similarity(d, u, dim=0))
    assert cos >= 0.99, f"{method}: cosine {cos:.4f} with the planted direction"
    flipped = direction(n, p, method)  # swapping the roles flips the direction
    assert float(torch.nn.functional.cosine_similarity(flipped, u, dim=0)) <= -0.99


def test_mean_diff_is_the_unnormalized_mean_difference():
    p, n, _ = planted()
    assert torch.allclose(direction(p, n, "mean_diff"), (p - n).mean(0))
    assert 1.5 < float(direction(p, n, "mean_diff").norm()) < 2.5  # ~ 2 * mean(s_k) = 2, not unit


def _top_eigvec(rows: np.ndarray) -> np.ndarray:
    cov = np.cov(rows.astype(np.float64), rowvar=False)  # centers, as PCA does
    w, v = np.linalg.eigh(cov)
    return v[:, np.argmax(w)]


@pytest.mark.parametrize("method", ["pca_diff", "pca_center"])
def test_pca_matches_an_independent_eigendecomposition(method):
    g = torch.Generator().manual_seed(1)
    p, n = torch.randn(50, HIDDEN, generator=g), torch.randn(50, HIDDEN, generator=g)  # no planted signal
    d = direction(p, n, method).numpy()
    if method == "pca_diff":
        rows = (p - n).numpy()
    else:
        c = (p + n) / 2
        rows = torch.cat([p - c, n - c]).numpy()
    assert abs(np.linalg.norm(d) - 1) < 1e-5
    assert abs(float(d @ _top_eigvec(rows))) > 0.9999
    above = int((((p - n).numpy() @ d) > 0).sum())
    assert above >= 50 - above, "sign rule: p must project above n for at least half the pairs"


def test_diagnostics_tell_signal_from_noise():
    p, n, _ = planted()
    signal = diagnostics(p, n, "mean_diff")
    assert signal["separation"] == 1.0
    assert abs(signal["mean_diff_norm"] - float((p - n).mean(0).norm())) < 1e-5
    g = torch.Generator().manual_seed(2)
    noise = diagnostics(torch.randn(400, HIDDEN, generator=g), torch.randn(400, HIDDEN, generator=g), "pca_diff")
    assert 0.3 < noise["separation"] < 0.7


def test_build_vector_writes_method_reference_sign_rule_and_diagnostics(tmp_path):
    from steer_batch import SteeringVector

    p, n, _ = planted()
    states_p, states_n = torch.stack([p, 2 * p], dim=1), torch.stack([n, 2 * n], dim=1)  # [pairs, layers, hidden]
    v = build_vector(states_p, states_n, [3, 5], 8, "pca_center", model="m", concept="happy - sad")
    v.save(tmp_path / "v.safetensors")
    w = SteeringVector.load(tmp_path / "v.safetensors")
    assert w.method == "pca_center" and w.layers == [3, 5]
    assert "RepE" in w.metadata["reference"] and "flip" in w.metadata["sign_rule"]
    diags = json.loads(w.metadata["diagnostics"])
    assert set(diags) == {"3", "5"} and diags["3"]["separation"] == 1.0
    with pytest.raises(
        ValueError, match=r"unknown method 'pca'; choose one of \['mean_diff', 'pca_diff', 'pca_center'\]"
    ):
        build_vector(states_p, states_n, [3, 5], 8, "pca", model="m", concept="x")
