"""The live dashboard: statistics from events, the pure render, throttling, the one-line mode,
replay, and the real thing in a pseudo-terminal."""

import io
import os
import re
import sys
import time
from pathlib import Path

import pexpect
import pytest
from rich.console import Console

from rdu.node.cli.main import main
from rdu.node.observe.dashboard import LiveDashboard, load_events, one_line, render, replay
from rdu.node.observe.events_log import read_events
from rdu.node.observe.live_stats import LiveStats
from rdu.node.runs.run import execute_run
from rdu.node.runs.run_config import resolve_run_config
from rdu.scheduler.timeline import Fault, Run, Setup

RDU = str(Path(sys.executable).with_name("rdu"))
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]")


class BackendGrab:
    """A sink that keeps the backend, to compare its ledgers with the stats at the end."""

    def __init__(self):
        self.backend = None

    def __call__(self, event):
        pass

    def attach(self, backend):
        self.backend = backend


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dash") / "n2"
    grab = BackendGrab()
    config = resolve_run_config(None, {"backend": "inline", "nodes": 2, "tp": 4, "out": str(out),
                                       "workload": {"limit": 300}})
    output = execute_run(config, [grab])
    return output, grab.backend, list(read_events(out / "events.msgpack"))


def recorded(width=140, height=60):
    return Console(file=io.StringIO(), record=True, width=width, height=height, color_system=None)


def stats_after(events, count=None):
    stats = LiveStats()
    for event in events[:count]:
        stats.feed(event)
    return stats


def test_stats_agree_with_the_summary_and_the_backend_ledgers(two_node_run):
    output, backend, events = two_node_run
    snapshot = stats_after(events).snapshot(1.0)
    summary = output.result.summary
    assert snapshot.finished and not snapshot.interrupted
    assert snapshot.completed == summary["requests_completed"] == 300
    assert snapshot.switches == summary["switches"] and snapshot.evictions == summary["evictions"]
    assert snapshot.prefetches == summary["prefetches"]
    for key in ("ttft_ns", "tpot_ns", "e2e_ns"):
        assert {q: getattr(snapshot, key)[q] for q in ("p50", "p90", "p99")} == \
            {q: summary[key][q] for q in ("p50", "p90", "p99")}
    assert snapshot.hit_rate == pytest.approx(summary["hbm_hit_rate"], abs=1e-6)
    ledgers = {s["socket"]: s for s in backend.socket_snapshots()}
    assert [v.name for v in snapshot.sockets] == sorted(ledgers, key=lambda n: (n[:5], int(n.rsplit("t", 1)[1])))
    for view in snapshot.sockets:  # HBM occupancy and residents tracked from events == the sockets' own ledgers
        assert view.hbm_used_bytes == ledgers[view.name]["tiers"]["hbm"]["used_bytes"]
        assert sorted(view.resident) == ledgers[view.name]["resident"]


