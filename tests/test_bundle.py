"""Trial bundles: members trained stacked give the per-epoch metrics of each trial trained alone (up to
floating-point reordering), checkpoint slices that resume alone, and failures confined to one member."""

from __future__ import annotations

import copy

import pytest
import torch

from trainables.bundle import Bundle, BundleError, bundle_key, check_bundle
from trainables.config import TrialConfig
from trainables.loop import Trainer, TrialDiverged

BASE = dict(
    dataset="gaussian",
    data={"gaussian": {"classes": 3, "dim": 6, "train_per_class": 40, "test_per_class": 10}},
    model={"mlp": {"depth": 4, "width": 16}},
    train={"epochs": 4, "batch_size": 16, "optimizer": {"lr": 0.05}},
    metrics={"every": 1},
    checkpoint={"every": 2},
)
VARIANTS = [
    dict(seed=0),
    dict(seed=1, etf={"depth": 1}),
    dict(seed=2, svsl={"alpha": 0.1, "gamma": 2}, train={"optimizer": {"lr": 0.02, "momentum": 0.5}}),
    dict(seed=3, etf={"adaptive": 0.5}, train={"schedule": {"milestones": [2], "gamma": 0.1}}),
]


def _cfg(variant: dict, base: dict = BASE) -> TrialConfig:
    data = copy.deepcopy(base)
    for key, value in variant.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return TrialConfig.model_validate(data)


class Recorder:
    def __init__(self):
        self.rows, self.states = [], []

    def report(self, epoch, metrics, state):
        self.rows.append(metrics)
        self.states.append(state)


def _assert_same_history(alone: list[dict], bundled: list[dict]) -> None:
    assert len(alone) == len(bundled)
    for epoch, (a, b) in enumerate(zip(alone, bundled), start=1):
        assert set(a) == set(b), (epoch, set(a) ^ set(b))
        for key in a:
            if key == "epoch_time_s":
                continue
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (epoch, key)


def test_bundled_members_match_trials_trained_alone():
    cfgs = [_cfg(v) for v in VARIANTS]
    recorders = [Recorder() for _ in cfgs]
    summaries = Bundle(cfgs).run(recorders)
    for cfg, recorder, summary in zip(cfgs, recorders, summaries):
        alone = Recorder()
        expected = Trainer(cfg).run(alone)
        _assert_same_history(alone.rows, recorder.rows)
        assert summary.keys() == expected.keys()
    # The variants really differ: an ETF classifier, SVSL, and Adaptive-ETF fixing layers mid-training.
    assert recorders[1].rows[0]["etf_layers"] == 1
    fixed = {k: v for k, v in recorders[3].rows[-1].items() if k.startswith("etf_fixed_epoch/")}
    assert fixed and min(fixed.values()) >= 1  # fixed after an epoch of training, then trained on
    assert recorders[2].rows[0]["lr"] == 0.02 and recorders[3].rows[-1]["lr"] == pytest.approx(0.005)


def test_bundle_measures_its_members_together(monkeypatch):
    """One stacked metric pass per epoch for the members that measure alike, in chunks the memory budget
    allows, with every member's numbers those of the trial alone."""
    import trainables.bundle

    calls = []
    stacked = trainables.bundle.measure_stack

    def recording(stack, *args, collapse, **kwargs):
        calls.append((stack.members, collapse))
        return stacked(stack, *args, collapse=collapse, **kwargs)

    monkeypatch.setattr(trainables.bundle, "measure_stack", recording)
    monkeypatch.setattr(trainables.bundle, "members_measured_together", lambda members, metric: 2)
    cfgs = [_cfg(VARIANTS[0]), _cfg(VARIANTS[1]), _cfg({**VARIANTS[2], "metrics": {"every": 2}})]
    recorders = [Recorder() for _ in cfgs]
    Bundle(cfgs).run(recorders)
    # Odd epochs: members 0 and 1 take NC metrics, member 2 accuracy and loss only; even epochs: all
    # three, in chunks of two.
    assert calls == [(2, True), (1, False), (2, True), (1, True)] * 2
    for cfg, recorder in zip(cfgs, recorders):
        alone = Recorder()
        Trainer(cfg).run(alone)
        _assert_same_history(alone.rows, recorder.rows)
    assert "nc1/train/fc1" not in recorders[2].rows[0] and "nc1/train/fc1" in recorders[2].rows[1]


IMAGE_MODELS = {
    "resnet18": {"resnet": {"stem": "imagenet"}},  # 8 x 8 digits end as 2 x 2 maps: narrow taps, fast
    "vit": {"vit": {"width": 32, "depth": 2, "heads": 4, "fc_width": 64, "patch_size": 4}},
}


