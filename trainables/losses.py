"""Training losses: the task loss (cross-entropy or MSE) and seed 004's SVSL penalty."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def task_loss(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, kind: str) -> torch.Tensor:
    """``ce``: cross-entropy. ``mse``: ``||logits - onehot(y)||^2`` summed over classes, averaged over the
    batch (the MSE loss of seed 002 §3, after Han et al.)."""
    if kind == "ce":
        return F.cross_entropy(logits, labels)
    target = F.one_hot(labels, num_classes).to(logits.dtype)
    return ((logits - target) ** 2).sum(1).mean()


def svsl_penalty(
    taps: list[torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    alpha: float | torch.Tensor,
    tap_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The within-class variability term of SVSL (004 Def. 10), averaged over the batch.

    For sample i of class c and the taps j = gamma..k given here (k + 1 - gamma of them):
    ``eta_c * sum_j ||h^j(x_i) - mu^j_{c,B}||^2`` with ``eta_c = alpha / (C (k + 1 - gamma) |{i in B: y_i = c}|)``
    and ``mu^j_{c,B}`` the class mean of tap j over the batch B. The batch loss adds its mean over i to the
    task loss, so the total is the mean of ``L_i`` of Def. 10.

    ``tap_weights`` (0/1 per tap) selects the taps j >= gamma from a longer list instead: a trial bundle
    passes every tap and each member its own gamma. Class sums go through a one-hot matrix rather than
    ``index_add_`` so that ``torch.func.vmap`` can batch the whole term over bundle members.
    """
    onehot = F.one_hot(labels, num_classes).to(taps[0].dtype)  # B x C
    counts = onehot.sum(0)
    per_sample = torch.zeros(len(labels), dtype=taps[0].dtype, device=labels.device)
    for j, h in enumerate(taps):
        h = h.flatten(1)
        means = (onehot.T @ h) / counts.clamp(min=1)[:, None]
        term = ((h - onehot @ means) ** 2).sum(1)
        per_sample = per_sample + (term if tap_weights is None else tap_weights[j] * term)
    n_taps = len(taps) if tap_weights is None else tap_weights.sum()
    eta = alpha / (num_classes * n_taps * (onehot @ counts))
    return (eta * per_sample).mean()
