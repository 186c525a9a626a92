"""NC metrics against an independent float64 reference, constructed cases and invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.nc_reference import exact_nc1, reference_metrics, simplex_etf_features
from trainables import metrics as nc
from trainables.etf import simplex_etf
from trainables.metrics import (
    GRAM_MAX_WIDTH,
    PROBE_RIDGE,
    DegenerateFeaturesError,
    TapAccumulator,
    effective_depth,
    layer_metrics,
)

EPS = np.finfo(np.float64).eps


def _random_case(seed, n, d, c, *, unbalanced=False, spread=1.0):
    rng = np.random.default_rng(seed)
    if unbalanced:
        y = rng.choice(c, size=n, p=np.linspace(1, 3, c) / np.linspace(1, 3, c).sum())
        y[:c] = np.arange(c)  # every class present
    else:
        y = np.arange(n) % c
    centres = 3 * rng.standard_normal((c, d))
    h = centres[y] + spread * rng.standard_normal((n, d))
    return h, y, rng


def _compare(ours, ref, rtol=1e-7, atol=1e-9):
    assert set(ref) == set(ours), (sorted(ref), sorted(ours))
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, rel=rtol, abs=atol), key


@pytest.mark.parametrize(
    "n,d,c,unbalanced",
    [
        (200, 16, 4, False),
        (300, 5, 10, False),  # d < C: M has rank d
        (120, 8, 2, False),  # C = 2
        (150, 2100, 5, False),  # wide tap: beyond the exact Gram (stable rank checked separately)
        (400, 12, 6, True),  # unbalanced classes
    ],
)
def test_layer_metrics_match_float64_reference(n, d, c, unbalanced):
    h, y, rng = _random_case(n + d + c, n, d, c, unbalanced=unbalanced)
    predictions = rng.integers(0, c, size=n)
    classifier = rng.standard_normal((c, d))
    next_weight = rng.standard_normal((7 if d > 7 else d + 3, d))
    train_means = rng.standard_normal((c, d))
    ours = layer_metrics(
        torch.tensor(h, dtype=torch.float32),
        torch.tensor(y),
        c,
        predictions=torch.tensor(predictions),
        classifier=torch.tensor(classifier),
        next_weight=torch.tensor(next_weight),
        means=torch.tensor(train_means),
        probe=d <= nc.PROBE_WIDTH,
    )
    # The reference sees the same float32-rounded features the engine sees.
    ref = reference_metrics(
        np.float32(h),
        y,
        c,
        predictions=predictions,
        classifier=classifier,
        next_weight=next_weight,
        means=train_means,
        probe_ridge=PROBE_RIDGE if d <= nc.PROBE_WIDTH else None,
    )
    if d > nc.GRAM_MAX_WIDTH:  # bracketed estimate, tested in its own test
        ref.pop("stable_rank")
        ours.pop("stable_rank")
        ours.pop("stable_rank_min")
    _compare(ours, ref)


def test_own_means_are_the_default_for_ncc():
    h, y, _ = _random_case(1, 200, 10, 4, spread=2.0)
    ours = layer_metrics(torch.tensor(h), torch.tensor(y), 4)
    _compare(ours, reference_metrics(h, y, 4))


def test_features_of_any_shape_are_flattened():
    h, y, _ = _random_case(2, 60, 2 * 3 * 4, 3)
    flat = layer_metrics(torch.tensor(h), torch.tensor(y), 3)
    shaped = layer_metrics(torch.tensor(h).reshape(60, 2, 3, 4), torch.tensor(y), 3)
    assert flat == shaped


def test_streaming_in_chunks_equals_layer_metrics():
    h, y, rng = _random_case(3, 500, 20, 5)
    pred = rng.integers(0, 5, size=500)
    h, y, pred = torch.tensor(h), torch.tensor(y), torch.tensor(pred)
    whole = layer_metrics(h, y, 5, predictions=pred, probe=True)
    acc = TapAccumulator(5, 20, probe="fit")
    for lo in range(0, 500, 37):
        acc.add_pass1(h[lo : lo + 37], y[lo : lo + 37])
    acc.end_pass1()
    for lo in range(0, 500, 53):
        acc.add_pass2(h[lo : lo + 53], y[lo : lo + 53], pred[lo : lo + 53])
    streamed = acc.result()
    for key in whole:
        assert streamed[key] == pytest.approx(whole[key], rel=1e-10), key


@pytest.mark.parametrize("c,d", [(2, 2), (4, 4), (10, 10), (10, 64), (3, 5000)])
def test_features_at_a_simplex_etf_are_fully_collapsed(c, d):
    h, y, vertices = simplex_etf_features(c, d, per_class=7, scale=2.5)
    classifier = vertices  # W^T = M when the global mean is 0: the self-dual classifier
    out = layer_metrics(
        torch.tensor(h),
        torch.tensor(y),
        c,
        classifier=torch.tensor(classifier),
        predictions=torch.tensor(y),
        next_weight=torch.tensor(classifier),
        probe=True,
    )
    for key in (
        "nc1",
        "nc1_ratio",
        "nc2_equinorm",
        "nc2_equiangle",
        "nc2_etf",
        "gnc2_spread",
        "cdnv",
        "nc3",
        "unc3",
        "nc2w_equinorm",
        "nc2w_equiangle",
        "ncc_mismatch",
    ):
        assert out[key] == pytest.approx(0.0, abs=1e-10), key
    # Liu et al. 2023: the simplex ETF minimises the log-kernel energy at -log sqrt(2C/(C-1)).
    assert out["gnc2_energy"] == pytest.approx(-np.log(np.sqrt(2 * c / (c - 1))), abs=1e-12)
    assert out["nc1_cond"] == pytest.approx(1.0, abs=1e-9)  # the ETF's C-1 singular values are equal
    assert out["ncc_acc"] == 1.0 and out["probe_acc"] == 1.0
    assert out["nc3_alignment"] == pytest.approx(1.0, abs=1e-12)
    assert out["stable_rank"] == 0.0  # no within-class spread at all


def test_zero_within_class_spread_gives_zero_nc1():
    rng = np.random.default_rng(5)
    means = rng.standard_normal((6, 30))
    y = np.repeat(np.arange(6), 10)
    out = layer_metrics(torch.tensor(means[y]), torch.tensor(y), 6)
    assert out["nc1"] == pytest.approx(0.0, abs=1e-12)
    assert out["nc1_ratio"] == pytest.approx(0.0, abs=1e-12)
    assert out["cdnv"] == pytest.approx(0.0, abs=1e-12)


def test_classifier_equal_to_centred_means_gives_zero_nc3():
    h, y, _ = _random_case(6, 300, 12, 5)
    mu = np.stack([h[y == c].mean(0) for c in range(5)])
    M_T = mu - mu.mean(0)
    out = layer_metrics(torch.tensor(h), torch.tensor(y), 5, classifier=torch.tensor(3.0 * M_T))
    assert out["nc3"] == pytest.approx(0.0, abs=1e-10)


def test_weight_whose_top_subspace_is_range_of_means_is_aligned():
    h, y, rng = _random_case(7, 300, 40, 5)
    mu = np.stack([h[y == c].mean(0) for c in range(5)])
    M = (mu - mu.mean(0)).T  # 40 x 5, rank 4
    q, _ = np.linalg.qr(M)
    weight = q[:, :4].T * np.array([[10.0], [9.0], [8.0], [7.0]])  # rows span range(M), large singular values
    weight = np.vstack([weight, 0.01 * rng.standard_normal((6, 40))])
    out = layer_metrics(torch.tensor(h), torch.tensor(y), 5, next_weight=torch.tensor(weight))
    assert out["nc3_alignment"] == pytest.approx(1.0, abs=1e-6)


def _spectrum_case(kind, n, d, c=4, seed=0):
    """Class clusters whose within-class spread has a flat, power-law (1/j) or rank-5 spectrum."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    if kind == "flat":
        noise = rng.standard_normal((n, d))
    else:
        r = n if kind == "power-law" else 5
        scales = np.arange(1, r + 1) ** -0.5 if kind == "power-law" else np.ones(r)
        noise = (rng.standard_normal((n, r)) * scales) @ rng.standard_normal((r, d))
    return 5 * rng.standard_normal((c, d))[y] + noise, y


