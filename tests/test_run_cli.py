"""`rdu run`: the run directory, bad input, and byte-identical summaries across backends."""

import csv
import json

import pytest

from rdu.node.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_writes_a_complete_directory(tmp_path, capsys):
    out = tmp_path / "r1"
    code, stdout, _ = run(capsys, "run", "--backend", "inline", "--limit", "300", "--out", str(out), "--json")
    assert code == 0
    data = json.loads(stdout)
    assert sorted(p.name for p in out.iterdir()) == ["config.resolved.yaml", "events.msgpack", "requests.csv",
                                                      "run.json", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert data["summary"] == summary and data["run"]["backend"] == "inline"
    for key in ("requests_in", "requests_completed", "throughput_tokens_per_s", "switches", "switch_time_share",
                "hbm_hit_rate", "virtual_ns"):
        assert key in summary
    for key in ("ttft_ns", "tpot_ns", "e2e_ns"):
        assert set(summary[key]) >= {"p50", "p90", "p99"}
    assert "wall_s" not in summary and "wall_s" in data["run"]
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert len(rows) == 300
    assert {"id", "arrival_ns", "expert", "node", "switch_wait_ns", "ttft_ns", "tpot_ns", "e2e_ns"} <= set(rows[0])
    resolved = (out / "config.resolved.yaml").read_text()
    assert "policy: lru" in resolved and "platform_resolved:" in resolved
    from rdu.node.observe.events_log import read_events
    from rdu.scheduler.timeline import Done, End, Setup

    events = list(read_events(out / "events.msgpack"))
    assert isinstance(events[0], Setup) and isinstance(events[-1], End)
    assert sum(isinstance(e, Done) for e in events) == 300
    assert data["run"]["events"] == len(events)


def test_config_file_and_flags(tmp_path, capsys):
    config = tmp_path / "coe.yaml"
    config.write_text("platform: sn40l-node\nexperts: 20\nworkload:\n  kind: synthetic\n  requests: 50\n"
                      "  rate_per_s: 20\nscheduler:\n  policy: lfu\n  max_batch: 4\nbackend: inline\n")
    code, stdout, _ = run(capsys, "run", str(config), "--policy", "prefetch", "--out", str(tmp_path / "r"), "--json")
    assert code == 0
    resolved = (tmp_path / "r" / "config.resolved.yaml").read_text()
    assert "policy: prefetch" in resolved and "max_batch: 4" in resolved and "experts: 20" in resolved


@pytest.mark.parametrize("argv, message", [
    (["--policy", "mru"], "scheduler.policy: expected one of lru, lfu, belady, prefetch, got 'mru'"),
    (["--platform", "tpu-v9"], "unknown platform 'tpu-v9'"),
    (["--model", "gpt-9"], "unknown model 'gpt-9'"),
    (["--platform", "dgx-h100"], "150 experts of 13.48 GB (2.02 TB) plus the router do not fit in the host_dram"),
    (["--set", "socket.hbm.capacity_bytes=3 GiB"], "does not fit next to the router"),
    (["--tp", "3"], "TP 3 does not divide the 8 sockets"),
    (["--dispatch", "random"], "scheduler.dispatch: expected one of"),
])
def test_bad_input_is_one_line_exit_2_and_no_directory(tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    code, _, err = run(capsys, "run", "--backend", "inline", "--limit", "50", "--out", str(out), *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_malformed_trace_line(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,100,5\n2023-11-16 18:17:04,abc,5\n")
    code, _, err = run(capsys, "run", "--backend", "inline", "--trace", str(trace), "--out", str(tmp_path / "r"))
    assert code == 2 and f"{trace}: line 3: ContextTokens: expected a whole number, got 'abc'" in err
    assert not (tmp_path / "r").exists()


def test_bad_run_config_file(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("experts: many\n")
    code, _, err = run(capsys, "run", str(config), "--backend", "inline")
    assert code == 2 and "c.yaml: experts: expected a whole number, got 'many'" in err
    config.write_text("schedular: {policy: lru}\n")
    code, _, err = run(capsys, "run", str(config), "--backend", "inline")
    assert code == 2 and "c.yaml: schedular: unknown field" in err


@pytest.mark.ray
@pytest.mark.parametrize("extra", [[], ["--nodes", "2", "--tp", "4", "--policy", "prefetch"]])
def test_ray_and_inline_summaries_are_byte_identical(ray_local, tmp_path, capsys, extra):
    common = ["run", "--limit", "200", "--experts", "60", *extra]
    assert run(capsys, *common, "--backend", "inline", "--out", str(tmp_path / "inline"))[0] == 0
    code, _, _ = run(capsys, *common, "--backend", "ray", "--out", str(tmp_path / "ray"))
    assert code == 0
    assert (tmp_path / "inline" / "summary.json").read_bytes() == (tmp_path / "ray" / "summary.json").read_bytes()
    info = json.loads((tmp_path / "ray" / "run.json").read_text())
    checks = info["backend_checks"]
    assert checks["logs_confirmed"] == checks["logs_sent"] > 0 and checks["commands"] > 0


def test_functional_payloads_inline(tmp_path, capsys):
    """--functional: switches copy real weights and every batch really runs (in-process TP),
    matching the single-process reference; the timing results do not change."""
    common = ["run", "--backend", "inline", "--limit", "40", "--experts", "20", "--scheduler", "static"]
    code, out, _ = run(capsys, *common, "--functional", "--out", str(tmp_path / "f"), "--json")
    checks = json.loads(out)["run"]["backend_checks"]
    assert code == 0 and checks["functional_runs"] > 40 and checks["functional_tokens"] > 0
    assert checks["functional_token_mismatches"] == 0 and checks["functional_max_abs_err"] <= 1e-4
    assert run(capsys, *common, "--out", str(tmp_path / "t"))[0] == 0
    assert (tmp_path / "f" / "summary.json").read_bytes() == (tmp_path / "t" / "summary.json").read_bytes()


def test_functional_payloads_under_the_continuous_engine_inline(tmp_path, capsys):
    """Every span of the continuous engine also generates for real (in-process TP) and matches
    the reference; the timing results are those of the run without payloads."""
    common = ["run", "--backend", "inline", "--limit", "30", "--experts", "6", "--scheduler", "continuous"]
    code, out, _ = run(capsys, *common, "--functional", "--out", str(tmp_path / "f"), "--json")
    checks = json.loads(out)["run"]["backend_checks"]
    assert code == 0 and checks["functional_runs"] > 30 and checks["functional_token_mismatches"] == 0
    assert run(capsys, *common, "--out", str(tmp_path / "t"))[0] == 0
    assert (tmp_path / "f" / "summary.json").read_bytes() == (tmp_path / "t" / "summary.json").read_bytes()


@pytest.mark.ray
def test_functional_spans_on_socket_actors_end_when_their_clocks_say(ray_local, tmp_path, capsys):
    """On the Ray backend every span runs over the gRPC plane and ends when the members' clocks
    say; with nothing lost that is the cost model's time, so the run equals the timing-only one."""
    common = ["run", "--limit", "8", "--experts", "4", "--scheduler", "continuous"]
    code, out, err = run(capsys, *common, "--functional", "--out", str(tmp_path / "f"), "--json")
    assert code == 0, err
    checks = json.loads(out)["run"]["backend_checks"]
    assert checks["functional_runs"] > 8 and checks["functional_token_mismatches"] == 0
    assert checks["logs_confirmed"] == checks["logs_sent"]
    assert run(capsys, *common, "--backend", "inline", "--out", str(tmp_path / "t"))[0] == 0
    assert (tmp_path / "f" / "summary.json").read_bytes() == (tmp_path / "t" / "summary.json").read_bytes()


@pytest.mark.ray
def test_a_functional_run_loses_real_messages_on_a_dropping_link(ray_local, tmp_path, capsys):
    """drop-link in a functional run: messages between the two sockets are really lost on the
    gRPC plane, noticed by the missing acknowledgement and resent; the numerics stay exact and
    nothing is lost or served twice."""
    code, out, err = run(capsys, "run", "--functional", "--limit", "6", "--experts", "4", "--scheduler",
                         "continuous", "--fault", "drop-link:node0/socket1-node0/socket2@p=0.3",
                         "--out", str(tmp_path / "r"), "--json")
    assert code == 0, err
    checks = json.loads(out)["run"]["backend_checks"]
    assert checks["messages_lost"] > 0 and checks["messages_resent"] >= checks["messages_lost"]
    assert checks["functional_token_mismatches"] == 0 and checks["functional_max_abs_err"] <= 1e-4
    from tests.helpers import assert_each_request_once

    assert_each_request_once(tmp_path / "r")


@pytest.mark.ray
def test_functional_payloads_on_socket_actors_survive_a_restart(ray_local, tmp_path, capsys):
    """On the Ray backend each batch runs over the gRPC plane; a killed socket is refilled
    with real copies out of the DDR store and the numerics stay exact."""
    code, out, err = run(capsys, "run", "--functional", "--limit", "6", "--experts", "8", "--max-batch", "2",
                         "--fault", "kill-socket:node0/socket2@request=3", "--out", str(tmp_path / "r"), "--json")
    assert code == 0, err
    data = json.loads(out)
    checks, summary = data["run"]["backend_checks"], data["summary"]
    assert checks["actor_restarts"] == 1 and checks["functional_runs"] >= 6
    assert checks["functional_token_mismatches"] == 0 and checks["functional_max_abs_err"] <= 1e-4
    from tests.helpers import assert_each_request_once

    assert assert_each_request_once(tmp_path / "r") == summary
