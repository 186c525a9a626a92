"""What the driver hands a Tune trial, as small frozen types: a trial point, a bundle of them, the sweep's
context. Orchestration and the searcher build them, the trial reads them; on the wire (Tune's
``param_space``, which Tune stores with the experiment and hands back on restore) they are plain dicts, so
an experiment started before these types existed resumes unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrialPoint:
    """One trial: its config and what its MLflow run is found, named, grouped and ordered by."""

    trial: dict[str, Any]
    """The TrialConfig, dumped to JSON types."""
    key: str
    """Stable trial key: the MLflow run's identity and the checkpoint's name."""
    name: str
    cell: str
    order: str
    """Sortable position in the plan: grid order, then study trial number."""
    data_root: str
    """Absolute, resolved on the driver: workers run in Ray's session directory."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra MLflow tags (a searched trial's study and trial number)."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.tags:
            del out["tags"]
        return out


@dataclass(frozen=True)
class BundlePoint:
    """Trials trained as one stacked model in one Tune trial (trainables.bundle)."""

    members: tuple[TrialPoint, ...]
    key: str
    name: str
    order: str

    @classmethod
    def of(cls, members: list[TrialPoint]) -> BundlePoint:
        digest = hashlib.sha256("|".join(m.key for m in members).encode()).hexdigest()[:12]
        return cls(
            tuple(members),
            key=f"bundle-{digest}",
            name=f"bundle of {len(members)}: {members[0].name} .. {members[-1].name}",
            order=members[0].order,
        )

    @staticmethod
    def member_prefix(index: int) -> str:
        """Tune result keys of member ``index``: ``m3:test_acc`` (the driver and the searcher split a
        bundle's result into its members' by these)."""
        return f"m{index}:"

    def member_results(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        """A bundle's Tune result split into each member's own keys."""
        out = []
        for i in range(len(self.members)):
            prefix = self.member_prefix(i)
            out.append({k[len(prefix) :]: v for k, v in result.items() if k.startswith(prefix)})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": [m.to_dict() for m in self.members],
            "key": self.key,
            "name": self.name,
            "order": self.order,
        }


def point_from_dict(data: dict[str, Any]) -> TrialPoint | BundlePoint:
    if "bundle" in data:
        members = tuple(point_from_dict(m) for m in data["bundle"])
        return BundlePoint(members, key=data["key"], name=data["name"], order=data["order"])
    return TrialPoint(
        trial=data["trial"],
        key=data["key"],
        name=data["name"],
        cell=data["cell"],
        order=data["order"],
        data_root=data["data_root"],
        tags=dict(data.get("tags", {})),
    )


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs of its sweep."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_id: str
    spec_hash: str
    checkpoints: str | None = None
    """Where trials keep their own checkpoint files (sweeper.checkpoints); None in a sweep started before
    they did, whose trials keep Tune's."""
    threads: int | None = None
    """torch's threads in the trial (its whole CPUs); None in a sweep started before it was set."""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepContext:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
