"""Studies: the fast variant of each shipped study runs (points as Ray tasks), resumes, plots."""

import csv
from pathlib import Path

import pytest

from interconnect.spec_fields import UserError
from node.sweep import load_study, run_study, study_points

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ("scale-up", "scale-out", "expert-count", "policies")

@pytest.mark.ray
@pytest.mark.parametrize("name", STUDIES)
def test_fast_variant_runs_and_resumes(ray_local, tmp_path, name):
    study = load_study(str(ROOT / "experiments" / f"{name}.yaml"), fast=True)
    outcome = run_study(study, tmp_path / name)
    rows = list(csv.DictReader((tmp_path / name / "results.csv").open()))
    assert len(rows) == len(study_points(study)) == outcome.ran
    assert any(r["status"] == "ok" for r in rows)
    for row in rows:
        if row["status"] == "ok":
            assert int(row["requests_completed"]) == int(row["requests_in"])
        else:
            assert row["status"] == "invalid" and row["error"]
    for path in outcome.files:
        assert path.stat().st_size > 0
    assert len([f for f in outcome.files if f.suffix == ".png"]) == len(study.plots)
    again = run_study(study, tmp_path / name)
    assert again.ran == 0 and again.reused == len(rows)

def test_variants_scale_with_an_axis():
    study = load_study(str(ROOT / "experiments" / "scale-out.yaml"), fast=True)
    growing = [p for p in study_points(study) if p.labels["load"] == "growing"]
    assert [p.overrides["workload"]["requests"] for p in growing] == [250, 500, 1000]
    fixed = [p for p in study_points(study) if p.labels["load"] == "fixed"]
    assert all("workload" not in p.overrides for p in fixed)

@pytest.mark.parametrize("text, message", [
    ("base: {}\n", "axes: expected a non-empty list of axes"),
    ("axes: [{field: tp, values: []}]\n", "axes[0].values: expected a non-empty list"),
    ("axes: [{field: tp, values: [1]}]\nbogus: 1\n", "bogus: unknown field"),
    ("axes: [{name: load, variants: {a: 3}}]\n", "axes[0].variants.a: expected a mapping"),
    ("axes: [{field: tp, values: [1]}]\nplots: [{x: tp}]\n", "plots: expected a list of plots"),
])
def test_bad_study_files(tmp_path, text, message):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_study(str(path))

def test_scale_by_needs_a_numeric_axis(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("axes:\n  - {field: platform, values: [sn40l-node]}\n"
                    "  - {name: load, variants: {x: {scale_by: platform, experts: 2}}}\n")
    with pytest.raises(UserError, match="scales by 'platform', which is not a numeric axis"):
        study_points(load_study(str(path)))