@pytest.mark.parametrize("kind", ["flat", "power-law", "low-rank"])
def test_wide_stable_rank_is_bracketed_on_every_spectrum(kind):
    """Taps wider than GRAM_MAX_WIDTH: ``stable_rank`` never undershoots the exact value (no collapse is
    invented) and ``stable_rank_min`` never overshoots it (the bound of ``_spectral_bounds``). Both are
    exact for a low-rank spread, stable_rank is exact for a decaying spectrum; a flat one is the hard case.
    Before version 2, the 32-column sketch gave +27% (flat) and +8% (power-law) here."""
    n, d = 600, 16_384
    h, y = _spectrum_case(kind, n, d)
    h = np.float64(np.float32(h))
    centred = h - np.stack([h[y == k].mean(0) for k in range(4)])[y]
    # ||H||_2^2 from the N x N Gram (the reference's d x d matrices would be 2 GiB here).
    exact = np.sum(centred**2) / np.linalg.eigvalsh(centred @ centred.T)[-1]
    out = layer_metrics(torch.tensor(h), torch.tensor(y), 4)
    # The subspace products run in float32: a Ritz value may exceed lambda_max by their rounding.
    slack = 1e-5
    assert out["stable_rank_min"] * (1 - slack) <= exact <= out["stable_rank"] * (1 + slack)
    if kind == "low-rank":
        assert out["stable_rank_min"] == pytest.approx(exact, rel=1e-4)
    if kind != "flat":
        assert out["stable_rank"] == pytest.approx(exact, rel=1e-3)
    else:
        assert out["stable_rank"] <= 1.15 * exact


