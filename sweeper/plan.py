"""What a sweep will train, without loading data: one row per trial with its model's parameter counts."""

from __future__ import annotations

from typing import Any

import torch

from sweeper.spec import LoadedSpec, expand
from trainables.data import dataset_info
from trainables.models import build_model, parameter_counts


def plan_rows(loaded: LoadedSpec) -> list[dict[str, Any]]:
    rows = []
    for trial in expand(loaded):
        # The meta device gives shapes without allocating: a ViT preset is counted as fast as an MLP.
        with torch.device("meta"):
            model = build_model(trial.config, dataset_info(trial.config))
        rows.append(
            {
                "trial": trial.index,
                "key": trial.key,
                "run_name": trial.run_name,
                **trial.varying,
                **parameter_counts(model),
            }
        )
    return rows
