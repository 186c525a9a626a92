"""torchvision's ResNet-18/34/50, adapted to 28-96 px inputs with 1 or 3 channels (seeds 002 and 004).

Stem (``model.resnet.stem``): ``cifar`` replaces torchvision's 7x7 stride-2 convolution and max-pool by
a 3x3 stride-1 convolution, so a 28-32 px image reaches ``layer1`` at full resolution instead of 8 px;
``imagenet`` keeps torchvision's stem (sensible for STL-10's 96 px); ``auto`` picks cifar up to 64 px.
The first convolution takes the dataset's channel count. Taps as in seed 004: ``layer1..layer4``,
``avgpool`` (the penultimate features) and ``fc`` (the logits).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from trainables.config import ResNetConfig


class ResNet(nn.Module):
    def __init__(
        self, *, variant: str, input_shape: tuple[int, ...], num_classes: int, cfg: ResNetConfig
    ) -> None:
        super().__init__()
        channels, height = input_shape[0], input_shape[1]
        self.net = getattr(torchvision.models, variant)(weights=None, num_classes=num_classes)
        stem = cfg.stem if cfg.stem != "auto" else ("cifar" if height <= 64 else "imagenet")
        if stem == "cifar":
            self.net.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
            self.net.maxpool = nn.Identity()
        else:
            self.net.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
        self.tap_names = ["layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
        self.penultimate = "avgpool"

    @property
    def classifier(self) -> nn.Linear:
        return self.net.fc

    def forward_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        taps = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(n, name)(x)
            taps[name] = x
        pooled = torch.flatten(n.avgpool(x), 1)
        taps["avgpool"] = pooled
        logits = n.fc(pooled)
        taps["fc"] = logits
        return logits, taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def etf_candidates(self) -> list[tuple[str, nn.Linear]]:
        return [("fc", self.net.fc)]

    def etf_input_taps(self) -> list[str | None]:
        return ["avgpool"]

    def consumer_weights(self) -> dict[str, torch.Tensor]:
        return {"avgpool": self.net.fc.weight}