def _within_class(kind, n, d, c, rng):
    """Within-class-centred features (N x d, mean squared row norm 1) with a known spectrum: ``exact-flat``
    (every nonzero singular value equal: stable rank exactly min(N - C, d)), ``gaussian`` (i.i.d.
    entries, centred: Marchenko-Pastur), ``power-law`` (1/sqrt(j)) or ``low-rank`` (5 equal values)."""
    y = np.arange(n) % c

    def centred(a):
        return a - np.stack([a[y == k].mean(0) for k in range(c)])[y]

    if kind == "gaussian":
        h = centred(rng.standard_normal((n, d)))
    else:
        r = 5 if kind == "low-rank" else min(n - c, d)
        left = np.linalg.qr(centred(rng.standard_normal((n, r))))[0]
        right = np.linalg.qr(rng.standard_normal((d, r)))[0]
        values = np.arange(1, r + 1) ** -0.5 if kind == "power-law" else np.ones(r)
        h = (left * values) @ right.T
    return h * (n**0.5 / np.linalg.norm(h)), y


def _exact_stable_rank(x, y, c):
    """||H||_F^2 / ||H||_2^2 of the within-class-centred x, from its own float64 centring and ARPACK's
    top eigenvalue of H^T H to 1e-12 (no sketch, no cut-off shared with the engine); with the bound on
    its own rounding: relative ``2 ||dH||_2 / ||H||_2``, ``||dH||_F <= 2 N eps ||X||_F`` from the centring."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    x = np.asarray(x, dtype=np.float64)
    h = x - np.stack([x[y == k].mean(0) for k in range(c)])[y]
    gram = LinearOperator((h.shape[1],) * 2, matvec=lambda v: h.T @ (h @ v), dtype=np.float64)
    top = eigsh(gram, k=1, which="LA", tol=1e-12, return_eigenvectors=False)[0]
    rounding = 2 * (2 * len(x) * EPS * np.linalg.norm(x)) / top**0.5 + 1e-11
    return np.sum(h**2) / top, rounding


MEAN_TO_SPREAD = [0.0, 0.01, 1.0, 10.0, 39.0, 157.0, 1e3]
"""Class-mean norm over within-class row norm: from no class structure to the near-collapse regime."""


@pytest.mark.parametrize("n,d", [(900, 3072), (2600, 2100)], ids=["N < d", "N > d"])
@pytest.mark.parametrize("kind", ["exact-flat", "gaussian", "power-law", "low-rank"])
def test_wide_stable_rank_bracket_holds_from_no_structure_to_near_collapse(kind, n, d):
    """``stable_rank_min <= exact <= stable_rank`` for every mean-to-spread ratio, float32 and float64
    features, alone and as bundle members: a wide tap never reports a collapse that is not there.

    Before the fix, the exact-flat case read 987 where the truth is 1,495 at ratio 10 (d = 6,144,
    N = 1,500): span(S Q)'s quotients divided float32 rounding by float32 rounding in directions S does
    not move (see ``TapAccumulator._spectral_bounds``)."""
    c = 5
    rng = np.random.default_rng([n, d, len(kind)])
    h, y = _within_class(kind, n, d, c, rng)
    directions = rng.standard_normal((c, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    cases = [
        (h + ratio * directions[y]).astype(dtype)
        for ratio in MEAN_TO_SPREAD
        for dtype in (np.float32, np.float64)
    ]
    labels = torch.tensor(y)
    for i, x in enumerate(cases):
        exact, rounding = _exact_stable_rank(x, y, c)
        if kind == "exact-flat" and x.dtype == np.float64:
            assert exact == pytest.approx(min(n - c, d), rel=1e-6)  # the constructed value
        out = layer_metrics(torch.tensor(x), labels, c)
        ratio = MEAN_TO_SPREAD[i // 2]
        where = (
            f"{kind}, ratio {ratio}, {x.dtype}: {out['stable_rank_min']} <= {exact} <= {out['stable_rank']}"
        )
        assert out["stable_rank_min"] <= exact * (1 + rounding), where
        assert exact <= out["stable_rank"] * (1 + rounding), where
        if kind in ("exact-flat", "low-rank") and x.dtype == np.float64:
            # Every direction of a flat spectrum is a top one (float32 rounding of large means adds a
            # little spectrum of its own: +3e-5 at ratio 1e3, on the side that misses, not invents).
            assert out["stable_rank"] == pytest.approx(exact, rel=1e-6), where
    # Bundles: the same features as members of one stacked pass keep the bracket member by member.
    for dtype in (np.float32, np.float64):
        stack = np.stack([x for x in cases if x.dtype == dtype][-4:])  # the four largest ratios
        acc = TapAccumulator(c, d, members=len(stack))
        acc.add_pass1(torch.tensor(stack), labels)
        acc.end_pass1()
        acc.add_pass2(torch.tensor(stack), labels)
        for x, out in zip(stack, acc.result()):
            exact, rounding = _exact_stable_rank(x, y, c)
            assert out["stable_rank_min"] <= exact * (1 + rounding) and exact <= out["stable_rank"] * (
                1 + rounding
            ), (kind, dtype, out, exact)


def _shifted_class_case(eps, d=6, c=3, per=10, seed=0):
    """Class 1 is class 0's samples shifted by ``eps * u``: one between-class direction of size ~eps."""
    rng = np.random.default_rng(seed)
    centres = 3 * rng.standard_normal((c, d))
    base = centres[0] + rng.standard_normal((per, d))
    u = rng.standard_normal(d)
    rows = [base, base + eps * u / np.linalg.norm(u)]
    rows += [centres[k] + rng.standard_normal((per, d)) for k in range(2, c)]
    return np.concatenate(rows), np.repeat(np.arange(c), per)


