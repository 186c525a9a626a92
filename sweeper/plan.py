"""What a sweep will train, without loading data: one row per trial (or, with a search, per grid cell and
its budget) with its model's parameter counts and the device memory it is estimated to need
(``trainables.memory``; for a bundle, the whole bundle's)."""

from __future__ import annotations

import json
from typing import Any

import torch

from sweeper.spec import LoadedSpec, expand, model_key
from trainables.data import dataset_info
from trainables.memory import estimate_bytes
from trainables.models import build_model, parameter_counts


def plan_rows(loaded: LoadedSpec) -> list[dict[str, Any]]:
    search = loaded.spec.search
    members = loaded.spec.bundle if isinstance(loaded.spec.bundle, int) else 1
    rows = []
    counts: dict[str, dict[str, int]] = {}  # by model_key: seeds and optimizer settings share one build
    estimates: dict[str, int] = {}
    for trial in expand(loaded):
        data = trial.config.model_dump(mode="json")
        key = model_key(data)
        if key not in counts:
            # The meta device gives shapes without allocating: a ViT preset is counted as fast as an MLP.
            with torch.device("meta"):
                counts[key] = parameter_counts(build_model(trial.config, dataset_info(trial.config)))
        memory_key = key + json.dumps([data["metrics"], data["device"]], sort_keys=True)
        if memory_key not in estimates:
            estimates[memory_key] = estimate_bytes(trial.config, members)
        row = {"cell" if search else "trial": trial.index, "key": trial.key, "run_name": trial.run_name}
        row.update(trial.varying)
        if search:
            # Every grid point is a cell with its own Optuna study and budget; counts are at base values.
            row.update(
                budget=search.optuna.trials_per_cell,
                sampler=search.optuna.sampler,
                searched={path: dist.as_spec() for path, dist in search.space.items()},
            )
        rows.append({**row, **counts[key], "memory_mib": round(estimates[memory_key] / 2**20)})
    return rows
