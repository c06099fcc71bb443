"""`rdu run --dashboard` on the default (Ray) backend, in a pseudo-terminal, as `make demo` runs
it: to the end, and after a Ctrl-C. The dashboard must never touch Ray after the session that
owns its refs is shut down (it used to, and the run ended in a traceback with exit 1 and no
results). The child starts its own Ray, and shuts it down."""

import json
import os
import re
import sys
from pathlib import Path

import pexpect
import pytest

pytestmark = pytest.mark.ray

RDU = str(Path(sys.executable).with_name("rdu"))
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]")
RUN_FILES = ("summary.json", "run.json", "requests.csv", "events.msgpack", "config.resolved.yaml")


def spawn(argv: list[str], rows: int = 24, columns: int = 80) -> pexpect.spawn:
    """`rdu ARGV` in a rows x columns pseudo-terminal (COLUMNS/LINES agree, so nothing inherited
    from the test runner overrides the size)."""
    env = {**os.environ, "COLUMNS": str(columns), "LINES": str(rows), "TERM": "xterm-256color",
           "RAY_USAGE_STATS_ENABLED": "0"}
    return pexpect.spawn(RDU, argv, dimensions=(rows, columns), env=env, encoding="utf-8", timeout=120)


def finish(child: pexpect.spawn, seen: str = "") -> str:
    """Everything the child printed (without terminal codes), once it has exited."""
    text = seen + child.read()
    child.close()
    return ANSI.sub("", text)


def assert_run_directory(out: Path) -> tuple[dict, dict]:
    for name in RUN_FILES:
        assert (out / name).is_file(), f"{name} missing in {sorted(p.name for p in out.iterdir())}"
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "a hidden partial directory is left"
    return json.loads((out / "summary.json").read_text()), json.loads((out / "run.json").read_text())


def test_ray_dashboard_run_to_the_end(tmp_path):
    out = tmp_path / "run"  # fresh: the CLI may refuse an existing --out
    child = spawn(["run", "--experts", "10", "--limit", "300", "--dashboard", "--out", str(out)])
    text = finish(child)
    assert child.exitstatus == 0, text[-3000:]
    assert "Traceback" not in text and "owner is unknown" not in text, text[-3000:]
    for expected in ("rdu dashboard [finished]", "run finished", "TTFT", "TPOT",
                     "queue", "300 done / 300", "run directory:"):
        assert expected in text, expected
    summary, run = assert_run_directory(out)
    assert run["backend"] == "ray" and not run["interrupted"]
    assert summary["requests_completed"] == summary["requests_in"] == 300


def test_ray_dashboard_ctrl_c_keeps_the_results_so_far(tmp_path):
    out = tmp_path / "run"
    child = spawn(["run", "--experts", "10", "--limit", "3000", "--dashboard", "--out", str(out)])
    # wait for a frame of the serving dashboard with some requests done, then press Ctrl-C
    child.expect(r"\[running\]")
    child.expect(r"\b[1-9][\d,]* done / 3,000")
    seen = child.before + child.after
    child.sendintr()
    text = finish(child, seen)
    assert child.exitstatus == 130, (child.exitstatus, child.signalstatus, text[-3000:])
    assert "Traceback" not in text and "owner is unknown" not in text, text[-3000:]
    assert "rdu dashboard [interrupted]" in text and "run interrupted" in text
    assert "interrupted; results so far in" in text
    summary, run = assert_run_directory(out)
    assert summary["interrupted"] and run["interrupted"] and run["backend"] == "ray"
    assert 0 < summary["requests_completed"] < summary["requests_in"] == 3000
    rows = (out / "requests.csv").read_text().strip().splitlines()
    assert len(rows) == summary["requests_completed"] + 1
