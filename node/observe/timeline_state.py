"""The one reducer of a run's timeline: what every view of a run derives from its events.

The live dashboard (`live_stats`), the Perfetto trace (`trace_export`) and the plots
(`plot_data`) feed the events of a run to a `TimelineState` and read, or are told through a
`TimelineView`, what follows from them, so that the three tell the same story:

- HBM per group (`Residency`): the model shards its members hold, least recently used first,
  when each copy lands, and the KV ledger entry (identical on every member of a group);
- the DDR -> HBM copies on their links (`CopyHold`): a copy holds the links of its copy path
  (`rdu.interconnect.topology.Topology.copy_path`); links that the copies of exactly the same
  sockets cross are always held together, so they are followed as one `Lane`;
- runs as busy intervals (`RunSpan`): a run is final once the group's next run begins, a fault
  that interrupts the group cuts it short (the group retries the work later), or the stream ends;
- requests waiting per group, the groups a fault took down or is restarting.

Events of different groups may come interleaved and out of time order (a partitioned run reports
node by node, window by window). Only the events of one group are taken to come in the order
they were produced, and a fault after the runs it interrupts; copies of different groups that
share a lane may be reported in any order (see `_LaneQueue`).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from rdu.base import UserError
from rdu.interconnect.links import LinkSpec
from rdu.interconnect.topology import Topology, TopologySpec
from rdu.scheduler.timeline import (ROUTER_MODEL, Enqueue, Event, Evict, Fault, GroupLayout, KvResize, Run, Setup,
                                    Switch)

__all__ = ["TimelineState", "TimelineView", "GroupState", "Residency", "Lane", "CopyHold", "RunSpan", "copy_lanes"]


class Residency:
    """The HBM of one group's members: model shards (LRU first) with the time each copy lands,
    and the KV entry the engines keep in the ledgers."""

    def __init__(self) -> None:
        self.shard_bytes: dict[str, int] = {}
        self.ready_ns: dict[str, int] = {}
        self.kv_bytes = 0

    def switch(self, event: Switch) -> None:
        for victim in event.victims:
            self.drop(victim)
        self.shard_bytes.pop(event.model, None)   # a model copied again goes to the recent end
        self.shard_bytes[event.model] = event.shard_bytes
        self.ready_ns[event.model] = event.ready_ns
        self.kv_bytes = event.kv_bytes

    def drop(self, model: str) -> None:
        self.shard_bytes.pop(model, None)
        self.ready_ns.pop(model, None)

    def touch(self, model: str) -> None:
        """A run used `model`: it becomes the most recently used."""
        if model in self.shard_bytes:
            self.shard_bytes[model] = self.shard_bytes.pop(model)

    @property
    def weights_bytes(self) -> int:
        return sum(self.shard_bytes.values())

    @property
    def used_bytes(self) -> int:
        """Weights and KV: what each member's HBM ledger holds."""
        return self.weights_bytes + self.kv_bytes

    def loading(self, now_ns: int) -> list[str]:
        """Models whose copy has not landed by `now_ns`."""
        return [m for m, ready in self.ready_ns.items() if ready > now_ns]


@dataclass(frozen=True, slots=True)
class Lane:
    """Links of the copy path that the copies of the same sockets cross, hence held together."""

    name: str                   # its links joined by "+": a stable key
    links: tuple[str, ...]
    node: int
    sockets: tuple[str, ...]    # whose copies cross it

    @property
    def shared(self) -> bool:
        return len(self.sockets) > 1

    @property
    def label(self) -> str:
        """`node0/socket3 DDR->HBM (ddr_channel + ddr)`, `node0 DDR->HBM shared (dram + host)`."""
        owner = self.sockets[0] if not self.shared else f"node{self.node}"
        short = " + ".join(link.rsplit("/", 1)[-1] for link in self.links)
        return f"{owner} DDR->HBM{' shared' if self.shared else ''} ({short})"