@pytest.mark.parametrize("eps", [1e-3, 1e-4, 1e-6, 1e-8])
def test_nc1_keeps_every_direction_float64_resolves(eps):
    """Definition version 2: a small but real between-class direction is kept. With the 1e-10 eigenvalue
    cut of version 1, eps = 1e-4 (sigma_min / sigma_max = 8e-6) gave nc1 = 0.0105, 'collapsed', where
    the exact value is 1.2e8."""
    h, y = _shifted_class_case(eps)
    out = layer_metrics(torch.tensor(h), torch.tensor(y), 3)
    exact = exact_nc1(h, y)
    # Rounding of the means perturbs M by ~eps_64 ||h||; sigma_min moves by that (Weyl), and nc1 ~
    # sigma_min^-2 moves by twice the relative change: 2 cond(M) eps_64 ||h|| / ||M||, with room.
    sv = np.linalg.svd(np.stack([h[y == k].mean(0) for k in range(3)]).T, compute_uv=False)
    bound = 64 * EPS * out["nc1_cond"] * max(1.0, np.abs(h).max() * np.sqrt(h.shape[1]) / sv[0])
    assert out["nc1"] == pytest.approx(exact, rel=bound)
    assert out["nc1"] > 0.01 / eps**2  # nothing near collapse: the classes differ by eps, the spread ~1
    assert out["nc1_cond"] == pytest.approx(reference_metrics(h, y, 3)["nc1_cond"], rel=bound)


