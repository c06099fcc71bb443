"""Stopping a run, however it is stopped, leaves a usable run directory (or none) and no process
of ours behind: Ctrl-C while serving, a second Ctrl-C while the outputs are written, Ctrl-C
during Ray's start-up, and `kill -9` of the driver, which nothing in the driver can catch (the
Ray session's watchdog ends what Ray would leave for a minute: node/cluster/ray_session.py).

Each test runs the CLI as a child process and blames it only for its own processes (its
descendants, and whatever holds files in its Ray session directory: tests/leftovers.py), so
other Rays on the machine do not count.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from leftovers import RunProcesses, command_line  # noqa: E402
from tests.helpers import wait_until_serving  # noqa: E402

RDU = str(Path(sys.executable).with_name("rdu"))
GONE_WITHIN_S = 15.0   # Ray's agents lived ~60 s after a kill -9 of the driver without the watchdog


def _start(argv: list[str], **kwargs) -> subprocess.Popen:
    """A child command with Ctrl-C at its default (pytest's own handler is not inherited)."""
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def _follow_until_exit(process: subprocess.Popen, run: RunProcesses, timeout_s: float = 90.0) -> bytes:
    """Keep following the child's descendants until it exits; returns its stderr."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        run.follow()
        time.sleep(0.02)
    _, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    return err


def _check_complete_interrupted_run(out: Path) -> dict:
    """An interrupted run directory whose three result files agree: every completed request in
    requests.csv exactly once, finishing after it arrived."""
    summary = json.loads((out / "summary.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert summary["interrupted"] and run["interrupted"]
    assert 0 < summary["requests_completed"] < summary["requests_in"] == 4000
    with open(out / "requests.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) == summary["requests_completed"]
    assert all(int(row["finish_ns"]) > int(row["arrival_ns"]) for row in rows)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "a hidden partial folder was left"
    return summary


def test_sigint_keeps_results_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "run"
    process = _start([RDU, "run", "--limit", "4000", "--out", str(out)])
    run = RunProcesses(process.pid)
    wait_until_serving(process, tmp_path, timeout_s=90)
    run.follow()
    process.send_signal(signal.SIGINT)
    err = _follow_until_exit(process, run).decode()
    assert process.returncode == 130, err
    assert "interrupted; results so far in" in err and "Traceback" not in err
    _check_complete_interrupted_run(out)
    assert any("raylet" in command for command in run.commands())
    assert not run.wait_gone(GONE_WITHIN_S)


def test_kill_9_of_the_driver_leaves_no_ray_process_behind(tmp_path):
    """SIGKILL cannot be caught: the watchdog started with the session ends Ray's processes."""
    process = _start([RDU, "run", "--limit", "4000", "--out", str(tmp_path / "run")])
    run = RunProcesses(process.pid)
    wait_until_serving(process, tmp_path, timeout_s=90)
    run.follow()
    commands = run.commands()
    assert any("raylet" in c for c in commands) and any("ray::SocketActor" in c for c in commands), commands
    process.kill()
    process.communicate(timeout=30)
    left = run.wait_gone(GONE_WITHIN_S)
    assert not left, f"alive {GONE_WITHIN_S:.0f} s after kill -9 of the driver: {left}"


@pytest.mark.parametrize("started", ["gcs_server", "raylet"])
def test_ctrl_c_during_ray_start_up_leaves_nothing_behind(tmp_path, started):
    """Ctrl-C as soon as Ray's GCS (or raylet) exists, inside `ray.init`: the command exits 130,
    no run directory, and no Ray process (a raylet's agents outlived an interrupted start-up by
    more than a minute before the watchdog)."""
    process = _start([RDU, "run", "--limit", "4000", "--out", str(tmp_path / "run")])
    run = RunProcesses(process.pid)
    deadline = time.monotonic() + 60
    while not any(started in command_line(pid) for pid in run.follow()):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    err = _follow_until_exit(process, run).decode()
    assert process.returncode == 130 and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())
    left = run.wait_gone(GONE_WITHIN_S)
    assert not left, f"alive {GONE_WITHIN_S:.0f} s after a Ctrl-C during Ray's start-up: {left}"


