"""Your own figures from a sweep: a starting point to copy into a notebook.

Loads one sweep (or two, to compare them) with ``sweeper.load_histories`` and ``load_trials``, prints each
variant's final test accuracy, and draws NC1 (Papyan et al. 2020) and NCC accuracy (Ben-Shaul & Dekel 2022)
by layer at the last measured epoch, one line per variant, the band spanning its seeds; with two sweeps a
second figure sets them side by side, one panel per sweep on shared axes.

Run: ``python docs/analysis.py SWEEP [OTHER_SWEEP] [--storage sweeps] [--out analysis]``
(e.g. ``python docs/analysis.py quickstart`` after the README's quickstart).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, not windows: runs the same on a server and in CI
import matplotlib.pyplot as plt
import pandas as pd

from sweeper import load_histories, load_trials

METRICS = {"nc1": "NC1 (train)", "ncc_acc": "NCC accuracy (train)"}


def layer_order(layers) -> list[str]:
    """Taps from the input up: fc2 before fc10, layer1 before layer2."""
    return sorted(layers, key=lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)])


def at_last_epoch(histories: pd.DataFrame) -> pd.DataFrame:
    """Each trial's value per metric and layer at its last measured epoch (metrics may be measured every
    few epochs, so the last is taken per metric)."""
    last = histories.groupby(["run_id", "key"], observed=True)["epoch"].transform("max")
    return histories[histories["epoch"] == last]


def band_by_layer(ax, final: pd.DataFrame, metric: str, label_prefix: str = "") -> None:
    """One line per variant (mean over its seeds), shaded from the lowest to the highest seed."""
    rows = final[final["metric"] == metric]
    layers = layer_order(rows["layer"].dropna().unique())
    for variant, group in rows.groupby("variant", observed=True):
        stats = group.groupby("layer", observed=True)["value"].agg(["mean", "min", "max"]).reindex(layers)
        x = range(len(layers))
        (line,) = ax.plot(x, stats["mean"], marker="o", label=f"{label_prefix}{variant}")
        ax.fill_between(x, stats["min"], stats["max"], color=line.get_color(), alpha=0.2)
    ax.set_xticks(range(len(layers)), layers)
    ax.set_xlabel("layer")
    ax.set_ylabel(METRICS[metric])
    if metric == "nc1":
        ax.set_yscale("log")  # NC1 falls by orders of magnitude as a layer collapses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", help="one sweep, or two to compare (names under --storage)")
    parser.add_argument("--storage", default="sweeps")
    parser.add_argument("--out", default="analysis", help="folder for the figures")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    trials = load_trials(args.sweeps, args.storage)
    summary = trials.groupby(["sweep", "variant"], observed=True)["test_acc_at_end"].agg(
        ["count", "mean", "std"]
    )
    print(summary.rename(columns={"count": "seeds", "mean": "test acc at end", "std": "std"}).to_string())

    histories = load_histories(args.sweeps, args.storage, metrics=list(METRICS), splits="train")
    final = at_last_epoch(histories)

    names = list(dict.fromkeys(trials["sweep"]))  # as sweep.json names them, whatever path was given
    first = final[final["sweep"] == names[0]]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4), squeeze=False)
    for ax, metric in zip(axes[0], METRICS, strict=True):
        band_by_layer(ax, first, metric)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{names[0]}: by layer at the last measured epoch (band: min-max over seeds)")
    fig.tight_layout()
    fig.savefig(out / "by_layer.png", dpi=120)
    print(f"wrote {out / 'by_layer.png'}")

    if len(names) > 1:
        fig, axes = plt.subplots(
            len(METRICS), len(names), figsize=(5 * len(names), 8), squeeze=False, sharey="row"
        )
        for column, name in enumerate(names):
            for row, metric in enumerate(METRICS):
                band_by_layer(axes[row][column], final[final["sweep"] == name], metric)
                axes[row][column].set_title(name)
        axes[0][0].legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / "compare.png", dpi=120)
        print(f"wrote {out / 'compare.png'}")


if __name__ == "__main__":
    main()