def test_nc1_drops_only_what_float64_cannot_resolve():
    """Two classes at exactly the same mean up to rounding give a direction below the rule: it is left out
    (nc1 stays finite and is that of the other directions), not inverted into 1e30."""
    h, y = _shifted_class_case(0.0)
    out = layer_metrics(torch.tensor(h), torch.tensor(y), 3)
    assert np.isfinite(out["nc1"]) and out["nc1"] < 1e3
    assert out["cdnv"] == np.inf  # the coinciding pair is still visible where it belongs


def test_nc3_alignment_of_an_etf_consumer_is_stable_under_tiny_perturbations():
    """An ETF classifier has rank C-1: version 1's top-C subspace took an arbitrary null direction and moved
    from 0.366 to 0.345-0.357 under a 1e-13 perturbation. Against the top-(C-1) subspace it does not
    move; for a hidden ETF layer (H-1 tied singular values) every tied vector belongs to the subspace."""
    c, d = 5, 32
    h, y, _ = _random_case(11, 300, d, c)
    rng = np.random.default_rng(12)
    for weight in (simplex_etf(c, d).double(), simplex_etf(d, d).double()):
        base = layer_metrics(torch.tensor(h), torch.tensor(y), c, next_weight=weight)["nc3_alignment"]
        for _ in range(5):
            noise = torch.tensor(1e-13 * rng.standard_normal(weight.shape))
            moved = layer_metrics(torch.tensor(h), torch.tensor(y), c, next_weight=weight + noise)
            assert moved["nc3_alignment"] == pytest.approx(base, abs=1e-9)
    # Collapsed features whose means span the classifier's row space are aligned, perturbed or not.
    hc, yc, vertices = simplex_etf_features(c, d, per_class=4)
    etf_w = torch.tensor(vertices) + 1e-13 * torch.randn(c, d, dtype=torch.float64)
    assert layer_metrics(torch.tensor(hc), torch.tensor(yc), c, next_weight=etf_w)["nc3_alignment"] == (
        pytest.approx(1.0, abs=1e-12)
    )
    # The weight branch (no precomputed SVD) agrees with the stacked one.
    M = torch.tensor(np.stack([h[y == k].mean(0) for k in range(c)]).T)
    M = M - M.mean(1, keepdim=True)
    w = torch.randn(9, d, dtype=torch.float64)
    sv, vh = nc.weight_svd(w)
    assert nc.nc3_alignment(M, w) == pytest.approx(float(nc.nc3_alignment(M, sv=sv, vh=vh)), abs=1e-14)


def test_unc3_and_classifier_nc2_on_constructed_weights():
    """Rows w_c at known angles a_c to the class means give unc3 = Var(a); rows of equal norm at a simplex
    give nc2w = 0, rows of norms 1 and 3 give nc2w_equinorm = std/mean = 0.5 (Papyan et al. 2020)."""
    c, d = 4, 12
    h, y, _ = _random_case(13, 200, d, c)
    mu = np.stack([h[y == k].mean(0) for k in range(c)])
    M = mu - mu.mean(0)
    a = np.array([0.9, 0.5, -0.2, 0.3])
    rng = np.random.default_rng(14)
    rows = []
    for k in range(c):
        m_hat = M[k] / np.linalg.norm(M[k])
        n = rng.standard_normal(d)
        n -= (n @ m_hat) * m_hat
        rows.append(2.0 * (a[k] * m_hat + np.sqrt(1 - a[k] ** 2) * n / np.linalg.norm(n)))
    out = layer_metrics(torch.tensor(h), torch.tensor(y), c, classifier=torch.tensor(np.stack(rows)))
    assert out["unc3"] == pytest.approx(np.var(a), rel=1e-12)
    etf_rows = simplex_etf(c, d).double()
    out = layer_metrics(torch.tensor(h), torch.tensor(y), c, classifier=etf_rows)
    assert out["nc2w_equinorm"] == pytest.approx(0.0, abs=1e-12)
    assert out["nc2w_equiangle"] == pytest.approx(0.0, abs=1e-12)
    scaled = etf_rows * torch.tensor([[1.0], [3.0], [1.0], [3.0]], dtype=torch.float64)
    out = layer_metrics(torch.tensor(h), torch.tensor(y), c, classifier=scaled)
    assert out["nc2w_equinorm"] == pytest.approx(0.5, rel=1e-12)


