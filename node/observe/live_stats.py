"""Running statistics of a run, built from its event stream: what the live dashboard shows.

`LiveStats` is fed every event (a few dict updates each, so it can sit in the serving loop's
sink list) and, a few times per second, the backend's own socket ledgers; `snapshot()` freezes
it into a `StatsSnapshot`, plain data that the dashboard renders without looking anywhere else.

The helpers that turn events into memory and link occupancy (`Residency`, `CopyLinks`,
`IntervalMeter`) are shared with the trace exporter and the plots, so all three views of a run
tell the same story.

Virtual "now" is the latest start time the serving loop has processed (arrivals, routers,
switches, runs). `done` events carry future finish times: a request counts as completed, and
enters the latency percentiles, once now has passed its finish.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from rdu.interconnect.topology import Topology
from rdu.scheduler.metrics import percentiles
from rdu.scheduler.serving import ROUTER_ID

__all__ = ["LiveStats", "StatsSnapshot", "SocketView", "NodeView", "GroupView", "LinkView", "Residency",
           "CopyLinks", "Copy", "IntervalMeter", "node_of", "format_virtual_s", "log_line"]


def node_of(socket: str) -> int:
    """`node1/socket3` -> 1."""
    return Topology.parse(socket)[0]


def format_virtual_s(t_ns: float) -> str:
    return f"{t_ns / 1e9:,.3f} s"


# -- shared derivations: memory and links from events ------------------------------------------

class Residency:
    """The HBM of one group's members (identical on every member) from the group's events: the
    model shards (switch and evict events), ordered least recently used first, and the KV entry
    the continuous engine keeps in the ledgers (the `kv_bytes` of switch, run and kv events)."""

    def __init__(self) -> None:
        self.shard_bytes: dict[str, int] = {}
        self.ready_ns: dict[str, int] = {}
        self.kv_bytes = 0

    def apply(self, event: dict) -> None:
        """Any event of the group: those that change its HBM update it, the rest are ignored."""
        kind = event["type"]
        if kind == "switch":
            self.apply_switch(event)
        elif kind == "evict":
            self.apply_evict(event)
        elif kind in ("run", "kv"):
            if kind == "run":
                self.touch(event["model"])
            self.kv_bytes = int(event.get("kv_bytes", self.kv_bytes))

    def apply_switch(self, event: dict) -> None:
        for victim in event["victims"]:
            self.shard_bytes.pop(victim, None)
            self.ready_ns.pop(victim, None)
        self.shard_bytes[event["model"]] = int(event["shard_bytes"])
        self.ready_ns[event["model"]] = int(event["ready_ns"])
        self.kv_bytes = int(event.get("kv_bytes", self.kv_bytes))

    def apply_evict(self, event: dict) -> None:
        """Models evicted without a switch (the continuous engine made room for KV blocks)."""
        for victim in event["models"]:
            self.shard_bytes.pop(victim, None)
            self.ready_ns.pop(victim, None)

    def touch(self, model: str) -> None:
        """A run used `model`: move it to the most recently used end."""
        if model in self.shard_bytes:
            self.shard_bytes[model] = self.shard_bytes.pop(model)

    @property
    def weights_bytes(self) -> int:
        return sum(self.shard_bytes.values())

    @property
    def used_bytes(self) -> int:
        """Weights and KV: what the sockets' HBM ledgers hold."""
        return self.weights_bytes + self.kv_bytes

    def loading(self, now_ns: int) -> list[str]:
        """Models whose DDR -> HBM copy has not landed by `now_ns`."""
        return [m for m, ready in self.ready_ns.items() if ready > now_ns]


def copy_path(member: str, host_link: bool) -> tuple[str, ...]:
    """The links (named as in interconnect.topology) a DDR -> HBM copy into `member` holds:
    the socket's own DDR channel, behind the node's shared host link on GPU platforms."""
    own = f"{member}/ddr"
    return (f"node{node_of(member)}/host", own) if host_link else (own,)


class Copy(NamedTuple):
    """One member's share of a switch: when its copy held its links and when it landed."""

    member: str
    model: str
    links: tuple[str, ...]
    sent_ns: int
    start_ns: int
    arrival_ns: int
    shard_bytes: int
    prefetch: bool


