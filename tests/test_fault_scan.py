"""Faults at any moment: a kill at every request position and at virtual times spread over a run
(inside switches, runs, recoveries) is survived with every request served exactly once, checked
against requests.csv, not only against the summary's counters."""

from __future__ import annotations

import json

import pytest

from rdu.node.cli.main import main
from tests.helpers import assert_each_request_once

SMALL = ["run", "--backend", "inline", "--experts", "20", "--limit", "60", "--scheduler", "static"]


def rdu(capsys, tmp_path, name, *extra) -> dict:
    out = tmp_path / name
    code = main([*SMALL, *extra, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    return assert_each_request_once(out)


def test_kill_socket_at_every_request_position(tmp_path, capsys):
    for position in range(60):
        summary = rdu(capsys, tmp_path, f"k{position}", "--fault", f"kill-socket:node0/socket3@request={position}")
        assert summary["faults_injected"] == summary["faults_recovered"] == 1


def test_kill_node_at_every_request_position(tmp_path, capsys):
    for position in range(0, 60, 3):
        summary = rdu(capsys, tmp_path, f"n{position}", "--nodes", "2", "--tp", "4",
                      "--fault", f"kill-node:node1@request={position}")
        assert summary["faults_injected"] == 1


def test_kills_at_virtual_times_across_the_whole_run(tmp_path, capsys):
    baseline = rdu(capsys, tmp_path, "base")
    span_ms = (baseline["virtual_ns"]) / 1e6
    for k in range(1, 40):
        at_ms = span_ms * k / 40
        rdu(capsys, tmp_path, f"t{k}", "--nodes", "2", "--tp", "4",
            "--fault", f"kill-socket:node0/socket1@virtual_ms={at_ms:.3f}",
            "--fault", f"kill-socket:node1/socket2@virtual_ms={at_ms * 1.01:.3f}")


def test_many_kills_of_one_socket_stop_at_the_presets_limit_with_results_kept(tmp_path, capsys):
    kills = [f"kill-socket:node0/socket3@request={p}" for p in range(2, 40, 2)]  # 19 kills > max_restarts 16
    out = tmp_path / "many"
    args = [*SMALL, "--out", str(out)]
    for kill in kills:
        args += ["--fault", kill]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1 and "restarts the platform allows" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] and summary["faults_recovered"] == 16
    assert summary["requests_completed"] < summary["requests_in"]


@pytest.mark.parametrize("limit", [4, 16])
def test_the_restart_limit_comes_from_the_preset(tmp_path, capsys, limit):
    kills = [f"kill-socket:node0/socket3@request={p}" for p in range(2, 2 + 2 * (limit + 1), 2)]
    args = [*SMALL, "--out", str(tmp_path / f"l{limit}"), "--set", f"socket.max_restarts={limit}"]
    for kill in kills:
        args += ["--fault", kill]
    code = main(args)
    assert code == 1 and f"more than the {limit} restarts" in capsys.readouterr().err


def test_the_issues_unlucky_kill_is_survived(tmp_path, capsys):
    """The repro of the issue: a kill while the group's next expert waits for its switch."""
    summary = rdu(capsys, tmp_path, "repro", "--limit", "300", "--fault", "kill-socket:node0/socket3@request=32")
    assert summary["faults_recovered"] == 1 and summary["requests_completed"] == 300


@pytest.mark.ray
def test_the_restart_limit_is_the_same_on_the_ray_backend(ray_local, tmp_path, capsys):
    """With the preset's limit at 2, two kills of one socket actor are survived (Ray really
    restarts it twice); a third stops the run with its results, as on the inline backend,
    instead of failing inside Ray."""
    kills = [f"kill-socket:node0/socket3@request={p}" for p in (4, 8, 12)]
    three = ["run", "--experts", "10", "--limit", "16", "--scheduler", "static", "--set", "socket.max_restarts=2",
             "--out", str(tmp_path / "three")] + [a for k in kills for a in ("--fault", k)]
    assert main(three) == 1
    assert "more than the 2 restarts" in capsys.readouterr().err
    summary = json.loads((tmp_path / "three" / "summary.json").read_text())
    assert summary["stopped"] and summary["faults_injected"] == 3 and summary["faults_recovered"] == 2
    assert json.loads((tmp_path / "three" / "run.json").read_text())["backend_checks"]["actor_restarts"] == 2

