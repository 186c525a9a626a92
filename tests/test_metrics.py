"""NC metrics against an independent float64 reference, constructed cases and invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.nc_reference import reference_metrics, simplex_etf_features
from trainables import metrics as nc
from trainables.metrics import (
    GRAM_MAX_WIDTH,
    DegenerateFeaturesError,
    TapAccumulator,
    effective_depth,
    layer_metrics,
)


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
    )
    if d > nc.GRAM_MAX_WIDTH:  # sketched estimate, tested in its own test
        ref.pop("stable_rank")
        ours.pop("stable_rank")
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
    whole = layer_metrics(h, y, 5, predictions=pred)
    acc = TapAccumulator(5, 20)
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
        torch.tensor(h), torch.tensor(y), c, classifier=torch.tensor(classifier), predictions=torch.tensor(y)
    )
    for key in (
        "nc1",
        "nc1_ratio",
        "nc2_equinorm",
        "nc2_equiangle",
        "nc2_etf",
        "cdnv",
        "nc3",
        "ncc_mismatch",
    ):
        assert out[key] == pytest.approx(0.0, abs=1e-10), key
    assert out["ncc_acc"] == 1.0
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


def test_sketched_stable_rank_of_wide_collapsing_features_is_close():
    """Wide taps estimate ||H||_2 from a sketch: a lower bound on it, tight for a dominant direction."""
    rng = np.random.default_rng(8)
    n, d, c = 400, nc.GRAM_MAX_WIDTH + 500, 4
    y = np.arange(n) % c
    direction = rng.standard_normal(d)
    h = (
        5 * rng.standard_normal((c, d))[y]
        + rng.standard_normal((n, 1)) * direction
        + 0.05 * rng.standard_normal((n, d))
    )
    ours = layer_metrics(torch.tensor(h), torch.tensor(y), c)["stable_rank"]
    exact = reference_metrics(h, y, c)["stable_rank"]
    assert exact <= ours <= 1.05 * exact


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
        # Every metric of SCIENCE.md's table is a ratio of like powers of the features: scale-free.
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
            # The wide tap's sketch products run in float32, where a batched product rounds differently.
            rel = 1e-5 if key == "stable_rank" and d > GRAM_MAX_WIDTH else 1e-10
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
