"""The compiled training step (``train.compile``): the same training as eager, and eager training when
compiling fails. The graph capture runs on torch.compile's ``aot_eager`` backend (Dynamo + AOTAutograd,
the parts our step goes through, without code generation, so each test takes seconds); the inductor
backend, and on CUDA its CUDA graphs, run in ``benchmarks/bench_speed.py``."""

from __future__ import annotations

import pytest
import torch

import trainables.loop
from tests.test_bundle import VARIANTS, Recorder, _assert_same_history, _cfg, _perturbed_histories
from trainables.loop import Trainer


def _compiled(variant: dict) -> dict:
    return {**variant, "train": {**variant.get("train", {}), "compile": "on"}}


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[3]], ids=["baseline", "adaptive-etf"])
def test_compiled_step_trains_as_eager(monkeypatch, variant):
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")
    graphs = []

    def counting_aot_eager(graph, example_inputs):
        graphs.append(graph)
        return aot_eager(graph, example_inputs)

    monkeypatch.setattr(trainables.loop, "COMPILE_BACKEND", counting_aot_eager)
    eager = Recorder()
    Trainer(_cfg(variant)).run(eager)
    trainer = Trainer(_cfg(_compiled(variant)))
    compiled = Recorder()
    trainer.run(compiled)
    assert trainer.compiled_loss is not None  # it really trained compiled, to the end
    # A compiled step reorders sums: within what one-ulp changes of the eager trial's start move it.
    _assert_same_history(eager.rows, _perturbed_histories(_cfg(variant)), compiled.rows)
    # The gaussian split's 120 samples in batches of 16 end in a batch of 8: two static-shape graphs.
    assert len(graphs) >= 2
    if "etf" in variant:
        # Adaptive-ETF turns a weight into a buffer mid-training: the step recompiled rather than go on
        # with the old graph, which still updates it.
        assert compiled.rows[-1]["etf_layers"] >= 1
        assert len(graphs) > 2


def test_a_step_that_fails_to_compile_trains_eagerly(monkeypatch, capsys):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler on this machine")

    monkeypatch.setattr(trainables.loop, "COMPILE_BACKEND", broken_backend)
    eager = Recorder()
    Trainer(_cfg(VARIANTS[0])).run(eager)
    trainer = Trainer(_cfg(_compiled(VARIANTS[0])))
    fallback = Recorder()
    trainer.run(fallback)
    assert trainer.compiled_loss is None
    assert "compiled training step failed, training eagerly" in capsys.readouterr().err
    _assert_same_history(eager.rows, _perturbed_histories(_cfg(VARIANTS[0])), fallback.rows)


def test_compile_auto_is_off_on_cpu():
    assert Trainer(_cfg(VARIANTS[0])).compiled_loss is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_auto_replays_cuda_graphs_and_trains_as_eager():
    variant = {**VARIANTS[0], "device": "cuda"}
    eager = Recorder()
    Trainer(_cfg({**variant, "train": {"compile": "off"}})).run(eager)
    trainer = Trainer(_cfg(variant))  # auto: reduce-overhead on CUDA
    compiled = Recorder()
    trainer.run(compiled)
    assert trainer.compiled_loss is not None
    for a, b in zip(eager.rows, compiled.rows):  # GPU kernels differ in summation order: looser
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["test_acc"] == pytest.approx(a["test_acc"], abs=0.05)
