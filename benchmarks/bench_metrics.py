"""Metric pass time against one training epoch, side by side in one run.

Cases:
- ``mlp-digits``: the quickstart MLP (depth 4, width 64) on scikit-learn's digits; the metric pass covers
  every tap on the whole train split (the metric subset) and the test split.
- ``conv-64x32x32``: a convolutional tap 64 x 32 x 32 = 65,536 wide (a ResNet ``layer1`` tap on CIFAR) on
  synthetic 3 x 32 x 32 images; the tap is beyond the exact Gram, so the stable rank uses the sketch.

Run: ``python benchmarks/bench_metrics.py [--quick] [--repeats N]``. Prints a Markdown table; times are
medians over repeats; nothing is asserted.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from trainables.config import TrialConfig
from trainables.loop import Trainer
from trainables.measure import measure


class WideConv(nn.Module):
    """conv3x3(3->64) + BN + ReLU at full resolution (the wide tap), then pooling and a classifier."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.classifier = nn.Linear(64, num_classes)
        self.tap_names = ["conv1", "pool"]
        self.penultimate = "pool"

    def forward_taps(self, x):
        h = self.stem(x)
        pooled = h.mean((2, 3))
        return self.classifier(pooled), {"conv1": h, "pool": pooled}

    def forward(self, x):
        return self.forward_taps(x)[0]

    def consumer_weights(self):
        return {"pool": self.classifier.weight}


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_mlp(repeats: int, epochs_cfg: int = 3) -> dict:
    cfg = TrialConfig.model_validate(
        {
            "dataset": "digits",
            "model": {"mlp": {"depth": 4, "width": 64}},
            "train": {"epochs": epochs_cfg},
            "metrics": {"max_samples": 2000},
        }
    )
    trainer = Trainer(cfg)
    trainer.train_epoch()  # warm-up
    epoch = _median_time(trainer.train_epoch, repeats)
    nc = _median_time(
        lambda: measure(trainer.model, trainer.splits, 10, batch_size=2048, collapse=True), repeats
    )
    acc_only = _median_time(
        lambda: measure(trainer.model, trainer.splits, 10, batch_size=2048, collapse=False), repeats
    )
    n = len(trainer.splits["train"][0]) + len(trainer.splits["test"][0])
    return {
        "case": "mlp-digits (taps 3 x 64)",
        "samples measured": n,
        "epoch_s": epoch,
        "metrics_s": nc,
        "acc_loss_only_s": acc_only,
    }


def bench_conv(repeats: int, n_train: int, n_test: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    num_classes = 10
    y_tr = torch.arange(n_train) % num_classes
    y_te = torch.arange(n_test) % num_classes
    templates = torch.randn(num_classes, 3, 32, 32, generator=gen)
    x_tr = templates[y_tr] + torch.randn(n_train, 3, 32, 32, generator=gen)
    x_te = templates[y_te] + torch.randn(n_test, 3, 32, 32, generator=gen)
    model = WideConv(num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def epoch():
        model.train()
        perm = torch.randperm(n_train, generator=gen)
        for lo in range(0, n_train, 128):
            idx = perm[lo : lo + 128]
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    splits = {"train": (x_tr, y_tr), "test": (x_te, y_te)}
    epoch()  # warm-up
    epoch_s = _median_time(epoch, repeats)
    nc = _median_time(lambda: measure(model, splits, num_classes, batch_size=256, collapse=True), repeats)
    acc_only = _median_time(
        lambda: measure(model, splits, num_classes, batch_size=256, collapse=False), repeats
    )
    return {
        "case": "conv tap 64x32x32 (65,536 wide)",
        "samples measured": n_train + n_test,
        "epoch_s": epoch_s,
        "metrics_s": nc,
        "acc_loss_only_s": acc_only,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: fewer samples and repeats")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    n_train, n_test = (256, 128) if args.quick else (2000, 1000)
    rows = [bench_mlp(repeats), bench_conv(repeats, n_train, n_test)]
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, repeats={repeats}\n"
    )
    print(
        "| case | samples measured | train epoch (s) | NC metric pass (s) | metric / epoch | acc+loss only (s) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['case']} | {r['samples measured']} | {r['epoch_s']:.3f} | {r['metrics_s']:.3f} | "
            f"{r['metrics_s'] / r['epoch_s']:.2f} | {r['acc_loss_only_s']:.3f} |"
        )


if __name__ == "__main__":
    main()