class CopyLinks:
    """When each DDR -> HBM copy held its links. A switch event says when the copy was sent and
    when it landed on each member; copies on a link are serialised, so a copy holds its links
    from when it was sent, or when the previous copy on them landed if that is later (this
    counts the link latency, microseconds, into the copy), until it lands."""

    def __init__(self, host_link: bool) -> None:
        self.host_link = host_link
        self.free_at_ns: dict[str, int] = {}
        self._paths: dict[str, tuple[str, ...]] = {}

    def copies(self, switch: dict) -> list[Copy]:
        sent, model, shard, prefetch = int(switch["t_ns"]), switch["model"], int(switch["shard_bytes"]), \
            bool(switch["prefetch"])
        return [Copy(member, model, links, sent, start, arrival, shard, prefetch)
                for member, links, start, arrival in self.holds(switch)]

    def holds(self, switch: dict) -> list[tuple[str, tuple[str, ...], int, int]]:
        """(member, links, start_ns, arrival_ns) of each member's copy: the cheap form of
        `copies` for the live dashboard, which sees every switch as it happens."""
        sent = switch["t_ns"]
        items = switch["arrivals"].items()
        if self.host_link:  # copies queue on the shared link in the order they land
            items = sorted(items, key=lambda item: (item[1], item[0]))
        free_at, paths, out = self.free_at_ns, self._paths, []
        for member, arrival in items:
            links = paths.get(member)
            if links is None:
                links = paths[member] = copy_path(member, self.host_link)
            start = sent
            for link in links:
                free = free_at.get(link, 0)
                if free > start:
                    start = free
                free_at[link] = arrival
            out.append((member, links, start if start < arrival else arrival, arrival))
        return out


class IntervalMeter:
    """Busy time of a resource from intervals that may end in the virtual future: `busy_ns(now)`
    counts only what has happened by `now`. `weight` is the busy share of an interval (a run's
    collectives are known only as a total, spread over the run)."""

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

    def truncate(self, at_ns: int) -> None:
        """Nothing is busy after `at_ns` (the run that was going on was interrupted by a fault)."""
        self._open = [(start, min(end, at_ns), weight) for start, end, weight in self._open if start < at_ns]

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


def log_line(event: dict) -> str:
    """One line of the dashboard's log for a switch, evict, fault or end event."""
    when = format_virtual_s(event.get("t_ns", 0))
    if event["type"] == "switch":
        kind = "prefetch" if event["prefetch"] else "switch"
        evicted = f", evicts {', '.join(event['victims'])}" if event["victims"] else ""
        return (f"{when}  {event['group']}  {kind} {event['model']}{evicted}; "
                f"in HBM after {(event['ready_ns'] - event['t_ns']) / 1e6:,.1f} ms")
    if event["type"] == "evict":
        return f"{when}  {event['group']}  evicts {', '.join(event['models'])} for KV blocks"
    if event["type"] == "end":
        if event.get("stopped"):
            return f"{when}  run stopped: {event['stopped']}"
        return f"{when}  run {'interrupted' if event.get('interrupted') else 'finished'}"
    detail = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("type", "t_ns", "kind", "target", "spec"))
    return f"{when}  FAULT {event.get('kind', '?')} {event.get('target', '')}: {detail}"


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
    ddr_tier: str
    capacity_tier_bytes: int
    ddr_used_bytes: int | None           # None when the events do not say


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
    kv_bytes: int | None = None          # KV blocks per member socket (None: the engine keeps none)
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

class _Group:
    def __init__(self, name: str, node: int, members: list[str]) -> None:
        self.name, self.node, self.members = name, node, members
        self.residency = Residency()
        self.waiting = 0
        self.batch = 0
        self.busy = IntervalMeter()
        self.collectives = IntervalMeter()
        self.ddr_links = IntervalMeter()     # the members' DDR -> HBM links, as a mean over members
        self.ddr_bytes = 0
        self.current: tuple[str, int, int, int] | None = None   # model, start, first token, end
        self.failed = False                  # its node died (kill-node fault)
        self.restarting_until_ns = 0         # a member is restarting (kill-socket fault)
        self.kv_known = False                # a run event said how much KV the group holds

    def interrupt(self, at_ns: int) -> None:
        """A fault stopped what the group was doing at `at_ns`."""
        self.busy.truncate(at_ns)
        self.collectives.truncate(at_ns)
        self.current = None