@dataclass(frozen=True, slots=True)
class CopyHold:
    """One member's copy of a switch on one lane: sent at `sent_ns`, the lane held from `start_ns`
    to `end_ns`, landed at `arrival_ns`. Copies on a lane are served one at a time, so a copy
    holds it from when it was sent, or when the copy before it landed if that is later (the
    link latency, microseconds, counts into the copy), until it lands."""

    lane: Lane
    group: str
    member: str
    model: str
    sent_ns: int
    start_ns: int
    end_ns: int
    arrival_ns: int
    shard_bytes: int
    prefetch: bool


@dataclass(frozen=True, slots=True)
class RunSpan:
    """A run as it happened: `end_ns` is its planned end, or the fault that cut it short."""

    run: Run
    end_ns: int

    @property
    def start_ns(self) -> int:
        return self.run.t_ns

    @property
    def router(self) -> bool:
        return self.run.model == ROUTER_MODEL

    @property
    def interrupted(self) -> bool:
        return self.end_ns < self.run.end_ns

    @property
    def first_step_end_ns(self) -> int:
        """End of its first iteration (a static batch's prefill), within the run as it happened."""
        return max(self.run.t_ns, min(self.end_ns, self.run.t_ns + self.run.first_step_ns))

    @property
    def prefill_end_ns(self) -> int:
        """End of the prefill: its first iteration if that carried prompt tokens (a continuous
        span's later iterations decode), else its start (a span of decodes only)."""
        return self.first_step_end_ns if self.run.prefill_tokens > 0 else self.run.t_ns

    @property
    def stall(self) -> tuple[int, int]:
        """(start, end) of the wait for a switch before the run (empty without one); a fault
        during the wait ends it."""
        start = max(0, self.run.t_ns - self.run.stall_ns)
        return start, max(start, min(self.run.t_ns, self.end_ns))

    @property
    def collective_share(self) -> float:
        """Share of the run spent in collectives (the cost model gives them as a total)."""
        planned = self.run.end_ns - self.run.t_ns
        return min(1.0, self.run.collective_ns / planned) if planned > 0 and self.run.collective_ns > 0 else 0.0


class GroupState:
    """One tensor-parallel group as the events so far describe it."""

    def __init__(self, layout: GroupLayout) -> None:
        self.name, self.node, self.members = layout.name, layout.node, list(layout.members)
        self.residency = Residency()
        self.waiting = 0                     # requests queued for the group's first model (the router)
        self.current: Run | None = None      # its latest run, final once the next begins
        self.down = False                    # its node died
        self.restarting_until_ns = 0         # a member is restarting after a kill-socket fault
        self.router_seen = False            # a router run set `waiting`: other models' runs no longer do


class TimelineView:
    """What a view is told while the timeline is reduced; override what it draws."""

    def hbm_changed(self, group: GroupState, t_ns: int) -> None:
        """The group's HBM (weights or KV) changed at `t_ns`."""

    def waiting_changed(self, group: GroupState, t_ns: int) -> None:
        """The group's count of waiting requests changed at `t_ns`."""

    def copy_held(self, hold: CopyHold) -> None:
        """A copy held a lane (one call per member and lane of a switch)."""

    def run_ended(self, group: GroupState, span: RunSpan) -> None:
        """A run is final (the group's next run began, a fault cut it, or the stream ended)."""


_NO_VIEW = TimelineView()
_PLACEHOLDER = LinkSpec(latency_ns=0.0, bandwidth_bytes_per_s=1.0)


