"""An independent float64 reference of SCIENCE.md's metrics: straightforward full-matrix numpy.

Written from the definitions (Sigma_W, Sigma_B, pinv, explicit loops over class pairs), not from the
streaming identities the engine uses, so agreement checks the identities too.
"""

from __future__ import annotations

import itertools

import numpy as np


def reference_metrics(h, y, num_classes, *, predictions=None, classifier=None, next_weight=None, means=None):
    h = np.asarray(h, dtype=np.float64).reshape(len(h), -1)
    y = np.asarray(y)
    classes = [c for c in range(num_classes) if np.any(y == c)]
    C = len(classes)
    mu = {c: h[y == c].mean(0) for c in classes}
    mu_g = np.mean([mu[c] for c in classes], axis=0)
    M = np.stack([mu[c] - mu_g for c in classes], axis=1)  # d x C
    N = len(h)
    centred = h - np.stack([mu[c] for c in y])
    sigma_w = centred.T @ centred / N
    sigma_b = M @ M.T / C
    total = h - h.mean(0)
    sigma_t = total.T @ total / N
    out = {
        "nc1": np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10)) / C,
        "nc1_ratio": np.trace(sigma_w) / np.trace(sigma_t),
    }
    norms = np.linalg.norm(M, axis=0)
    out["nc2_equinorm"] = norms.std() / norms.mean()
    cos = [
        abs(M[:, i] @ M[:, j] / (norms[i] * norms[j]) + 1 / (C - 1))
        for i in range(C)
        for j in range(C)
        if i != j
    ]
    out["nc2_equiangle"] = np.mean(cos)
    mtm = M.T @ M
    etf = np.eye(C) - np.ones((C, C)) / C
    out["nc2_etf"] = np.linalg.norm(mtm / np.linalg.norm(mtm) - etf / np.linalg.norm(etf))
    var = {c: np.mean(np.sum((h[y == c] - mu[c]) ** 2, axis=1)) for c in classes}
    out["cdnv"] = np.mean(
        [
            (var[a] + var[b]) / (2 * np.sum((mu[a] - mu[b]) ** 2))
            for a, b in itertools.combinations(classes, 2)
        ]
    )
    if means is None:
        ncc_means, ncc_labels = np.stack([mu[c] for c in classes]), np.array(classes)
    else:
        ncc_means, ncc_labels = np.asarray(means, dtype=np.float64), np.arange(len(means))
    dists = np.linalg.norm(h[:, None, :] - ncc_means[None, :, :], axis=2)
    ncc = ncc_labels[dists.argmin(1)]
    out["ncc_acc"] = np.mean(ncc == y)
    if predictions is not None:
        out["ncc_mismatch"] = np.mean(ncc != np.asarray(predictions))
    out["stable_rank"] = np.linalg.norm(centred) ** 2 / np.linalg.norm(centred, 2) ** 2
    if classifier is not None:
        W = np.asarray(classifier, dtype=np.float64)[classes]
        out["nc3"] = np.linalg.norm(W.T / np.linalg.norm(W) - M / np.linalg.norm(M))
    if next_weight is not None:
        W = np.asarray(next_weight, dtype=np.float64)
        u, s, _ = np.linalg.svd(M, full_matrices=False)
        q_m = u[:, s > 1e-5 * s.max()]
        _, _, vh = np.linalg.svd(W, full_matrices=False)
        v_c = vh[:num_classes].T
        out["nc3_alignment"] = np.mean(np.minimum(np.linalg.svd(q_m.T @ v_c, compute_uv=False), 1.0))
        out["weight_stable_rank"] = np.linalg.norm(W) ** 2 / np.linalg.norm(W, 2) ** 2
    return out


def simplex_etf_features(num_classes: int, dim: int, per_class: int, scale: float = 1.0):
    """Features placed exactly at the vertices of a simplex ETF, no within-class spread (SCIENCE.md)."""
    c = num_classes
    etf = np.sqrt(c / (c - 1)) * (np.eye(c) - np.ones((c, c)) / c)  # rows: the C vertices, in R^C
    vertices = np.zeros((c, dim))
    vertices[:, :c] = etf
    y = np.repeat(np.arange(c), per_class)
    return scale * vertices[y], y, vertices
