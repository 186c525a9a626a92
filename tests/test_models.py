"""Every architecture x ETF variant: shapes, no NaN, ETF weights frozen and outside the optimizer, every
other parameter trained; the papers' parameter arithmetic; Adaptive-ETF; SVSL against Def. 10 directly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainables.config import TrialConfig
from trainables.data import DatasetInfo
from trainables.etf import simplex_etf
from trainables.loop import Trainer
from trainables.losses import svsl_penalty
from trainables.models import REGISTRY, ModelConfigError, TappedModel, build_model, parameter_counts

IMAGES = DatasetInfo((1, 8, 8), 10)
FASHION = DatasetInfo((1, 28, 28), 10)
SMALL_MODELS = {
    "mlp": {"mlp": {"depth": 4, "width": 16}},
    "convnet": {"convnet": {"channels": 16, "depth": 2}},
    "resnet18": {},
    "resnet34": {},
    "resnet50": {},
    "vit": {"vit": {"patch_size": 4, "width": 16, "depth": 2, "heads": 2, "fc_width": 32}},
}
VARIANTS = {
    "mlp": [{"depth": 0}, {"depth": 1}, {"depth": 3}, {"adaptive": 0.1}],
    "convnet": [{"depth": 0}, {"depth": 1}, {"adaptive": 0.1}],
    "resnet18": [{"depth": 0}, {"depth": 1}],
    "resnet34": [{"depth": 1}],
    "resnet50": [{"depth": 1}],
    "vit": [{"depth": 0}, {"transformer": "head"}, {"transformer": "last_block"}, {"transformer": "all"}],
}
CASES = [(arch, etf) for arch, etfs in VARIANTS.items() for etf in etfs]


def test_every_registered_architecture_is_tested_and_has_the_feature_api():
    """The hand-kept tables above cover the registry: a new architecture fails here until it is added."""
    assert set(SMALL_MODELS) == set(REGISTRY) and set(VARIANTS) == set(REGISTRY)
    for arch in REGISTRY:
        model = build_model(_cfg(arch, {"depth": 0}), IMAGES)
        assert isinstance(model, TappedModel), arch
        assert model.penultimate in model.tap_names, arch
        assert set(model.consumer_weights()) <= set(model.tap_names), arch


def _cfg(arch, etf, **extra):
    return TrialConfig.model_validate(
        {"architecture": arch, "dataset": "digits", "model": SMALL_MODELS[arch], "etf": etf, **extra}
    )


@pytest.mark.parametrize("arch,etf", CASES, ids=[f"{a}-{next(iter(e.values()))}" for a, e in CASES])
def test_model_invariants(arch, etf):
    torch.manual_seed(0)
    cfg = _cfg(arch, etf, svsl={"alpha": 1e-3, "gamma": 1})
    model = build_model(cfg, IMAGES)
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    logits, taps = model.forward_taps(x)
    assert logits.shape == (6, 10)
    assert list(taps) == model.tap_names and model.penultimate in taps
    assert all(torch.isfinite(t).all() for t in taps.values()) and torch.isfinite(logits).all()
    model.eval()
    assert torch.allclose(model(x), model.forward_taps(x)[0])
    model.train()

    n_fixed = {"depth": etf.get("depth", 0), "adaptive": 0}.get(next(iter(etf)), None)
    if n_fixed is None:
        n_fixed = model.transformer_etf_depth(etf["transformer"])
    candidates = model.etf_candidates()
    fixed = [layer for _, layer in candidates[:n_fixed]]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for layer in fixed:
        assert not isinstance(layer.weight, torch.nn.Parameter)
        assert torch.equal(layer.weight, simplex_etf(layer.out_features, layer.in_features))
        assert all(layer.weight is not p for p in params)

    loss = F.cross_entropy(logits, y) + svsl_penalty(list(taps.values()), y, 10, 1e-3)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    before = [layer.weight.clone() for layer in fixed]
    optimizer.step()
    assert all(torch.equal(b, layer.weight) for b, layer in zip(before, fixed))
    assert not any(layer.weight in optimizer.state for layer in fixed)

    counts = parameter_counts(model)
    assert counts["total_params"] - counts["trainable_params"] == sum(layer.weight.numel() for layer in fixed)


def test_an_etf_classifier_narrower_than_the_classes_is_refused():
    """A 10-class classifier on 8 features has no simplex ETF: the lifted E_8 left two classes a zero row
    (unc3 and nc2w_equiangle came out NaN). Refused for etf.depth and for Adaptive-ETF, which may fix it."""
    narrow = {"convnet": {"channels": 8, "depth": 2}}
    for etf in ({"depth": 1}, {"adaptive": 0.1}):
        cfg = TrialConfig.model_validate(
            {"architecture": "convnet", "dataset": "digits", "model": narrow, "etf": etf}
        )
        with pytest.raises(
            ModelConfigError, match=r"etf: the classifier \(classifier\) reads 8 features for 10"
        ):
            build_model(cfg, IMAGES)
    build_model(
        TrialConfig.model_validate({"architecture": "convnet", "dataset": "digits", "model": narrow}), IMAGES
    )


def test_simplex_etf_is_a_simplex():
    w = simplex_etf(10, 128).double()  # a classifier, C x d
    gram = w @ w.T
    c = 10
    assert torch.allclose(gram, (c / (c - 1)) * (torch.eye(c) - 1 / c).double(), atol=1e-6)
    # Unit-norm rows at equal angles -1/(C-1), the defining property of a simplex ETF.
    assert torch.allclose(gram.diagonal(), torch.ones(c, dtype=torch.float64))
    assert math.isclose(float(gram[0, 1]), -1 / (c - 1), rel_tol=1e-6)
    assert torch.equal(simplex_etf(128, 10), simplex_etf(10, 128).T)
    with pytest.raises(ValueError, match="at least 2"):
        simplex_etf(1, 5)


def _params(arch, model, etf):
    cfg = TrialConfig.model_validate({"architecture": arch, "model": model, "etf": etf})
    with torch.device("meta"):
        return parameter_counts(build_model(cfg, FASHION))


def test_seed000_mlp_parameter_arithmetic():
    model = {"mlp": {"preset": "seed000"}}
    counts = [_params("mlp", model, {"depth": n})["trainable_params"] for n in range(5)]
    # docs/science.md: the classifier removes 1,280 = 128 x 10, each further hidden layer 16,384 = 128 x 128.
    assert [a - b for a, b in zip(counts, counts[1:])] == [1280, 16384, 16384, 16384]
    # Paper: 152,586. Ours: 4 Linear+BN blocks and the classifier, see README ("Parameter counts").
    assert counts[0] == 152330


def test_seed000_vit_parameter_arithmetic():
    model = {"vit": {"preset": "seed000"}}
    variants = [{"depth": 0}] + [{"transformer": v} for v in ("head", "last_block", "last_2_blocks", "all")]
    counts = [_params("vit", model, v)["trainable_params"] for v in variants]
    # docs/science.md: the head removes 5,120 = 512 x 10, each block's two FC layers 2,097,152 = 2 x 512 x 2048.
    assert [a - b for a, b in zip(counts, counts[1:])] == [5120, 2097152, 2097152, 2097152]
    assert counts[0] == 9498122  # paper: 9,491,978; see README
    assert counts[0] - counts[-1] == 9491978 - 3195402  # baseline minus ETF-Transformer, as in 000 Table 2


ADAPTIVE = {
    "dataset": "gaussian",
    "data": {"gaussian": {"classes": 4, "dim": 10, "train_per_class": 40, "test_per_class": 10}},
    "model": {"mlp": {"depth": 4, "width": 16}},
    "etf": {"adaptive": 0.1},
    "train": {"epochs": 4, "batch_size": 32},
}


def test_adaptive_etf_fixes_the_layers_above_the_first_separable_input():
    trainer = Trainer(TrialConfig.model_validate(ADAPTIVE))
    trainer.epoch = 3
    before = trainer.params["trainable_params"]
    trainer.train_epoch()  # gives every weight momentum state
    weights = {name: layer.weight for name, layer in trainer.model.etf_candidates()}
    assert all(w in trainer.optimizer.state for w in weights.values())
    # Constructed: fc1 is not separable (error 0.5), fc2 is (0.05), fc3 too. Layers reading fc2 and
    # above (fc3 and the classifier) become ETF; fc2 and fc1 stay trainable.
    trainer.adapt_etf({"ncc_acc/train/fc1": 0.5, "ncc_acc/train/fc2": 0.95, "ncc_acc/train/fc3": 0.99})
    assert trainer.etf_fixed == {"classifier": 3, "fc3": 3}
    assert trainer.params["trainable_params"] == before - 16 * 4 - 16 * 16
    for name in ("classifier", "fc3"):
        assert not any(weights[name] is p for g in trainer.optimizer.param_groups for p in g["params"])
        assert weights[name] not in trainer.optimizer.state
    trainer.train_epoch()  # trains on with the fixed layers
    # Nothing separable: nothing more is fixed; a later, lower separable input fixes more.
    trainer.adapt_etf({"ncc_acc/train/fc1": 0.5, "ncc_acc/train/fc2": 0.5, "ncc_acc/train/fc3": 0.5})
    assert set(trainer.etf_fixed) == {"classifier", "fc3"}
    trainer.adapt_etf({"ncc_acc/train/fc1": 0.99})
    assert set(trainer.etf_fixed) == {"classifier", "fc3", "fc2"}


class Collect:
    def __init__(self):
        self.epochs = []

    def report(self, epoch, metrics, state):
        self.epochs.append((epoch, metrics, state))


def test_adaptive_etf_run_logs_fixing_and_resumes_identically():
    cfg = TrialConfig.model_validate(
        {**ADAPTIVE, "etf": {"adaptive": 0.5}, "train": {"epochs": 5, "batch_size": 32}}
    )
    full = Collect()
    trainer = Trainer(cfg)
    initial = trainer.params["trainable_params"]
    trainer.run(full)
    fixed_epochs = [m for _, m, _ in full.epochs if m["etf_layers"] > 0]
    assert fixed_epochs, "eps=0.5 on a separable mixture fixes layers within 5 epochs"
    first = fixed_epochs[0]
    assert any(k.startswith("etf_fixed_epoch/") for k in first)
    assert first["trainable_params"] < initial
    # Resume from epoch 2's checkpoint: the fixed layers come back as buffers, the optimizer lines up.
    assert full.epochs[1][2]["etf_fixed"]
    resumed = Collect()
    trainer = Trainer(cfg)
    trainer.load_state_dict(full.epochs[1][2])
    trainer.run(resumed)
    strip = lambda m: {k: v for k, v in m.items() if k != "epoch_time_s"}  # noqa: E731
    assert [strip(m) for _, m, _ in resumed.epochs] == [strip(m) for _, m, _ in full.epochs[2:]]


def test_svsl_matches_seed004_definition_per_sample():
    torch.manual_seed(1)
    c, n = 3, 9
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    taps = [torch.randn(n, 4, dtype=torch.float64), torch.randn(n, 2, 3, dtype=torch.float64)]
    alpha = 0.7
    logits = torch.randn(n, c, dtype=torch.float64)
    ours = F.cross_entropy(logits, y) + svsl_penalty(taps, y, c, alpha)
    # 004 Def. 10 literally: L_i = CE_i + eta_c sum_j ||h^j_i - mu^j_{c,B}||^2, eta_c = alpha/(C(k+1-gamma)|B_c|)
    total = 0.0
    for i in range(n):
        ci = int(y[i])
        members = [k for k in range(n) if int(y[k]) == ci]
        eta = alpha / (c * len(taps) * len(members))
        spread = 0.0
        for h in taps:
            flat = h.reshape(n, -1)
            mu = sum(flat[k] for k in members) / len(members)
            spread += float(((flat[i] - mu) ** 2).sum())
        ce = -float(torch.log_softmax(logits[i], 0)[ci])
        total += ce + eta * spread
    assert float(ours) == pytest.approx(total / n, rel=1e-12)


def test_mse_loss_trains():
    cfg = TrialConfig.model_validate({**ADAPTIVE, "etf": {"depth": 1}, "train": {"epochs": 2, "loss": "mse"}})
    rep = Collect()
    Trainer(cfg).run(rep)
    assert rep.epochs[-1][1]["train_loss"] < rep.epochs[0][1]["train_loss"] * 1.5
