"""The three views of a run — the dashboard's statistics, the Perfetto trace and the plots — are
drawn from one reducer of the timeline (node/observe/timeline_state.py), so they must tell the
same story: the same HBM residency at every change, the same link occupancy of every copy lane,
the same busy time of every socket, runs cut where a fault interrupted them. Checked on a static
run with a kill-socket fault, a continuous run whose engine evicts experts for KV blocks, and a
GPU node whose copies share the host link.

The reducer itself is checked against the truth: HBM against the sockets' own ledgers at every
event as the engines make it, and lane occupancy against the links' own busy time (copies over a
real topology, reported out of order across groups)."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import numpy as np
import pytest

from rdu.interconnect.links import transmit_path
from rdu.node.cluster.platform import load_platform
from rdu.node.observe.events_log import read_events
from rdu.node.observe.live_stats import LiveStats
from rdu.node.observe.plot_data import gather
from rdu.node.observe.plots import run_figures
from rdu.node.observe.timeline_state import TimelineState, TimelineView
from rdu.node.observe.trace_export import build_trace_json
from rdu.node.runs.run import execute_run
from rdu.node.runs.run_config import resolve_run_config
from rdu.scheduler.timeline import Evict, GroupLayout, KvResize, Run, Setup, Switch
from rdu.interconnect.topology import Topology
from tests.helpers import events_as_made

GIB = 2**30
US = 1000   # the trace floors times to whole microseconds: each span may lose up to 1 us


class LedgerCheck:
    """A sink that, as the engines make the timeline, compares each group's HBM derived from the
    events so far with every member's ledger at that moment (the restarted member of a
    kill-socket fault is refilled outside the timeline: only its group's other members count)."""

    def __init__(self):
        self.backend, self.state, self.checked, self.mismatches = None, None, 0, []

    def __call__(self, event):
        if isinstance(event, Setup):
            self.state = TimelineState(event)

    def attach(self, backend):
        self.backend = backend

    def produced(self, event):
        self.state.feed(event)
        if not isinstance(event, (Run, Switch, Evict, KvResize)):
            return
        group = self.state.groups[event.group]
        for member in group.members:
            if member in self.state.socket_restarts:
                continue
            self.checked += 1
            ledger = self.backend.sockets[member].tiers.hbm.used_bytes
            if ledger != group.residency.used_bytes:
                self.mismatches.append((event.type, event.t_ns, member, ledger, group.residency.used_bytes))


def _run(out, **fields):
    check = LedgerCheck()
    config = resolve_run_config(None, {"backend": "inline", "out": str(out), **fields})
    with events_as_made(check.produced):
        output = execute_run(config, [check])
    return output.out_dir, check


RUNS = {
    "static-kill-socket": {"scheduler": {"kind": "static"}, "faults": ["kill-socket:node0/socket3@request=40"],
                           "workload": {"limit": 120}},
    "continuous-evicting": {"workload": {"limit": 300}},
    "continuous-kill-socket": {"scheduler": {"kind": "continuous"}, "workload": {"limit": 160},
                               "faults": ["kill-socket:node0/socket5@request=70"]},
    "gpu-shared-host-link": {"platform": "dgx-a100", "experts": 40, "tp": 4, "workload": {"limit": 120}},
}


@pytest.fixture(scope="module", params=sorted(RUNS))
def views(request, tmp_path_factory):
    """(events, ledger check, dashboard after every event, trace, plot data, figures) of a run."""
    run_dir, check = _run(tmp_path_factory.mktemp("agree") / request.param, **RUNS[request.param])
    events = list(read_events(run_dir / "events.msgpack"))
    stats, changes = LiveStats(), defaultdict(list)   # group -> (t_ns, weights, used) after each HBM change
    for event in events:
        before = stats.state.groups[event.group].residency.used_bytes if isinstance(event, (Run, KvResize)) else None
        stats.feed(event)
        if isinstance(event, (Switch, Evict)) or before is not None and \
                stats.state.groups[event.group].residency.used_bytes != before:
            residency = stats.state.groups[event.group].residency
            changes[event.group].append((event.t_ns, residency.weights_bytes, residency.used_bytes))
    trace = json.loads(build_trace_json(run_dir / "events.msgpack"))
    return request.param, events, check, stats, changes, trace, gather(run_dir / "events.msgpack"), \
        run_figures(run_dir)


def _tracks(trace):
    return {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
            if e["ph"] == "M" and e["name"] == "thread_name"}


def _spans_by_track(trace, category=None):
    names, out = _tracks(trace), defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "X" and (category is None or e["cat"] in category):
            out[names[(e["pid"], e["tid"])]].append(e)
    return out


def test_hbm_from_the_events_is_the_ledgers_at_every_event(views):
    _, _, check, _, _, _, _, _ = views
    assert check.checked > 100 and check.mismatches == []


