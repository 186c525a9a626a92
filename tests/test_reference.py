"""Published numbers in a spec (``reference:``): validated against the grid, compared in the report."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweeper.report import TrialRecord, reference_comparisons, render_comparisons
from sweeper.spec import SpecError, load_spec, load_spec_text, spec_hash

ROOT = Path(__file__).resolve().parent.parent
SPEC = """
name: ref
dataset: gaussian
data: {gaussian: {classes: 3, dim: 6, train_per_class: 10, test_per_class: 5}}
model: {mlp: {depth: 3, width: 8}}
train: {epochs: 1}
grid:
  etf: [{depth: 0}, {depth: 1}]
  seed: [0, 1, 2]
"""
REFERENCE = """
reference:
  - source: a paper, Table 1
    match: {etf: {depth: 0}}
    values: {best_test_acc: 90.0, trainable_params: 250, effective_depth: 2}
  - source: a paper, Table 1
    match: {etf: {depth: 1}, model.mlp.width: 8}
    values: {best_test_acc: 80.0}
"""


def _record(cell: str, test_acc: float, params: float = 250, depth: float = 2) -> TrialRecord:
    values = {"best_test_acc": test_acc, "trainable_params": params, "effective_depth": depth}
    return TrialRecord("id", "name", cell, [], {}, values)


def test_every_paper_spec_carries_published_numbers_that_match_its_grid():
    for name in ("etf_depth", "etf_transformer", "svsl"):
        loaded = load_spec(ROOT / "search_spaces" / f"{name}.yaml")
        assert loaded.spec.reference, name
        assert all("Table" in row.source for row in loaded.spec.reference), name


def test_a_reference_row_matching_no_variant_is_refused_naming_the_row():
    bad = SPEC + REFERENCE.replace("etf: {depth: 1}", "etf: {depth: 2}")
    with pytest.raises(SpecError, match=r"x.yaml: reference\[1\].match: .*matches no variant") as err:
        load_spec_text(bad, "x.yaml")
    assert "its variants: etf=depth:0, etf=depth:1" in str(err.value)
    with pytest.raises(SpecError, match=r"reference\[0\]\.values\.best_acc.*should be 'trainable_params'"):
        load_spec_text(SPEC + REFERENCE.replace("best_test_acc: 90.0", "best_acc: 90.0"), "x.yaml")
    with pytest.raises(SpecError, match=r"reference match key 'model.mlp.height'.*allowed: preset, depth"):
        load_spec_text(SPEC + REFERENCE.replace("model.mlp.width", "model.mlp.height"), "x.yaml")


def test_a_grid_narrowed_with_set_keeps_the_rows_of_the_files_own_grid():
    """What a user does to try the baseline first: the rows describe the paper's table, which the spec
    file's grid runs, so narrowing the grid with --set is no error; a row matching no variant of the
    file's own grid still is, narrowed or not."""
    narrow = ["grid.etf=[{depth: 0}]", "grid.seed=[0]"]
    loaded = load_spec(ROOT / "search_spaces" / "etf_depth.yaml", narrow)
    assert loaded.spec.grid["etf"] == [{"depth": 0}] and len(loaded.spec.reference) == 5
    loaded = load_spec_text(SPEC + REFERENCE, "x.yaml", ["grid.etf=[{depth: 1}]"])
    assert loaded.spec.grid["etf"] == [{"depth": 1}]
    bad = SPEC + REFERENCE.replace("etf: {depth: 1}", "etf: {depth: 2}")
    with pytest.raises(SpecError, match=r"x.yaml: reference\[1\].match: .*matches no variant"):
        load_spec_text(bad, "x.yaml", ["grid.etf=[{depth: 0}]"])
    # A --set that widens the grid to a row's variant does not make the file's row valid either.
    with pytest.raises(SpecError, match=r"reference\[1\].match"):
        load_spec_text(bad, "x.yaml", ["grid.etf=[{depth: 0}, {depth: 2}]"])


def test_the_report_of_a_narrowed_sweep_leaves_absent_variants_out_in_one_line(tmp_path):
    from sweeper.location import parse_location
    from sweeper.orchestrate import prepare_sweep_dir
    from sweeper.spec import load_frozen_spec

    location = parse_location(tmp_path / "narrow")
    narrowed = load_spec_text(SPEC + REFERENCE, "x.yaml", ["grid.etf=[{depth: 0}]"])
    prepare_sweep_dir(narrowed, location, "sqlite:///unused.db")
    frozen = load_frozen_spec(location)  # its grid runs one of the two rows' variants
    base = 'etf={"depth":0}'
    comparisons, left_out = reference_comparisons(frozen, [_record(base, a) for a in (0.89, 0.9, 0.91)])
    assert {c["variant"] for c in comparisons} == {base} and len(comparisons) == 3
    assert left_out == (
        "Left out 1 of 2 reference rows, for variants this sweep's grid does not run (it was narrowed): "
        'reference[1] ({"etf":{"depth":1},"model.mlp.width":8}).'
    )


def test_published_numbers_are_not_part_of_the_sweeps_identity():
    assert spec_hash(load_spec_text(SPEC, "x").resolved) == spec_hash(
        load_spec_text(SPEC + REFERENCE, "x").resolved
    )