# The child runs the real CLI; an audit hook sends it a second SIGINT the moment it opens its
# first result file (summary.json or run.json) for writing, i.e. while the outputs are written.
_SECOND_CTRL_C = """
import os, signal, sys
from rdu.node.cli.main import main
marker = os.dup(2)
fired = []
def hook(event, args):
    if event != "open" or fired or not args or args[0] is None or isinstance(args[0], int):
        return
    name = os.path.basename(os.fsdecode(args[0]))
    mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
    if ("summary.json" in name or "run.json" in name) and ("w" in mode or "x" in mode):
        fired.append(name)
        os.write(marker, ("second SIGINT while writing " + name + "\\n").encode())
        os.kill(os.getpid(), signal.SIGINT)
sys.addaudithook(hook)
sys.argv = ["rdu", *sys.argv[1:]]
sys.exit(main())
"""


def test_a_second_ctrl_c_while_the_outputs_are_written_still_leaves_a_complete_run(tmp_path):
    out = tmp_path / "run"
    process = _start([sys.executable, "-c", _SECOND_CTRL_C, "run", "--backend", "inline", "--limit", "4000",
                      "--out", str(out)])
    wait_until_serving(process, tmp_path, timeout_s=60)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    err = err.decode()
    assert "second SIGINT while writing" in err, err
    assert process.returncode == 130 and "Traceback" not in err, err
    assert "interrupted; results so far in" in err
    _check_complete_interrupted_run(out)


def test_kill_9_of_a_driver_that_joined_a_cluster_leaves_the_cluster_alone(tmp_path, ray_local):
    """A run that joins a Ray it did not start (`--address`) has no watchdog and starts no Ray
    process: killing it leaves every process of that cluster running (a reaper that ended the
    user's Ray processes by name, or everything under /tmp/ray, would not)."""
    cluster = RunProcesses(os.getpid())   # the session's Ray: children of this test process
    cluster.follow()
    core = {pid for pid, command in cluster.command_lines.items()
            if any(name in command for name in ("gcs_server", "raylet", "Agent", "monitor"))}
    assert len(core) >= 3, cluster.commands()
    address = ray_local.get_runtime_context().gcs_address
    process = _start([RDU, "run", "--address", address, "--limit", "4000", "--out", str(tmp_path / "run")])
    wait_until_serving(process, tmp_path, timeout_s=90)
    joined = RunProcesses(process.pid)
    assert not joined.follow(), joined.commands()
    process.kill()
    process.communicate(timeout=30)
    time.sleep(3)   # the watchdog of a local run has reaped everything well within this
    assert core <= set(cluster.alive()), "a process of the joined cluster was ended"
    assert ray_local.get(ray_local.remote(lambda: 42).remote(), timeout=60) == 42



def _sleeper(mark: str, child_mark: str | None = None) -> subprocess.Popen:
    """A sleeping process whose command line ends with `mark` (a fake program of Ray's, say);
    with `child_mark` (passed in the environment, not on its own command line), it first starts
    a sleeping child whose command line ends with that."""
    code = ("import os, subprocess, sys, time\n"
            "if os.environ.get('CHILD_MARK'):\n"
            "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', os.environ['CHILD_MARK']])\n"
            "time.sleep(60)\n")
    return subprocess.Popen([sys.executable, "-c", code, mark], env={**os.environ, "CHILD_MARK": child_mark or ""})


def test_the_watchdog_ends_only_the_ray_processes_its_driver_started_after_it(tmp_path):
    """Ray's programs started by this process after the watchdog, and their descendants, are
    ended; a Ray program started before it, a child that is not Ray's, and a Ray program that is
    not this process's child (a grandchild through a non-Ray child) are left alone."""
    from rdu.node.cluster.ray_session import RayWatchdog

    fake_ray = str(tmp_path / "site-packages" / "ray")
    before = _sleeper(f"{fake_ray}/gcs_server")
    watchdog = RayWatchdog.start(ray_dir=fake_ray)
    assert watchdog is not None
    ours = _sleeper(f"{fake_ray}/raylet", child_mark="worker")
    not_ray = _sleeper("plain", child_mark=f"{fake_ray}/raylet")
    trees = [RunProcesses(ours.pid), RunProcesses(not_ray.pid)]
    try:
        deadline = time.monotonic() + 10
        while not all(tree.follow() for tree in trees):
            assert time.monotonic() < deadline, "the sleepers did not start their children"
            time.sleep(0.05)
        time.sleep(1.2)   # the watchdog refreshes its list every 0.5 s
        watchdog.close()
        assert ours.poll() is not None and not trees[0].alive(), "a Ray program of ours or its child was left"
        assert before.poll() is None and not_ray.poll() is None and trees[1].alive(), "the watchdog ended too much"
    finally:
        for tree in trees:
            for pid in tree.alive():
                os.kill(pid, signal.SIGKILL)
        for process in (before, ours, not_ray):
            process.kill()
            process.wait()
