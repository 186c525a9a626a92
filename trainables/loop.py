"""The training loop of one trial: no Ray, no MLflow; it talks to the outside through a :class:`Reporter`.

Data lives as tensors on the trial's device and is shuffled by an index permutation drawn from a seeded
generator, so the only per-step Python is the step itself (small models run at their kernels' speed only
without per-sample Python). Everything needed to continue a run exactly is in :meth:`Trainer.state_dict`
(model, optimizer, scheduler, RNG states, epoch, the running summary), plain tensors and containers so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch

from trainables.config import (
    METRIC_DEFINITIONS_VERSION,
    EtfAdaptive,
    TrialConfig,
    changed_paths,
    get_path,
    has_path,
)
from trainables.data import Splits, balanced_subset, dataset_info, load_splits
from trainables.etf import fix_to_etf
from trainables.losses import svsl_penalty, task_loss
from trainables.measure import measure, metric_key
from trainables.metrics import effective_depth
from trainables.models import build_model, fix_layers, parameter_counts

COMPILE_BACKEND = "inductor"
"""torch.compile's backend for ``train.compile``; tests use ``aot_eager`` (the same graph capture and
autograd, without generating code)."""

INTERPOLATION_ACC = 0.995
"""Train accuracy that marks the interpolation threshold and the start of the terminal phase (004 §5.3)."""


class Reporter(Protocol):
    def report(self, epoch: int, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        """Called once per epoch; ``state`` is the checkpoint payload on checkpoint epochs, else None."""


class TrialDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


def batch_starts(n: int, batch: int) -> range | list[int]:
    """Where each mini-batch of an epoch over ``n`` samples starts. A last batch of one sample is
    dropped unless it is the only one: BatchNorm cannot normalise a batch of one (Trainer and Bundle)."""
    starts = range(0, n, batch)
    return starts[:-1] if len(starts) > 1 and n - starts[-1] < 2 else starts


def diverged(loss: float, epoch: int) -> TrialDiverged | None:
    """The error that ends a trial whose epoch ``epoch`` had a non-finite mean training loss, else None."""
    return None if math.isfinite(loss) else TrialDiverged(f"training loss is {loss} at epoch {epoch}")


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device(requested)


class Trainer:
    def __init__(self, cfg: TrialConfig, data: Splits | None = None) -> None:
        """``data``: the trial's splits already on its device (a bundle shares one copy among members)."""
        self.cfg = cfg
        # Asked once per epoch: True checkpoints the epoch just trained (a sweep being stopped).
        self.stop_requested: Callable[[], bool] = lambda: False
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.data = data if data is not None else load_splits(cfg).to(self.device)
        self.model = build_model(cfg, dataset_info(cfg)).to(self.device)
        # Layer name -> epoch it became ETF (0: from the start).
        self.etf_fixed = {name: 0 for name, layer in self.model.etf_candidates() if not _trainable(layer)}
        self._build_optimizer()
        self.compiled_loss = self._compile()
        self.shuffle = torch.Generator(device=self.device).manual_seed(cfg.seed)
        subset = balanced_subset(
            self.data.y_train, self.data.num_classes, cfg.metrics.max_samples, cfg.data.split_seed
        )
        self.splits = {
            "train": (self.data.x_train[subset], self.data.y_train[subset]),
            "test": (self.data.x_test, self.data.y_test),
        }
        self.params = parameter_counts(self.model)
        self.epoch = 0
        self.interpolation_epoch = 0  # 0: not reached yet
        self.best_epoch = 0
        self.best_metrics: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}

    def _build_optimizer(self) -> None:
        opt = self.cfg.train.optimizer
        self.optimizer = torch.optim.SGD(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=opt.lr,
            momentum=opt.momentum,
            weight_decay=opt.weight_decay,
            # One kernel for the whole update: measured 0.78 -> 0.55 s per 20k-sample epoch of seed 000's
            # MLP on 2 CPU cores (benchmarks/RESULTS.md); CUDA has it too.
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer,
            milestones=list(self.cfg.train.schedule.milestones),
            gamma=self.cfg.train.schedule.gamma,
        )

    def _compile(self):
        """The compiled forward + loss, or None (``train.compile``). Static shapes: an epoch has at most
        two batch sizes, and each gets its own graph (a CUDA graph needs fixed shapes anyway)."""
        mode = self.cfg.train.compile
        if mode == "off" or (mode == "auto" and self.device.type != "cuda"):
            return None
        # reduce-overhead: replay forward and backward as CUDA graphs, the launch-bound small models' lever.
        graphs = self.device.type == "cuda" and COMPILE_BACKEND == "inductor"
        return torch.compile(
            self._loss, backend=COMPILE_BACKEND, mode="reduce-overhead" if graphs else None, dynamic=False
        )

    def _gradients(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss and gradients of one mini-batch: compiled where it compiles, else eager."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.compiled_loss is not None:
            try:
                if self.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are spent
                loss = self.compiled_loss(x, y)
                loss.backward()
                return loss
            except Exception as err:  # a model or torch version the compiler cannot handle
                print(
                    f"warning: compiled training step failed, training eagerly from here: "
                    f"{type(err).__name__}: {str(err)[:500]}",
                    file=sys.stderr,
                )
                self.compiled_loss = None
                self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(x, y)
        loss.backward()
        return loss

    def _fix_now(self, name: str, layer: torch.nn.Linear) -> None:
        """Adaptive-ETF: fix a layer mid-training and drop its weight from the optimizer and its state."""
        old = layer.weight
        fix_to_etf(layer)
        for group in self.optimizer.param_groups:
            group["params"] = [p for p in group["params"] if p is not old]
        self.optimizer.state.pop(old, None)
        self.etf_fixed[name] = self.epoch

    def adapt_etf(self, metrics: dict[str, float]) -> None:
        """000 §4.1: once the features a layer receives have train NCC error <= eps, that layer and every
        layer above it become ETF. Candidates are ordered from the top, so the first separable input
        fixes itself and everything before it in the list."""
        eps = self.cfg.etf.adaptive
        candidates = self.model.etf_candidates()
        inputs = self.model.etf_input_taps()
        lowest = None
        for i, tap in enumerate(inputs):
            key = metric_key("ncc_acc", "train", tap) if tap else None
            if key is not None and key in metrics and 1.0 - metrics[key] <= eps + 1e-12:
                lowest = i  # keep going down: a lower separable input fixes more layers
        if lowest is None:
            return
        for name, layer in candidates[: lowest + 1]:
            if _trainable(layer):
                self._fix_now(name, layer)
        self.params = parameter_counts(self.model)

    # ---- checkpoint state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A snapshot on the CPU: later training steps do not change it (state_dict() returns live views).
        It carries the config that trained it and the metric definitions that measured it."""
        return _cpu_copy(
            {
                "config": self.cfg.model_dump(mode="json"),
                "metric_definitions": METRIC_DEFINITIONS_VERSION,
                "epoch": self.epoch,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "shuffle_rng": self.shuffle.get_state(),
                "torch_rng": torch.get_rng_state(),
                "interpolation_epoch": self.interpolation_epoch,
                "etf_fixed": dict(self.etf_fixed),
                "best_epoch": self.best_epoch,
                "best_metrics": dict(self.best_metrics),
                "last_metrics": dict(self.last_metrics),
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_resumable(state, self.cfg)
        # Layers fixed during training must be buffers again before the weights and the optimizer load:
        # the optimizer's state is indexed by the position of the trainable parameters.
        self.etf_fixed = {k: int(v) for k, v in state["etf_fixed"].items()}
        fix_layers(self.model, list(self.etf_fixed))
        self.params = parameter_counts(self.model)
        self._build_optimizer()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.shuffle.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch = int(state["epoch"])
        self.interpolation_epoch = int(state["interpolation_epoch"])
        self.best_epoch = int(state["best_epoch"])
        self.best_metrics = dict(state["best_metrics"])
        self.last_metrics = dict(state["last_metrics"])

    # ---- training -----------------------------------------------------------------------------------
    def train_epoch(self) -> float:
        """One pass over the shuffled train split; returns the mean mini-batch loss."""
        self.model.train()
        x, y = self.data.x_train, self.data.y_train
        batch = self.cfg.train.batch_size
        perm = torch.randperm(len(x), device=self.device, generator=self.shuffle)
        loss_sum = torch.zeros((), device=self.device)
        starts = batch_starts(len(x), batch)
        for lo in starts:
            idx = perm[lo : lo + batch]
            loss = self._gradients(x.index_select(0, idx), y.index_select(0, idx))
            self.optimizer.step()
            loss_sum += loss.detach()
        mean_loss = float(loss_sum / len(starts))  # the epoch's single host sync
        if (error := diverged(mean_loss, self.epoch + 1)) is not None:
            raise error
        return mean_loss

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        svsl = self.cfg.svsl
        if svsl.alpha == 0:
            return task_loss(self.model(x), y, self.data.num_classes, self.cfg.train.loss)
        logits, taps = self.model.forward_taps(x)
        selected = [taps[name] for name in self.model.tap_names[svsl.gamma - 1 :]]
        return task_loss(logits, y, self.data.num_classes, self.cfg.train.loss) + svsl_penalty(
            selected, y, self.data.num_classes, svsl.alpha
        )

    def run(self, reporter: Reporter) -> dict[str, float]:
        """Train from ``self.epoch`` to the configured number of epochs; return the trial's summary."""
        while self.epoch < self.cfg.train.epochs:
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            batch_loss = self.train_epoch()
            metrics = self.end_epoch(batch_loss, lr, started)
            due = self.checkpoint_due() or self.stop_requested()
            reporter.report(self.epoch, metrics, self.state_dict() if due else None)
        return self.summary()

    def checkpoint_due(self, epoch: int | None = None) -> bool:
        """Whether ``epoch`` (1-based; default: the last one trained) ends with a checkpoint."""
        epoch = self.epoch if epoch is None else epoch
        return epoch % self.cfg.checkpoint.every == 0 or epoch == self.cfg.train.epochs

    def collapse_due(self, epoch: int) -> bool:
        """Whether ``epoch`` (1-based) measures the NC metrics, not only accuracy and loss."""
        return epoch % self.cfg.metrics.every == 0 or epoch == self.cfg.train.epochs

    def end_epoch(
        self, batch_loss: float, lr: float, started: float, measured: dict[str, float] | None = None
    ) -> dict[str, float]:
        """After an epoch's steps: advance the schedule, measure, adapt ETF layers, keep the summary.
        ``measured``: this epoch's measurement when a bundle took it for all its members at once."""
        cfg = self.cfg
        taps = self.model.tap_names
        self.scheduler.step()
        self.epoch += 1
        collapse = self.collapse_due(self.epoch)
        if measured is not None:
            metrics = dict(measured)
        else:
            metrics = measure(
                self.model,
                self.splits,
                self.data.num_classes,
                batch_size=cfg.metrics.batch_size,
                collapse=collapse,
                loss=cfg.train.loss,
                probe=cfg.metrics.probe,
            )
        metrics.update(batch_loss=batch_loss, lr=lr)
        if self.interpolation_epoch == 0 and metrics["train_acc"] >= INTERPOLATION_ACC:
            self.interpolation_epoch = self.epoch
        metrics["terminal_phase"] = float(self.interpolation_epoch > 0)
        if collapse:
            if isinstance(cfg.etf, EtfAdaptive):
                self.adapt_etf(metrics)
            ncc = [metrics.get(metric_key("ncc_acc", "train", t), 0.0) for t in taps]
            for i, eps in enumerate(cfg.metrics.effective_depth_eps):
                key = "effective_depth" if i == 0 else f"effective_depth/eps_{eps:g}"
                metrics[key] = float(effective_depth(ncc, eps))
        # After adapt_etf, so the epoch a layer is fixed shows the count it trains with from then on.
        metrics.update({k: float(v) for k, v in self.params.items()})
        metrics["etf_layers"] = float(len(self.etf_fixed))
        metrics.update({f"etf_fixed_epoch/{k}": float(v) for k, v in self.etf_fixed.items()})
        metrics["epoch_time_s"] = time.perf_counter() - started
        if self.device.type == "cuda":
            # Measured, to set resources.gpu for packing (trainables.memory estimates it beforehand).
            metrics["gpu_memory_peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.last_metrics = metrics
        if self.best_epoch == 0 or metrics["test_acc"] > self.best_metrics["test_acc"]:
            self.best_epoch, self.best_metrics = self.epoch, metrics
        return metrics

    def summary(self) -> dict[str, float]:
        """Last-epoch and best-test-epoch values of every metric (004 §5.3 reports both)."""
        out = {f"final/{k}": v for k, v in self.last_metrics.items()}
        out.update({f"best/{k}": v for k, v in self.best_metrics.items()})
        out["best_epoch"] = float(self.best_epoch)
        out["interpolation_epoch"] = float(self.interpolation_epoch)
        return out


def _trainable(layer: torch.nn.Module) -> bool:
    return isinstance(layer.weight, torch.nn.Parameter)


def _cpu_copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return value


RESUMABLE_CHANGES = ("train.epochs", "checkpoint", "device", "train.compile", "data.root", "data.download")
"""Trial-config fields a checkpoint may continue under with other values: how long, where and how often
it runs and saves, not what it trains."""


class CheckpointMismatch(ValueError):
    """A checkpoint written by a trial of another config than the one asked to continue it."""


def check_resumable(state: dict[str, Any], cfg: TrialConfig) -> None:
    """Refuse a checkpoint of another trial config, naming the fields; warn on one without a config (written
    before checkpoints carried it) and on one measured under other metric definitions."""
    saved = state.get("config")
    if saved is None:
        warnings.warn(
            "the checkpoint does not say which config trained it (it predates that); loading it unchecked",
            stacklevel=2,
        )
    else:
        current = cfg.model_dump(mode="json")
        # A field on one side only was added or removed between versions: it did not train this state.
        changed = sorted(
            path
            for path in changed_paths(saved, current)
            if has_path(saved, path)
            and has_path(current, path)
            and not any(path == f or path.startswith(f"{f}.") for f in RESUMABLE_CHANGES)
        )
        if changed:
            shown = "; ".join(
                f"{p}: {get_path(saved, p)!r} in the checkpoint, {get_path(current, p)!r} here"
                for p in changed
            )
            raise CheckpointMismatch(f"the checkpoint was written by another trial config: {shown}")
    version = state.get("metric_definitions")
    if version is not None and version != METRIC_DEFINITIONS_VERSION:
        warnings.warn(
            f"the checkpoint was measured under metric definitions v{version}; epochs after "
            f"{int(state['epoch'])} are measured under v{METRIC_DEFINITIONS_VERSION}",
            stacklevel=2,
        )


def train(cfg: TrialConfig, reporter: Reporter, state: dict[str, Any] | None = None) -> dict[str, float]:
    """Run one trial; ``state`` (a :meth:`Trainer.state_dict`) continues an interrupted one."""
    trainer = Trainer(cfg)
    if state is not None:
        trainer.load_state_dict(state)
    return trainer.run(reporter)
