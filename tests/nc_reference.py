"""An independent float64 reference of docs/science.md's metrics: straightforward full-matrix numpy.

Written from the definitions (Sigma_W, Sigma_B, pinv, explicit loops over class pairs), not from the
streaming identities the engine uses, so agreement checks the identities too. It shares none of the
engine's numerical cut-offs: a pseudo-inverse keeps exactly the rank the construction gives
(``min(d, C-1)`` for centred class means in general position), so a direction the engine drops, however
small, shows up as a disagreement. :func:`exact_nc1` recomputes nc1 in 60-digit arithmetic for cases
where float64 itself is in doubt.
"""

from __future__ import annotations

import itertools

import mpmath
import numpy as np
from sklearn.linear_model import Ridge


def _top_left_vectors(M, rank):
    u, s, _ = np.linalg.svd(M, full_matrices=False)
    return u[:, :rank], s[:rank]


def reference_metrics(
    h,
    y,
    num_classes,
    *,
    predictions=None,
    classifier=None,
    next_weight=None,
    means=None,
    probe_ridge=None,
):
    """``probe_ridge``: the probe's ridge penalty relative to the mean eigenvalue of the centred Gram
    (the engine's PROBE_RIDGE); adds ``probe_acc`` from scikit-learn's Ridge on the unprojected features."""
    h = np.asarray(h, dtype=np.float64).reshape(len(h), -1)
    y = np.asarray(y)
    classes = [c for c in range(num_classes) if np.any(y == c)]
    C = len(classes)
    d = h.shape[1]
    mu = {c: h[y == c].mean(0) for c in classes}
    mu_g = np.mean([mu[c] for c in classes], axis=0)
    M = np.stack([mu[c] - mu_g for c in classes], axis=1)  # d x C
    N = len(h)
    rank = min(d, C - 1)
    centred = h - np.stack([mu[c] for c in y])
    sigma_w = centred.T @ centred / N
    # Sigma_B^+ = C (M M^T)^+ from M's top `rank` singular pairs, however small the last one is.
    u, s = _top_left_vectors(M, rank)
    sigma_b_pinv = C * (u / s**2) @ u.T
    total = h - h.mean(0)
    sigma_t = total.T @ total / N
    out = {
        "nc1": np.trace(sigma_w @ sigma_b_pinv) / C,
        "nc1_cond": s[0] / s[-1],
        "nc1_ratio": np.trace(sigma_w) / np.trace(sigma_t),
    }
    out.update(_equinorm_equiangle(M, "nc2"))
    mtm = M.T @ M
    etf = np.eye(C) - np.ones((C, C)) / C
    out["nc2_etf"] = np.linalg.norm(mtm / np.linalg.norm(mtm) - etf / np.linalg.norm(etf))
    x = M / np.linalg.norm(M, axis=0)
    energies = [-np.log(np.linalg.norm(x[:, i] - x[:, j])) for i in range(C) for j in range(C) if i != j]
    out["gnc2_energy"] = np.mean(energies)
    out["gnc2_spread"] = np.std(energies)
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
        cos = [W[k] @ M[:, k] / (np.linalg.norm(W[k]) * np.linalg.norm(M[:, k])) for k in range(C)]
        out["unc3"] = np.var(cos)
        out.update(_equinorm_equiangle(W.T, "nc2w"))
    if next_weight is not None:
        W = np.asarray(next_weight, dtype=np.float64)
        _, _, vh = np.linalg.svd(W, full_matrices=False)
        v = vh[: min(C - 1, len(vh))].T  # top-(C-1) right-singular subspace (no ties in random draws)
        angles = min(rank, v.shape[1])
        cosines = np.linalg.svd(u.T @ v, compute_uv=False)[:angles]
        out["nc3_alignment"] = np.mean(np.minimum(cosines, 1.0))
        out["weight_stable_rank"] = np.linalg.norm(W) ** 2 / np.linalg.norm(W, 2) ** 2
    if probe_ridge is not None:
        onehot = np.eye(num_classes)[y]
        xc = h - h.mean(0)
        alpha = probe_ridge * np.trace(xc.T @ xc) / d
        fit = Ridge(alpha=alpha, fit_intercept=True, solver="svd").fit(h, onehot)
        scores = fit.predict(h)
        scores[:, [c not in classes for c in range(num_classes)]] = -np.inf
        out["probe_acc"] = np.mean(scores.argmax(1) == y)
    return out


def _equinorm_equiangle(X, prefix):
    C = X.shape[1]
    norms = np.linalg.norm(X, axis=0)
    cos = [
        abs(X[:, i] @ X[:, j] / (norms[i] * norms[j]) + 1 / (C - 1))
        for i in range(C)
        for j in range(C)
        if i != j
    ]
    return {f"{prefix}_equinorm": norms.std() / norms.mean(), f"{prefix}_equiangle": np.mean(cos)}


def exact_nc1(h, y, digits=60):
    """nc1 = Tr(Sigma_W Sigma_B^+)/C in ``digits``-digit arithmetic, for small cases (d and C of a few).

    The features are taken as the exact binary numbers they are; Sigma_B^+ comes from the
    eigendecomposition of Sigma_B, keeping its min(d, C-1) largest eigenvalues (the rank the
    construction gives)."""
    with mpmath.workdps(digits):
        h = [[mpmath.mpf(float(v)) for v in row] for row in np.asarray(h, dtype=np.float64)]
        y = list(np.asarray(y))
        classes = sorted(set(y))
        C, d, N = len(classes), len(h[0]), len(h)
        mu = {
            c: [sum(h[i][k] for i in range(N) if y[i] == c) / y.count(c) for k in range(d)] for c in classes
        }
        mu_g = [sum(mu[c][k] for c in classes) / C for k in range(d)]
        M = mpmath.matrix([[mu[c][k] - mu_g[k] for c in classes] for k in range(d)])
        sigma_b = M * M.T / C
        diff = mpmath.matrix([[h[i][k] - mu[y[i]][k] for k in range(d)] for i in range(N)])
        sigma_w = diff.T * diff / N
        evals, evecs = mpmath.eigsy(sigma_b)
        order = sorted(range(d), key=lambda k: -evals[k])[: min(d, C - 1)]
        pinv = mpmath.zeros(d, d)
        for k in order:
            v = evecs[:, k]
            pinv += (v * v.T) / evals[k]
        return float(sum((sigma_w * pinv)[k, k] for k in range(d)) / C)


def simplex_etf_features(num_classes: int, dim: int, per_class: int, scale: float = 1.0):
    """Features placed exactly at the vertices of a simplex ETF, no within-class spread (docs/science.md)."""
    c = num_classes
    etf = np.sqrt(c / (c - 1)) * (np.eye(c) - np.ones((c, c)) / c)  # rows: the C vertices, in R^C
    vertices = np.zeros((c, dim))
    vertices[:, :c] = etf
    y = np.repeat(np.arange(c), per_class)
    return scale * vertices[y], y, vertices