@pytest.mark.parametrize("architecture", IMAGE_MODELS)
def test_resnet_and_vit_bundles_match_trials_trained_alone(architecture):
    """ResNet (BatchNorm, in-place ReLU, residual adds) and ViT (attention, LayerNorm) under vmap."""
    base = dict(
        architecture=architecture,
        dataset="digits",
        data={"train_per_class": 4, "test_fraction": 0.05},
        model=IMAGE_MODELS[architecture],
        train={"epochs": 2, "batch_size": 20, "optimizer": {"lr": 0.002}},
        metrics={"every": 1, "max_samples": 40},
        checkpoint={"every": 2},
    )
    cfgs = [
        _cfg(dict(seed=0), base),
        _cfg(dict(seed=1, etf={"depth": 1}, svsl={"alpha": 0.01, "gamma": 2}), base),
    ]
    recorders = [Recorder() for _ in cfgs]
    Bundle(cfgs).run(recorders)
    for cfg, recorder in zip(cfgs, recorders):
        alone = Recorder()
        Trainer(cfg).run(alone)
        _assert_same_history(alone.rows, recorder.rows)
    assert recorders[1].rows[0]["etf_layers"] == 1


def test_a_members_checkpoint_slice_resumes_alone_and_in_a_bundle():
    cfgs = [_cfg(v) for v in VARIANTS[:3]]
    recorders = [Recorder() for _ in cfgs]
    done = []
    Bundle(cfgs).run(
        recorders, epoch_done=lambda epoch: done.append((epoch, [len(r.rows) for r in recorders]))
    )
    # The bundle-level hook (a sweep's Tune report) runs once per epoch, after every member reported.
    assert done == [(e, [e] * 3) for e in (1, 2, 3, 4)]
    mid = [r.states[1] for r in recorders]  # checkpoint.every: 2 -> epoch 2
    assert all(s is not None and s["epoch"] == 2 for s in mid)
    # A member's slice is a lone trial's checkpoint: it continues alone...
    alone = Recorder()
    trainer = Trainer(cfgs[1])
    trainer.load_state_dict(copy.deepcopy(mid[1]))  # torch's SGD keeps the loaded buffers and trains them
    trainer.run(alone)
    _assert_same_history(recorders[1].rows[2:], alone.rows)
    # ...and the bundle resumes from its members' slices.
    resumed = [Recorder() for _ in cfgs]
    Bundle(cfgs, states=mid).run(resumed)
    for full, rest in zip(recorders, resumed):
        _assert_same_history(full.rows[2:], rest.rows)


def test_a_diverging_member_fails_alone():
    import torch

    base = {**BASE, "model": {"mlp": {"depth": 3, "width": 8, "batchnorm": False}}}
    cfgs = [_cfg(dict(seed=0), base), _cfg(dict(seed=1), base)]
    bundle = Bundle(cfgs)
    with torch.no_grad():  # as test_trainables' divergence test: blow up one member's weights
        for name in bundle.momentum:
            bundle.stacked[name][1].mul_(1e30)
    recorders = [Recorder() for _ in cfgs]
    results = bundle.run(recorders)
    assert isinstance(results[1], TrialDiverged) and "training loss is" in str(results[1])
    assert recorders[1].rows == []
    alone = Recorder()
    Trainer(cfgs[0]).run(alone)
    _assert_same_history(alone.rows, recorders[0].rows)


def test_bundle_membership_rules():
    a, b = _cfg(dict(seed=0)), _cfg(dict(seed=5, svsl={"alpha": 0.2, "gamma": 1}))
    assert bundle_key(a) == bundle_key(b)
    check_bundle([a, b])
    wider = _cfg(dict(seed=0, model={"mlp": {"depth": 4, "width": 32}}))
    with pytest.raises(BundleError, match="model.mlp.width"):
        check_bundle([a, wider])
    vit = TrialConfig.model_validate({**BASE, "dataset": "digits", "architecture": "vit", "model": {}})
    with pytest.raises(BundleError, match="architecture"):
        check_bundle([a, vit])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bundle_trains_on_cuda_as_its_members_alone():
    cfgs = [_cfg({**v, "device": "cuda"}) for v in VARIANTS[:3]]
    bundle = Bundle(cfgs)
    assert all(t.device.type == "cuda" for t in bundle.stacked.values())
    recorders = [Recorder() for _ in cfgs]
    bundle.run(recorders)
    for cfg, recorder in zip(cfgs, recorders):
        alone = Recorder()
        Trainer(cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": "off"})})).run(alone)
        for a, b in zip(alone.rows, recorder.rows):  # GPU kernels differ in summation order: looser
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
