"""Running statistics of a run, built from its timeline: what the live dashboard shows.

`LiveStats` is fed every event (it can sit in the serving loop's sink list) and, a few times per
second, the backend's own socket ledgers; `snapshot()` freezes it into a `StatsSnapshot`, plain
data that the dashboard renders without looking anywhere else. HBM residency, copies on their
links, runs and faults come from the one reducer the trace and the plots use too
(`timeline_state.TimelineState`); this module adds only what the dashboard counts.

Virtual "now" is the latest time the engines have reported: every event but `arrival` (the
ingress routes requests ahead of the engines, window by window) and `done` (it carries a future
finish time). A request counts as arrived once now has reached its arrival, and as completed
(entering the latency percentiles) once now has passed its finish.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from rdu.interconnect.topology import Topology
from rdu.node.observe.timeline_state import CopyHold, GroupState, RunSpan, TimelineState, TimelineView
from rdu.scheduler.metrics import percentiles
from rdu.scheduler.timeline import (ROUTER_MODEL, Arrival, Done, End, Event, Evict, Fault, Preempt, Run, Setup,
                                    Switch)

__all__ = ["LiveStats", "StatsSnapshot", "SocketView", "NodeView", "GroupView", "LinkView", "IntervalMeter",
           "format_virtual_s", "log_line", "moves_now"]


def format_virtual_s(t_ns: float) -> str:
    return f"{t_ns / 1e9:,.3f} s"


def moves_now(event: Event) -> bool:
    """Whether `event` says how far the engines have come (see the module's docstring)."""
    return not isinstance(event, (Arrival, Done))


class IntervalMeter:
    """Busy time of a resource from intervals that may end in the virtual future: `busy_ns(now)`
    counts only what has happened by `now`. `weight` is the busy share of an interval (a run's
    collectives are known only as a total, spread over the run; a group's copy links as a mean
    over its members)."""

    def __init__(self) -> None:
        self._past_ns = 0.0
        self._open: list[tuple[int, int, float]] = []

    def add(self, start_ns: int, end_ns: int, weight: float = 1.0) -> None:
        if end_ns <= start_ns or weight <= 0:
            return
        last = self._open[-1] if self._open else None
        if last is not None and last[0] == start_ns and last[1] == end_ns:  # the same copy on every member
            self._open[-1] = (start_ns, end_ns, last[2] + weight)
        else:
            self._open.append((start_ns, end_ns, weight))

    def busy_ns(self, now_ns: int) -> float:
        partial, still_open = 0.0, []
        for start, end, weight in self._open:
            if end <= now_ns:
                self._past_ns += (end - start) * weight
            else:
                if start < now_ns:
                    partial += (now_ns - start) * weight
                still_open.append((start, end, weight))
        self._open = still_open
        return self._past_ns + partial


def log_line(event: Event) -> str:
    """One line of the dashboard's log for a switch, evict, fault or end event."""
    when = format_virtual_s(event.t_ns)
    if isinstance(event, Switch):
        kind = "prefetch" if event.prefetch else "switch"
        evicted = f", evicts {', '.join(event.victims)}" if event.victims else ""
        return (f"{when}  {event.group}  {kind} {event.model}{evicted}; "
                f"in HBM after {(event.ready_ns - event.t_ns) / 1e6:,.1f} ms")
    if isinstance(event, Evict):
        return f"{when}  {event.group}  evicts {', '.join(event.models)} for KV blocks"
    if isinstance(event, End):
        if event.stopped:
            return f"{when}  run stopped: {event.stopped}"
        return f"{when}  run {'interrupted' if event.interrupted else 'finished'}"
    if isinstance(event, Fault):
        parts = [f"groups {', '.join(event.groups)}"] if event.groups else []
        if event.recovered_at_ns:
            parts.append(f"serving again at {format_virtual_s(event.recovered_at_ns)}")
        parts += [f"{key}={value}" for key, value in event.detail.items()]
        return f"{when}  FAULT {event.kind} {event.target}: {'; '.join(parts) or 'no group interrupted'}"
    return f"{when}  {event.type}"


# -- the snapshot the dashboard renders ----------------------------------------------------------

@dataclass(frozen=True)
class SocketView:
    name: str
    node: int
    group: str
    hbm_used_bytes: int
    hbm_capacity_bytes: int
    sram_used_bytes: int | None          # from the backend's ledgers; None when not sampled
    sram_capacity_bytes: int
    resident: tuple[str, ...]            # models in HBM, least recently used first
    loading: tuple[str, ...]             # of those, copies still in flight
    busy_fraction: float                 # router + expert runs, share of virtual time so far
    state: str = ""                      # "", "down" (its node died), "restarting", "restarted once"...


@dataclass(frozen=True)
class NodeView:
    index: int
    capacity_tier_name: str              # ddr (RDU) or host_dram (GPU)
    capacity_tier_bytes: int
    capacity_tier_used_bytes: int | None  # None when the events do not say


@dataclass(frozen=True)
class LinkView:
    name: str
    busy_fraction: float
    bytes_moved: int | None              # None: not known from the events
    note: str = ""


@dataclass(frozen=True)
class GroupView:
    name: str
    node: int
    sockets: int
    waiting: int                         # requests queued for the group's next router batch
    batch: int                           # requests (continuous engine: sequences) in the batch it is serving
    activity: str                        # what it does now: router / expertN prefill|decode / idle
    kv_bytes: int = 0                    # the KV ledger entry of each member socket
    kv_pool_bytes: int = 0               # what HBM leaves for KV next to the resident weights


@dataclass(frozen=True)
class StatsSnapshot:
    name: str
    platform: str
    model: str
    experts: int
    policy: str
    nodes: int
    sockets_per_node: int
    tp: int
    requests_total: int
    arrived: int
    completed: int
    output_tokens: int
    clock_ns: int                        # virtual now
    serving_ns: int                      # virtual time since the first arrival
    wall_s: float
    tokens_per_s: float                  # output tokens per virtual second since the first arrival
    ttft_ns: dict
    tpot_ns: dict
    e2e_ns: dict
    switches: int
    prefetches: int
    evictions: int
    preemptions: int
    hit_rate: float | None
    sockets: tuple[SocketView, ...]
    nodes_view: tuple[NodeView, ...]
    groups: tuple[GroupView, ...]
    links: tuple[LinkView, ...]
    log: tuple[str, ...]
    faults: tuple[str, ...]              # every fault so far (the log scrolls them away)
    backend_sampled: bool
    finished: bool
    interrupted: bool
    stopped: str                         # why the emulated cluster could not finish ("" if it did)

    @property
    def progress(self) -> float:
        return self.completed / self.requests_total if self.requests_total else 0.0


# -- the aggregator ---------------------------------------------------------------------------

class _Meters:
    """What the dashboard measures of one group: busy time, collectives, its members' copy lanes."""

    def __init__(self, members: int) -> None:
        self.busy = IntervalMeter()
        self.collectives = IntervalMeter()
        self.copies = IntervalMeter()        # the members' own copy lanes, as a mean over members
        self.copy_share = 1.0 / max(1, members)
        self.copy_bytes = 0


class LiveStats(TimelineView):
    """Aggregates a run's events into what the dashboard shows; `snapshot()` freezes it."""

    def __init__(self, log_lines: int = 20) -> None:
        self.setup: Setup | None = None
        self.state: TimelineState | None = None
        self.clock_ns = 0
        self.first_arrival_ns: int | None = None
        self.arrived = self.completed = self.output_tokens = self.preemptions = 0
        self.switches = self.prefetches = self.evictions = self.accesses = self.hits = 0
        self.log: deque[Event] = deque(maxlen=log_lines)      # switch, evict, fault and end events, newest last
        self.faults: list[Fault] = []
        self.socket_samples: dict[str, dict] = {}
        self.finished = self.interrupted = False
        self.stopped = ""
        self.summary: dict | None = None
        self._meters: dict[str, _Meters] = {}
        self._shared: dict[str, tuple[IntervalMeter, list[int]]] = {}   # shared lane -> meter, [bytes]
        self._pending_arrivals: list[int] = []                            # a heap of arrival times
        self._pending_done: list[tuple[int, int, int, int, int]] = []   # finish, tokens, ttft, tpot, e2e
        self._latencies: dict[str, list[int]] = {"ttft_ns": [], "tpot_ns": [], "e2e_ns": []}
        self._handlers = {Arrival: self._on_arrival, Run: self._on_run, Switch: self._on_switch,
                          Evict: self._on_evict, Done: self._on_done, Preempt: self._on_preempt,
                          Fault: self._on_fault, End: self._on_end}

    # -- feeding --------------------------------------------------------------------------------
    def feed(self, event: Event) -> None:
        if isinstance(event, Setup):
            self._on_setup(event)
            return
        if self.state is None:   # nothing to lay it out on before the setup
            return
        self.state.feed(event)
        if event.t_ns > self.clock_ns and moves_now(event):
            self.clock_ns = event.t_ns
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def observe_sockets(self, snapshots: list[dict] | None) -> None:
        """The backend's per-socket ledgers (`socket_snapshots()`), when it has them."""
        if snapshots:
            self.socket_samples = {s["socket"]: s for s in snapshots}

    def _on_setup(self, event: Setup) -> None:
        self.setup = event
        self.state = TimelineState(event, self)
        self._meters = {name: _Meters(len(group.members)) for name, group in self.state.groups.items()}
        self._shared = {name: (IntervalMeter(), [0]) for name, lane in self.state.lanes.items() if lane.shared}

    def _on_arrival(self, event: Arrival) -> None:
        heapq.heappush(self._pending_arrivals, event.t_ns)
        if self.first_arrival_ns is None or event.t_ns < self.first_arrival_ns:
            self.first_arrival_ns = event.t_ns

    def _on_run(self, event: Run) -> None:
        self.accesses += event.accesses
        self.hits += event.hits

    def _on_switch(self, event: Switch) -> None:
        if event.model != ROUTER_MODEL:
            self.switches += 1
            self.prefetches += event.prefetch
        self.evictions += len(event.victims)
        self.log.append(event)  # formatted when drawn: only the last few lines ever are

    def _on_evict(self, event: Evict) -> None:
        self.evictions += len(event.models)
        self.log.append(event)

    def _on_done(self, event: Done) -> None:
        self._pending_done.append((event.t_ns, event.output_tokens, event.ttft_ns, event.tpot_ns, event.e2e_ns))

    def _on_preempt(self, event: Preempt) -> None:
        self.preemptions += 1

    def _on_fault(self, event: Fault) -> None:
        self.log.append(event)
        self.faults.append(event)

    def _on_end(self, event: End) -> None:
        self.state.finish()
        self.finished = True
        self.interrupted = event.interrupted
        self.stopped = event.stopped
        self.summary = event.summary
        self._release_done(float("inf"))
        self.log.append(event)

    # -- what the reducer reports ---------------------------------------------------------------
    def copy_held(self, hold: CopyHold) -> None:
        if hold.lane.shared:
            meter, moved = self._shared[hold.lane.name]
            meter.add(hold.start_ns, hold.end_ns)
            moved[0] += hold.shard_bytes
        else:
            meters = self._meters[hold.group]
            meters.copies.add(hold.start_ns, hold.end_ns, meters.copy_share)
            meters.copy_bytes += hold.shard_bytes

    def run_ended(self, group: GroupState, span: RunSpan) -> None:
        meters = self._meters[group.name]
        meters.busy.add(span.start_ns, span.end_ns)
        meters.collectives.add(span.start_ns, span.end_ns, span.collective_share)

    def _release_done(self, now_ns: float) -> None:
        """Count the requests that arrived by `now_ns`, and those whose last token is out by then
        (kept as plain tuples until then)."""
        arrivals = self._pending_arrivals
        while arrivals and arrivals[0] <= now_ns:
            heapq.heappop(arrivals)
            self.arrived += 1
        pending = self._pending_done
        if not pending:
            return
        pending.sort(reverse=True)
        latencies = self._latencies
        while pending and pending[-1][0] <= now_ns:
            _, output_tokens, ttft, tpot, e2e = pending.pop()
            self.completed += 1
            self.output_tokens += output_tokens
            latencies["ttft_ns"].append(ttft)
            latencies["e2e_ns"].append(e2e)
            if output_tokens > 1:
                latencies["tpot_ns"].append(tpot)

    # -- freezing ---------------------------------------------------------------------------------
    def snapshot(self, wall_s: float) -> StatsSnapshot:
        """Everything the dashboard shows, as of virtual now and `wall_s` seconds of wall time."""
        self._release_done(self.clock_ns)
        s = self.setup
        now = self.clock_ns
        serving_ns = max(0, now - self.first_arrival_ns) if self.first_arrival_ns is not None else 0
        return StatsSnapshot(
            name=s.name if s else "?", platform=s.platform if s else "?", model=s.model if s else "?",
            experts=s.experts if s else 0, policy=s.policy if s else "?", nodes=s.nodes if s else 0,
            sockets_per_node=s.sockets_per_node if s else 0, tp=s.tp if s else 0,
            requests_total=s.requests if s else 0, arrived=self.arrived, completed=self.completed,
            output_tokens=self.output_tokens, clock_ns=now, serving_ns=serving_ns, wall_s=wall_s,
            tokens_per_s=self.output_tokens / (serving_ns / 1e9) if serving_ns > 0 else 0.0,
            ttft_ns=percentiles(self._latencies["ttft_ns"]), tpot_ns=percentiles(self._latencies["tpot_ns"]),
            e2e_ns=percentiles(self._latencies["e2e_ns"]),
            switches=self.switches, prefetches=self.prefetches, evictions=self.evictions,
            preemptions=self.preemptions, hit_rate=self.hits / self.accesses if self.accesses else None,
            sockets=tuple(self._socket_views(now)), nodes_view=tuple(self._node_views()),
            groups=tuple(self._group_views(now)), links=tuple(self._link_views(now)),
            log=tuple(log_line(event) for event in self.log), faults=tuple(log_line(event) for event in self.faults),
            backend_sampled=bool(self.socket_samples), finished=self.finished, interrupted=self.interrupted,
            stopped=self.stopped)

    def _groups(self) -> list[GroupState]:
        return list(self.state.groups.values()) if self.state is not None else []

    @staticmethod
    def _running(group: GroupState, now: int, share: float = 1.0) -> float:
        """Busy time by `now` of the run the group holds (not final yet: a fault may cut it)."""
        run = group.current
        if run is None or now <= run.t_ns:
            return 0.0
        return (min(run.end_ns, now) - run.t_ns) * share

    def _socket_views(self, now: int) -> list[SocketView]:
        views = []
        for group in self._groups():
            busy = self._meters[group.name].busy.busy_ns(now) + self._running(group, now)
            residency = group.residency
            resident, loading = tuple(residency.shard_bytes), tuple(residency.loading(now))
            for member in group.members:
                sample = self.socket_samples.get(member, {}).get("tiers", {})
                views.append(SocketView(
                    name=member, node=Topology.parse(member)[0], group=group.name,
                    hbm_used_bytes=residency.used_bytes, hbm_capacity_bytes=self.setup.hbm_usable_bytes,
                    sram_used_bytes=sample["sram"]["used_bytes"] if "sram" in sample else None,
                    sram_capacity_bytes=self.setup.sram_bytes, resident=resident, loading=loading,
                    busy_fraction=min(1.0, busy / now) if now > 0 else 0.0,
                    state=self._socket_state(group, member, now)))
        return sorted(views, key=lambda v: Topology.parse(v.name))

    def _socket_state(self, group: GroupState, member: str, now: int) -> str:
        """What sets one member apart from the rest of its group: a fault's mark stays after the
        restart, so the dashboard can still tell which socket was killed."""
        if group.down:
            return "down"
        restarts, back_ns = self.state.socket_restarts.get(member, (0, 0))
        if not restarts:
            return ""
        return "restarting" if now < back_ns else "restarted once" if restarts == 1 else f"restarted {restarts} times"

    def _node_views(self) -> list[NodeView]:
        s = self.setup
        if s is None:
            return []
        used = s.capacity_tier_used_bytes
        return [NodeView(index=n, capacity_tier_name=s.capacity_tier_name, capacity_tier_bytes=s.capacity_tier_bytes,
                         capacity_tier_used_bytes=used[n] if n < len(used) else None)
                for n in range(s.nodes)]

    def _group_views(self, now: int) -> list[GroupView]:
        views = []
        usable = self.setup.hbm_usable_bytes if self.setup else 0
        for group in self._groups():
            activity, run = "idle", group.current
            if group.down:
                activity = "failed (node down)"
            elif now < group.restarting_until_ns:
                activity = "restarting a socket"
            elif run is not None:
                if run.t_ns <= now < run.end_ns:
                    activity = f"{run.model} {'prefill' if now < run.t_ns + run.first_step_ns else 'decode'}"
                elif now < run.t_ns:
                    activity = f"waits for {run.model}"
            batch = len(run.requests) if run is not None and activity != "idle" else 0
            residency = group.residency
            views.append(GroupView(group.name, group.node, len(group.members), group.waiting, batch, activity,
                                   residency.kv_bytes, max(0, usable - residency.weights_bytes)))
        return views

    def _link_views(self, now: int) -> list[LinkView]:
        """Per group: its members' own copy lanes (mean) and its P2P collectives; per node: the
        lanes its sockets' copies share (GPU platforms: host DRAM and PCIe)."""
        def share(busy_ns: float) -> float:
            return min(1.0, busy_ns / now) if now > 0 else 0.0

        views = []
        for group in self._groups():
            meters = self._meters[group.name]
            running = group.current
            collectives = meters.collectives.busy_ns(now) + (
                self._running(group, now, RunSpan(running, running.end_ns).collective_share) if running else 0.0)
            views.append(LinkView(f"{group.name} DDR->HBM", share(meters.copies.busy_ns(now)), meters.copy_bytes,
                                  f"mean of {len(group.members)} links"))
            views.append(LinkView(f"{group.name} P2P", share(collectives), None, "collectives"))
        for name, (meter, moved) in sorted(self._shared.items()):
            lane = self.state.lanes[name]
            views.append(LinkView(lane.label, share(meter.busy_ns(now)), moved[0], "shared by the node"))
        return views
