"""Fully connected network with BatchNorm, the MLP of seed 000 §5 (width 128, ReLU, BN on intermediate layers).

Hidden block l is ``Linear -> BatchNorm -> activation``; its output is the feature tap ``fc{l}``. The last
``Linear`` is the classifier, whose weight is the C x d matrix of NC3.
"""

from __future__ import annotations

import torch
from torch import nn

from trainables.config import MLPConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    def __init__(self, *, in_features: int, num_classes: int, cfg: MLPConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        width_in = in_features
        for _ in range(cfg.depth - 1):
            self.blocks.append(
                nn.Sequential(
                    nn.Linear(width_in, cfg.width),
                    nn.BatchNorm1d(cfg.width) if cfg.batchnorm else nn.Identity(),
                    _ACTIVATIONS[cfg.activation](),
                )
            )
            width_in = cfg.width
        self.classifier = nn.Linear(width_in, num_classes)
        self.tap_names = [f"fc{i}" for i in range(1, cfg.depth)]
        self.penultimate = self.tap_names[-1]

    def forward_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and every named feature tap, in depth order."""
        h = x.flatten(1)
        taps = {}
        for name, block in zip(self.tap_names, self.blocks):
            h = block(h)
            taps[name] = h
        return self.classifier(h), taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for block in self.blocks:
            h = block(h)
        return self.classifier(h)

    def weight_layers(self) -> list[nn.Linear]:
        """Weight layers in depth order; the classifier is last."""
        return [block[0] for block in self.blocks] + [self.classifier]

    def etf_candidates(self) -> list[tuple[str, nn.Linear]]:
        """Weight layers that may become ETF, from the top: the classifier, then fc{depth-1}, ..., fc1."""
        names = [f"fc{i}" for i in range(1, len(self.blocks) + 1)] + ["classifier"]
        return list(zip(names, self.weight_layers()))[::-1]

    def etf_input_taps(self) -> list[str | None]:
        """For each of :meth:`etf_candidates`, the tap it reads (None: the network input). Adaptive-ETF
        fixes a layer once the features it receives are class-separable (000 §4.1)."""
        return ([None] + self.tap_names)[::-1]

    def consumer_weights(self) -> dict[str, torch.Tensor]:
        """For each tap, the weight of the layer that reads it (NC3 alignment, 002 App. A)."""
        return {name: layer.weight for name, layer in zip(self.tap_names, self.weight_layers()[1:])}
