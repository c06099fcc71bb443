"""`rdu` as a process, as a user's shell sees it: stdout carries exactly what the command prints,
signals stop it cleanly with the right exit code, a closed pipe is not an error, and an
unreachable cluster fails quickly with one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import wait_until_serving

RDU = str(Path(sys.executable).with_name("rdu"))
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.mark.parametrize("extra", [["--backend", "inline"], ["--nodes", "2"]], ids=["inline", "ray-2-nodes"])
def test_json_output_is_exactly_one_json_document(tmp_path, extra):
    proc = subprocess.run([RDU, "run", "--experts", "10", "--limit", "40", "--out", str(tmp_path / "r"), "--json",
                           *extra], capture_output=True, text=True, env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # nothing else on stdout: no Ray warning, no progress line
    assert "\x1b" not in proc.stdout and data["summary"]["requests_completed"] == 40
    assert "Traceback" not in proc.stderr


def test_sigterm_keeps_results_and_exits_143(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([RDU, "run", "--limit", "4000", "--out", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=ENV)
    wait_until_serving(process, tmp_path)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err.decode()
    assert "Traceback" not in err.decode()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and 0 < summary["requests_completed"] < 4000


def test_a_closed_stdout_is_not_an_error(tmp_path):
    process = subprocess.Popen([RDU, "run", "--backend", "inline", "--experts", "10", "--limit", "40", "--out",
                                str(tmp_path / "r"), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=ENV)
    process.stdout.close()  # `rdu run --json | true`: the reader is gone before anything is printed
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0 and "BrokenPipeError" not in err and "Traceback" not in err
    assert (tmp_path / "r" / "summary.json").is_file()


def test_an_unreachable_address_fails_quickly_with_one_line(tmp_path):
    started = time.monotonic()
    proc = subprocess.run([RDU, "run", "--experts", "10", "--limit", "10", "--address", "127.0.0.1:1", "--out",
                           str(tmp_path / "r")], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and "--address 127.0.0.1:1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and time.monotonic() - started < 60
    assert not (tmp_path / "r").exists() and not list(tmp_path.iterdir())
