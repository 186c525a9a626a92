"""The per-epoch measurement of a model: accuracy and loss on both splits, and every NC metric of every tap.

Two streaming passes (SCIENCE.md "Computing them at scale") over the fixed metric subset of the train
split and the whole test split, all taps at once, under ``torch.no_grad()`` in eval mode. Pass 1 also
gives the accuracies and losses, so an epoch without NC metrics costs one forward pass per split.

Metric keys group in the MLflow UI by metric, then split, with the layer last: ``ncc_acc/train/fc3``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from trainables.losses import task_loss
from trainables.metrics import DegenerateFeaturesError, TapAccumulator, weight_svd

CACHE_BYTES = 256 << 20
"""Taps of one split up to this size are kept from pass 1 for pass 2 instead of running the model again
(the seed 000 MLP's 4 taps of 10,000 samples take 20 MiB); wider ones are recomputed batch by batch."""


def metric_key(metric: str, split: str, tap: str) -> str:
    return f"{metric}/{split}/{tap}"


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    for lo in range(0, len(x), batch_size):
        yield x[lo : lo + batch_size], y[lo : lo + batch_size]


def _forward_again(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int):
    for xb, yb in _batches(x, y, batch_size):
        logits, taps = model.forward_taps(xb)
        yield taps, yb, logits.argmax(1)


@torch.no_grad()
def measure(
    model: nn.Module,
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    *,
    batch_size: int,
    collapse: bool,
    loss: str = "ce",
) -> dict[str, float]:
    """Measure ``model`` on ``splits`` (``{"train": (x, y), "test": (x, y)}``, train first).

    Returns ``{split}_acc`` and ``{split}_loss`` (the task loss, ``ce`` or ``mse``) for every split and, when ``collapse``, every metric of
    :func:`trainables.metrics.layer_metrics` for every tap and split, with NCC decisions on every split
    made against the train class means (004 Def. 6). A tap whose features are degenerate at this epoch
    (e.g. a dead layer of constant features) is left out for this epoch with a warning on stderr.
    """
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    accumulators: dict[str, dict[str, TapAccumulator]] = {}
    cached: dict[str, list | None] = {}
    for split, (x, y) in splits.items():
        loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
        correct = torch.zeros((), dtype=torch.float64, device=x.device)
        taps_acc: dict[str, TapAccumulator] = {}
        kept: list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]] | None = (
            [] if collapse else None
        )
        for xb, yb in _batches(x, y, batch_size):
            logits, taps = model.forward_taps(xb) if collapse else (model(xb), {})
            loss_sum += task_loss(logits.float(), yb, num_classes, loss).double() * len(yb)
            predictions = logits.argmax(1)
            correct += (predictions == yb).sum()
            for name, h in taps.items():
                if name not in taps_acc:
                    taps_acc[name] = TapAccumulator(num_classes, h[0].numel(), h.device)
                taps_acc[name].add_pass1(h, yb)
            if kept is not None:
                per_sample = sum(h[0].numel() * h.element_size() for h in taps.values())
                if per_sample * len(x) <= CACHE_BYTES:
                    kept.append((taps, yb, predictions))
                else:
                    kept = None
        cached[split] = kept
        out[f"{split}_loss"] = float(loss_sum / len(x))
        out[f"{split}_acc"] = float(correct / len(x))
        accumulators[split] = taps_acc
    if not collapse:
        model.train(was_training)
        return out

    train_means: dict[str, torch.Tensor] = {}
    live: dict[str, dict[str, TapAccumulator]] = {}
    for split, taps_acc in accumulators.items():
        live[split] = {}
        for name, acc in taps_acc.items():
            if split != "train" and name not in train_means:
                continue
            try:
                means = acc.end_pass1(None if split == "train" else train_means[name])
            except DegenerateFeaturesError as err:
                print(f"warning: {split}/{name}: no NC metrics this epoch: {err}", file=sys.stderr)
                continue
            if split == "train":
                train_means[name] = means
            live[split][name] = acc

    for split, (x, y) in splits.items():
        if not live[split]:
            continue
        batches = cached[split]
        if batches is None:  # too wide to keep: run the model again
            batches = _forward_again(model, x, y, batch_size)
        for taps, yb, predictions in batches:
            for name, acc in live[split].items():
                acc.add_pass2(taps[name], yb, predictions)

    consumers = model.consumer_weights()
    # One SVD per consumer weight serves NC3 alignment and the weight's stable rank on every split.
    svds = {name: weight_svd(w) for name, w in consumers.items() if any(name in t for t in live.values())}
    classifier = model.classifier.weight
    last_tap = model.penultimate
    for split, taps_acc in live.items():
        for name, acc in taps_acc.items():
            values = acc.result(
                classifier=classifier if name == last_tap else None,
                next_weight=consumers.get(name),
                next_weight_svd=svds.get(name),
            )
            for metric, value in values.items():
                out[metric_key(metric, split, name)] = value
    model.train(was_training)
    return out
