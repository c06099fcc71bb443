"""What passes between the cluster's ingress and the engines of its nodes.

A run is partitioned by emulated node: each node's serving engine (its TP groups, their queues,
KV and residency) advances on its own, and the ingress — the cluster's load balancer — routes
requests to nodes. They meet in *rounds*: the ingress asks every engine to advance to a virtual
time (processing every event before it), hands it the requests it routed there and any
re-placed experts, and gets back what the engine did meanwhile (its timeline, the requests it
completed) and its load at that time. This is conservative synchronisation: an engine is never
handed an event in its past. Everything here is plain data, so an engine may run in this process
(the `inline` backend) or in a node runtime actor (the `ray` backend) with the same results.

A node whose TP groups span several emulated nodes (TP larger than a node) shares one engine
with them: an engine covers the nodes of its groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rdu.interconnect.links import LinkDown
from rdu.scheduler.backend import GroupInfo
from rdu.scheduler.metrics import EngineMetrics, GroupStats, RequestRecord
from rdu.scheduler.serving_types import ServingStopped
from rdu.scheduler.workloads import Request

__all__ = ["PartitionSpec", "GroupLoad", "Delivery", "RoundInput", "RoundOutput", "PartitionResult",
           "partition_groups", "PartitionEngine", "FOREVER_NS"]

FOREVER_NS = 1 << 62    # "advance until there is nothing left to do"


@dataclass(frozen=True)
class PartitionSpec:
    """One engine's share of the cluster: its emulated nodes and their TP groups."""

    index: int
    nodes: tuple[int, ...]
    groups: tuple[GroupInfo, ...]


@dataclass(frozen=True)
class GroupLoad:
    """What a group's node reports to the load balancer: requests it holds (dispatched, not
    finished), the experts it is warm for (resident in HBM, or already queued or running there)
    and whether it is alive."""

    index: int
    node: int
    load: int
    warm: frozenset[int]
    dead: bool = False


@dataclass(frozen=True)
class Delivery:
    """A request reaching its node at `enqueue_ns` (after forwarding over the fabric)."""

    enqueue_ns: int
    request: Request
    node: int


@dataclass(frozen=True)
class RoundInput:
    """Advance to `until_ns`, with these requests delivered and these experts stored first;
    then, at `until_ns`, lose the nodes in `kill_nodes` (their unfinished requests come back)."""

    until_ns: int
    deliveries: tuple[Delivery, ...] = ()
    stores: tuple[tuple[int, int], ...] = ()          # (node, expert) re-placed into that node's tier
    kill_nodes: tuple[int, ...] = ()
    start_ns: int = -1                                 # the first round: the workload's clock starts here


@dataclass
class RoundOutput:
    """What an engine did in a round: its timeline (packed event records), the requests it
    completed, its groups' load at `until_ns`, requests handed back (their node died), and why
    it cannot go on, if it cannot."""

    timeline: bytes
    records: list[RequestRecord]
    loads: list[GroupLoad]
    orphans: list[Request] = field(default_factory=list)
    stopped: str = ""
    events: int = 0
    next_event_ns: int = FOREVER_NS    # when the engine has something to do next (FOREVER_NS: nothing)


@dataclass
class PartitionResult:
    """An engine's totals at the end of a run (or when it stopped)."""

    groups: list[GroupStats]
    metrics: EngineMetrics | None      # the continuous engine's (merged across partitions)
    peak_kv_bytes: list[int]           # per group
    fault_stats: dict[str, int]        # faults this engine handled (kill-socket)
    backend: dict                      # the backend's own checks and counters
    timeline: tuple[bytes, int] = (b"", 0)   # the last events (KV entries emptied), packed, and their count
    stopped: str = ""                  # why the partition's results do not stand (a socket diverged)


def partition_groups(groups: list[GroupInfo]) -> list[PartitionSpec]:
    """One engine per emulated node, except that nodes one TP group spans share an engine."""
    parent: dict[int, int] = {}

    def find(n: int) -> int:
        while parent.setdefault(n, n) != n:
            n = parent[n]
        return n

    for group in groups:
        nodes = sorted({int(m.split("/")[0].removeprefix("node")) for m in group.members})
        for n in nodes[1:]:
            parent[find(n)] = find(nodes[0])
        find(nodes[0])
    blocks: dict[int, list[int]] = {}
    for n in sorted(parent):
        blocks.setdefault(find(n), []).append(n)
    specs = []
    for i, nodes in enumerate(sorted(blocks.values())):
        members = [g for g in groups if g.node in nodes]
        specs.append(PartitionSpec(index=i, nodes=tuple(nodes), groups=tuple(members)))
    return specs


class PartitionEngine:
    """The round both engines run (static.py, continuous.py): take the round's stores and
    deliveries (`_take_round`, the engine's own), process every event before the round's end,
    lose the nodes a fault kills there, and answer with what happened meanwhile. A link that
    failed for good or a reason the cluster cannot go on stops the engine, reported, not raised:
    the ingress stops every partition."""

    stopped: str = ""

    def advance(self, round_input: RoundInput) -> RoundOutput:
        """Process every event before `round_input.until_ns`, with its deliveries and stores."""
        if round_input.start_ns >= 0:
            self.start(round_input.start_ns)
        self.until_ns = round_input.until_ns
        self._take_round(round_input)
        if not self.stopped:
            try:
                self._loop(round_input.until_ns)
                for node in round_input.kill_nodes:
                    self._kill_node(node, round_input.until_ns)
            except LinkDown as exc:
                self.stopped = f"at {self.clock_ns()} ns: {exc}"
            except ServingStopped as exc:
                self.stopped = str(exc)
        timeline, count = self.timeline.take()
        records, self._records = self._records, []
        orphans, self._orphans = self._orphans, []
        return RoundOutput(timeline=timeline, events=count, records=records, loads=self.loads(), orphans=orphans,
                           stopped=self.stopped, next_event_ns=self._next_event_ns())
