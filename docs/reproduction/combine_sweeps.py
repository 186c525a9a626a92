"""One report over several sweeps of one spec that differ only in seeds (run apart to fit the time there
was): ``python docs/reproduction/combine_sweeps.py STORAGE SWEEP [SWEEP ...]``. The variants' rows pool
the sweeps' finished trials; the published numbers come from the first sweep's frozen spec. It uses
``sweeper report``'s own functions, so the numbers are computed as `sweeper report` computes them.
"""

from __future__ import annotations

import json
import sys

from mlflow.tracking import MlflowClient

from sweeper.report import (
    collect,
    reference_comparisons,
    render_comparisons,
    render_table,
    resolve_sweep_dir,
    table_rows,
)
from sweeper.spec import load_spec_text


def main(storage: str, names: list[str]) -> None:
    dirs = [resolve_sweep_dir(name, storage) for name in names]
    records, parent = [], None
    for sweep_dir in dirs:
        meta = json.loads(sweep_dir.read_text("sweep.json"))
        found_parent, found = collect(MlflowClient(meta["tracking_uri"]), meta["sweep_id"])
        parent = parent or found_parent
        records += found
    loaded = load_spec_text(dirs[0].read_text("spec.yaml"), f"{dirs[0]}/spec.yaml")
    print(render_table(table_rows(parent, records), "md"))
    print(render_comparisons(reference_comparisons(loaded, records), "md"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
