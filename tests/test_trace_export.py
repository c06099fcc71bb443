"""trace.json: valid Chrome trace events, one process per node, one track per socket and link,
well-nested spans in time order, and a trace even from a truncated events file."""

import dataclasses
import json
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from rdu.base import UserError
from rdu.node.cli.main import main
from rdu.node.observe import trace_export
from rdu.node.observe.events_log import EventsWriter, read_events
from rdu.node.runs.run import execute_run
from rdu.node.runs.run_config import resolve_run_config
from rdu.node.observe.trace_export import build_trace_json, write_trace
from rdu.scheduler.timeline import End, Evict, Run, Switch


def _run(out, **overrides):
    workload = {"limit": overrides.pop("limit", 300)}
    config = resolve_run_config(None, {"backend": "inline", "out": str(out), "workload": workload, **overrides})
    return execute_run(config).out_dir


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    run_dir = _run(tmp_path_factory.mktemp("trace") / "n2", nodes=2, tp=4)
    return run_dir, json.loads(write_trace(run_dir).read_text()), list(read_events(run_dir / "events.msgpack"))


@pytest.fixture(scope="module")
def gpu_node(tmp_path_factory):
    run_dir = _run(tmp_path_factory.mktemp("trace") / "dgx", platform="dgx-a100", experts=40, limit=150)
    return run_dir, json.loads(write_trace(run_dir).read_text()), list(read_events(run_dir / "events.msgpack"))


def spans(trace):
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def thread_names(trace):
    return {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
            if e["ph"] == "M" and e["name"] == "thread_name"}


def assert_well_formed(trace):
    by_track = defaultdict(list)
    for event in spans(trace):
        for key in ("ts", "dur", "pid", "tid", "name"):
            assert key in event, (key, event)
        assert isinstance(event["ts"], float) and event["dur"] >= 0
        by_track[(event["pid"], event["tid"])].append(event)
    names = thread_names(trace)
    for track, events in by_track.items():
        assert track in names, track
        times = [e["ts"] for e in events]
        assert times == sorted(times), f"timestamps go backwards on {names[track]}"
        open_ends: list[float] = []  # a stack: spans must nest or be disjoint
        for event in events:
            end = event["ts"] + event["dur"]
            while open_ends and open_ends[-1] <= event["ts"]:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1], f"overlapping spans on {names[track]}: {event}"
            open_ends.append(end)


def test_two_node_trace_is_valid_and_well_nested(two_nodes):
    _, trace, _ = two_nodes
    assert trace["displayTimeUnit"] == "ms" and trace["otherData"]["complete"] is True
    assert_well_formed(trace)


def test_one_process_per_node_and_one_track_per_socket_and_link(two_nodes):
    _, trace, _ = two_nodes
    processes = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
                 if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(processes.values()) == ["node0 (sn40l-node)", "node1 (sn40l-node)"]
    names = thread_names(trace)
    assert len(set(names.values())) == len(names) == 2 * 8 * 3
    for node in (0, 1):
        pid = next(pid for pid, name in processes.items() if name.startswith(f"node{node} "))
        on_node = {name for (p, _), name in names.items() if p == pid}
        for socket in range(8):
            member = f"node{node}/socket{socket}"
            # the socket's own copy path (Topology.copy_path): its DDR channel and its DDR -> HBM link
            assert {f"{member} compute", f"{member} DDR->HBM (ddr_channel + ddr)",
                    f"{member} P2P link (collectives)"} <= on_node


def test_every_run_is_a_span_with_prefill_and_decode_on_every_member(two_nodes):
    _, trace, events = two_nodes
    runs = [e for e in events if isinstance(e, Run)]
    named = Counter(e["name"] for e in spans(trace))
    # the first iteration of a span with prompt tokens is its prefill; a span of decodes only has none
    assert named["prefill"] == 4 * sum(e.prefill_tokens > 0 for e in runs) > 0
    assert named["decode"] == 4 * sum(e.end_ns > e.t_ns + (e.first_step_ns if e.prefill_tokens else 0)
                                      for e in runs)
    assert named["router"] == 4 * sum(e.model == "router" for e in runs)
    collectives = [e for e in spans(trace) if e["cat"] == "collective"]
    assert len(collectives) == 4 * sum(e.collective_ns > 0 for e in runs)
    assert all(e["args"]["aggregated"] is True and e["args"]["collective_ns"] > 0 for e in collectives)
    first = next(e for e in events if isinstance(e, Run) and e.model != "router")
    expert = next(e for e in spans(trace) if e["name"] == first.model and e["cat"] == "expert")
    assert expert["ts"] == first.t_ns // 1000 and expert["ts"] + expert["dur"] == first.end_ns // 1000