def test_the_queue_shows_kv_use_and_the_batch_of_sequences(two_node_run):
    _, _, events = two_node_run
    def running(index):   # the snapshot right after a run, and the run's group in it
        snapshot = stats_after(events, index + 1).snapshot(1.0)
        return snapshot, next(g for g in snapshot.groups if g.name == events[index].group)

    runs = [i for i, e in enumerate(events) if isinstance(e, Run) and e.kv_bytes > 0 and e.model != "router"]
    # a run the engine reported while it still ran (the nodes report window by window)
    index = next(i for i in runs[len(runs) // 2:] if running(i)[1].activity != "idle")
    snapshot, view = running(index)
    run = events[index]
    assert view.activity == f"{run.model} {'prefill' if snapshot.clock_ns < run.t_ns + run.first_step_ns else 'decode'}"
    assert view.kv_bytes == run.kv_bytes and 0 < view.kv_bytes < view.kv_pool_bytes
    assert view.batch == len(run.requests)
    for width in (80, 140):
        console = recorded(width=width)
        console.print(render(snapshot, width=width))
        text = console.export_text()
        assert "KV use" in text
        share = f"{view.kv_bytes / view.kv_pool_bytes:4.0%}"
        assert any(re.search(rf"{view.name} +\d+ +{view.batch} .*{share}", line) for line in text.splitlines()), share


def test_done_events_count_only_once_virtual_time_has_passed_them(two_node_run):
    _, _, events = two_node_run
    half = len(events) // 2
    stats = stats_after(events, half)
    snapshot = stats.snapshot(0.5)
    finishes = [e.t_ns for e in events[:half] if e.type == "done"]
    assert snapshot.completed == sum(t <= snapshot.clock_ns for t in finishes) < 300
    assert not snapshot.finished and 0 < snapshot.progress < 1


def test_render_shows_every_part_of_the_dashboard(two_node_run):
    _, _, events = two_node_run
    snapshot = stats_after(events, len(events) // 2).snapshot(2.0)
    console = recorded()
    console.print(render(snapshot, width=140, max_socket_rows=16))
    text = console.export_text()
    for expected in ("rdu dashboard", "on 2 x sn40l-node, TP4", "[running]", "virtual time", "wall time",
                     "requests", f"{snapshot.completed} done / 300", "node0 s0-3 x4", "node1 s4-7 x4", "group3",
                     "HBM", "experts + router", "links", "DDR->HBM", "P2P", "queue", "waiting",
                     "TTFT", "TPOT", "end-to-end", "switches, evictions, faults", "switch expert"):
        assert expected in text, expected
    assert "node1/socket7" not in text and "SRAM" not in text  # identical members fold; no SRAM sampled


def test_render_is_a_pure_function_of_the_snapshot(two_node_run):
    _, _, events = two_node_run
    snapshot = stats_after(events).snapshot(3.0)
    texts = []
    for _ in range(2):
        console = recorded()
        console.print(render(snapshot, width=140))
        texts.append(console.export_text())
    assert texts[0] == texts[1] and "[finished]" in texts[0] and "300 done / 300" in texts[0]


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_80x24_keeps_latency_queue_and_log(two_node_run, fraction):
    _, _, events = two_node_run
    console = recorded(width=80, height=24)
    console.print(render(stats_after(events, int(len(events) * fraction)).snapshot(1.0), width=80, height=23))
    lines = console.export_text().splitlines()
    assert len(lines) <= 23 and max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    for expected in ("p50", "p99", "TTFT", "TPOT", "queue", "waiting", "group0", "group3", "node0 s0-3 x4",
                     "node1 s4-7 x4", "switches, evictions, faults"):
        assert expected in text, expected
    log_title = next(i for i, line in enumerate(lines) if "switches, evictions, faults" in line)
    assert re.match(r"│ +[\d.]+ s  ", lines[log_title + 1]), lines[log_title + 1]  # a log line shows


def test_a_tall_terminal_shows_the_links_and_more_log(two_node_run):
    _, _, events = two_node_run
    console = recorded(width=120, height=40)
    console.print(render(stats_after(events).snapshot(1.0), width=120, height=39))
    lines = console.export_text().splitlines()
    assert len(lines) <= 39 and max(len(line) for line in lines) <= 120
    text = "\n".join(lines)
    assert "DDR->HBM" in text and "P2P" in text and "[finished]" in text
    assert sum(1 for line in lines if re.match(r"│ +[\d.]+ s  ", line)) >= 6


class FakeBackend:
    """Socket ledgers on demand; after `close()` any read fails, as a shut-down Ray session does."""

    def __init__(self, sockets, sram_bytes=0):
        self.sockets, self.sram_bytes, self.reads, self.late_reads, self.closed = sockets, sram_bytes, 0, 0, False

    def socket_snapshots(self):
        if self.closed:
            self.late_reads += 1
            raise ValueError("An application is trying to access a Ray object whose owner is unknown")
        self.reads += 1
        return [{"socket": name, "tiers": {"sram": {"used_bytes": self.sram_bytes * (i == 2)}}}
                for i, name in enumerate(self.sockets)]


def run_members(events):
    setup = next(e for e in events if isinstance(e, Setup))
    return [member for group in setup.groups for member in group.members]


def test_detach_samples_once_and_nothing_touches_the_backend_after(two_node_run):
    _, _, events = two_node_run
    backend = FakeBackend(run_members(events), sram_bytes=1 << 20)
    console = Console(file=io.StringIO(), force_terminal=True, width=140, height=50)
    with LiveDashboard(console, refresh_per_s=1000.0) as dashboard:
        dashboard.attach(backend)
        for event in events[:-1]:
            dashboard(event)
        reads = backend.reads
        dashboard.detach()
        assert backend.reads == reads + 1
        backend.closed = True          # the session is gone: the end event and the exit must not read
        dashboard(events[-1])
    assert backend.late_reads == 0
    assert dashboard.stats.socket_samples["node0/socket2"]["tiers"]["sram"]["used_bytes"] == 1 << 20
    final = ANSI.sub("", console.file.getvalue()).split("rdu dashboard")[-1]
    assert "[finished]" in final and "run finished" in final


def test_a_ledger_that_cannot_be_read_does_not_end_the_run(two_node_run):
    _, _, events = two_node_run
    backend = FakeBackend(run_members(events))
    backend.closed = True
    with LiveDashboard(Console(file=io.StringIO(), force_terminal=True, width=140, height=50),
                       refresh_per_s=1000.0) as dashboard:
        dashboard.attach(backend)
        for event in events:
            dashboard(event)
        dashboard.detach()
    assert backend.late_reads == 1  # it tried once, then stopped watching
    assert dashboard.stats.finished and dashboard.stats.socket_samples == {}


def test_sram_column_only_when_a_sample_says_something(two_node_run):
    _, _, events = two_node_run
    texts = {}
    for sram_bytes in (0, 1 << 20):
        stats = stats_after(events)
        stats.observe_sockets(FakeBackend(run_members(events), sram_bytes).socket_snapshots())
        console = recorded()
        console.print(render(stats.snapshot(1.0), width=140, max_socket_rows=16))
        texts[sram_bytes] = console.export_text()
    assert "SRAM" not in texts[0] and "node0/socket2" not in texts[0] and "node0 s0-3 x4" in texts[0]
    # one member's ledger differs from its group's: it gets its own row, the rest stay folded
    assert "SRAM" in texts[1 << 20] and "node0/socket2" in texts[1 << 20] and "node0 s0-1,3 x3" in texts[1 << 20]


@pytest.fixture(scope="module")
def kill_socket_events(tmp_path_factory):
    out = tmp_path_factory.mktemp("dash") / "ks"
    config = resolve_run_config(None, {"backend": "inline", "nodes": 2, "tp": 4, "out": str(out),
                                       "workload": {"limit": 200}, "faults": ["kill-socket:node1/socket2@request=50"]})
    execute_run(config)
    return list(read_events(out / "events.msgpack"))


def test_a_killed_socket_gets_its_own_row(kill_socket_events):
    events = kill_socket_events
    fault = next(i for i, e in enumerate(events) if isinstance(e, Fault))
    before, during, after = (stats_after(events, n).snapshot(1.0) for n in (fault, fault + 1, len(events)))
    states = {view.name: view.state for view in during.sockets}
    assert states["node1/socket2"] == "restarting" and {states[f"node1/socket{i}"] for i in (0, 1, 3)} == {""}
    assert {view.name: view.state for view in after.sockets}["node1/socket2"] == "restarted once"
    texts = []
    for snapshot, rows in ((before, 16), (after, 16), (after, 4)):
        console = recorded()
        console.print(render(snapshot, width=140, max_socket_rows=rows))
        texts.append(console.export_text())
    assert "node1 s0-3 x4" in texts[0] and "node1/socket2" not in texts[0].split("switches, evictions")[0]
    assert "node1 s0-1,3 x3" in texts[1] and re.search(r"node1/socket2 +group2 .*restarted once;", texts[1])
    # four rows for five looks: one per group, which names the socket that differs
    assert "node1 s0-3 x4" in texts[2] and "s2 restarted once;" in texts[2]


def test_without_a_terminal_it_prints_one_line_every_few_seconds(two_node_run):
    _, _, events = two_node_run
    out = io.StringIO()
    console = Console(file=out, width=300, force_terminal=False)
    with LiveDashboard(console, line_interval_s=0.05) as dashboard:
        assert not dashboard.live_view
        for i, event in enumerate(events):
            dashboard(event)
            if i == len(events) // 2:
                time.sleep(0.06)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2
    assert all(line.startswith("sn40l-node-") and "done" in line and "TTFT p50" in line for line in lines)
    assert "300/300 done" in lines[-1] and "╭" not in out.getvalue()
    assert one_line(dashboard.stats.snapshot(1.0)).split(" | ")[0] == lines[-1].split(" | ")[0]


def test_live_view_redraws_on_a_timer_not_per_event(two_node_run):
    _, _, events = two_node_run
    console = Console(file=io.StringIO(), force_terminal=True, width=140, height=50)
    started = time.perf_counter()
    with LiveDashboard(console, refresh_per_s=4.0) as dashboard:
        assert dashboard.live_view
        for i, event in enumerate(events):
            dashboard(event)
            if i % 200 == 0:
                time.sleep(0.05)  # spread the events over about half a second
    elapsed = time.perf_counter() - started
    assert len(events) > 1000 and elapsed > 0.3
    assert 2 <= dashboard.draws <= 2 + 4 * elapsed  # at most 4 a second, plus the end
    assert "node1 s4-7 x4" in console.file.getvalue()


def test_replay_feeds_the_whole_run_and_returns_its_summary(two_node_run):
    output, _, _ = two_node_run
    console = Console(file=io.StringIO(), width=300, force_terminal=False)
    events = load_events(output.out_dir / "events.msgpack")
    with LiveDashboard(console) as dashboard:
        summary = replay(events, dashboard, speed=1e6)
    assert summary == output.result.summary
    assert dashboard.stats.completed == 300


def test_faults_show_in_the_log_and_the_queue(tmp_path):
    config = resolve_run_config(None, {"backend": "inline", "nodes": 2, "tp": 4, "out": str(tmp_path / "f"),
                                       "workload": {"limit": 300},
                                       "faults": ["kill-socket:node1/socket2@request=10", "kill-node:node1@request=150"]})
    output = execute_run(config)
    snapshot = stats_after(list(read_events(output.out_dir / "events.msgpack"))).snapshot(1.0)
    assert snapshot.completed == output.result.summary["requests_completed"] == 300
    activity = {g.name: g.activity for g in snapshot.groups}
    assert activity["group2"] == activity["group3"] == "failed (node down)"
    console = recorded()
    console.print(render(snapshot, width=140, log_lines=20))
    text = console.export_text()
    assert "FAULT kill-node node1" in text and "failed (node down)" in text


def test_dash_errors_are_one_line(tmp_path, capsys):
    assert main(["dash", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "events.msgpack").write_bytes(b"\xc1garbage")
    assert main(["dash", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "events.msgpack" in err


def spawn(argv: list[str], rows: int, columns: int) -> pexpect.spawn:
    """`rdu ARGV` in a pseudo-terminal of rows x columns (COLUMNS/LINES say the same, so nothing
    inherited from the test runner's environment overrides the size)."""
    env = {**os.environ, "COLUMNS": str(columns), "LINES": str(rows), "TERM": "xterm-256color"}
    return pexpect.spawn(RDU, argv, dimensions=(rows, columns), env=env, encoding="utf-8", timeout=60)


def screen(child: pexpect.spawn) -> str:
    return ANSI.sub("", child.read())


def test_run_dashboard_in_a_real_terminal(tmp_path):
    child = spawn(["run", "--backend", "inline", "--limit", "400", "--dashboard", "--out", str(tmp_path / "r")],
                  rows=50, columns=140)
    text = screen(child)
    child.close()
    assert child.exitstatus == 0, text[-2000:]
    for expected in ("rdu dashboard", "node0 s0-7 x8", "HBM", "requests", "100%",
                     "400 done / 400", "[finished]", "run directory:"):
        assert expected in text, expected


def test_dash_replays_a_run_in_a_real_terminal(two_node_run):
    output, _, _ = two_node_run
    child = spawn(["dash", str(output.out_dir), "--speed", "150"], rows=60, columns=140)
    started = time.perf_counter()
    text = screen(child)
    child.close()
    assert child.exitstatus == 0, text[-2000:]
    assert time.perf_counter() - started < 20
    for expected in ("[running]", "[finished]", "node1 s0-3 x4", "HBM", "300 done / 300", "TTFT", "end-to-end"):
        assert expected in text, expected