def copy_lanes(setup: Setup, where: str = "setup") -> dict[str, tuple[Lane, ...]]:
    """The lanes each socket's DDR -> HBM copies hold, from the topology's copy path. Link names
    do not depend on link speeds, nor on the P2P layout, so the topology is built with
    placeholder specs, as a ring (the layout with the fewest links), and for the nodes the
    groups list only. A copy reads the capacity tier: each socket's own DDR, or the node's host
    DRAM (shared by its copies)."""
    members = [member for group in setup.groups for member in group.members]
    by_node: dict[int, list[int]] = {}
    for member in members:
        try:
            node, socket = Topology.parse(member)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        if not (0 <= node < setup.nodes and 0 <= socket < setup.sockets_per_node):
            raise UserError(f"{where}: group member {member} is outside its {setup.nodes} node(s) x "
                            f"{setup.sockets_per_node} socket(s)")
        by_node.setdefault(node, []).append(socket)
    if not members:
        return {}
    widest = max(1 + max(sockets) for sockets in by_node.values())
    if any(1 + max(sockets) > 2 * len(set(sockets)) for sockets in by_node.values()):
        raise UserError(f"{where}: its groups do not list a node's sockets from socket0 up (not a run's setup)")
    spec = TopologySpec(p2p_kind="ring", p2p=_PLACEHOLDER, scale_out=_PLACEHOLDER, ddr_to_hbm=_PLACEHOLDER,
                        host_shared=_PLACEHOLDER if setup.host_link else None, ddr_read=_PLACEHOLDER,
                        ddr_read_shared=setup.capacity_tier_name == "host_dram")
    topology = Topology(spec, setup.nodes, widest, only_nodes=tuple(sorted(by_node)))
    paths = {member: [link.name for link in topology.copy_path(member)] for member in dict.fromkeys(members)}
    crossing: dict[str, list[str]] = {}
    for member, links in paths.items():
        for link in links:
            crossing.setdefault(link, []).append(member)
    lanes: dict[tuple[str, ...], Lane] = {}
    out: dict[str, tuple[Lane, ...]] = {}
    for member, links in paths.items():
        own = []
        for link in links:
            sockets = tuple(crossing[link])
            if sockets not in lanes:
                together = tuple(l for l in links if tuple(crossing[l]) == sockets)
                lanes[sockets] = Lane("+".join(together), together, Topology.parse(member)[0], sockets)
            if lanes[sockets] not in own:
                own.append(lanes[sockets])
        out[member] = tuple(own)
    return out


class _LaneQueue:
    """The copies of one lane lately reported, by landing time. A copy's predecessor is the one
    that landed just before it; in the order copies are produced that is the last one reported,
    and the hold is exact. A copy reported after one that landed later (another group's, from
    another window) is cut where that one's hold begins, so holds never overlap and their sum
    stays the time the lane was busy (that one's hold began too early, when the late copy was
    unknown; a socket's own lane then also counts the time its copy waited for the shared one).
    The last `KEEP` copies are enough to place a late one."""

    KEEP = 64

    def __init__(self) -> None:
        self._arrivals: list[int] = []
        self._starts: list[int] = []

    def landed_before(self, arrival_ns: int) -> int:
        i = bisect_right(self._arrivals, arrival_ns)
        return self._arrivals[i - 1] if i else 0

    def hold(self, start_ns: int, arrival_ns: int) -> int:
        """Record a copy holding the lane from `start_ns`; returns when its hold ends."""
        i = bisect_right(self._arrivals, arrival_ns)
        end = min(arrival_ns, self._starts[i]) if i < len(self._starts) else arrival_ns
        self._arrivals.insert(i, arrival_ns)
        self._starts.insert(i, start_ns)
        if len(self._arrivals) > self.KEEP:
            del self._arrivals[0], self._starts[0]
        return max(start_ns, end)


