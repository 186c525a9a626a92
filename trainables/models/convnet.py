"""Seed 002's ConvNet (§3): two 2x2 stride-2 convolutions, then a stack of 3x3 convolutions, each with
BatchNorm and ReLU, then global average pooling and a linear classifier.

Taps: ``down1``, ``down2``, ``conv1..conv{depth}`` (C x H x W maps) and ``pool`` (the pooled features the
classifier reads).
"""

from __future__ import annotations

import torch
from torch import nn

from trainables.config import ConvNetConfig


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class ConvNet(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, cfg: ConvNetConfig) -> None:
        super().__init__()
        c = cfg.channels
        layers = [_conv_bn_relu(in_channels, c, 2, 2, 0), _conv_bn_relu(c, c, 2, 2, 0)]
        layers += [_conv_bn_relu(c, c, 3, 1, 1) for _ in range(cfg.depth)]
        self.layers = nn.ModuleList(layers)
        self.classifier = nn.Linear(c, num_classes)
        self.tap_names = ["down1", "down2"] + [f"conv{i}" for i in range(1, cfg.depth + 1)] + ["pool"]
        self.penultimate = "pool"

    def forward_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        taps = {}
        for name, layer in zip(self.tap_names, self.layers):
            x = layer(x)
            taps[name] = x
        pooled = x.mean((2, 3))
        taps["pool"] = pooled
        return self.classifier(pooled), taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x.mean((2, 3)))

    def etf_candidates(self) -> list[tuple[str, nn.Linear]]:
        return [("classifier", self.classifier)]

    def etf_input_taps(self) -> list[str | None]:
        return ["pool"]

    def consumer_weights(self) -> dict[str, torch.Tensor]:
        return {"pool": self.classifier.weight}
