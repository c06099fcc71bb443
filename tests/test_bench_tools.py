"""The bench's bookkeeping without running a benchmark: the README splicing, the verdict and exit
code, the result files and the progress lines. No Ray, no timing; fast."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

from bench import run as bench_run
from bench.progress import BenchProgress
from bench.report import (BEGIN_MARKER, END_MARKER, BenchRecord, Row, check_writable, exit_code, format_value,
                          load_record, markdown_table, missed, record_block, save_record, splice_readme,
                          verdict_lines)
from rdu.base import UserError

REPO_README = Path(__file__).resolve().parent.parent / "README.md"

README = f"""# Title

Intro | with a pipe.

{BEGIN_MARKER}
| old | table |
|---|---|
| stale | ~1 s |
{END_MARKER}

## After
tail text without a final newline"""


def _rows() -> list[Row]:
    return [Row("plane", "gRPC plane", 1034.2, "MB/s", ">= 500", True),
            Row("plane", "round trip", 1.171, "ms"),
            Row("trace", "serving ratio", 3.4, "x", "<= 3", False),
            Row("trace", "identical", 1.0, "bool", "yes", True)]


def _record(groups=tuple(bench_run.BENCHES), rows=None, failed=()) -> BenchRecord:
    return BenchRecord(date="2030-01-02", cores=2, groups=list(groups), rows=_rows() if rows is None else rows,
                       failed=list(failed))


def test_splice_replaces_only_between_markers():
    new = splice_readme(README, "| new | 2 |")
    head, tail = README.split(BEGIN_MARKER)[0], README.split(END_MARKER)[1]
    assert new == f"{head}{BEGIN_MARKER}\n| new | 2 |\n{END_MARKER}{tail}"
    assert "stale" not in new and new.endswith("without a final newline")
    assert splice_readme(new, "| new | 2 |") == new  # idempotent


def test_splice_keeps_the_real_readme_outside_the_markers():
    text = REPO_README.read_text(encoding="utf-8")  # read only: the lead runs --write-readme for real
    new = splice_readme(text, "BLOCK")
    assert new.split(BEGIN_MARKER)[0] == text.split(BEGIN_MARKER)[0]
    assert new.split(END_MARKER)[1] == text.split(END_MARKER)[1]
    assert f"{BEGIN_MARKER}\nBLOCK\n{END_MARKER}" in new


@pytest.mark.parametrize("text", ["no markers", f"{BEGIN_MARKER} only", f"{END_MARKER}\n{BEGIN_MARKER}",
                                  f"{BEGIN_MARKER}\n{END_MARKER}\n{BEGIN_MARKER}\n{END_MARKER}"])
def test_splice_refuses_missing_repeated_or_swapped_markers(text):
    with pytest.raises(UserError):
        splice_readme(text, "x")


def test_exit_code_is_one_only_for_a_missed_target():
    rows = _rows()
    assert [r.name for r in missed(rows)] == ["serving ratio"]
    assert exit_code(rows) == 1
    assert exit_code([r for r in rows if r.ok is not False]) == 0
    assert exit_code([Row("g", "no target", 0.0, "s")]) == 0  # no target never misses
    assert verdict_lines(rows) == ["bench: 1 of 3 targets missed:", "  trace: serving ratio = 3.40x (target <= 3x)"]
    assert verdict_lines(rows[:2]) == ["bench: all 1 targets met"]


def test_markdown_table_and_block():
    table = markdown_table(_rows() + [Row("g", "a|b", 12.345, "%", "<= 10", False)])
    lines = table.splitlines()
    assert lines[0] == "| group | measurement | value | target | met |"
    assert "| plane | gRPC plane | 1,034 MB/s | >= 500 MB/s | yes |" in lines
    assert "| plane | round trip | 1.17 ms |  |  |" in lines
    assert "| trace | serving ratio | 3.40x | <= 3x | **NO** |" in lines
    assert "| trace | identical | yes | yes | yes |" in lines
    assert "| g | a\\|b | 12.3% | <= 10% | **NO** |" in lines
    block = record_block(_record())
    assert block.startswith(table.splitlines()[0]) and "2030-01-02, 2 cores" in block and "one `make bench` run" in block


def test_format_value():
    assert [format_value(v) for v in (123456.7, 45.67, 1.234, -0.5)] == ["123,457", "45.7", "1.23", "-0.50"]
    assert format_value(0.0, "bool") == "no" and format_value(float("nan")) == "n/a"


def test_record_round_trip_and_foreign_files(tmp_path):
    crashed = Row("soak", "benchmark crashed: RuntimeError: x", float("nan"), "", "runs", False)
    save_record(tmp_path, _record(rows=[*_rows(), crashed], failed=["soak"]))
    data = json.loads((tmp_path / "latest.json").read_text())  # strict JSON: NaN written as null
    assert data["missed"] == ["serving ratio", crashed.name] and data["rows"][-1]["value"] is None
    back = load_record(tmp_path)
    assert back.rows[:-1] == _rows() and math.isnan(back.rows[-1].value) and back.failed == ["soak"]
    assert (tmp_path / "table.md").read_text() == record_block(back) + "\n"
    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "latest.json").write_text('{"mine": true}')
    with pytest.raises(UserError):
        check_writable(foreign)


def test_write_readme_on_a_copy(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    results = tmp_path / "results"
    save_record(results, _record())
    assert bench_run.main(["--write-readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert "stale" not in text and "| trace | serving ratio | 3.40x | <= 3x | **NO** |" in text
    assert text == splice_readme(README, record_block(_record()))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("record", [_record(groups=("plane",)), _record(failed=["soak"])])
def test_write_readme_refuses_a_partial_or_crashed_run(tmp_path, capsys, record):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    save_record(tmp_path / "results", record)
    assert bench_run.main(["--write-readme", str(readme), "--results", str(tmp_path / "results")]) == 2
    assert readme.read_text() == README
    err = capsys.readouterr().err
    assert err.startswith("bench: error: ") and len(err.strip().splitlines()) == 1


def test_write_readme_without_results_is_a_one_line_error(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert bench_run.main(["--write-readme", str(readme), "--results", str(tmp_path / "none")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and readme.read_text() == README


def _fake_benches(monkeypatch, met: bool) -> None:
    """Replace the real groups with instant ones; one prints to stdout as Ray might."""
    def good():
        print("noise from a library")
        return [Row("plane", "fast thing", 5.0, "x", "<= 3", met)]

    def broken():
        raise RuntimeError("boom " + "x" * 200 + "\nsecond line")

    monkeypatch.setattr(bench_run, "BENCHES", {"plane": good, "trace": broken} if not met else {"plane": good})


def test_main_exits_1_names_the_misses_and_keeps_stdout_for_the_table(tmp_path, monkeypatch, capfd):
    _fake_benches(monkeypatch, met=False)
    assert bench_run.main(["--results", str(tmp_path)]) == 1
    out, err = capfd.readouterr()
    assert "fast thing" in out and "NO" in out and "noise from a library" not in out
    assert "noise from a library" in err and "Traceback" in err
    assert "bench: 2 of 2 targets missed:" in err and "  plane: fast thing = 5.00x (target <= 3x)\n" in err
    assert "bench [1/2] plane: started" in err and "bench [2/2] trace: crashed in" in err
    data = json.loads((tmp_path / "latest.json").read_text())
    crash = "benchmark crashed: RuntimeError: boom " + "x" * 92 + "..."  # cut to 100 characters of message
    assert data["failed"] == ["trace"] and data["missed"] == ["fast thing", crash]
    assert f"  trace: {crash} = n/a (target runs)\n" in err and "second line" in err  # whole message in traceback


def test_main_exits_0_when_every_target_is_met(tmp_path, monkeypatch, capfd):
    _fake_benches(monkeypatch, met=True)
    assert bench_run.main(["--json", "--results", str(tmp_path)]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == [Row("plane", "fast thing", 5.0, "x", "<= 3", True).to_dict()]
    assert "bench: all 1 targets met" in err


def test_plain_progress_lines():
    stream = io.StringIO()
    with BenchProgress(2, stream=stream, terminal=False) as progress:
        with progress.group("plane"):
            pass
        with pytest.raises(ValueError), progress.group("trace"):
            raise ValueError
    lines = stream.getvalue().splitlines()
    assert lines[0] == "bench [1/2] plane: started" and lines[1].startswith("bench [1/2] plane: finished in ")
    assert lines[2] == "bench [2/2] trace: started" and lines[3].startswith("bench [2/2] trace: crashed in ")
    assert progress.done == 2
