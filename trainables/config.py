"""The one typed configuration of a trial.

A sweep spec (``sweeper.spec``) is these same fields plus a grid; each grid point becomes one plain dict
(Ray's param space) that the trial parses back into a frozen :class:`TrialConfig`. Every model here is
strict (``extra="forbid"``) so a typo in a spec is an error naming its path, never a silently ignored key.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

METRIC_DEFINITIONS_VERSION = "1"
"""Bumped whenever a metric's definition changes, so runs logged under another definition are told apart."""


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, validate_default=True)


class MLPConfig(Frozen):
    """Fully connected network: ``depth`` weight layers (the classifier included) of ``width`` units.

    Seed 000 §5 calls its network a "5-layer" MLP of width 128: ``depth: 5, width: 128``.
    """

    depth: Annotated[int, Field(ge=2, le=64)] = 5
    width: Annotated[int, Field(ge=1, le=65536)] = 128
    batchnorm: bool = True
    activation: Literal["relu", "gelu", "tanh"] = "relu"


class ModelConfig(Frozen):
    """Per-family settings; ``TrialConfig.architecture`` picks the family that is built."""

    mlp: MLPConfig = MLPConfig()


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
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 128
    loss: Literal["ce"] = "ce"
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()


class MetricsConfig(Frozen):
    """Which neural-collapse metrics are computed, how often, on how much data."""

    every: Annotated[int, Field(ge=1)] = 1
    max_samples: Annotated[int, Field(ge=2, le=1_000_000)] = 10_000
    """Size of the fixed, class-balanced train subset the metrics use (the test split is used whole)."""
    batch_size: Annotated[int, Field(ge=1)] = 2048
    effective_depth_eps: list[Annotated[float, Field(ge=0, le=1)]] = [0.1, 0.05, 0.01]
    """Thresholds for the effective depth L0(eps); the first is the headline value (seed 000 §3)."""


class CheckpointConfig(Frozen):
    every: Annotated[int, Field(ge=1)] = 1


Device = Literal["auto", "cpu", "cuda"]


class TrialConfig(Frozen):
    """Everything one trial needs; nothing is read from the environment except the data root fallback."""

    architecture: Literal["mlp"] = "mlp"
    dataset: Literal["digits", "gaussian", "mnist1d"] = "digits"
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    metrics: MetricsConfig = MetricsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    device: Device = "auto"


TRIAL_FIELDS = tuple(TrialConfig.model_fields)
