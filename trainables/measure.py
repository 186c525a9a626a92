"""The per-epoch measurement of a model: accuracy and loss on both splits, and every NC metric of every tap.

Two streaming passes (docs/science.md "Computing them at scale") over the fixed metric subset of the train
split and the whole test split, all taps at once, under ``torch.no_grad()`` in eval mode. Pass 1 also
gives the accuracies and losses, so an epoch without NC metrics costs one forward pass per split.

A trial bundle measures its members together (:func:`measure_stack`): one forward pass of the stacked
models per batch and every statistic batched over members, so the pass costs a bundle the launches and
host syncs of one model rather than one pass per member (small models are launch-bound).

Metric keys group in the MLflow UI by metric, then split, with the layer last: ``ncc_acc/train/fc3``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from trainables.losses import task_loss
from trainables.metrics import DegenerateFeaturesError, TapAccumulator, weight_svd

CACHE_BYTES = 256 << 20
"""Taps of one split up to this size per model are kept from pass 1 for pass 2 instead of running the
model again (the seed 000 MLP's 4 taps of 10,000 samples take 20 MiB); wider ones are recomputed batch by
batch."""

Forward = Callable[[torch.Tensor, bool], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class ModelStack:
    """What the metric pass needs of ``members`` models of one architecture, each tensor with a leading
    member axis: ``forward(x, taps)`` gives logits (members x B x C) and, when ``taps``, every tap
    (members x B x ...); the classifier weights and, per tap, the weights of the layer that reads it."""

    forward: Forward
    members: int
    classifier: torch.Tensor
    consumers: dict[str, torch.Tensor]
    penultimate: str

    @classmethod
    def of(cls, model: nn.Module) -> ModelStack:
        """One model as a stack of one."""

        def forward(x: torch.Tensor, taps: bool):
            if not taps:
                return model(x)[None], {}
            logits, out = model.forward_taps(x)
            return logits[None], {k: v[None] for k, v in out.items()}

        return cls(
            forward=forward,
            members=1,
            classifier=model.classifier.weight[None],
            consumers={k: w[None] for k, w in model.consumer_weights().items()},
            penultimate=model.penultimate,
        )


def metric_key(metric: str, split: str, tap: str) -> str:
    return f"{metric}/{split}/{tap}"


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    for lo in range(0, len(x), batch_size):
        yield x[lo : lo + batch_size], y[lo : lo + batch_size]


def _forward_again(stack: ModelStack, x: torch.Tensor, y: torch.Tensor, batch_size: int):
    for xb, yb in _batches(x, y, batch_size):
        logits, taps = stack.forward(xb, True)
        yield taps, yb, logits.argmax(-1)


@torch.no_grad()
def measure(
    model: nn.Module,
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    *,
    batch_size: int,
    collapse: bool,
    loss: str = "ce",
    probe: bool = False,
) -> dict[str, float]:
    """Measure ``model`` on ``splits`` (``{"train": (x, y), "test": (x, y)}``, train first).

    Returns ``{split}_acc`` and ``{split}_loss`` (the task loss, ``ce`` or ``mse``) for every split and,
    when ``collapse``, every metric of :func:`trainables.metrics.layer_metrics` for every tap and split,
    with NCC decisions on every split made against the train class means (004 Def. 6). A tap whose
    features are degenerate at this epoch (e.g. a dead layer of constant features) is left out for this
    epoch with a warning on stderr. ``probe``: adds each tap's linear-probe accuracy ``probe_acc``, fit on
    the train split and scored on every split.
    """
    was_training = model.training
    model.eval()
    try:
        stack = ModelStack.of(model)
        return measure_stack(
            stack, splits, num_classes, batch_size=batch_size, collapse=collapse, loss=loss, probe=probe
        )[0]
    finally:
        model.train(was_training)


@torch.no_grad()
def measure_stack(
    stack: ModelStack,
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    *,
    batch_size: int,
    collapse: bool,
    loss: str = "ce",
    labels: list[str] | None = None,
    probe: bool = False,
) -> list[dict[str, float]]:
    """:func:`measure` for every model of ``stack`` at once (already in eval mode): one dict per member,
    each what that model measured alone gives. ``labels`` name the members in warnings."""
    out: list[dict[str, float]] = [{} for _ in range(stack.members)]
    passes = {
        split: _pass1(stack, x, y, num_classes, batch_size, collapse, loss, probe, split, out)
        for split, (x, y) in splits.items()
    }
    if not collapse:
        return out
    live, dropped = _end_pass1(passes, stack.members, labels, probe)
    for split, (x, y) in splits.items():
        batches = passes[split].kept
        if live[split]:
            for taps, yb, predictions in (
                batches if batches is not None else _forward_again(stack, x, y, batch_size)
            ):
                for name, acc in live[split].items():
                    acc.add_pass2(taps[name], yb, predictions)
    _results(stack, live, dropped, out)
    return out


@dataclass
class _Pass1:
    """One split after pass 1: its tap accumulators, and its batches when they fit the cache."""

    accumulators: dict[str, TapAccumulator]
    kept: list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]] | None


def _pass1(
    stack: ModelStack,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    batch_size: int,
    collapse: bool,
    loss: str,
    probe: bool,
    split: str,
    out: list[dict[str, float]],
) -> _Pass1:
    """Accuracy and loss of every member on one split (into ``out``), and with ``collapse`` pass 1 of
    every tap; taps that fit :data:`CACHE_BYTES` are kept for pass 2, which then need not run the models
    again."""
    m = stack.members
    loss_sum = torch.zeros(m, dtype=torch.float64, device=x.device)
    correct = torch.zeros(m, dtype=torch.float64, device=x.device)
    accumulators: dict[str, TapAccumulator] = {}
    kept: list | None = [] if collapse else None
    for xb, yb in _batches(x, y, batch_size):
        logits, taps = stack.forward(xb, collapse)
        per_member = torch.vmap(lambda z, yb=yb: task_loss(z, yb, num_classes, loss))(logits.float())
        loss_sum += per_member.double() * len(yb)
        predictions = logits.argmax(-1)
        correct += (predictions == yb).sum(-1)
        if (
            kept is not None
            and sum(h[0, 0].numel() * h.element_size() for h in taps.values()) * len(x) <= CACHE_BYTES
        ):
            kept.append((taps, yb, predictions))
        else:
            kept = None
        for name, h in taps.items():
            if name not in accumulators:
                role = ("fit" if split == "train" else "score") if probe else None
                accumulators[name] = TapAccumulator(
                    num_classes, h[0, 0].numel(), h.device, members=m, probe=role
                )
            accumulators[name].add_pass1(h, yb)
    for i, (loss_i, correct_i) in enumerate(
        zip((loss_sum / len(x)).tolist(), (correct / len(x)).tolist(), strict=True)
    ):
        out[i][f"{split}_loss"] = loss_i
        out[i][f"{split}_acc"] = correct_i
    return _Pass1(accumulators, kept)


def _end_pass1(
    passes: dict[str, _Pass1], m: int, labels: list[str] | None, probe: bool
) -> tuple[dict[str, dict[str, TapAccumulator]], dict[str, set[int]]]:
    """Fix every split's class means (the train split first: NCC on every split uses its means, and the
    probe its fit); return the accumulators still live per split, and per tap the members without train
    statistics this epoch (each degenerate case warned about once)."""

    def warn(i: int | None, where: str, reason: object) -> None:
        """``i``: the member, or None for all of them; a lone model's warning names no member."""
        if m == 1:
            who = ""
        elif i is None:
            who = "all members: "
        else:
            who = f"{labels[i] if labels else f'member {i}'}: "
        print(f"warning: {who}{where}: no NC metrics this epoch: {reason}", file=sys.stderr)

    train_means: dict[str, torch.Tensor] = {}
    train_probes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    dropped: dict[str, set[int]] = {}
    live: dict[str, dict[str, TapAccumulator]] = {}
    for split, done in passes.items():
        live[split] = {}
        for name, acc in done.accumulators.items():
            if split != "train" and name not in train_means:
                continue
            try:
                if split == "train":
                    means = acc.end_pass1()
                else:
                    means = acc.end_pass1(train_means[name], probe=train_probes.get(name))
            except DegenerateFeaturesError as err:
                warn(None, f"{split}/{name}", err)
                continue
            for i, reason in acc.degenerate.items():
                if i not in dropped.get(name, ()):
                    warn(i, f"{split}/{name}", reason)
            if split == "train":
                train_means[name] = means
                dropped[name] = set(acc.degenerate)
                if probe:
                    train_probes[name] = acc.probe_weights
            if len(dropped[name] | set(acc.degenerate)) < m:
                live[split][name] = acc
    return live, dropped


def _results(
    stack: ModelStack,
    live: dict[str, dict[str, TapAccumulator]],
    dropped: dict[str, set[int]],
    out: list[dict[str, float]],
) -> None:
    """Every live tap's metrics into ``out``, per member; one SVD per consumer weight serves NC3
    alignment and the weight's stable rank on every split."""
    svds = {
        name: weight_svd(w, members=True)
        for name, w in stack.consumers.items()
        if any(name in t for t in live.values())
    }
    for split, taps_acc in live.items():
        for name, acc in taps_acc.items():
            values = acc.result(
                classifier=stack.classifier if name == stack.penultimate else None,
                next_weight=stack.consumers.get(name),
                next_weight_svd=svds.get(name),
            )
            for i, member_values in enumerate(values):
                if member_values is None or i in dropped[name]:
                    continue
                out[i].update({metric_key(k, split, name): v for k, v in member_values.items()})
