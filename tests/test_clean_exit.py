"""Ctrl-C during a run with the Ray backend: the results so far are written, the run is marked
interrupted, Ray is shut down and no process of ours is left behind."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from leftovers import ray_processes  # noqa: E402
from tests.helpers import wait_until_serving  # noqa: E402

RDU = str(Path(sys.executable).with_name("rdu"))


def test_sigint_keeps_results_and_leaves_nothing_behind(tmp_path):
    before = set(ray_processes())
    out = tmp_path / "run"
    process = subprocess.Popen([RDU, "run", "--limit", "4000", "--out", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_until_serving(process, tmp_path, timeout_s=90)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=90)
    assert process.returncode == 130, err.decode()
    assert "interrupted; results so far in" in err.decode() and "Traceback" not in err.decode()
    summary = json.loads((out / "summary.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert summary["interrupted"] and run["interrupted"]
    assert 0 < summary["requests_completed"] < summary["requests_in"] == 4000
    rows = (out / "requests.csv").read_text().strip().splitlines()
    assert len(rows) == summary["requests_completed"] + 1
    deadline = time.monotonic() + 30
    while set(ray_processes()) - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not set(ray_processes()) - before
