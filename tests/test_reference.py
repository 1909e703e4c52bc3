"""The papers' reference table (package data) and the VTAB-1K summary statistics."""

from __future__ import annotations

import math
from fnmatch import fnmatch
from pathlib import Path

import pytest
import tomllib

from petl_lightning.data.vtab import VTAB_TASKS
from petl_lightning.errors import PETLError
from petl_lightning.vtab.reference import (
    paper_table,
    reference,
    reference_for_module,
    reference_methods,
    resolve_name,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]


def test_every_reference_row_reproduces_the_papers_printed_means() -> None:
    """Transcription check: each row's 19 numbers give back the means its paper printed (to the
    rounding of the printed values), e.g. RepAdapter 76.1 (group mean), ARC 73.4 (19-task mean)."""
    checked = 0
    for name in reference_methods():
        ref = reference(name)
        if ref.per_task is None:
            assert name == "Dyn-Adapter"
            continue
        assert list(ref.per_task) == list(VTAB_TASKS), name
        assert all(0.0 <= v <= 100.0 for v in ref.per_task.values()), name
        s = summarize(ref.per_task)
        for key, printed in ref.reported.items():
            # printed to 1 or 2 decimals from unrounded per-task numbers: within half a unit + 0.01
            assert abs(s[key] - printed) <= 0.051, (name, key, s[key], printed)
            checked += 1
    assert checked >= 25
    # The anchors quoted in the specs.
    assert summarize(reference("RepAdapter").per_task)["group_mean"] == pytest.approx(76.09, abs=0.005)
    assert summarize(reference("ARC").per_task)["mean19"] == pytest.approx(73.37, abs=0.005)
    assert summarize(reference("DyT r=0.5").per_task)["group_mean"] == pytest.approx(77.15, abs=0.005)


def test_summarize_closed_form_and_partial_groups() -> None:
    per_group = {"natural": 70.0, "specialized": 80.0, "structured": 60.0}
    full = {t.name: per_group[t.group] for t in VTAB_TASKS.values()}
    full["dtd"] = 77.0  # natural mean becomes 71
    full["my_custom_task"] = 0.0  # custom tasks never enter a mean
    s = summarize(full)
    assert s["natural"] == pytest.approx(71.0)
    assert s["group_mean"] == pytest.approx((71.0 + 80.0 + 60.0) / 3)
    assert s["mean19"] == pytest.approx((6 * 70 + 77 + 4 * 80 + 8 * 60) / 19)
    # One structured task missing (or NaN): no structured mean, no group mean, no 19-task mean.
    partial = dict(full, kitti=float("nan"))
    s = summarize(partial)
    assert s["natural"] == pytest.approx(71.0) and s["specialized"] == pytest.approx(80.0)
    assert s["structured"] is None and s["group_mean"] is None and s["mean19"] is None
    assert s["counts"]["structured"] == (7, 8) and s["counts"]["all"] == (18, 19)


def test_names_aliases_and_errors() -> None:
    assert resolve_name("LinearProbe") == "Linear"
    assert resolve_name("repadapter") == "RepAdapter"
    assert reference_for_module("DyT", {"skipping": {"target_rate": 0.7}}) == "DyT r=0.7"
    assert reference_for_module("RepAdapter", {"placement": "repattn"}) is None
    assert reference_for_module("DynAdapter", {}) is None  # no per-task numbers exist
    with pytest.raises(PETLError, match="Did you mean 'RepAdapter'"):
        reference("RepAdaptr")


def test_paper_table_layout() -> None:
    table = paper_table({"RepAdapter": reference("RepAdapter").per_task, "half": {"cifar": 50.0}})
    header, _, full, half = table.splitlines()
    assert header.count("|") == 1 + 1 + 19 + 5
    cells = [c.strip() for c in full.strip("|").split("|")]
    assert cells[1] == "72.4" and cells[-2] == "76.09" and cells[-1] == "73.84"
    cells = [c.strip() for c in half.strip("|").split("|")]
    assert cells[1] == "50.0" and cells[2] == "-" and cells[-1] == "-"


def test_reference_json_is_package_data() -> None:
    """The JSON ships in the wheel: pyproject's package-data globs cover it."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["petl_lightning"]
    assert any(fnmatch("data/reference_results.json", g) for g in globs)
    assert (ROOT / "src/petl_lightning/data/reference_results.json").is_file()
    assert not math.isnan(reference("Linear").per_task["cifar"])
