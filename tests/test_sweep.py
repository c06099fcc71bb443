"""Studies: the fast variant of each shipped study runs (points as Ray tasks), resumes, plots."""

import csv
from pathlib import Path

import pytest

from rdu.base import UserError
from rdu.node.studies.sweep import load_study, run_study, study_points
from tests.helpers import assert_each_request_once

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ("scale-up", "scale-out", "expert-count", "policies", "load")

@pytest.mark.ray
@pytest.mark.parametrize("name", STUDIES)
def test_fast_variant_runs_and_resumes(ray_local, tmp_path, name):
    study = load_study(str(ROOT / "experiments" / f"{name}.yaml"), fast=True)
    outcome = run_study(study, tmp_path / name)
    rows = list(csv.DictReader((tmp_path / name / "results.csv").open()))
    assert len(rows) == len(study_points(study)) == outcome.ran
    assert any(r["status"] == "ok" for r in rows)
    for row in rows:
        if row["status"] == "ok":   # its run directory holds every request once
            assert assert_each_request_once(tmp_path / name / "points" / row["point"])["requests_in"] == \
                int(row["requests_in"])
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


# -- resume by content hash, study mistakes, failures, progress (issues 10 and 15) ----------------------

import json
import random

from rdu.node.cli.main import main
from rdu.node.studies.sweep import POINT_RECORD_SUFFIX, PlainProgress, SweepProgress, point_id, point_key

TINY = """name: tiny
base:
  platform: sn40l-node
  model: llama-2-7b
  experts: 10
  workload: {{kind: synthetic, requests: 12, rate_per_s: {rate}}}
  backend: {backend}
axes:
  - {{field: tp, values: [{tps}]}}
"""