def test_switches_are_copies_on_each_member_ddr_link_and_hbm_is_a_counter(two_nodes):
    _, trace, events = two_nodes
    switches = [e for e in events if isinstance(e, Switch)]
    copies = [e for e in spans(trace) if e["cat"] == "switch"]
    assert len(copies) == sum(len(e.arrivals) for e in switches)
    names = thread_names(trace)
    assert all(names[(e["pid"], e["tid"])] == f"{e['args']['to']} DDR->HBM (ddr_channel + ddr)" for e in copies)
    hbm = [e for e in trace["traceEvents"] if e["ph"] == "C" and e["name"].endswith("HBM used")]
    assert {e["name"] for e in hbm} == {f"node{n}/socket{s} HBM used" for n in (0, 1) for s in range(8)}
    assert max(e["args"]["GiB"] for e in hbm) > 0


def test_gpu_copies_cross_the_shared_host_link(gpu_node):
    _, trace, events = gpu_node
    assert_well_formed(trace)
    names = thread_names(trace)
    # every copy reads the node's host DRAM and crosses its PCIe link: one lane the node's GPUs share
    host = [e for e in spans(trace) if names[(e["pid"], e["tid"])] == "node0 DDR->HBM shared (dram + host)"]
    switches = [e for e in events if isinstance(e, Switch)]
    assert len(host) == 8 * len(switches)
    last = switches[0].arrivals  # the router's copies to the 8 GPUs queue on PCIe one after another
    router_copies = sorted(host, key=lambda e: e["ts"])[:8]
    assert [e["ts"] + e["dur"] for e in router_copies] == sorted(t // 1000 for t in last.values())
    assert all(b["ts"] >= a["ts"] + a["dur"] for a, b in zip(router_copies, router_copies[1:]))


def test_truncated_events_still_give_a_trace(two_nodes, tmp_path):
    run_dir, full, _ = two_nodes
    partial = tmp_path / ".n2.partial-1234"
    partial.mkdir()
    data = (run_dir / "events.msgpack").read_bytes()
    (partial / "events.msgpack").write_bytes(data[: len(data) // 2 + 7])
    assert main(["trace", str(partial)]) == 0
    trace = json.loads((partial / "trace.json").read_text())
    assert trace["otherData"]["complete"] is False
    assert 0 < len(spans(trace)) < len(spans(full))
    assert_well_formed(trace)


def test_bad_run_directories_are_one_line_errors(tmp_path, capsys):
    assert main(["trace", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "events.msgpack").write_bytes(b"\x93\x01\x02\x03")
    assert main(["trace", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rdu: error: ") and err.count("\n") == 1
    with pytest.raises(UserError, match="no events"):
        (tmp_path / "events.msgpack").write_bytes(b"")
        build_trace_json(tmp_path / "events.msgpack")


def test_rdu_trace_rewrites_the_trace(two_nodes, tmp_path, capsys):
    run_dir, trace, _ = two_nodes
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "trace.json").unlink(missing_ok=True)
    assert main(["trace", str(copy)]) == 0
    assert "ui.perfetto.dev" in capsys.readouterr().out
    assert json.loads((copy / "trace.json").read_text()) == trace


FAULTS = ["kill-socket:node1/socket2@request=10", "kill-node:node1@request=150"]


def test_faults_cut_the_interrupted_runs_and_are_marked(tmp_path):
    """The static cycle reports a batch when it starts: a fault that interrupts it cuts it there."""
    run_dir = _run(tmp_path / "faults", nodes=2, tp=4, faults=FAULTS, scheduler={"kind": "static"})
    trace = json.loads(write_trace(run_dir).read_text())
    assert_well_formed(trace)  # an interrupted run is cut at the fault, so its retry does not overlap it
    faults = [e for e in trace["traceEvents"] if e.get("cat") == "fault"]
    assert sorted(e["args"]["kind"] for e in faults) == ["kill-node", "kill-socket"]
    cut = [e for e in spans(trace) if "interrupted_at_ns" in e.get("args", {})]
    assert cut and all(e["pid"] == 2 for e in cut)  # both faults hit node1


# -- streaming: memory bounded by the cluster, not by the number of requests ----------------------

_TIME_FIELDS = ("t_ns", "end_ns", "ready_ns", "recovered_at_ns")


def _shifted(event, by_ns):
    """`event` moved `by_ns` later in virtual time (its arrivals too)."""
    changes = {f: getattr(event, f) + by_ns for f in _TIME_FIELDS if hasattr(event, f)}
    if isinstance(event, Switch):
        changes["arrivals"] = {m: t + by_ns for m, t in event.arrivals.items()}
    return dataclasses.replace(event, **changes)


def _repeat_events(events, times, path):
    """The events of a run replayed `times` times back to back in virtual time: a longer run of
    the same cluster, made without running one."""
    setup, body = events[0], [e for e in events[1:] if not isinstance(e, End)]
    period = 1 + max(max(getattr(e, f, 0) for f in _TIME_FIELDS) for e in body)
    period = max(period, 1 + max((t for e in body if isinstance(e, Switch) for t in e.arrivals.values()), default=0))
    writer = EventsWriter(path)
    writer(setup)
    for k in range(times):
        for event in body:
            writer(_shifted(event, k * period))
    writer(events[-1])
    writer.close()
    return path


def test_spilled_trace_is_the_in_memory_trace_and_leaves_nothing_behind(two_nodes, tmp_path, monkeypatch):
    _, _, events = two_nodes
    run_dir = tmp_path / "long"
    run_dir.mkdir()
    _repeat_events(events, 3, run_dir / "events.msgpack")
    in_memory = build_trace_json(run_dir / "events.msgpack")
    runs = []
    original = trace_export._SpillSorter._write
    monkeypatch.setattr(trace_export, "SPILL_ITEMS", 97)  # many sorted runs, cut mid-track, merged on 2 levels
    monkeypatch.setattr(trace_export._SpillSorter, "_write", lambda self, items: runs.append(1) or original(self, items))
    path = write_trace(run_dir)
    assert len(runs) > trace_export._SpillSorter.FAN_IN ** 2  # so a second-level merge happened
    assert path.read_text() == in_memory  # byte for byte: the merge of the runs is the full sort
    trace = json.loads(in_memory)
    assert_well_formed(trace)
    prefills = sum(isinstance(e, Run) and e.prefill_tokens > 0 for e in events)
    assert Counter(e["name"] for e in spans(trace))["prefill"] == 3 * 4 * prefills
    assert sorted(p.name for p in run_dir.iterdir()) == ["events.msgpack", "trace.json"]


_PEAK_RSS = """
import resource, sys
from rdu.node.observe import trace_export
trace_export.SPILL_ITEMS = 2000
trace_export._SpillSorter.FAN_IN = 4
trace_export.write_trace(sys.argv[1])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_kib(run_dir):
    """Peak RSS of a fresh process that exports `run_dir`'s trace (KiB on Linux)."""
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(run_dir)], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])
    return int(done.stdout.split()[-1])


def test_export_memory_does_not_grow_with_the_run(two_nodes, tmp_path):
    _, _, events = two_nodes
    short, long = tmp_path / "short", tmp_path / "long"
    for run_dir, times in ((short, 4), (long, 40)):
        run_dir.mkdir()
        _repeat_events(events, times, run_dir / "events.msgpack")
    short_kib, long_kib = _peak_rss_kib(short), _peak_rss_kib(long)
    grown_bytes = (long / "trace.json").stat().st_size - (short / "trace.json").stat().st_size
    assert grown_bytes > 40 << 20
    # holding the trace in memory costs more than its size again; streaming, only read buffers differ
    assert (long_kib - short_kib) * 1024 < grown_bytes / 8, (short_kib, long_kib, grown_bytes)


def test_a_failed_export_keeps_the_existing_trace_and_leaves_no_partial(two_nodes, tmp_path, capsys):
    run_dir, _, _ = two_nodes
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    before = (copy / "trace.json").read_bytes()
    (copy / "events.msgpack").write_bytes((copy / "events.msgpack").read_bytes()[:200] + b"\xc1" * 64)
    assert main(["trace", str(copy)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert (copy / "trace.json").read_bytes() == before
    assert not [p.name for p in copy.iterdir() if p.name.startswith(".")]
    (copy / "trace.json").unlink()
    (copy / "trace.json").mkdir()
    assert main(["trace", str(copy)]) == 2
    assert "is a directory" in capsys.readouterr().err