def test_comparisons_give_difference_and_flag_a_value_outside_two_sample_stds():
    loaded = load_spec_text(SPEC + REFERENCE, "x.yaml")
    base, etf = 'etf={"depth":0}', 'etf={"depth":1}'
    # Base: test acc 0.89, 0.90, 0.91 -> mean 90, sample std 1: the paper's 90 is within.
    # ETF: 0.70, 0.71, 0.72 -> mean 71, std 1: the paper's 80 is 9 std away.
    records = [_record(base, a) for a in (0.89, 0.90, 0.91)] + [_record(etf, a) for a in (0.70, 0.71, 0.72)]
    comparisons, left_out = reference_comparisons(loaded, records)
    assert left_out is None  # the grid runs every row's variant
    rows = {(c["variant"], c["column"]): c for c in comparisons}
    assert set(rows) == {
        (base, "best_test_acc"),
        (base, "trainable_params"),
        (base, "effective_depth"),
        (etf, "best_test_acc"),
    }
    acc = rows[(base, "best_test_acc")]
    assert acc["n"] == 3 and acc["mean"] == pytest.approx(90.0) and acc["std"] == pytest.approx(1.0)
    assert acc["difference"] == pytest.approx(0.0, abs=1e-9) and acc["check"] == "within"
    assert rows[(base, "trainable_params")]["check"] == "within"  # identical over seeds, equal to the paper
    far = rows[(etf, "best_test_acc")]
    assert far["difference"] == pytest.approx(9.0) and far["check"].startswith("OUTSIDE")
    text = render_comparisons(list(rows.values()), "md")
    assert '| etf={"depth":1} | best test acc | 3 | 71.00 ± 1.00 | 80.00 | +9.00 | OUTSIDE' in text


def test_one_seed_or_none_says_so_instead_of_flagging():
    loaded = load_spec_text(SPEC + REFERENCE, "x.yaml")
    # Trials tagged with cell labels (the tests above use the full-path tags of sweeps made before them).
    rows, _ = reference_comparisons(loaded, [_record("etf=depth:0", 0.5)])
    by_variant = {(c["variant"], c["column"]): c for c in rows}
    one = by_variant[("etf=depth:0", "best_test_acc")]
    assert one["n"] == 1 and one["difference"] == pytest.approx(40.0)
    assert one["check"] == "1 seed: no spread to compare with"
    assert by_variant[("etf=depth:1", "best_test_acc")]["check"] == "no finished trial"


def test_published_numbers_changed_later_reach_the_frozen_spec_of_the_same_sweep(tmp_path):
    import yaml

    from sweeper.location import parse_location
    from sweeper.orchestrate import prepare_sweep_dir

    location = parse_location(tmp_path / "ref")
    first = prepare_sweep_dir(load_spec_text(SPEC, "x.yaml"), location, "sqlite:///unused.db")
    corrected = load_spec_text(SPEC + REFERENCE, "x.yaml")
    assert prepare_sweep_dir(corrected, location, "sqlite:///unused.db") == first  # the same sweep
    frozen = yaml.safe_load((tmp_path / "ref" / "spec.yaml").read_text())
    assert frozen["reference"] == corrected.resolved["reference"]


def test_a_paper_spec_started_before_it_had_published_numbers_is_the_same_sweep():
    """etf_depth.yaml gained reference rows, and `reference: []` in its smoke section, after sweeps of it
    had started: its hash without them is the hash those sweeps recorded."""
    import yaml

    text = (ROOT / "search_spaces" / "etf_depth.yaml").read_text()
    before = yaml.safe_load(text)
    before.pop("reference")
    before["smoke"].pop("reference")
    assert (
        spec_hash(load_spec_text(yaml.safe_dump(before), "x").resolved)
        == load_spec(ROOT / "search_spaces" / "etf_depth.yaml").hash
    )


def test_a_searched_variants_row_is_each_seeds_best_trial_not_a_mean_over_the_search():
    import json
    from types import SimpleNamespace

    from sweeper.report import COLUMNS, render_table, table_rows

    def trial(seed: int, number: int, acc: float) -> TrialRecord:
        values = {key: None for key, _ in COLUMNS} | {"best_test_acc": acc}
        return TrialRecord(
            "id", f"seed={seed} trial={number}", "etf.depth=1", [], {}, values, f"S/c{seed}", number
        )

    # Seed 0's study ran three settings, seed 1's two; each study's best (by the objective, as the
    # searcher recorded it on the parent) is the one a reader compares with other variants.
    records = [trial(0, 0, 0.50), trial(0, 1, 0.90), trial(0, 2, 0.70), trial(1, 0, 0.80), trial(1, 1, 0.60)]
    best = {
        "c0": {"cell": "x", "study_trial": 1, "value": 0.90, "params": {"svsl.alpha": 1e-6}},
        "c1": {"cell": "y", "study_trial": 0, "value": 0.80, "params": {"svsl.alpha": 2e-6}},
    }
    tags = {"sweeper.sweep_id": "S"} | {f"sweeper.best.{k}": json.dumps(v) for k, v in best.items()}
    (row,) = table_rows(SimpleNamespace(data=SimpleNamespace(tags=tags)), records)
    assert row["n"] == 2 and row["searched"] == 5
    assert row["best_test_acc"] == pytest.approx(0.85) and row["best_test_acc_std"] == pytest.approx(0.05)
    assert row["best_params"] == [{"svsl.alpha": 1e-6}, {"svsl.alpha": 2e-6}]
    table = render_table([row], "md")
    assert "| etf.depth=1 | 2 |" in table and "| 5 |" in table and "each seed's best searched trial" in table
