"""The report's figures over a sweep whose variants differ in architecture and depth (seed 002 pairs an
MLP, a ConvNet and ResNets in one sweep): every variant's every layer is drawn, none borrowed from the
first variant's tap names."""

from __future__ import annotations

import warnings

import numpy as np

from sweeper import figures
from sweeper.report import TrialRecord, write_figures

TAPS = {"mlp": ["fc1", "fc2", "fc3"], "convnet": ["conv1", "conv2", "conv3", "conv4", "fc"]}


def _record(cell: str, taps: list[str], seed: int) -> TrialRecord:
    history = {}
    for depth, tap in enumerate(taps, 1):
        for metric in ("ncc_acc", "nc1", "nc1_ratio", "nc2_etf", "nc3_alignment", "ncc_mismatch"):
            for split in ("train", "test"):
                history[f"{metric}/{split}/{tap}"] = [(e, depth / 10 + e / 100 + seed) for e in (1, 2, 3)]
    return TrialRecord(f"id-{cell}-{seed}", f"{cell} seed={seed}", cell, taps, history, {})


def _lines(ax) -> list[np.ndarray]:
    return [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]


def test_every_variant_draws_its_own_layers():
    variants = {cell: _record(cell, taps, 0).history for cell, taps in TAPS.items()}
    fig = figures.ncc_over_epochs(variants, TAPS)
    for ax, (cell, taps) in zip(fig.axes, TAPS.items()):
        lines = _lines(ax)
        assert len(lines) == len(taps), cell  # one curve per layer of this variant
        assert [line[-1] for line in lines] == [variants[cell][f"ncc_acc/train/{t}"][-1][1] for t in taps]
    fig = figures.collapse_by_layer(variants, TAPS)
    for ax in fig.axes[:4]:
        mlp, convnet = _lines(ax)
        assert len(mlp) == 3 and len(convnet) == 5 and not np.isnan(np.r_[mlp, convnet]).any()
    assert fig.axes[0].get_xlabel() == "layer (index from the input)"


def test_shared_taps_keep_their_names_and_the_report_warns_of_nothing(tmp_path):
    same = {"a": TAPS["mlp"], "b": TAPS["mlp"]}
    fig = figures.mismatch_by_layer({c: _record(c, t, 0).history for c, t in same.items()}, same)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == TAPS["mlp"]
    records = [_record(cell, taps, seed) for cell, taps in TAPS.items() for seed in (0, 1)]
    records.append(TrialRecord("failed", "convnet seed=2", "convnet", [], {}, {}))  # failed before a tap
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty legend or panel would warn
        paths = write_figures(records, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)
