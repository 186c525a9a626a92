"""Simplex ETF weights and fixing a layer's weight to one (docs/science.md "Simplex ETF layers").

An ETF layer fixes the **weight** only: it becomes a buffer, so it gets no gradient and no optimizer state;
bias and normalisation parameters stay trainable. This is the convention behind seed 000's parameter
counts (fixing the Fashion-MNIST MLP's classifier removes exactly 128 x 10 = 1,280 parameters).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def simplex_etf(out_features: int, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The d_out x d_in simplex ETF weight (000 §2.2, 002 §5.3).

    With K = min(d_out, d_in) and the canonical rank-K ETF ``E_K = sqrt(K/(K-1)) (I_K - 11^T/K)``:
    ``W = P E_K`` when d_out >= d_in and ``W = E_K P^T`` otherwise, P the first K columns of the identity
    on the larger side. For a classifier (C outputs, d >= C inputs) this is
    ``W^T = sqrt(C/(C-1)) P (I_C - 11^T/C)``. K = 1 has no simplex; it is rejected.
    """
    k = min(out_features, in_features)
    if k < 2:
        raise ValueError(
            f"a simplex ETF needs at least 2 rows and columns, got {out_features} x {in_features}"
        )
    e_k = math.sqrt(k / (k - 1)) * (torch.eye(k, dtype=torch.float64) - 1.0 / k)
    w = torch.zeros(out_features, in_features, dtype=torch.float64)
    w[:k, :k] = e_k
    return w.to(dtype)


def fix_to_etf(layer: nn.Linear) -> None:
    """Replace ``layer.weight`` by a simplex ETF buffer (no longer trained); a fixed layer stays as it is."""
    if not isinstance(layer.weight, nn.Parameter):
        return
    old = layer.weight
    etf = simplex_etf(layer.out_features, layer.in_features, old.dtype).to(old.device)
    del layer.weight
    layer.register_buffer("weight", etf)
