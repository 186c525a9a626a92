"""How much device memory a trial (or a bundle of trials) needs, estimated from shapes alone.

Ray packs fractional-GPU trials by the fraction asked for and does not cap their memory, so a sweep with
``resources.gpu: 0.25`` on a GPU too small for four trials fails mid-sweep with CUDA out-of-memory. The
sweeper checks this estimate against the fraction before starting (``sweeper.orchestrate``), ``plan``
prints it, and every trial on CUDA logs its measured peak (``gpu_memory_peak_mib``) to compare.

Counted, in float32 unless noted: the data splits (they live on the device, trainables.data); weights,
gradients and momentum per member; training activations of one batch (every module's output is assumed
kept for backward); the metric pass (:func:`metric_bytes`, once per member a bundle measures at a time).
A fixed allowance covers the CUDA context and allocator slack. It is an upper-leaning estimate, not a
bound.
"""

from __future__ import annotations

import math

import torch

from trainables.config import TrialConfig
from trainables.data import dataset_info
from trainables.measure import CACHE_BYTES
from trainables.metrics import ERROR_PROBES, GRAM_MAX_WIDTH, PROBE_WIDTH, SKETCH_WIDTH, SUBSPACE_ROWS
from trainables.models import build_model

CUDA_CONTEXT_BYTES = 600 << 20
"""CUDA context, cuBLAS workspaces and allocator rounding (typically 300-600 MiB per process)."""

METRIC_STACK_BYTES = 2 << 30
"""Memory one stacked metric pass of a bundle may take (seed 000's MLP: about 50 MiB per member, so 40
members per pass); larger bundles measure in several passes."""

DIGITS_CLASS_COUNTS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)
"""scikit-learn's digits per class; split per class by ``data.test_fraction`` (trainables.data)."""

SPLIT_SIZES = {
    "mnist": (60_000, 10_000),
    "fashion_mnist": (60_000, 10_000),
    "cifar10": (50_000, 10_000),
    "cifar100": (50_000, 10_000),
    "svhn": (73_257, 26_032),
    "stl10": (5_000, 8_000),
    "mnist1d": (4_000, 1_000),
}


def split_sizes(cfg: TrialConfig) -> tuple[int, int]:
    """Train and test sizes without loading anything (the train subset of ``data.train_per_class``)."""
    if cfg.dataset == "gaussian":
        g = cfg.data.gaussian
        n_train, n_test = g.classes * g.train_per_class, g.classes * g.test_per_class
    elif cfg.dataset == "digits":
        n_test = sum(max(1, int(round(cfg.data.test_fraction * n))) for n in DIGITS_CLASS_COUNTS)
        n_train = sum(DIGITS_CLASS_COUNTS) - n_test
    else:
        n_train, n_test = SPLIT_SIZES[cfg.dataset]
    if cfg.data.train_per_class is not None:
        n_train = min(n_train, cfg.data.train_per_class * dataset_info(cfg).num_classes)
    return n_train, n_test


def estimate_bytes(cfg: TrialConfig, members: int = 1) -> int:
    """Device memory for one trial, or a bundle of ``members`` trials of this config (shared data)."""
    info = dataset_info(cfg)
    with torch.device("meta"):
        model = build_model(cfg, info)
        outputs: list[int] = []
        hooks = [
            m.register_forward_hook(lambda _m, _i, out: outputs.append(_numel(out)))
            for m in model.modules()
            if not list(m.children())
        ]
        batch = cfg.train.batch_size
        _, taps = model.forward_taps(torch.empty(batch, *info.input_shape))
        for hook in hooks:
            hook.remove()
    n_train, n_test = split_sizes(cfg)
    sample_bytes = 4 * math.prod(info.input_shape) + 8  # float32 input + int64 label
    data = (n_train + n_test) * sample_bytes
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    weights = 3 * 4 * params  # weight, gradient, momentum
    activations = 4 * sum(outputs)  # kept for backward; transient gradients fit in the slack
    metric = metric_bytes(cfg, [t[0].numel() for t in taps.values()])
    together = members_measured_together(members, metric)
    return CUDA_CONTEXT_BYTES + data + members * (weights + activations) + together * metric


def wide_tap_bytes(d: int) -> int:
    """Pass 2's spectral statistics of a tap wider than GRAM_MAX_WIDTH, all float64: the subspace and S
    applied to it, the error probes and S applied to them, and the rows gathered for one product
    (``metrics.SUBSPACE_ROWS``)."""
    return d * 8 * (2 * (2 * SKETCH_WIDTH + ERROR_PROBES) + SUBSPACE_ROWS)


def metric_bytes(cfg: TrialConfig, tap_widths: list[int] | None = None) -> int:
    """The metric pass of one model: one metric batch of taps in float64, pass 1's taps kept up to
    ``measure.CACHE_BYTES``, and per split the float64 Gram of every tap up to
    ``metrics.GRAM_MAX_WIDTH`` (:func:`wide_tap_bytes` for wider ones) and the probe's statistics when
    ``metrics.probe`` is on. ``tap_widths``: when the caller has the model's taps already."""
    if tap_widths is None:
        info = dataset_info(cfg)
        with torch.device("meta"):
            _, taps = build_model(cfg, info).forward_taps(torch.empty(2, *info.input_shape))
        tap_widths = [t[0].numel() for t in taps.values()]
    n_train, n_test = split_sizes(cfg)
    measured = min(n_train, cfg.metrics.max_samples) + n_test
    metric_batch = min(cfg.metrics.batch_size, measured)
    metric = 8 * metric_batch * sum(tap_widths) + min(CACHE_BYTES, 4 * measured * sum(tap_widths))
    statistics = sum(8 * d * d if d <= GRAM_MAX_WIDTH else wide_tap_bytes(d) for d in tap_widths)
    if cfg.metrics.probe:  # the Gram of the (projected) tap, and the projection of a wide one
        statistics += sum(
            8 * min(d, PROBE_WIDTH) ** 2 + 8 * d * PROBE_WIDTH * (d > PROBE_WIDTH) for d in tap_widths
        )
    return metric + 2 * statistics  # both splits' accumulators live through pass 2


def members_measured_together(members: int, metric: int) -> int:
    """How many of a bundle's ``members`` one stacked metric pass takes, each pass of one model taking
    ``metric`` bytes (:func:`metric_bytes`): all while they fit :data:`METRIC_STACK_BYTES`, at least one."""
    return max(1, min(members, METRIC_STACK_BYTES // metric))


def _numel(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel()
    if isinstance(out, (tuple, list)):
        return sum(_numel(o) for o in out)
    if isinstance(out, dict):
        return sum(_numel(o) for o in out.values())
    return 0
