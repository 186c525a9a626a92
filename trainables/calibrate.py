"""Timing a trial's training step on the device it will run on, for the settings a spec leaves to ``auto``.

Whether stacking trials into a bundle pays, and how many trials should share a CPU node, depends on the
machine, not on the model alone: on a GPU a small model is launch-bound and a bundle of 16 trains each
member several times faster, while on a 2-core CPU the trainer already runs near the cores' FP32 peak and
a bundle of 4 is 1.6x slower per trial (benchmarks/RESULTS.md). So the sweeper measures instead of
assuming: :class:`StepTimer` builds the trial's own model (or a bundle of copies of it) on random inputs of
the dataset's shape, and times its real training loop (``Trainer.train_epoch`` / ``Bundle.train_epoch``)
for a short window. Everything here is Ray-free; sweeper.calibration runs timers as Ray actors on the
trials' node and decides.
"""

from __future__ import annotations

import platform
import time

import torch

from trainables.config import TrialConfig
from trainables.data import Splits, dataset_info
from trainables.loop import resolve_device

STEPS_PER_PASS = 8
"""Mini-batches per timed pass: short enough that a ResNet pass on a CPU is seconds, long enough that a
small model's pass is not dominated by the epoch's set-up (the shuffle)."""

TIE = 0.05
"""A larger setting must be this much faster per trial than the smaller one it replaces: timing noise on a
shared machine is a few percent, and the smaller setting is the simpler one (a tie goes to 1)."""


def synthetic_splits(cfg: TrialConfig, n_train: int) -> Splits:
    """Standard-normal inputs of the dataset's shape with labels cycling through the classes: the step's
    cost depends on shapes, not on values (no data is loaded, so timing needs no dataset)."""
    info = dataset_info(cfg)
    gen = torch.Generator().manual_seed(0)
    n_test = 2 * info.num_classes
    return Splits(
        torch.randn(n_train, *info.input_shape, generator=gen),
        torch.arange(n_train) % info.num_classes,
        torch.randn(n_test, *info.input_shape, generator=gen),
        torch.arange(n_test) % info.num_classes,
        info.num_classes,
    )


def device_name(device: torch.device) -> str:
    """What the timing was measured on, as a cache key: the GPU's name, else the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class StepTimer:
    """The training loop of ``members`` copies of ``cfg`` (1: a lone ``Trainer``; more: a ``Bundle`` of
    copies that differ in seed), ready to be timed. ``threads``: torch's intra-op threads, as the trial
    will run with them."""

    def __init__(self, cfg: TrialConfig, members: int, threads: int | None = None) -> None:
        from trainables.bundle import Bundle
        from trainables.loop import Trainer

        if threads is not None:
            torch.set_num_threads(threads)
        self.members = members
        self.device = resolve_device(cfg.device)
        data = synthetic_splits(cfg, STEPS_PER_PASS * cfg.train.batch_size).to(self.device)
        if members == 1:
            trainer = Trainer(cfg, data=data)
            self._pass = trainer.train_epoch  # returns a float: the pass has synchronised
        else:
            copies = [cfg.model_copy(update={"seed": cfg.seed + i}) for i in range(members)]
            bundle = Bundle(copies, data=data)
            self._pass = lambda: bundle.train_epoch().tolist()
        self._pass()  # warm-up: allocator, lazy initialisation, compilation where the trial compiles

    def time(self, seconds: float, min_passes: int = 2) -> float:
        """Seconds per training step per trial, from as many passes as fit in ``seconds`` (at least
        ``min_passes``)."""
        passes = 0
        started = time.perf_counter()
        while passes < min_passes or time.perf_counter() - started < seconds:
            self._pass()
            passes += 1
        return (time.perf_counter() - started) / (passes * STEPS_PER_PASS * self.members)


def choose(per_trial_seconds: dict[int, float]) -> int:
    """The setting (bundle size, trials per node) with the lowest seconds per trial step; a larger one
    replaces a smaller only if it is more than :data:`TIE` faster, so a tie goes to the smallest."""
    settings = sorted(per_trial_seconds)
    best = settings[0]
    for n in settings[1:]:
        if per_trial_seconds[n] < per_trial_seconds[best] * (1 - TIE):
            best = n
    return best
