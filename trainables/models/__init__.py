"""Model registry: architecture name -> constructor. Every model is a :class:`TappedModel`: it answers the
questions the trainer, the metric pass, the ETF variants and bundles ask of it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from trainables.config import EtfAdaptive, EtfDepth, EtfTransformer, TrialConfig
from trainables.data import DatasetInfo
from trainables.etf import fix_to_etf
from trainables.models.convnet import ConvNet
from trainables.models.mlp import MLP
from trainables.models.resnet import ResNet
from trainables.models.vit import ViT


@runtime_checkable
class TappedModel(Protocol):
    """The feature API every registered model has (tests check each against it)."""

    tap_names: list[str]
    """Named feature taps, in depth order: the layers the NC metrics are measured at."""
    penultimate: str
    """The tap the classifier reads (NC2/NC3 of the last layer, 004's collapse at the classifier)."""
    classifier: nn.Linear
    """The last layer; its weight is NC3's W."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N x C)."""

    def forward_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and every tap, keyed by :attr:`tap_names` in that order."""

    def etf_candidates(self) -> list[tuple[str, nn.Linear]]:
        """The weight layers that may be fixed to simplex ETFs, from the top (``etf.depth: k`` fixes the
        first k)."""

    def etf_input_taps(self) -> list[str | None] | None:
        """Per ETF candidate, the tap it reads (None: the input); None when Adaptive-ETF cannot apply."""

    def consumer_weights(self) -> dict[str, torch.Tensor]:
        """Per tap, the weight of the layer that reads it (nc3_alignment, weight stable rank)."""


class ModelConfigError(ValueError):
    """A trial config the chosen model cannot take; the message names the field."""


def _image_shape(cfg: TrialConfig, info: DatasetInfo) -> tuple[int, int, int]:
    if len(info.input_shape) != 3:
        raise ModelConfigError(
            f"architecture: '{cfg.architecture}' needs images (channels x height x width); dataset "
            f"'{cfg.dataset}' gives vectors of shape {info.input_shape}"
        )
    return info.input_shape


def _mlp(cfg: TrialConfig, info: DatasetInfo) -> nn.Module:
    in_features = 1
    for size in info.input_shape:
        in_features *= size
    return MLP(in_features=in_features, num_classes=info.num_classes, cfg=cfg.model.mlp)


def _convnet(cfg: TrialConfig, info: DatasetInfo) -> nn.Module:
    c, h, w = _image_shape(cfg, info)
    if min(h, w) < 4:
        raise ModelConfigError(f"architecture: convnet halves the image twice; {h}x{w} is too small")
    return ConvNet(in_channels=c, num_classes=info.num_classes, cfg=cfg.model.convnet)


def _resnet(variant: str):
    def build(cfg: TrialConfig, info: DatasetInfo) -> nn.Module:
        shape = _image_shape(cfg, info)
        return ResNet(variant=variant, input_shape=shape, num_classes=info.num_classes, cfg=cfg.model.resnet)

    return build


def _vit(cfg: TrialConfig, info: DatasetInfo) -> nn.Module:
    c, h, w = _image_shape(cfg, info)
    p = cfg.model.vit.patch_size
    if h % p or w % p:
        raise ModelConfigError(f"model.vit.patch_size: {p} must divide the image size {h}x{w}")
    return ViT(input_shape=(c, h, w), num_classes=info.num_classes, cfg=cfg.model.vit)


REGISTRY = {
    "mlp": _mlp,
    "convnet": _convnet,
    "resnet18": _resnet("resnet18"),
    "resnet34": _resnet("resnet34"),
    "resnet50": _resnet("resnet50"),
    "vit": _vit,
}


def initial_etf_layers(cfg: TrialConfig, model: nn.Module) -> list[str]:
    """Names of the layers that are ETF from the start, after checking the ETF and SVSL settings against
    the model (raises :class:`ModelConfigError` naming the field)."""
    candidates = model.etf_candidates()
    etf = cfg.etf
    if isinstance(etf, EtfTransformer):
        if cfg.architecture != "vit":
            raise ModelConfigError(
                f"etf.transformer: only the vit architecture has transformer blocks, not '{cfg.architecture}'"
            )
        depth = model.transformer_etf_depth(etf.transformer)
        if depth > len(candidates):
            raise ModelConfigError(
                f"etf.transformer: '{etf.transformer}' needs {depth // 2} blocks; the model has {(len(candidates) - 1) // 2}"
            )
    elif isinstance(etf, EtfAdaptive):
        if model.etf_input_taps() is None:
            raise ModelConfigError(
                f"etf.adaptive: Adaptive-ETF needs layers that read taps (mlp, convnet, resnet*), not '{cfg.architecture}'"
            )
        depth = 0
    else:
        assert isinstance(etf, EtfDepth)
        depth = etf.depth
        if depth > len(candidates):
            raise ModelConfigError(
                f"etf.depth: {depth} exceeds the {len(candidates)} weight layer(s) of '{cfg.architecture}' that may "
                f"become ETF ({', '.join(name for name, _ in candidates)}); allowed: 0..{len(candidates)}"
            )
    if cfg.svsl.alpha > 0 and cfg.svsl.gamma > len(model.tap_names):
        raise ModelConfigError(
            f"svsl.gamma: {cfg.svsl.gamma} is beyond the model's {len(model.tap_names)} taps "
            f"({', '.join(f'{i}={t}' for i, t in enumerate(model.tap_names, start=1))})"
        )
    # Adaptive-ETF may fix any candidate during training: each must take an ETF as the others do.
    may_fix = candidates if isinstance(etf, EtfAdaptive) else candidates[:depth]
    for name, layer in may_fix:
        if min(layer.in_features, layer.out_features) < 2:
            raise ModelConfigError(
                f"etf: layer {name} is {layer.out_features} x {layer.in_features}; a simplex ETF needs both >= 2"
            )
        if layer is model.classifier and layer.in_features < layer.out_features:
            # The lifted E_K would leave C - d classes a zero weight row: no class of theirs could ever be
            # scored above another, and NC3 and the classifier's NC2 would divide by zero.
            raise ModelConfigError(
                f"etf: the classifier ({name}) reads {layer.in_features} features for {layer.out_features} "
                "classes; a simplex ETF classifier needs at least as many features as classes (its rows are "
                "the C vertices: W^T = sqrt(C/(C-1)) P (I_C - 11^T/C)); widen the layer below it or fix "
                "fewer layers"
            )
    return [name for name, _ in candidates[:depth]]


def build_model(cfg: TrialConfig, info: DatasetInfo) -> nn.Module:
    """Build the model with its initial ETF layers fixed (weights as buffers, docs/science.md)."""
    model = REGISTRY[cfg.architecture](cfg, info)
    fix_layers(model, initial_etf_layers(cfg, model))
    return model


def fix_layers(model: nn.Module, names: list[str]) -> None:
    layers = dict(model.etf_candidates())
    for name in names:
        fix_to_etf(layers[name])


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters, and the total including the fixed ETF weights (which are buffers)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fixed = sum(
        layer.weight.numel()
        for _, layer in model.etf_candidates()
        if not isinstance(layer.weight, nn.Parameter)
    )
    return {"trainable_params": trainable, "total_params": sum(p.numel() for p in model.parameters()) + fixed}