class TimelineState:
    """Reduces a run's events (after its `setup`) into per-group state, telling `view` what changes."""

    def __init__(self, setup: Setup, view: TimelineView | None = None, where: str = "setup") -> None:
        """`where` names the setup in a refusal (the file and event it came from)."""
        self.setup = setup
        self.view = view or _NO_VIEW
        self.groups = {layout.name: GroupState(layout) for layout in setup.groups}
        self.lanes_of = copy_lanes(setup, where)
        self.lanes = {lane.name: lane for lanes in self.lanes_of.values() for lane in lanes}
        self.socket_restarts: dict[str, tuple[int, int]] = {}   # killed socket -> (restarts, back at ns)
        self._queues = {name: _LaneQueue() for name in self.lanes}
        self._handlers = {Run: self._run, Switch: self._switch, Evict: self._evict, KvResize: self._kv,
                          Enqueue: self._enqueue, Fault: self._fault}

    def feed(self, event: Event) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def finish(self) -> None:
        """The stream ended: the runs still held are final as they are."""
        for group in self.groups.values():
            self._end_run(group)

    # -- runs -----------------------------------------------------------------------------------
    def _end_run(self, group: GroupState, cut_at_ns: int | None = None) -> None:
        run = group.current
        if run is None:
            return
        group.current = None
        self.view.run_ended(group, RunSpan(run, run.end_ns if cut_at_ns is None else min(run.end_ns, cut_at_ns)))

    def _run(self, event: Run) -> None:
        group = self.groups.get(event.group)
        if group is None:
            return
        self._end_run(group)
        group.current = event
        residency = group.residency
        residency.touch(event.model)
        if event.kv_bytes != residency.kv_bytes:
            residency.kv_bytes = event.kv_bytes
            self.view.hbm_changed(group, event.t_ns)
        # the router's queue is the group's queue; without a router, the first model's
        if event.model == ROUTER_MODEL or not group.router_seen:
            group.router_seen |= event.model == ROUTER_MODEL
            if group.waiting != event.queued:
                group.waiting = event.queued
                self.view.waiting_changed(group, event.t_ns)

    def _enqueue(self, event: Enqueue) -> None:
        group = self.groups.get(event.group)
        if group is not None and not group.down:
            group.waiting += 1
            self.view.waiting_changed(group, event.t_ns)

    # -- HBM ------------------------------------------------------------------------------------
    def _switch(self, event: Switch) -> None:
        group = self.groups.get(event.group)
        if group is None:
            return
        group.residency.switch(event)
        self.view.hbm_changed(group, event.t_ns)
        members = set(group.members)
        for member, arrival in sorted(event.arrivals.items(), key=lambda item: (item[1], item[0])):
            lanes = self.lanes_of.get(member, ()) if member in members else ()
            start = event.t_ns
            for lane in lanes:
                start = max(start, self._queues[lane.name].landed_before(arrival))
            start = min(start, arrival)
            for lane in lanes:
                end = self._queues[lane.name].hold(start, arrival)
                self.view.copy_held(CopyHold(lane, group.name, member, event.model, event.t_ns, start, end, arrival,
                                             event.shard_bytes, event.prefetch))

    def _evict(self, event: Evict) -> None:
        group = self.groups.get(event.group)
        if group is None:
            return
        for model in event.models:
            group.residency.drop(model)
        self.view.hbm_changed(group, event.t_ns)

    def _kv(self, event: KvResize) -> None:
        group = self.groups.get(event.group)
        if group is not None and group.residency.kv_bytes != event.kv_bytes:
            group.residency.kv_bytes = event.kv_bytes
            self.view.hbm_changed(group, event.t_ns)

    # -- faults ---------------------------------------------------------------------------------
    def _fault(self, event: Fault) -> None:
        """The groups it names stop what they run at once; a dead node's groups are gone, with
        what their HBM held; a killed socket's group is back when the fault says it recovered."""
        for name in event.groups:
            group = self.groups.get(name)
            if group is None:
                continue
            self._end_run(group, cut_at_ns=event.t_ns)
            if event.kind == "kill-node":
                group.down = True
                group.residency = Residency()
                self.view.hbm_changed(group, event.t_ns)
                if group.waiting:
                    group.waiting = 0
                    self.view.waiting_changed(group, event.t_ns)
            else:
                group.restarting_until_ns = max(group.restarting_until_ns, event.recovered_at_ns)
        if event.kind == "kill-socket" and event.target in self.lanes_of:
            restarts, _ = self.socket_restarts.get(event.target, (0, 0))
            self.socket_restarts[event.target] = (restarts + 1, event.recovered_at_ns)