def test_gnc2_of_two_antipodal_pairs():
    """Four unit directions at +-e1, +-e2: pair distances sqrt(2) (x4, ordered x2) and 2 (x2, ordered x2):
    energy = -(4 log sqrt2 + 2 log 2)/6, spread the std of those six values."""
    vertices = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    y = np.repeat(np.arange(4), 3)
    out = layer_metrics(torch.tensor(vertices[y]), torch.tensor(y), 4)
    values = np.array([-np.log(np.sqrt(2))] * 4 + [-np.log(2.0)] * 2)
    assert out["gnc2_energy"] == pytest.approx(values.mean(), rel=1e-12)
    assert out["gnc2_spread"] == pytest.approx(values.std(), rel=1e-12)


def test_probe_on_wide_taps_is_the_ridge_probe_of_their_projection():
    """Taps wider than PROBE_WIDTH are probed through a fixed Gaussian map: the reference's ridge probe of
    the projected features gives the same accuracy; separable classes give 1, a second split is scored
    with the train fit."""
    n, d, c = 300, nc.PROBE_WIDTH + 300, 3
    h, y, _ = _random_case(15, n, d, c, spread=8.0)
    projection = nc._probe_projection(d, torch.device("cpu"))
    ours = layer_metrics(torch.tensor(h), torch.tensor(y), c, probe=True)["probe_acc"]
    ref = reference_metrics(h @ projection.numpy(), y, c, probe_ridge=PROBE_RIDGE)["probe_acc"]
    assert ours == ref
    separable, ys, _ = _random_case(16, 200, 20, 4, spread=0.1)
    train, test = torch.tensor(separable[:100]), torch.tensor(separable[100:])
    fit = TapAccumulator(4, 20, probe="fit")
    fit.add_pass1(train, torch.tensor(ys[:100]))
    fit.end_pass1()
    score = TapAccumulator(4, 20, probe="score")
    score.add_pass1(test, torch.tensor(ys[100:]))
    score.end_pass1(probe=fit.probe_weights)
    score.add_pass2(test, torch.tensor(ys[100:]))
    assert score.result()["probe_acc"] == 1.0


def test_absent_class_is_left_out():
    h, y, _ = _random_case(9, 200, 10, 5)
    keep = y != 3
    out = layer_metrics(torch.tensor(h[keep]), torch.tensor(y[keep]), 5)
    _compare(out, reference_metrics(h[keep], y[keep], 5))


@pytest.mark.parametrize(
    "features,labels,message",
    [
        (torch.randn(20, 4), torch.zeros(20, dtype=torch.long), "at least 2 classes"),
        (torch.ones(20, 4), torch.arange(20) % 2, "class means coincide"),
        (torch.full((20, 4), float("nan")), torch.arange(20) % 2, "NaN or infinite"),
    ],
    ids=["single class", "constant features", "non-finite features"],
)
def test_degenerate_input_is_a_clear_error(features, labels, message):
    with pytest.raises(DegenerateFeaturesError, match=message):
        layer_metrics(features, labels, 2)


def test_one_class_problem_is_rejected_up_front():
    with pytest.raises(DegenerateFeaturesError, match="at least 2 classes"):
        layer_metrics(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), 1)


def test_infinite_feature_is_an_error():
    h = torch.randn(20, 4)
    h[3, 1] = float("inf")
    with pytest.raises(DegenerateFeaturesError):
        layer_metrics(h, torch.arange(20) % 2, 2)


def test_bad_labels_and_shapes_are_clear_errors():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        layer_metrics(torch.randn(6, 2), torch.tensor([0, 1, 2, 3, 0, 1]), 3)
    with pytest.raises(ValueError, match="5 samples but labels 6"):
        layer_metrics(torch.randn(5, 2), torch.arange(6) % 2, 2)
    with pytest.raises(ValueError, match="means must be 2 x 2"):
        layer_metrics(torch.randn(6, 2), torch.arange(6) % 2, 2, means=torch.randn(3, 2))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3), c=st.integers(2, 6), d=st.integers(1, 12))
