"""What a sweep will train, without loading data: one row per trial (or, with a search, per grid cell and
its budget) with its model's parameter counts and the device memory it is estimated to need
(``trainables.memory``; for a bundle, the whole bundle's)."""

from __future__ import annotations

from typing import Any

import torch

from sweeper.spec import LoadedSpec, expand
from trainables.data import dataset_info
from trainables.memory import estimate_bytes
from trainables.models import build_model, parameter_counts


def plan_rows(loaded: LoadedSpec) -> list[dict[str, Any]]:
    search = loaded.spec.search
    rows = []
    for trial in expand(loaded):
        # The meta device gives shapes without allocating: a ViT preset is counted as fast as an MLP.
        with torch.device("meta"):
            model = build_model(trial.config, dataset_info(trial.config))
        row = {"cell" if search else "trial": trial.index, "key": trial.key, "run_name": trial.run_name}
        row.update(trial.varying)
        if search:
            # Every grid point is a cell with its own Optuna study and budget; counts are at base values.
            row.update(
                budget=search.optuna.trials_per_cell,
                sampler=search.optuna.sampler,
                searched={path: dist.as_spec() for path, dist in search.space.items()},
            )
        estimate = estimate_bytes(
            trial.config, loaded.spec.bundle if isinstance(loaded.spec.bundle, int) else 1
        )
        rows.append({**row, **parameter_counts(model), "memory_mib": round(estimate / 2**20)})
    return rows