def _tiny(tmp_path, tps="2, 8", rate=4, backend="inline", name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(TINY.format(tps=tps, rate=rate, backend=backend))
    return load_study(str(path))


class _Notes(SweepProgress):
    def __init__(self):
        self.notes, self.done = [], []

    def note(self, message):
        self.notes.append(message)

    def point_done(self, point_id, result):
        self.done.append(point_id)


@pytest.mark.ray
def test_an_edited_study_reruns_exactly_what_changed(ray_local, tmp_path):
    out = tmp_path / "out"
    first = run_study(_tiny(tmp_path), out)
    assert (first.ran, first.reused, first.changed) == (2, 0, 0)
    csv_before = (out / "results.csv").read_text()
    started = {p: json.loads((out / "points" / p / "run.json").read_text())["started_at_unix_s"]
               for p in ("tp=2", "tp=8")}

    again = run_study(_tiny(tmp_path), out)
    assert (again.ran, again.reused) == (0, 2)
    assert (out / "results.csv").read_text() == csv_before  # reused rows are the rows of the fresh run

    notes = _Notes()
    edited = run_study(_tiny(tmp_path, tps="2, 4"), out, progress=notes)  # tp=8 replaced by tp=4
    assert (edited.ran, edited.reused, edited.changed) == (1, 1, 0)
    assert notes.done == ["tp=4"]
    assert json.loads((out / "points" / "tp=2" / "run.json").read_text())["started_at_unix_s"] == started["tp=2"]

    notes = _Notes()
    rate_changed = run_study(_tiny(tmp_path, tps="2, 4", rate=5), out, progress=notes)
    assert (rate_changed.ran, rate_changed.reused, rate_changed.changed) == (2, 0, 2)
    assert "2 point(s) changed since the last run: rerun" in notes.notes
    assert json.loads((out / "points" / "tp=2" / "run.json").read_text())["started_at_unix_s"] != started["tp=2"]
    assert [r["point"] for r in rate_changed.rows] == ["tp=2", "tp=4"]


@pytest.mark.ray
def test_corrupt_or_missing_records_rerun_with_a_warning(ray_local, tmp_path, capsys):
    out = tmp_path / "out"
    run_study(_tiny(tmp_path), out)
    (out / "points" / "tp=2" / "summary.json").write_text("{broken")
    (out / "points" / f"tp=8{POINT_RECORD_SUFFIX}").write_text("[1, 2")
    notes = _Notes()
    outcome = run_study(_tiny(tmp_path), out, progress=notes)
    assert outcome.ran == 2 and outcome.failed == 0
    assert any("tp=2/summary.json cannot be read" in n for n in notes.notes)
    assert any(f"tp=8{POINT_RECORD_SUFFIX} cannot be read" in n for n in notes.notes)
    assert json.loads((out / "points" / "tp=2" / "summary.json").read_text())["requests_completed"] == 12

    (out / "points" / f"tp=2{POINT_RECORD_SUFFIX}").unlink()  # a point directory without a record: stale
    notes = _Notes()
    outcome = run_study(_tiny(tmp_path), out, progress=notes)
    assert (outcome.ran, outcome.reused, outcome.changed) == (1, 1, 1)
    assert any("1 point(s) without a record of their config" in n for n in notes.notes)

    capsys.readouterr()
    assert main(["sweep", str(tmp_path / "tiny.yaml"), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)  # stdout: exactly one JSON document
    assert (printed["ran"], printed["reused"]) == (0, 2)


@pytest.mark.ray
def test_failed_points_are_counted_and_rerun(ray_local, tmp_path, monkeypatch, capsys):
    import rdu.node.runs.run

    def crash(config, *args, **kwargs):
        raise RuntimeError("socket on fire")

    monkeypatch.setattr(rdu.node.runs.run, "execute_run", crash)
    out = tmp_path / "out"
    outcome = run_study(_tiny(tmp_path, backend="ray"), out)  # Ray-backend points run in this process
    assert (outcome.ran, outcome.failed, outcome.skipped) == (2, 2, 0)
    assert {r["status"] for r in outcome.rows} == {"failed"}
    assert outcome.rows[0]["error"] == "RuntimeError: socket on fire"
    notes = _Notes()
    again = run_study(_tiny(tmp_path, backend="ray"), out, progress=notes)
    assert again.ran == 2 and "2 point(s) failed last time: rerun" in notes.notes
    capsys.readouterr()
    assert main(["sweep", str(tmp_path / "tiny.yaml"), "--out", str(out)]) == 1
    assert "failed: tp=2: RuntimeError: socket on fire" in capsys.readouterr().out


@pytest.mark.parametrize("field, message", [
    ("tpp", "tpp: unknown field"),
    ("scheduler.polcy", "scheduler.polcy: unknown field"),
    ("workload.popularity.exponnt", "workload.popularity.exponnt: unknown field"),
    ("platform_overrides.sockets_per_nod", "sockets_per_nod: no such platform field"),
])
def test_a_misspelt_axis_field_is_one_error_before_anything_runs(tmp_path, capsys, field, message):
    study = tmp_path / "study.yaml"
    study.write_text("base: {backend: inline, workload: {kind: synthetic, popularity: {kind: zipf}}}\n"
                     f"axes: [{{field: {field}, values: [1, 2]}}]\n")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        run_study(load_study(str(study)), out)
    assert not out.exists()
    assert main(["sweep", str(study), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_axis_values_that_look_alike_never_share_a_directory(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("axes: [{field: platform, values: ['p a.yaml', 'p-a.yaml', 'p/a.yaml', '..']}]\n")
    ids = [p.id for p in study_points(load_study(str(path)))]
    assert len(set(ids)) == 4 and "platform=p-a.yaml" in ids
    assert all("/" not in i and not i.startswith(".") for i in ids)
    path.write_text("axes: [{field: tp, values: [1, '1']}]\n")
    with pytest.raises(UserError, match="would share the directory 'tp=1'"):
        study_points(load_study(str(path)))


def test_point_ids_are_one_to_one_with_their_labels():
    rng = random.Random(7)
    alphabet = "aA0-_.=%/ ,é~"
    labels = {(rng.choice(["x", "x=", "x-y"]), "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))))
              for _ in range(3000)}
    ids = {point_id({"a": a, "b": b}) for a, b in labels}
    assert len(ids) == len(labels)
    long = point_id({"a": "v" * 400})
    assert len(long.encode()) <= 160 and long != point_id({"a": "v" * 401})


def test_point_key_follows_content_not_location(tmp_path):
    from rdu.node.runs.run_config import resolve_run_config

    trace = tmp_path / "trace.csv"
    trace.write_text((ROOT / "scheduler" / "data" / "azure_llm_code_2023.csv").read_text())
    model = tmp_path / "model.json"
    hf = json.loads((ROOT / "socket_actor" / "models" / "llama-2-7b.json").read_text())
    model.write_text(json.dumps(hf))

    def key(**fields):
        tree = {"backend": "inline", "model": str(model), "workload": {"kind": "trace", "trace": str(trace)}}
        return point_key(resolve_run_config(None, {**tree, **fields}))

    base = key()
    assert key(name="other", out=str(tmp_path / "elsewhere"), address="auto") == base
    assert key(tp=4) != base
    lines = trace.read_text().splitlines()
    trace.write_text("\n".join(lines[:-1]) + "\n")  # one request fewer: same path, new content
    assert key() != base
    edited = key()
    model.write_text(json.dumps({**hf, "num_hidden_layers": hf["num_hidden_layers"] - 1}))
    assert key() != edited


def test_a_folder_the_tool_did_not_make_is_refused_untouched(tmp_path):
    study = _tiny(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("t")
    with pytest.raises(UserError, match="is not a sweep folder of this tool"):
        run_study(study, docs)
    assert [p.name for p in docs.iterdir()] == ["thesis.txt"]
    out = tmp_path / "out"
    (out / "points" / "tp=2").mkdir(parents=True)
    (out / "points" / "tp=2" / "notes.txt").write_text("mine")
    (out / "sweep.json").write_text("{}")
    with pytest.raises(UserError, match="was not made by this tool"):
        run_study(study, out)
    assert (out / "points" / "tp=2" / "notes.txt").read_text() == "mine"


def test_plain_progress_prints_periodic_lines_with_an_eta():
    lines, now = [], [0.0]
    progress = PlainProgress(lines.append, interval_s=10.0, clock=lambda: now[0])
    progress.start("scale-up", total=12, to_run=10)
    for t, status in ((4.0, "ok"), (8.0, "ok"), (20.0, "invalid")):
        now[0] = t
        progress.point_done("p", {"status": status, "error": "too big"})
    now[0] = 25.0
    progress.tick()  # only 5 s since the last line: quiet
    now[0] = 31.0
    progress.tick()
    assert lines == ["sweep scale-up: 12 point(s), 10 to run, 2 reused",
                     "  p: invalid: too big",
                     "sweep scale-up: 5/12 points done, 20 s elapsed, ~47 s left",
                     "sweep scale-up: 5/12 points done, 31 s elapsed, ~72 s left"]
    for _ in range(7):
        progress.point_done("p", {"status": "ok"})
    assert lines[-1] == "sweep scale-up: 12/12 points done, 31 s elapsed"


# --- the saturation knee of load studies -----------------------------------------------------------------

def _load_rows():
    """Three machines: one falls behind at 8 requests/s, one breaks its TTFT SLO at 2, one keeps up."""
    served = {"a": [1.0, 2.0, 3.9, 5.0], "b": [1.0, 2.0, 4.0, 8.0], "c": [1.0, 2.0, 4.0, 8.0]}
    ttft_s = {"a": [0.1, 0.1, 0.2, 9.0], "b": [0.5, 2.5, 3.0, 4.0], "c": [0.1, 0.1, 0.1, 0.2]}
    return [{"machine": m, "rate": rate, "status": "ok", "served": served[m][i], "ttft": ttft_s[m][i] * 1e9}
            for m in served for i, rate in enumerate((1, 2, 4, 8))]


KNEE = {"offered": "rate", "served": "served", "ratio": 0.95, "latency": "ttft", "slo_ns": 2.0e9}


def test_the_knee_is_the_first_load_not_served_or_over_the_slo():
    from rdu.node.studies.sweep_plots import find_knees

    knees = find_knees({"x": "rate", "y": "served", "series": "machine", "knee": KNEE}, _load_rows())
    assert {m: k[0] if k else None for m, k in knees.items()} == {"a": 8.0, "b": 2.0, "c": None}
    assert "served 5 < 95% of offered" in knees["a"][1] and "ttft 2.5 s > SLO 2 s" in knees["b"][1]
    no_slo = {"x": "rate", "y": "served", "series": "machine", "knee": {"served": "served"}}
    assert find_knees(no_slo, _load_rows())["b"] is None      # served keeps up; only the SLO said no


def test_knees_are_marked_in_the_series_colour_and_named_in_the_legend():
    from rdu.node.studies.sweep_plots import build_study_figure

    spec = {"x": "rate", "y": "served", "series": "machine", "kind": "line", "knee": KNEE, "diagonal": True}
    axes = build_study_figure(spec, _load_rows(), "load").axes[0]
    labels = [t.get_text() for t in axes.get_legend().texts]
    assert {"a: knee at 8", "b: knee at 2", "c: no knee up to the highest load", "served = offered"} <= set(labels)
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert lines["a: knee at 8"].get_xdata()[0] == 8 and lines["a: knee at 8"].get_color() == lines["a"].get_color()


def test_series_of_several_fields_get_one_line_each():
    from rdu.node.studies.sweep_plots import build_study_figure

    rows = [{"platform": p, "experts": e, "rate": r, "status": "ok", "y": r * (e + 1)}
            for p in ("x", "z") for e in (1, 150) for r in (1, 2)]
    axes = build_study_figure({"x": "rate", "y": "y", "series": ["platform", "experts"]}, rows, "t").axes[0]
    assert sorted(t.get_text() for t in axes.get_legend().texts) == ["x, 1", "x, 150", "z, 1", "z, 150"]
    assert axes.get_legend().get_title().get_text() == "platform, experts"


@pytest.mark.parametrize("knee, message", [
    ("yes", "expected a mapping with at least `served`"),
    ({"served": "s", "ratio": 1.5}, r"ratio must be a number in \(0, 1\]"),
    ({"served": "s", "latency": "ttft_ns.p99"}, "`latency` and `slo_ns` go together"),
    ({"served": "s", "slo": 1}, "unknown key"),
])
def test_a_malformed_knee_is_one_line_error(knee, message):
    from rdu.node.studies.sweep_plots import check_knee

    with pytest.raises(UserError, match=message):
        check_knee({"x": "rate", "y": "served", "knee": knee})