def test_each_run_is_the_case_it_stands_for(views):
    name, events, _, stats, _, trace, _, _ = views
    assert stats.finished
    if name in ("static-kill-socket", "continuous-kill-socket"):
        assert [s.name for s in stats.snapshot(1.0).sockets if s.state] == [RUNS[name]["faults"][0].split(":")[1].split("@")[0]]
        assert any("interrupted_at_ns" in e.get("args", {}) for e in trace["traceEvents"])
    if name == "continuous-evicting":   # idle experts evicted for KV blocks; the KV entries emptied at the end
        assert sum(isinstance(e, Evict) for e in events) > 5
        assert max(e.kv_bytes for e in events if isinstance(e, Run)) > 0
        assert [e.kv_bytes for e in events if isinstance(e, KvResize)][-1:] == [0]
    if name == "gpu-shared-host-link":
        assert sum(isinstance(e, Switch) for e in events) > 5 and events[0].host_link


def test_hbm_residency_agrees_at_every_change(views):
    """Every HBM change the dashboard sees is a sample of the trace's counter of every member,
    at the same time with the same value; the plots' weights per bin peak where those samples do;
    at the end the three hold the same bytes and the dashboard the same models as the events."""
    _, events, _, stats, changes, trace, data, figures = views
    snapshot = stats.snapshot(1.0)
    counters = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "C" and e["name"].endswith(" HBM used"):
            counters[e["name"].removesuffix(" HBM used")].append((e["ts"], e["args"]["GiB"]))
    grid = data.grid
    for group in events[0].groups:
        expected = sorted((float(t // US), round(used / GIB, 3)) for t, _, used in changes[group.name])
        for member in group.members:
            assert sorted(counters[member]) == expected, member
        # the plot's step series: per bin, the largest weights value any change set in it or carried into it
        samples = sorted(changes[group.name], key=lambda c: c[0])
        peaks = data.groups[group.name].weights_bytes.peaks(grid.used)
        carried, i = 0, 0
        for b in range(grid.used):
            top = carried
            while i < len(samples) and samples[i][0] < (b + 1) * grid.width_ns:
                top, carried, i = max(top, samples[i][1]), samples[i][1], i + 1
            assert peaks[b] == top, (group.name, b)
        last = data.groups[group.name]
        views_of_group = [v for v in snapshot.sockets if v.group == group.name]
        assert {v.hbm_used_bytes for v in views_of_group} == \
            {int(last.weights_bytes.at_bin_ends(grid.used)[-1] + last.kv_bytes.at_bin_ends(grid.used)[-1])}
        peak_gib = round(max(used for _, _, used in changes[group.name]) / GIB, 3)
        assert max(value for _, value in counters[group.members[0]]) == peak_gib
    top = next(a for a in figures["hbm_and_switches.png"].axes if a.get_title().startswith("HBM occupancy"))
    drawn = max(max(line.get_ydata()) for line in top.get_lines() if line.get_label().startswith("group"))
    assert drawn == pytest.approx(max(w for c in changes.values() for _, w, _ in c) / GIB)


def test_link_occupancy_agrees_on_every_lane(views):
    """The copies' busy time on each lane: the dashboard's link rows, the trace's copy tracks and
    the plots' copy-link series (totals and bins) add up to the same, and so do the bytes."""
    _, events, _, stats, _, trace, data, _ = views
    snapshot = stats.snapshot(1.0)
    now = snapshot.clock_ns
    links = {link.name: link for link in snapshot.links}
    copies = _spans_by_track(trace, {"switch"})
    lanes_of = TimelineState(events[0]).lanes_of
    grid = data.grid
    for group in events[0].groups:
        own = [lane for m in group.members for lane in lanes_of[m] if not lane.shared]
        spans = [e for lane in own for e in copies[lane.label]]
        trace_mean_ns = sum(e["dur"] for e in spans) * US / len(group.members)
        series = data.groups[group.name]
        dash_ns = links[f"{group.name} DDR->HBM"].busy_fraction * now
        assert series.copy_total_ns > 0
        assert dash_ns == pytest.approx(series.copy_total_ns, rel=1e-9)
        assert abs(trace_mean_ns - series.copy_total_ns) <= US * len(spans) / len(group.members)
        assert series.copies_ns[:grid.used].sum() == pytest.approx(series.copy_total_ns, rel=1e-9)
        assert links[f"{group.name} DDR->HBM"].bytes_moved == sum(e["args"]["shard_bytes"] for e in spans)
    shared = {lane.label for lanes in lanes_of.values() for lane in lanes if lane.shared}
    assert shared == set(data.shared_total_ns)
    for label in shared:
        spans = copies[label]
        assert links[label].busy_fraction * now == pytest.approx(data.shared_total_ns[label], rel=1e-9)
        assert abs(sum(e["dur"] for e in spans) * US - data.shared_total_ns[label]) <= US * len(spans)
        on_track = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans)   # one copy at a time
        assert all(b[0] >= a[1] for a, b in zip(on_track, on_track[1:]))


def test_busy_time_agrees_and_faults_cut_the_same_runs(views):
    """Each socket's busy time (runs, cut at a fault that interrupted them): the dashboard's busy
    share, the trace's run spans on its compute track and the plots' activity totals."""
    _, events, _, stats, _, trace, data, _ = views
    snapshot = stats.snapshot(1.0)
    runs = _spans_by_track(trace, {"router", "expert"})
    for view in snapshot.sockets:
        spans = [e for e in runs[f"{view.name} compute"] if e["name"] not in ("prefill", "decode")]
        totals = data.groups[view.group].busy_total_ns
        plotted = totals["router"] + totals["expert prefill"] + totals["expert decode"]
        assert view.busy_fraction * snapshot.clock_ns == pytest.approx(plotted, rel=1e-9)
        assert abs(sum(e["dur"] for e in spans) * US - plotted) <= US * len(spans)
    planned = sum(e.end_ns - e.t_ns for e in events if isinstance(e, Run))
    assert sum(sum(data.groups[g.name].busy_total_ns[a] for a in ("router", "expert prefill", "expert decode"))
               for g in events[0].groups) <= planned


# -- the reducer against the truth: lane occupancy against the links' own accounting ----------------

class _Holds(TimelineView):
    def __init__(self):
        self.holds = []

    def copy_held(self, hold):
        self.holds.append(hold)


def _gpu_setup(platform, groups):
    spec = platform.spec
    return Setup(t_ns=0, name="copies", platform=spec.name, nodes=1, sockets_per_node=spec.sockets_per_node,
                 tp=len(groups[0].members), experts=8, model="m", router_model="m", policy="lru",
                 scheduler="continuous", requests=0, groups=groups, hbm_usable_bytes=spec.socket.hbm_usable_bytes,
                 sram_bytes=0, capacity_tier_bytes=spec.capacity_tier_bytes,
                 capacity_tier_name=spec.capacity_tier_name, capacity_tier_used_bytes=[0],
                 expert_shard_bytes=1 << 30, router_shard_bytes=1 << 30, p2p_topology=spec.links.p2p_kind,
                 host_link=spec.links.host_shared is not None)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("order", ["as made", "groups interleaved"])
def test_lane_occupancy_is_the_links_busy_time(seed, order):
    """Copies into two groups of a GPU node go over a real topology (they queue on the node's
    host DRAM and PCIe link). Their switch events reach the reducer in the order they were made,
    or with each group's in its own order but the groups interleaved at random (as a partitioned
    run may report them). The holds of a lane never overlap and add up to the links' own busy
    time, within one link latency per copy (a hold runs until its copy lands); a copy reported
    after one that landed later may find its time counted in that one's hold (its own is then
    empty), and only then may a socket's own lane count time its copy spent waiting for the
    shared one."""
    platform = load_platform("dgx-a100")
    topology = Topology(platform.spec.links, 1, platform.spec.sockets_per_node)
    groups = [GroupLayout(f"group{g}", 0, [f"node0/socket{4 * g + s}" for s in range(4)]) for g in range(2)]
    rng = random.Random(seed)
    made, now = [], 0
    for k in range(30):
        group = groups[rng.randrange(2)]
        now += rng.choice([0, 1, 5_000_000, 40_000_000])
        shard = rng.choice([1 << 28, 1 << 30])
        arrivals = {m: transmit_path(topology.copy_path(m), shard, now) for m in group.members}
        made.append(Switch(t_ns=now, group=group.name, model=f"expert{k:04d}", ready_ns=max(arrivals.values()),
                           victims=[], prefetch=False, arrivals=arrivals, shard_bytes=shard, kv_bytes=0))
    view = _Holds()
    state = TimelineState(_gpu_setup(platform, groups), view)
    queues = {g.name: [e for e in made if e.group == g.name] for g in groups}
    for event in made if order == "as made" else ():
        state.feed(event)
    while order != "as made" and any(queues.values()):
        state.feed(queues[rng.choice([n for n, q in queues.items() if q])].pop(0))
    by_lane = defaultdict(list)
    for hold in view.holds:
        by_lane[hold.lane].append(hold)
    assert any(lane.shared for lane in by_lane) and len(view.holds) == 2 * sum(len(e.arrivals) for e in made)
    for lane, holds in by_lane.items():
        spans = sorted((h.start_ns, h.end_ns) for h in holds if h.end_ns > h.start_ns)
        assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:])), lane.name
        links = [topology.links[name] for name in lane.links]
        assert all(link.busy_ns == links[0].busy_ns for link in links)   # a lane's links are held together
        latency = max(np.ceil(sum(link.spec.latency_ns for link in topology.copy_path(h.member))) for h in holds)
        busy, held = links[0].busy_ns, sum(end - start for start, end in spans)
        assert busy <= held, (lane.name, busy, held)
        if lane.shared or order == "as made":
            assert held <= busy + latency * len(holds), (lane.name, busy, held)