class LiveStats:
    """Aggregates a run's events into what the dashboard shows; `snapshot()` freezes it."""

    def __init__(self, log_lines: int = 20) -> None:
        self.setup: dict | None = None
        self.clock_ns = 0
        self.first_arrival_ns: int | None = None
        self.arrived = self.completed = self.output_tokens = 0
        self.switches = self.prefetches = self.evictions = self.runs = self.hits = 0
        self.log: deque[dict] = deque(maxlen=log_lines)      # switch, fault and end events, newest last
        self.faults: list[dict] = []
        self.groups: dict[str, _Group] = {}
        self.copy_links = CopyLinks(host_link=False)
        self.host_busy: dict[str, IntervalMeter] = {}     # node's shared host link (GPU platforms)
        self.host_bytes: dict[str, int] = {}
        self.socket_samples: dict[str, dict] = {}
        self.socket_faults: dict[str, tuple[int, int]] = {}   # kill-socket target -> (restarts, back at ns)
        self.finished = self.interrupted = False
        self.stopped = ""
        self.summary: dict | None = None
        self._pending_done: list[tuple[int, int, int, int, int]] = []   # finish, tokens, ttft, tpot, e2e
        self._latencies: dict[str, list[int]] = {"ttft_ns": [], "tpot_ns": [], "e2e_ns": []}
        self._handlers = {"setup": self._on_setup, "arrival": self._on_arrival, "router": self._on_router,
                          "switch": self._on_switch, "run": self._on_run, "done": self._on_done,
                          "evict": self._on_evict, "kv": self._on_kv,
                          "fault": self._on_fault, "end": self._on_end}

    # -- feeding --------------------------------------------------------------------------------
    def feed(self, event: dict) -> None:
        handler = self._handlers.get(event["type"])
        if handler is not None:
            handler(event)

    def observe_sockets(self, snapshots: list[dict] | None) -> None:
        """The backend's per-socket ledgers (`socket_snapshots()`), when it has them."""
        if snapshots:
            self.socket_samples = {s["socket"]: s for s in snapshots}

    def _advance(self, t_ns: int) -> None:
        if t_ns > self.clock_ns:
            self.clock_ns = t_ns

    def _on_setup(self, event: dict) -> None:
        self.setup = event
        self.groups = {g["name"]: _Group(g["name"], g["node"], list(g["members"])) for g in event["groups"]}
        self.copy_links = CopyLinks(host_link=bool(event.get("host_link")))

    def _group(self, name: str) -> _Group:
        group = self.groups.get(name)
        if group is None:  # a stream without its setup event: learn groups as they appear
            group = self.groups[name] = _Group(name, 0, [])
        return group

    def _on_arrival(self, event: dict) -> None:
        t_ns = event["t_ns"]
        if t_ns > self.clock_ns:
            self.clock_ns = t_ns
        self.arrived += 1
        if self.first_arrival_ns is None:
            self.first_arrival_ns = t_ns
        self._group(event["group"]).waiting += 1

    def _on_router(self, event: dict) -> None:
        group = self._start_run(event)
        group.waiting = event["queued"]
        group.batch = len(event["requests"])

    def _on_run(self, event: dict) -> None:
        group = self._start_run(event)
        if "accesses" in event:   # the continuous engine: requests first admitted in this span
            self.runs += event["accesses"]
            self.hits += event["hits"]
        else:                     # the static cycle: every expert run is one access
            self.runs += 1
            self.hits += bool(event["hit"])
        group.residency.apply(event)
        if "kv_bytes" in event:   # the continuous engine: the batch is the sequences of this span
            group.batch = len(event["requests"])
            group.kv_known = True

    def _start_run(self, event: dict) -> _Group:
        start, end = event["t_ns"], event["end_ns"]
        if start > self.clock_ns:
            self.clock_ns = start
        group = self._group(event["group"])
        group.busy.add(start, end)
        if end > start:
            group.collectives.add(start, end, event.get("collective_ns", 0) / (end - start))
        group.current = (event["model"], start, start + event["ttft_ns"], end)
        return group

    def _on_switch(self, event: dict) -> None:
        self._advance(event["t_ns"])
        group = self._group(event["group"])
        group.residency.apply_switch(event)
        if event["model"] != ROUTER_ID:
            self.switches += 1
            self.prefetches += bool(event["prefetch"])
        self.evictions += len(event["victims"])
        share = 1.0 / max(1, len(group.members) or len(event["arrivals"]))
        shard = event["shard_bytes"]
        holds = self.copy_links.holds(event)
        group.ddr_bytes += shard * len(holds)
        if len({(start, arrival) for _, _, start, arrival in holds}) == 1 and len(holds[0][1]) == 1:
            _, _, start, arrival = holds[0]  # every member's own link, in lockstep: one update
            group.ddr_links.add(start, arrival, share * len(holds))
            holds = []
        for _, links, start, arrival in holds:
            group.ddr_links.add(start, arrival, share)
            if len(links) > 1:
                host = links[0]
                if host not in self.host_busy:
                    self.host_busy[host], self.host_bytes[host] = IntervalMeter(), 0
                self.host_busy[host].add(start, arrival)
                self.host_bytes[host] += shard
        self.log.append(event)  # formatted when drawn: only the last few lines ever are

    def _on_evict(self, event: dict) -> None:
        """Idle models evicted to make room for KV blocks (no switch says so)."""
        self._advance(event["t_ns"])
        self._group(event["group"]).residency.apply_evict(event)
        self.evictions += len(event["models"])
        self.log.append(event)

    def _on_kv(self, event: dict) -> None:
        self._group(event["group"]).residency.apply(event)

    def _on_done(self, event: dict) -> None:
        self._pending_done.append((event["t_ns"], event["output_tokens"], event["ttft_ns"], event["tpot_ns"],
                                   event["e2e_ns"]))

    def _on_fault(self, event: dict) -> None:
        t_ns = event.get("t_ns", 0)
        self._advance(t_ns)
        for name in event.get("groups", ()):        # kill-node: these groups are gone
            group = self._group(name)
            group.interrupt(t_ns)
            group.failed, group.waiting, group.batch = True, 0, 0
        if "group" in event:                         # kill-socket: the group waits for the restart
            group = self._group(event["group"])
            group.interrupt(t_ns)
            group.restarting_until_ns = int(event.get("recovered_at_ns", t_ns))
            if event.get("kind") == "kill-socket" and event.get("target"):
                restarts, _ = self.socket_faults.get(event["target"], (0, 0))
                self.socket_faults[event["target"]] = (restarts + 1, group.restarting_until_ns)
        self.log.append(event)
        self.faults.append(event)

    def _on_end(self, event: dict) -> None:
        self._advance(event["t_ns"])
        self.finished = True
        self.interrupted = bool(event.get("interrupted"))
        self.stopped = str(event.get("stopped") or "")
        self.summary = event.get("summary")
        self._release_done(float("inf"))
        self.log.append(event)

    def _release_done(self, now_ns: float) -> None:
        """Count the requests whose last token is out by `now_ns` (kept as plain tuples until then)."""
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
        setup = self.setup or {}
        now = self.clock_ns
        serving_ns = now - self.first_arrival_ns if self.first_arrival_ns is not None else 0
        return StatsSnapshot(
            name=setup.get("name", "?"), platform=setup.get("platform", "?"), model=setup.get("model", "?"),
            experts=setup.get("experts", 0), policy=setup.get("policy", "?"), nodes=setup.get("nodes", 0),
            sockets_per_node=setup.get("sockets_per_node", 0), tp=setup.get("tp", 0),
            requests_total=setup.get("requests", 0), arrived=self.arrived, completed=self.completed,
            output_tokens=self.output_tokens, clock_ns=now, serving_ns=serving_ns, wall_s=wall_s,
            tokens_per_s=self.output_tokens / (serving_ns / 1e9) if serving_ns > 0 else 0.0,
            ttft_ns=percentiles(self._latencies["ttft_ns"]), tpot_ns=percentiles(self._latencies["tpot_ns"]),
            e2e_ns=percentiles(self._latencies["e2e_ns"]),
            switches=self.switches, prefetches=self.prefetches, evictions=self.evictions,
            hit_rate=self.hits / self.runs if self.runs else None,
            sockets=tuple(self._socket_views(setup, now)), nodes_view=tuple(self._node_views(setup)),
            groups=tuple(self._group_views(now)), links=tuple(self._link_views(now)),
            log=tuple(log_line(event) for event in self.log), faults=tuple(log_line(event) for event in self.faults),
            backend_sampled=bool(self.socket_samples), finished=self.finished, interrupted=self.interrupted,
            stopped=self.stopped)

    def _socket_views(self, setup: dict, now: int) -> list[SocketView]:
        views = []
        for group in self.groups.values():
            used = group.residency.used_bytes
            resident = tuple(group.residency.shard_bytes)
            loading = tuple(group.residency.loading(now))
            busy = group.busy.busy_ns(now) / now if now > 0 else 0.0
            for member in group.members:
                sample = self.socket_samples.get(member, {}).get("tiers", {})
                views.append(SocketView(
                    name=member, node=node_of(member), group=group.name, hbm_used_bytes=used,
                    hbm_capacity_bytes=setup.get("hbm_usable_bytes", 0),
                    sram_used_bytes=sample["sram"]["used_bytes"] if "sram" in sample else None,
                    sram_capacity_bytes=setup.get("sram_bytes", 0), resident=resident, loading=loading,
                    busy_fraction=min(1.0, busy), state=self._socket_state(group, member, now)))
        return sorted(views, key=lambda v: Topology.parse(v.name))

    def _socket_state(self, group: _Group, member: str, now: int) -> str:
        """What sets one member apart from the rest of its group: a fault's mark stays after the
        restart, so the dashboard can still tell which socket was killed."""
        if group.failed:
            return "down"
        restarts, back_ns = self.socket_faults.get(member, (0, 0))
        if not restarts:
            return ""
        return "restarting" if now < back_ns else "restarted once" if restarts == 1 else f"restarted {restarts} times"

    def _node_views(self, setup: dict) -> list[NodeView]:
        used = setup.get("ddr_used_bytes")
        return [NodeView(index=n, ddr_tier=setup.get("ddr_tier", "ddr"), capacity_tier_bytes=setup.get("ddr_bytes", 0),
                         ddr_used_bytes=int(used[n]) if used is not None and n < len(used) else None)
                for n in range(setup.get("nodes", 0))]

    def _group_views(self, now: int) -> list[GroupView]:
        views = []
        usable = int((self.setup or {}).get("hbm_usable_bytes", 0))
        for group in self.groups.values():
            activity = "idle"
            if group.failed:
                activity = "failed (node down)"
            elif now < group.restarting_until_ns:
                activity = "restarting a socket"
            elif group.current is not None:
                model, start, first_token, end = group.current
                if start <= now < end:
                    activity = f"{model} {'prefill' if now < first_token else 'decode'}"
                elif now < start:
                    activity = f"waits for {model}"
            batch = group.batch if activity != "idle" else 0
            kv = group.residency.kv_bytes if group.kv_known else None
            views.append(GroupView(group.name, group.node, len(group.members), group.waiting, batch, activity,
                                   kv, max(0, usable - group.residency.weights_bytes)))
        return views

    def _link_views(self, now: int) -> list[LinkView]:
        """Per group: its members' DDR -> HBM links (mean) and its P2P collectives; per node: the
        shared host link of GPU platforms."""
        def share(meter: IntervalMeter) -> float:
            return min(1.0, meter.busy_ns(now) / now) if now > 0 else 0.0

        views = []
        for group in self.groups.values():
            views.append(LinkView(f"{group.name} DDR->HBM", share(group.ddr_links), group.ddr_bytes,
                                  f"mean of {len(group.members)} links"))
            views.append(LinkView(f"{group.name} P2P", share(group.collectives), None, "collectives"))
        for host in sorted(self.host_busy):
            views.append(LinkView(f"{host} link", share(self.host_busy[host]), self.host_bytes[host],
                                  "shared by the node"))
        return views
