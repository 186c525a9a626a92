"""Model registry: architecture name -> constructor. Every model answers the same questions (STYLE.md):
``forward_taps`` (logits and named feature taps), ``tap_names``, ``classifier`` (its weight is NC3's W),
``weight_layers`` and ``consumer_weights``."""

from __future__ import annotations

from torch import nn

from trainables.config import TrialConfig
from trainables.data import DatasetInfo
from trainables.models.mlp import MLP


def _mlp(cfg: TrialConfig, info: DatasetInfo) -> nn.Module:
    in_features = 1
    for size in info.input_shape:
        in_features *= size
    return MLP(in_features=in_features, num_classes=info.num_classes, cfg=cfg.model.mlp)


REGISTRY = {"mlp": _mlp}


def build_model(cfg: TrialConfig, info: DatasetInfo) -> nn.Module:
    return REGISTRY[cfg.architecture](cfg, info)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
    }
