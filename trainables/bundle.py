"""Trial bundles: several trials of one architecture on one dataset trained together as a stacked model.

Small models are launch-bound on a GPU (measured on an H100: 0.9-1.3 s per MNIST epoch for one MLP,
~5 ms per model for hundreds stacked), so a bundle runs every member's step in the same kernels:
parameters and buffers are stacked along a leading member axis (``torch.func.stack_module_state``) and the
forward pass is ``vmap(functional_call)`` over them. Each member is still a whole :class:`Trainer`: its
own seed (initialisation and shuffling), ETF layers, SVSL alpha/gamma, optimizer settings and schedule,
metrics, summary and checkpoint (``Trainer.state_dict``, the same format as a trial trained alone, so a
member's checkpoint slice resumes alone too). The training steps and the metric pass (:meth:`Bundle.measure`)
run stacked; a member's own module receives its slices when it checkpoints.

What must agree within a bundle (:func:`bundle_key`): everything but ``seed``, ``etf``, ``svsl``,
``train.optimizer``, ``train.schedule`` and ``metrics``. The SGD step below is torch's SGD (momentum,
dampening 0, weight decay) written on stacked tensors with per-member learning rate, momentum and weight
decay; an ETF weight (000 §2.2) is a member whose slice of that weight never changes and keeps no
momentum, exactly as a buffer with no optimizer state.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainables.config import TrialConfig, changed_paths, flatten_paths
from trainables.data import Splits, load_splits
from trainables.loop import Reporter, Trainer, batch_starts, diverged, resolve_device
from trainables.losses import svsl_penalty, task_loss
from trainables.measure import ModelStack, measure_stack
from trainables.memory import members_measured_together, metric_bytes

# Every architecture bundles: all forward passes vmap (BatchNorm with stacked running statistics, in-place
# ReLU, attention; none uses dropout, which vmap would have to draw per member). A new model with dropout
# needs ``vmap(..., randomness="different")`` and its own test first.

VARYING = ("seed", "etf", "svsl", "train.optimizer", "train.schedule", "metrics")
"""Fields bundle members may differ in."""


class BundleError(ValueError):
    """Configs that cannot train as one bundle (the message names the field that differs)."""


def bundle_key(cfg: TrialConfig) -> str:
    """Trials with equal keys can share a bundle: the config without the fields members may vary in."""
    data = cfg.model_dump(mode="json")
    return repr(sorted((k, v) for k, v in flatten_paths(data).items() if not _varies(k)))


def _varies(path: str) -> bool:
    return any(path == v or path.startswith(f"{v}.") for v in VARYING)


def check_bundle(cfgs: list[TrialConfig]) -> None:
    if not cfgs:
        raise BundleError("a bundle needs at least one trial")
    first = cfgs[0].model_dump(mode="json")
    for cfg in cfgs[1:]:
        differ = sorted(p for p in changed_paths(first, cfg.model_dump(mode="json")) if not _varies(p))
        if differ:
            raise BundleError(
                f"bundle members differ in {', '.join(differ)}; they may differ only in {VARYING}"
            )
    every = {c.checkpoint.every for c in cfgs}
    if len(every) > 1:
        raise BundleError(f"checkpoint.every: bundle members checkpoint together; got {sorted(every)}")


class Bundle:
    """Train ``cfgs`` together; ``states`` (one ``Trainer.state_dict`` or None per member) resumes them;
    ``data``: the splits already on the device (else loaded here)."""

    def __init__(
        self,
        cfgs: list[TrialConfig],
        states: list[dict[str, Any] | None] | None = None,
        data: Splits | None = None,
    ) -> None:
        check_bundle(cfgs)
        self.cfgs = cfgs
        self.device = resolve_device(cfgs[0].device)
        if data is None:
            data = load_splits(cfgs[0]).to(self.device)  # one copy: members share the data
        self.members = [Trainer(cfg, data=data) for cfg in cfgs]
        for member, state in zip(self.members, states or [None] * len(cfgs)):
            if state is not None:
                member.load_state_dict(state)
        epochs = {m.epoch for m in self.members}
        if len(epochs) > 1:
            raise BundleError(f"bundle members must resume from the same epoch, got {sorted(epochs)}")
        self.data = data
        self.failed: dict[int, Exception] = {}
        self.stop_requested: Callable[[], bool] = lambda: False  # as Trainer.stop_requested
        self._stack()
        self.measure_chunk = members_measured_together(len(cfgs), metric_bytes(cfgs[0]))

    # ---- stacking -----------------------------------------------------------------------------------
    def _stack(self) -> None:
        """Stacked copies of every member's tensors, trainability masks and momentum buffers."""
        models = [m.model for m in self.members]
        self.template = _TapsForward(copy.deepcopy(models[0]).to("meta"))
        named = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in models]
        trainable = [{n for n, p in m.named_parameters() if p.requires_grad} for m in models]
        self.names = list(named[0])
        dev = self.device
        # Per-name mask of the members that train it: False where it is ETF for that member.
        self.mask = {n: torch.tensor([n in t for t in trainable], device=dev) for n in self.names}
        self.stacked: dict[str, torch.Tensor] = {}
        for n in self.names:
            value = torch.stack([t[n].detach() for t in named]).clone()
            if bool(self.mask[n].any()):
                value.requires_grad_(True)
            self.stacked[n] = value
        self.momentum: dict[str, torch.Tensor | None] = {n: None for n in self.names if self.mask[n].any()}
        for i, member in enumerate(self.members):
            for p_name, param in member.model.named_parameters():
                buf = member.optimizer.state.get(param, {}).get("momentum_buffer")
                if buf is not None:
                    if self.momentum[p_name] is None:
                        self.momentum[p_name] = torch.zeros_like(self.stacked[p_name]).detach()
                    self.momentum[p_name][i] = buf
        self.alive = torch.ones(len(models), dtype=torch.bool, device=dev)
        opts = [c.train.optimizer for c in self.cfgs]
        self.weight_decay = torch.tensor([o.weight_decay for o in opts], device=dev)
        self.momentum_coef = torch.tensor([o.momentum for o in opts], device=dev)
        taps = models[0].tap_names
        self.tap_weights = torch.tensor(
            [[float(j >= c.svsl.gamma - 1) for j in range(len(taps))] for c in self.cfgs], device=dev
        )
        self.alpha = torch.tensor([c.svsl.alpha for c in self.cfgs], device=dev)

    def _unstack(self) -> None:
        """Copy the stacked values into each member's own module, whose state its checkpoint holds."""
        with torch.no_grad():
            for i, member in enumerate(self.members):
                tensors = dict(member.model.named_parameters()) | dict(member.model.named_buffers())
                for n, t in tensors.items():
                    t.copy_(self.stacked[n][i])

    def _member_state(self, i: int) -> dict[str, Any]:
        """Member ``i``'s checkpoint, a lone trial's format: its momentum goes into its own optimizer
        first (only here, on checkpoint epochs; the stacked buffers are the live ones)."""
        member = self.members[i]
        for n, param in member.model.named_parameters():
            buf = self.momentum.get(n)
            if buf is not None and param.requires_grad:
                member.optimizer.state[param]["momentum_buffer"] = buf[i]
        return member.state_dict()  # copies to the CPU

    def _sync_etf(self, i: int, known: set[str]) -> None:
        """Adaptive-ETF fixed layers of member ``i`` during its epoch end: freeze its slices (000 §4.1)."""
        member = self.members[i]
        now = {n for n, p in member.model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for n in known - now:
                self.stacked[n][i] = dict(member.model.named_buffers())[n]
                self.mask[n][i] = False
                if self.momentum.get(n) is not None:
                    self.momentum[n][i] = 0

    # ---- measuring ----------------------------------------------------------------------------------
    @torch.no_grad()  # no graph through the stacked parameters' slices
    def measure(self, live: list[int]) -> dict[int, dict[str, float]]:
        """This epoch's measurement of the ``live`` members, taken together (:func:`measure_stack`).

        Members measure together when they agree on what to measure this epoch (``metrics`` may differ
        within a bundle); each group goes in chunks of :func:`trainables.memory.members_measured_together`
        members, so the stacked pass stays within the memory the sweep's packing check counted."""
        groups: dict[tuple, list[int]] = {}
        for i in live:
            member = self.members[i]
            metrics = member.cfg.metrics
            key = (
                member.collapse_due(member.epoch + 1),
                metrics.max_samples,
                metrics.batch_size,
                metrics.probe,
            )
            groups.setdefault(key, []).append(i)
        chunk = self.measure_chunk
        measured: dict[int, dict[str, float]] = {}
        self.template.eval()
        try:
            for (collapse, _, batch_size, probe), indices in groups.items():
                for lo in range(0, len(indices), chunk):
                    part = indices[lo : lo + chunk]
                    values = measure_stack(
                        self._model_stack(part),
                        self.members[part[0]].splits,
                        self.data.num_classes,
                        batch_size=batch_size,
                        collapse=collapse,
                        loss=self.cfgs[0].train.loss,
                        labels=[f"member {i} (seed {self.cfgs[i].seed})" for i in part],
                        probe=probe,
                    )
                    measured.update(zip(part, values))
        finally:
            self.template.train()
        return measured

    def _model_stack(self, members: list[int]) -> ModelStack:
        """The stacked models of ``members`` as the metric pass sees them (their slices, no copies when
        all members are measured together)."""
        if members == list(range(len(self.members))):
            tensors = self.stacked
        else:
            index = torch.tensor(members, device=self.device)
            tensors = {n: t.index_select(0, index) for n, t in self.stacked.items()}
        params = {f"model.{n}": t for n, t in tensors.items()}

        def one(p: dict[str, torch.Tensor], x: torch.Tensor):
            return functional_call(self.template, p, (x,))

        def forward(x: torch.Tensor, taps: bool):
            # As in training, attention in its math form, which batches over members; in eval mode without
            # gradients nn.MultiheadAttention would take its fused fast path, which has no batching rule.
            fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                with sdpa_kernel(SDPBackend.MATH):
                    logits, out = vmap(one, in_dims=(0, None))(params, x)
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
            return logits, out if taps else {}

        # The weights the metrics read, found by name in the first member's model.
        model = self.members[0].model
        name_of = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
        return ModelStack(
            forward=forward,
            members=len(members),
            classifier=tensors[name_of[id(model.classifier.weight)]],
            consumers={k: tensors[name_of[id(w)]] for k, w in model.consumer_weights().items()},
            penultimate=model.penultimate,
        )

    # ---- training -----------------------------------------------------------------------------------
    def _losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-member mini-batch losses (task loss + SVSL, 004 Def. 10); x: M x B x ..., y: M x B."""
        cfg = self.cfgs[0]
        num_classes = self.data.num_classes
        any_svsl = bool((self.alpha > 0).any())

        def one(params: dict[str, torch.Tensor], xb, yb, alpha, weights):
            logits, taps = functional_call(self.template, {f"model.{n}": t for n, t in params.items()}, (xb,))
            loss = task_loss(logits, yb, num_classes, cfg.train.loss)
            if any_svsl:  # members with alpha 0 add exactly 0, as a lone trial that skips the term
                loss = loss + svsl_penalty(list(taps.values()), yb, num_classes, alpha, weights)
            return loss

        # Attention's fused kernels have no vmap batching rule (torch falls back to a loop over members);
        # the math form is plain matmuls and softmax, which batch over members (ViT).
        with sdpa_kernel(SDPBackend.MATH):
            return vmap(one)(self.stacked, x, y, self.alpha, self.tap_weights)

    def _sgd_step(self, lrs: torch.Tensor, first: bool) -> None:
        """torch.optim.SGD (dampening 0, no Nesterov) on stacked tensors, per-member hyper-parameters."""
        with torch.no_grad():
            for n, buf in self.momentum.items():
                p = self.stacked[n]
                shape = (-1,) + (1,) * (p.dim() - 1)
                grad = p.grad + self.weight_decay.view(shape) * p
                if buf is None or first:
                    buf = grad.clone()
                else:
                    buf.mul_(self.momentum_coef.view(shape)).add_(grad)
                keep = (self.mask[n] & self.alive).view(shape)
                self.momentum[n] = torch.where(keep, buf, torch.zeros_like(buf))
                p.copy_(torch.where(keep, p - lrs.view(shape) * buf, p))
                p.grad = None

    def train_epoch(self) -> torch.Tensor:
        """One epoch for every member (each its own shuffle); returns the per-member mean batch loss."""
        for m in self.members:
            m.model.train()
        self.template.train()
        x, y = self.data.x_train, self.data.y_train
        batch = self.cfgs[0].train.batch_size
        lrs = torch.tensor([m.optimizer.param_groups[0]["lr"] for m in self.members], device=self.device)
        perms = torch.stack(
            [torch.randperm(len(x), device=self.device, generator=m.shuffle) for m in self.members]
        )
        loss_sum = torch.zeros(len(self.members), device=self.device)
        first = all(v is None for v in self.momentum.values())
        starts = batch_starts(len(x), batch)
        for steps, lo in enumerate(starts):
            idx = perms[:, lo : lo + batch]
            flat = idx.reshape(-1)  # one gather for every member's batch (faster than x[idx])
            xb = x.index_select(0, flat).view(*idx.shape, *x.shape[1:])
            losses = self._losses(xb, y.index_select(0, flat).view(idx.shape))
            losses.sum().backward()  # members are independent: each slice gets its own gradient
            self._sgd_step(lrs, first and steps == 0)
            loss_sum += losses.detach()
        return loss_sum / len(starts)

    def run(
        self, reporters: list[Reporter], epoch_done: Callable[[int], None] | None = None
    ) -> list[dict[str, float] | Exception]:
        """Train every member to its last epoch; per member, its summary or the exception that ended it.

        ``epoch_done(epoch)`` runs after every live member has reported the epoch (a sweep reports the
        bundle to Tune there, with every member's checkpoint slice together)."""
        epochs = self.cfgs[0].train.epochs
        while self.members[0].epoch < epochs and len(self.failed) < len(self.members):
            started = time.perf_counter()
            lrs = [m.optimizer.param_groups[0]["lr"] for m in self.members]
            known = [{n for n, p in m.model.named_parameters() if p.requires_grad} for m in self.members]
            losses = self.train_epoch().tolist()  # the epoch's single host sync
            # Decided once for the epoch and for every member (a stop asked mid-epoch must not give some
            # members a checkpoint from modules not yet unstacked).
            due = self.members[0].checkpoint_due(self.members[0].epoch + 1) or self.stop_requested()
            if due:
                # Members' own modules are read only for their checkpoints (metrics come from the stack,
                # Adaptive-ETF swaps a weight for a fixed ETF): one copy per tensor and member, so only
                # when they checkpoint (check_bundle: all at once) and at the end.
                self._unstack()
            for i, loss in enumerate(losses):
                if i not in self.failed and (error := diverged(loss, self.members[i].epoch + 1)):
                    self.failed[i] = error
                    self.alive[i] = False  # its slices stop changing; the other members go on
            measured = self.measure([i for i in range(len(self.members)) if i not in self.failed])
            for i, (member, reporter) in enumerate(zip(self.members, reporters)):
                if i in self.failed:
                    member.epoch += 1
                    continue
                with warnings.catch_warnings():
                    # The member's own optimizer only carries its schedule; the steps happened stacked.
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                    metrics = member.end_epoch(losses[i], lrs[i], started, measured[i])
                self._sync_etf(i, known[i])
                reporter.report(member.epoch, metrics, self._member_state(i) if due else None)
            if epoch_done is not None and len(self.failed) < len(self.members):
                epoch_done(self.members[0].epoch)
        return [self.failed.get(i) or m.summary() for i, m in enumerate(self.members)]


class _TapsForward(torch.nn.Module):
    """``forward`` is the model's ``forward_taps``: ``functional_call`` only ever calls ``forward``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model.forward_taps(x)
