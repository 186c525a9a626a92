"""The one typed configuration of a trial.

A sweep spec (``sweeper.spec``) is these same fields plus a grid; each grid point becomes one plain dict
(Ray's param space) that the trial parses back into a frozen :class:`TrialConfig`. Every model here is
strict (``extra="forbid"``) so a typo in a spec is an error naming its path, never a silently ignored key.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PositiveInt, Tag, model_validator

METRIC_DEFINITIONS_VERSION = "2"
"""Bumped whenever a metric's definition changes, so runs logged under another definition are told apart."""


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, validate_default=True)


def _apply_preset(data: Any, presets: dict[str, dict[str, Any]], section: str) -> Any:
    """Fill a model section from its named preset; a field given explicitly must agree with the preset."""
    if not isinstance(data, dict) or data.get("preset") is None:
        return data
    name = data["preset"]
    if name not in presets:
        return data  # the Literal on ``preset`` reports the allowed names
    for key, value in presets[name].items():
        if key in data and data[key] != value:
            raise ValueError(f"{section} preset '{name}' fixes {key}={value!r}; got {data[key]!r} (drop one)")
    return {**data, **presets[name]}


MLP_PRESETS = {
    # 000 §5: "a 5-layer feedforward MLP with intermediate layers of width 128, ReLU, batch normalization".
    "seed000": {"depth": 5, "width": 128, "batchnorm": True, "activation": "relu"},
    # 002 §3: 10 hidden layers of width 1024 with BN + ReLU, plus the classifier.
    "seed002": {"depth": 11, "width": 1024, "batchnorm": True, "activation": "relu"},
}


class MLPConfig(Frozen):
    """Fully connected network: ``depth`` weight layers (the classifier included) of ``width`` units.

    Seed 000 §5 calls its network a "5-layer" MLP of width 128: ``depth: 5, width: 128`` (preset seed000).
    """

    preset: Literal["seed000", "seed002"] | None = None
    depth: Annotated[int, Field(ge=2, le=64)] = 5
    width: Annotated[int, Field(ge=2, le=65536)] = 128
    batchnorm: bool = True
    activation: Literal["relu", "gelu", "tanh"] = "relu"

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        return _apply_preset(data, MLP_PRESETS, "model.mlp")


class ConvNetConfig(Frozen):
    """Seed 002's ConvNet: two 2x2 stride-2 convolutions, then ``depth`` 3x3 convolutions of ``channels``
    channels, each with BN + ReLU, global average pooling and a linear classifier."""

    channels: Annotated[int, Field(ge=2, le=4096)] = 128
    depth: Annotated[int, Field(ge=1, le=64)] = 20


class ResNetConfig(Frozen):
    """torchvision's ResNets. ``stem``: ``cifar`` (3x3 stride-1 conv, no max-pool: small images keep their
    resolution into layer1), ``imagenet`` (torchvision's 7x7 stride-2 conv + max-pool), or ``auto``:
    cifar for inputs up to 64 px, imagenet above (STL-10's 96 px)."""

    stem: Literal["auto", "cifar", "imagenet"] = "auto"


VIT_PRESETS = {
    # 000 §5: 3 blocks, 8 heads of dimension 64 (width 512), FC hidden 2048, on 28 x 28 Fashion-MNIST.
    "seed000": {"depth": 3, "heads": 8, "width": 512, "fc_width": 2048, "patch_size": 7},
}


class ViTConfig(Frozen):
    """Vision transformer on a CLS token (pre-norm blocks of attention and a two-layer FC)."""

    preset: Literal["seed000"] | None = None
    patch_size: Annotated[int, Field(ge=1, le=64)] = 7
    width: Annotated[int, Field(ge=2, le=8192)] = 512
    depth: Annotated[int, Field(ge=1, le=48)] = 3
    heads: Annotated[int, Field(ge=1, le=64)] = 8
    fc_width: Annotated[int, Field(ge=2, le=32768)] = 2048

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        return _apply_preset(data, VIT_PRESETS, "model.vit")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ViTConfig:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        return self


class ModelConfig(Frozen):
    """Per-family settings; ``TrialConfig.architecture`` picks the family that is built."""

    mlp: MLPConfig = MLPConfig()
    convnet: ConvNetConfig = ConvNetConfig()
    resnet: ResNetConfig = ResNetConfig()
    vit: ViTConfig = ViTConfig()


class GaussianConfig(Frozen):
    """Synthetic mixture: class means on a random sphere of radius ``separation``, unit isotropic noise."""

    classes: Annotated[int, Field(ge=2, le=1000)] = 10
    dim: Annotated[int, Field(ge=1, le=100_000)] = 32
    separation: Annotated[float, Field(gt=0)] = 3.0
    train_per_class: Annotated[int, Field(ge=2)] = 200
    test_per_class: Annotated[int, Field(ge=1)] = 100


class DataConfig(Frozen):
    """Where data comes from and how it is split; the split itself never depends on the trial seed."""

    root: str | None = None
    """Data root for torchvision datasets; default ``$SWEEPER_DATA``, else ``./data``."""
    download: bool = True
    """Download a torchvision dataset that is absent from the root (when the machine can)."""
    train_per_class: Annotated[int, Field(ge=1)] | None = None
    """Train on a fixed class-balanced subset of this many samples per class (None: the whole split)."""
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    split_seed: int = 0
    gaussian: GaussianConfig = GaussianConfig()


class OptimizerConfig(Frozen):
    name: Literal["sgd"] = "sgd"
    lr: Annotated[float, Field(gt=0, le=10)] = 0.01
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 5.0e-4


