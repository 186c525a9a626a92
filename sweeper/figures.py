"""The papers' figures as pure functions of metric histories: data in, a matplotlib Figure out.

A history is ``{metric key: [(epoch, value), ...]}`` with keys as logged (``ncc_acc/train/fc3``). Layers
are taken in the order the model lists its taps (``layers`` arguments), so the x axes read bottom to top.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

History = dict[str, list[tuple[int, float]]]


def layers_of(history: History, metric: str = "ncc_acc", split: str = "train") -> list[str]:
    """Tap names present for a metric, in the order they were first logged (the model's depth order)."""
    prefix = f"{metric}/{split}/"
    return [key[len(prefix) :] for key in history if key.startswith(prefix)]


Layers = dict[str, list[str]]
"""Each variant's tap names in depth order: variants of one sweep may differ in architecture or depth."""


def common_layers(layers: Layers) -> list[str] | None:
    """The tap names every variant shares, or None where variants differ."""
    distinct = {tuple(v) for v in layers.values()}
    return list(distinct.pop()) if len(distinct) == 1 else None


def ncc_over_epochs(variants: dict[str, History], layers: Layers, split: str = "train") -> Figure:
    """NCC accuracy of every layer over epochs, one panel per variant (seed 000 Figs. 1-2, 4)."""
    n = len(variants)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    shared = common_layers(layers) is not None
    for ax, (variant, history) in zip(axes[0], variants.items()):
        own = layers[variant]
        for i, layer in enumerate(own):
            points = history.get(f"ncc_acc/{split}/{layer}", [])
            if points:
                steps, values = zip(*points)
                # Markers where there are few measurements: one metric pass is a point, not an empty panel.
                ax.plot(
                    steps,
                    values,
                    color=cmap(i / max(1, len(own) - 1)),
                    label=layer,
                    marker="o" if len(points) <= 20 else None,
                    markersize=4,
                )
        ax.set_title(variant, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if not shared:
            _legend(ax, title="layer", fontsize=7, loc="lower right")
    axes[0][0].set_ylabel(f"NCC accuracy ({split})")
    if shared:
        _legend(axes[0][-1], title="layer", fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def _legend(ax, **kwargs) -> None:
    """A legend where the panel drew something (an empty one is a matplotlib warning, not a figure)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def final(history: History, key: str) -> float | None:
    points = history.get(key)
    return points[-1][1] if points else None


def by_layer(variants: dict[str, History], layers: Layers, panels: list[tuple[str, str, str]]) -> Figure:
    """Metrics at the end of training against layer, one line per variant; ``panels`` are
    (metric, split, y label). Variants with different taps are drawn against the layer's index from the
    input, so that a deeper variant's layers are all there."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    names = common_layers(layers)
    ticks = np.arange(1, max((len(v) for v in layers.values()), default=0) + 1)
    for ax, (metric, split, label) in zip(axes[0], panels):
        for variant, history in variants.items():
            own = layers[variant]
            values = [final(history, f"{metric}/{split}/{layer}") for layer in own]
            x = np.arange(1, len(own) + 1)
            ax.plot(x, [np.nan if v is None else v for v in values], marker="o", label=variant)
        if names is not None:
            ax.set_xticks(ticks, names, rotation=45, ha="right", fontsize=8)
            ax.set_xlabel("layer")
        else:
            ax.set_xticks(ticks)
            ax.set_xlabel("layer (index from the input)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    _legend(axes[0][-1], fontsize=7)
    fig.tight_layout()
    return fig


def mismatch_by_layer(variants: dict[str, History], layers: Layers) -> Figure:
    """Train and test NCC mismatch (NC4) per layer at the end of training, e.g. vanilla vs SVSL (004 Fig. 2)."""
    return by_layer(
        variants,
        layers,
        [("ncc_mismatch", "train", "NCC mismatch (train)"), ("ncc_mismatch", "test", "NCC mismatch (test)")],
    )


def collapse_by_layer(variants: dict[str, History], layers: Layers) -> Figure:
    """NC1 ratio, NC2 (distance to a simplex ETF), NC3 alignment and NCC accuracy by layer (002 Figs. 1-4)."""
    return by_layer(
        variants,
        layers,
        [
            ("nc1_ratio", "train", "NC1: Tr(Sw)/Tr(St) (train)"),
            ("nc2_etf", "train", "NC2: distance to ETF (train)"),
            ("nc3_alignment", "train", "NC3: alignment with next W (train)"),
            ("ncc_acc", "train", "NCC accuracy (train)"),
        ],
    )


def nc1_heatmap(history: History, layers: list[str], title: str) -> Figure:
    """NC1 of every layer over epochs as a layer x epoch heatmap (log10 colour scale)."""
    epochs = sorted({step for layer in layers for step, _ in history.get(f"nc1/train/{layer}", [])})
    grid = np.full((len(layers), len(epochs)), np.nan)
    column = {e: j for j, e in enumerate(epochs)}
    for i, layer in enumerate(layers):
        for step, value in history.get(f"nc1/train/{layer}", []):
            grid[i, column[step]] = np.log10(max(value, 1e-12))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.12 * len(epochs) + 3), 0.4 * len(layers) + 1.8))
    extent = (epochs[0] - 0.5, epochs[-1] + 0.5, len(layers) + 0.5, 0.5) if epochs else None
    image = ax.imshow(grid, aspect="auto", cmap="magma", extent=extent, interpolation="nearest")
    ax.set_yticks(range(1, len(layers) + 1), layers, fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="log10 NC1 (train)")
    fig.tight_layout()
    return fig


def save(fig: Figure, path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)