def test_invariant_to_sample_order_and_scale(seed, scale, c, d):
    h, y, rng = _random_case(seed, 8 * c, d, c)
    pred = rng.integers(0, c, size=len(y))
    base = layer_metrics(torch.tensor(h), torch.tensor(y), c, predictions=torch.tensor(pred))
    perm = rng.permutation(len(y))
    shuffled = layer_metrics(
        torch.tensor(h[perm]), torch.tensor(y[perm]), c, predictions=torch.tensor(pred[perm])
    )
    scaled = layer_metrics(torch.tensor(scale * h), torch.tensor(y), c, predictions=torch.tensor(pred))
    # nc1 goes through M^+: rounding in the class means (which the order of summation changes) reaches it
    # amplified by cond(M)^2, so a draw of nearly dependent centres gets a looser bound (one drew cond
    # 6e4, where the two orders differ by 2e-7 relative in either float64 formula).
    means = np.stack([h[y == k].mean(0) for k in range(c)])
    sv = np.linalg.svd(means - means.mean(0), compute_uv=False)
    cond = sv[0] / sv[min(d, c - 1) - 1]
    order_rel = 1e-8 + 64 * np.finfo(float).eps * cond**2
    for key in base:
        assert shuffled[key] == pytest.approx(base[key], rel=order_rel, abs=1e-10), key
        # Every metric of docs/science.md's table is a ratio of like powers of the features: scale-free.
        assert scaled[key] == pytest.approx(base[key], rel=max(1e-6, order_rel), abs=1e-9), key


def test_effective_depth():
    # 000 §3: the first layer whose train NCC error is <= eps; L when none is.
    assert effective_depth([0.5, 0.85, 0.95, 0.99], 0.1) == 3
    assert effective_depth([0.5, 0.85, 0.95, 0.99], 0.01) == 4
    assert effective_depth([0.5, 0.6], 0.1) == 2
    assert effective_depth([0.9, 0.95], 0.1) == 1


@pytest.mark.parametrize("d", [20, 3000], ids=["exact Gram", "wide tap, sketch"])
def test_stacked_members_equal_each_model_alone(d):
    """A trial bundle's metric pass: members stacked on a leading axis give, member by member, what
    each model's features give alone, and a degenerate member drops out without touching the others."""
    c, n, m = 5, 240, 4
    rng = np.random.default_rng(d)
    y = torch.tensor(np.arange(n) % c)
    h = torch.tensor(rng.standard_normal((m, n, d)) + 3 * rng.standard_normal((m, c, d))[:, y])
    h[2] = float("nan")  # member 2 diverged
    pred = torch.tensor(rng.integers(0, c, size=(m, n)))
    classifier = torch.tensor(rng.standard_normal((m, c, d)))
    next_weight = torch.tensor(rng.standard_normal((m, 7, d)))
    train_means = torch.tensor(rng.standard_normal((m, c, d)))

    acc = TapAccumulator(c, d, members=m)
    for lo in range(0, n, 100):  # streamed in chunks, as the training loop does
        acc.add_pass1(h[:, lo : lo + 100], y[lo : lo + 100])
    acc.end_pass1(train_means)
    for lo in range(0, n, 70):
        acc.add_pass2(h[:, lo : lo + 70], y[lo : lo + 70], pred[:, lo : lo + 70])
    stacked = acc.result(classifier=classifier, next_weight=next_weight)

    assert list(acc.degenerate) == [2] and "NaN" in acc.degenerate[2]
    assert stacked[2] is None
    for i in (0, 1, 3):
        alone = layer_metrics(
            h[i],
            y,
            c,
            predictions=pred[i],
            classifier=classifier[i],
            next_weight=next_weight[i],
            means=train_means[i],
        )
        assert set(stacked[i]) == set(alone)
        for key in alone:
            # A wide tap's stable rank comes from the subspace pass 1 builds with float32 products (any
            # subspace gives valid bounds), which a batched product rounds differently: its Ritz values
            # move at first order with it (1.6e-9 relative seen; float32's 6e-8 bounds the subspace's).
            rel = 1e-5 if key.startswith("stable_rank") and d > GRAM_MAX_WIDTH else 1e-10
            assert stacked[i][key] == pytest.approx(alone[key], rel=rel, abs=1e-12), (i, key)


def test_stacked_members_with_coinciding_class_means_are_left_out():
    h = torch.randn(3, 40, 6, dtype=torch.float64)
    h[1] = 1.0  # constant features: every class mean is the same
    acc = TapAccumulator(2, 6, members=3)
    y = torch.arange(40) % 2
    acc.add_pass1(h, y)
    acc.end_pass1()
    acc.add_pass2(h, y)
    out = acc.result()
    assert out[1] is None and "coincide" in acc.degenerate[1]
    assert out[0] == pytest.approx(layer_metrics(h[0], y, 2)) and out[2] == pytest.approx(
        layer_metrics(h[2], y, 2)
    )
