"""Run directories never delete or replace what the tool did not make; run.json accounts for the
wall time; the Perfetto trace is written only when asked."""

import json
import os

import pytest

from rdu.node.cli.main import main
from rdu.node.runs.run_directory import RunDirectory, is_run_directory

SMALL = ["run", "--backend", "inline", "--experts", "10", "--limit", "20"]


def rdu(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_folder_with_user_files_is_never_replaced_even_with_force(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    for extra in ([], ["--force"]):
        code, _, err = rdu(capsys, *SMALL, "--out", str(docs), *extra)
        assert code == 2 and "not a run directory" in err and len(err.strip().splitlines()) == 1
    assert (docs / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]  # no partial folder left behind


def test_a_run_inside_a_run_directory_with_a_user_file_is_not_ours(tmp_path, capsys):
    out = tmp_path / "r"
    assert rdu(capsys, *SMALL, "--out", str(out))[0] == 0
    (out / "notes.md").write_text("mine")
    code, _, err = rdu(capsys, *SMALL, "--out", str(out), "--force")
    assert code == 2 and (out / "notes.md").read_text() == "mine"


def test_an_existing_run_is_refused_then_replaced_with_force(tmp_path, capsys):
    out = tmp_path / "r"
    assert rdu(capsys, *SMALL, "--out", str(out), "--seed", "1")[0] == 0
    first = (out / "summary.json").read_text()
    code, _, err = rdu(capsys, *SMALL, "--out", str(out), "--seed", "2")
    assert code == 2 and "--force" in err and (out / "summary.json").read_text() == first
    assert rdu(capsys, *SMALL, "--out", str(out), "--seed", "2", "--force")[0] == 0
    assert (out / "summary.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


@pytest.mark.parametrize("out", ["", " ", "..", "a/../b", "."])
def test_dangerous_output_paths_are_refused(tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    code, _, err = rdu(capsys, *SMALL, "--out", out, "--force")
    assert code == 2 and "out: " in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_an_output_path_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("data")
    code, _, err = rdu(capsys, *SMALL, "--out", str(target), "--force")
    assert code == 2 and "not a folder" in err and target.read_text() == "data"


def test_an_unfinished_run_never_replaces_a_complete_one(tmp_path, capsys):
    out = tmp_path / "r"
    assert rdu(capsys, *SMALL, "--out", str(out))[0] == 0
    before = (out / "summary.json").read_text()
    directory = RunDirectory(out, force=True)
    (directory.partial / "summary.json").write_text("{}")
    landed = directory.complete(finished=False)
    assert landed != out and landed.name.startswith("r.interrupted-")
    assert (out / "summary.json").read_text() == before and is_run_directory(out)


def test_run_json_accounts_for_every_phase_and_says_what_ran(tmp_path, capsys):
    out = tmp_path / "r"
    code, stdout, _ = rdu(capsys, *SMALL, "--out", str(out), "--json")
    info = json.loads((out / "run.json").read_text())
    assert code == 0 and json.loads(stdout)["run"] == info
    assert set(info["phases_wall_s"]) == {"setup", "serving", "writing_outputs"}
    assert abs(sum(info["phases_wall_s"].values()) - info["wall_s"]) <= 0.01 + 0.01 * info["wall_s"]
    assert info["tool"] == "rdu-emulator" and info["version"] and info["command"][:2] == ["rdu", "run"]
    assert "wall_s" not in json.loads((out / "summary.json").read_text())


def test_the_perfetto_trace_is_written_only_when_asked(tmp_path, capsys):
    assert rdu(capsys, *SMALL, "--out", str(tmp_path / "plain"))[0] == 0
    assert not (tmp_path / "plain" / "trace.json").exists()
    assert rdu(capsys, *SMALL, "--out", str(tmp_path / "traced"), "--perfetto")[0] == 0
    trace = json.loads((tmp_path / "traced" / "trace.json").read_text())
    assert trace["traceEvents"] and json.loads((tmp_path / "traced" / "run.json").read_text())["trace_written"]
    assert is_run_directory(tmp_path / "traced")


def test_a_run_directory_is_an_ordinary_folder(tmp_path, capsys):
    out = tmp_path / "r"
    assert rdu(capsys, *SMALL, "--out", str(out))[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