class ScheduleConfig(Frozen):
    """Step decay at the given epochs (seed 000 §5: x0.1 at 60, 120, 160)."""

    milestones: list[PositiveInt] = [60, 120, 160]
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1

    @model_validator(mode="after")
    def _increasing(self) -> ScheduleConfig:
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError("milestones must be strictly increasing epochs")
        return self


class TrainConfig(Frozen):
    epochs: Annotated[int, Field(ge=1, le=100_000)] = 300
    batch_size: Annotated[int, Field(ge=2, le=1_000_000)] = 128
    loss: Literal["ce", "mse"] = "ce"
    """``mse``: squared error to one-hot targets, summed over classes, mean over samples (002 §3)."""
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    compile: Literal["auto", "on", "off"] = "auto"
    """Compile the forward pass and loss with ``torch.compile`` (on CUDA in ``reduce-overhead`` mode: the
    forward and backward replay as CUDA graphs, which took one MLP's MNIST epoch from 0.9-1.3 s to 0.13 s
    on an H100). ``auto``: on CUDA only; on CPU it measured no faster than eager and costs about 20 s of
    compiling per trial (benchmarks/RESULTS.md). A step that fails to compile trains eagerly, with a
    warning. Trial bundles do not compile."""


class MetricsConfig(Frozen):
    """Which neural-collapse metrics are computed, how often, on how much data."""

    every: Annotated[int, Field(ge=1)] = 1
    max_samples: Annotated[int, Field(ge=2, le=1_000_000)] = 10_000
    """Size of the fixed, class-balanced train subset the metrics use (the test split is used whole)."""
    batch_size: Annotated[int, Field(ge=1)] = 2048
    effective_depth_eps: list[Annotated[float, Field(ge=0, le=1)]] = [0.1, 0.05, 0.01]
    """Thresholds for the effective depth L0(eps); the first is the headline value (seed 000 §3)."""
    probe: bool = False
    """Per-tap linear-probe accuracy (``probe_acc``): a closed-form ridge classifier fit on the train
    metric subset, scored on every split (:func:`trainables.metrics.probe_fit`)."""


class EtfDepth(Frozen):
    """The last ``depth`` weight layers are simplex ETFs from the start (000 §3)."""

    depth: Annotated[int, Field(ge=0, le=200)] = 0


class EtfAdaptive(Frozen):
    """Adaptive-ETF (000 §4.1): once the features a layer receives have train NCC error <= ``adaptive``,
    that layer and every layer above it become ETF and stay so."""

    adaptive: Annotated[float, Field(ge=0, lt=1)]


class EtfTransformer(Frozen):
    """ETF-Transformer (000 §4.2): the head, then the FC layers of the last 1, 2 or all blocks are ETF."""

    transformer: Literal["head", "last_block", "last_2_blocks", "all"]


def _etf_kind(value: Any) -> str:
    keys = set(value) if isinstance(value, dict) else set(type(value).model_fields)
    return "adaptive" if "adaptive" in keys else "transformer" if "transformer" in keys else "depth"


EtfConfig = Annotated[
    Annotated[EtfDepth, Tag("depth")]
    | Annotated[EtfAdaptive, Tag("adaptive")]
    | Annotated[EtfTransformer, Tag("transformer")],
    Discriminator(_etf_kind),
]


class SVSLConfig(Frozen):
    """Seed 004's SVSL loss (Def. 10): ``alpha`` weighs within-class variability of taps gamma..k (1-based
    tap indices of the model); ``alpha: 0`` is the vanilla loss."""

    alpha: Annotated[float, Field(ge=0, le=1e3)] = 0.0
    gamma: Annotated[int, Field(ge=1, le=1000)] = 1


class CheckpointConfig(Frozen):
    every: Annotated[int, Field(ge=1)] = 1


Device = Literal["auto", "cpu", "cuda"]


class TrialConfig(Frozen):
    """Everything one trial needs; nothing is read from the environment except the data root fallback."""

    architecture: Literal["mlp", "convnet", "resnet18", "resnet34", "resnet50", "vit"] = "mlp"
    dataset: Literal[
        "digits", "gaussian", "mnist1d", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "stl10"
    ] = "digits"
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    etf: EtfConfig = EtfDepth()
    svsl: SVSLConfig = SVSLConfig()
    metrics: MetricsConfig = MetricsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    device: Device = "auto"


TRIAL_FIELDS = tuple(TrialConfig.model_fields)


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set ``data["a"]["b"]["c"] = value`` for ``path = "a.b.c"``, creating (or replacing non-mapping)
    sections on the way: how ``--set``, grids and searched values address trial-config fields."""
    *parents, leaf = path.split(".")
    for key in parents:
        child = data.get(key)
        if not isinstance(child, dict):
            child = data[key] = {}
        data = child
    data[leaf] = value


def get_path(data: Any, path: str) -> Any:
    """``data["a"]["b"]["c"]`` for ``path = "a.b.c"``, or None where the path ends early."""
    for part in path.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def has_path(data: Any, path: str) -> bool:
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def flatten_paths(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": value}`` for every leaf (a non-mapping value)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten_paths(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_paths(old: Any, new: Any, prefix: str = "") -> set[str]:
    """Dotted paths whose values differ between two nested mappings (a path on one side only counts)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: set[str] = set()
        for key in set(old) | set(new):
            out |= changed_paths(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return set() if old == new else {prefix.rstrip(".")}
