"""The cluster's ingress: requests arrive here, are routed to a node, and the nodes' engines
advance in rounds (scheduler/partition.py).

Routing is two-level, as in a real deployment: the ingress (a load balancer) picks a node from
the load each node reported at the start of the current *window* of virtual time — slightly
stale, as a balancer acting on periodic load reports is — plus the requests it sent itself since
then; the node picks one of its groups with what it knows when the request reaches it. The window
(`scheduler.dispatch_window_ms`) is a parameter of the model, not of the backend: every backend
runs the same rounds and gets the same results. A window whose arrivals have only one node to go
to needs no report and no round.

Faults that move requests between nodes (kill-node) are round boundaries: every engine advances
to that moment, the dying node hands back its unfinished requests, and they are routed again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rdu.scheduler.backend import Cluster, GroupInfo
from rdu.scheduler.dispatch import choose_group
from rdu.scheduler.engine_recipe import EngineRecipe
from rdu.scheduler.faults import FaultSpec
from rdu.scheduler.metrics import EngineMetrics, MetricsCollector, RequestRecord, summarize
from rdu.scheduler.partition import (FOREVER_NS, Delivery, GroupLoad, PartitionResult, RoundInput, RoundOutput)
from rdu.scheduler.serving_types import ServingResult, ServingStopped, expert_id
from rdu.scheduler.timeline import Arrival, Event, Fault, TimelineBuffer, unpack_timeline
from rdu.scheduler.workloads import Request

__all__ = ["Ingress"]

_TOKEN_BYTES = 4
_DELIVERIES_PER_ROUND = 512     # a round at least this often (requests routed): observers follow the run
_DRAIN_WINDOWS = 64             # the rounds after the last arrival cover this many windows each


@dataclass
class _View:
    """The ingress's picture of a group: its last report plus what was sent there since."""

    info: GroupInfo
    load: int = 0
    warm: set[int] = field(default_factory=set)
    dead: bool = False

    def warm_for(self, expert: int) -> bool:
        return expert in self.warm


class Ingress:
    """Routes a workload's requests to the nodes of `cluster` and gathers what they serve."""

    def __init__(self, cluster: Cluster, recipe: EngineRecipe, window_ns: int,
                 on_event: Callable[[Event], None] | None = None,
                 on_timeline: Callable[[bytes, int], None] | None = None,
                 on_record: Callable[[RequestRecord], None] | None = None, keep_records: bool = True,
                 stop_requested: Callable[[], bool] | None = None) -> None:
        self.cluster, self.recipe, self.window_ns = cluster, recipe, max(1, int(window_ns))
        self.config, self.workload = recipe.config, recipe.workload
        self.on_event, self.on_timeline = on_event, on_timeline
        self.stop_requested = stop_requested or (lambda: False)
        self.metrics = MetricsCollector(on_record, keep=keep_records, requests=len(self.workload.requests))
        self.views = {g.index: _View(g) for g in cluster.groups()}
        self.holders = {e: {n for n in range(cluster.nodes) if e in set(recipe.placement[f"node{n}"])}
                        for e in range(recipe.experts)}
        self.slack = self.config.max_batch if recipe.kind == "static" else self.config.max_num_seqs
        self.timeline = TimelineBuffer()
        self.setup_ns = 0
        self.inter_node_bytes = 0
        self.fault_stats = {"faults_injected": 0, "faults_recovered": 0, "requests_redispatched": 0,
                            "experts_replaced": 0}
        self.dead_nodes: set[int] = set()
        self.runner = None
        self._partition_of_node: dict[int, int] = {}
        self._pending: list[list[Delivery]] = []
        self._stores: list[list[tuple[int, int]]] = []
        self._synced_ns = -1
        self._next_event_ns = FOREVER_NS
        self._routed_since_sync = 0
        self._dispatched = 0
        self._results: list[PartitionResult] | None = None
        self._retired: dict[int, PartitionResult] = {}   # partitions whose nodes all died, and their totals
        self.rounds = 0
        self.rounds_wall_s = 0.0   # the wall the driver waited for rounds (the emulator's speed, never a result)

    # -- the run --------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Build the engines and let them load what starts resident (the run's set-up: the
        workload's clock starts when every engine is ready)."""
        if self.runner is not None:
            return
        self.runner = runner = self.cluster.start(self.recipe)
        for spec in runner.partitions:
            for n in spec.nodes:
                self._partition_of_node[n] = spec.index
        self._pending = [[] for _ in runner.partitions]
        self._stores = [[] for _ in runner.partitions]
        self.setup_ns = max(runner.setup(), default=0)

    def run(self) -> ServingResult:
        self.prepare()
        setup_ns = self.setup_ns
        arrivals = [Request(r.id, r.arrival_ns + setup_ns, r.prompt_tokens, r.output_tokens, r.expert)
                    for r in self.workload.requests]
        faults = sorted(((setup_ns + (f.virtual_ns if f.request is None else self.workload.requests[f.request]
                                      .arrival_ns), i, f) for i, f in enumerate(self.config.faults)
                         if f.kind != "kill-socket"), key=lambda item: item[:2])
        self._round(setup_ns, start_ns=setup_ns)
        i = j = 0
        while i < len(arrivals) or j < len(faults):
            if j < len(faults) and (i == len(arrivals) or faults[j][0] <= arrivals[i].arrival_ns):
                self._fault(faults[j][0], faults[j][2])
                j += 1
                continue
            window_end = self._window_start(arrivals[i].arrival_ns) + self.window_ns
            fault_at = faults[j][0] if j < len(faults) else FOREVER_NS
            while i < len(arrivals) and arrivals[i].arrival_ns < min(window_end, fault_at):
                self._route(arrivals[i], arrivals[i].arrival_ns)
                i += 1
        self._drain()
        stopped = next((r.stopped for r in self._finish() if r.stopped), "")
        if stopped:
            raise ServingStopped(stopped, self.result())
        if self.metrics.completed != len(self.workload.requests):
            raise RuntimeError(f"served {self.metrics.completed} of {len(self.workload.requests)} requests")
        return self.result()

    def _drain(self) -> None:
        """After the last arrival: rounds of `_DRAIN_WINDOWS` windows (a virtual second at least)
        past the engines' next event, until none has anything left (bounded rounds: observers
        follow, a stop lands)."""
        step = max(self.window_ns * _DRAIN_WINDOWS, 1_000_000_000)
        while True:
            pending = [d.enqueue_ns for deliveries in self._pending for d in deliveries]
            nxt = min([self._next_event_ns, *pending])
            if nxt >= FOREVER_NS:
                return
            self._round(max(self._synced_ns, nxt) + step)

    def _window_start(self, t_ns: int) -> int:
        return self.setup_ns + (t_ns - self.setup_ns) // self.window_ns * self.window_ns

    def _round(self, until_ns: int, kill_nodes: tuple[int, ...] = (), start_ns: int = -1) -> list[Request]:
        """Advance every engine to `until_ns`; returns the requests handed back."""
        if self.stop_requested():
            raise KeyboardInterrupt("stop requested")
        live = [spec for spec in self.runner.partitions if spec.index not in self._retired]
        inputs = {spec.index: RoundInput(until_ns=until_ns, deliveries=tuple(self._pending[spec.index]),
                                         stores=tuple(self._stores[spec.index]),
                                         kill_nodes=tuple(n for n in kill_nodes if n in spec.nodes), start_ns=start_ns)
                  for spec in live}
        started = time.perf_counter()
        answers = self.runner.round(inputs)
        self.rounds_wall_s += time.perf_counter() - started
        outputs = [answers[spec.index] for spec in live]
        self.rounds += 1
        self._pending = [[] for _ in self.runner.partitions]
        self._stores = [[] for _ in self.runner.partitions]
        self._synced_ns = until_ns
        self._routed_since_sync = 0
        self._next_event_ns = min((o.next_event_ns for o in outputs), default=FOREVER_NS)
        orphans = []
        stopped = ""
        for output in outputs:
            self._observe(output)
            orphans += output.orphans
            stopped = stopped or output.stopped
        if stopped:
            raise ServingStopped(stopped, self.result())
        return sorted(orphans, key=lambda r: r.id)

    def _observe(self, output: RoundOutput) -> None:
        """What an engine did in a round goes to the observers, its records to the metrics."""
        self._timeline(output.timeline, output.events)
        for record in output.records:
            self.metrics.add(record)
        for load in output.loads:
            self._report(load)

    def _report(self, load: GroupLoad) -> None:
        view = self.views[load.index]
        view.load, view.warm, view.dead = load.load, set(load.warm), load.dead or view.dead

    def _timeline(self, packed: bytes, count: int) -> None:
        if not packed:
            return
        if self.on_timeline is not None:
            self.on_timeline(packed, count)
        if self.on_event is not None:
            for event in unpack_timeline(packed):
                self.on_event(event)

    def _emit(self, event: Event) -> None:
        if self.on_timeline is not None:
            self.timeline(event)
            self.on_timeline(*self.timeline.take())
        if self.on_event is not None:
            self.on_event(event)

    # -- routing --------------------------------------------------------------------------------
    def _route(self, request: Request, now: int, redispatched: bool = False) -> None:
        """Pick the request's node and send it there (over the fabric from the ingress node)."""
        holders = [n for n in sorted(self.holders[request.expert]) if n not in self.dead_nodes]
        if not holders:
            raise ServingStopped(f"at {now} ns: no live node holds expert {request.expert}", self.result())
        if len(holders) > 1 and self.config.dispatch != "round-robin" and self._synced_ns < self._window_start(now):
            self._round(self._window_start(now))   # the load reports of this window
        if self._routed_since_sync >= _DELIVERIES_PER_ROUND and self._synced_ns < self._window_start(now):
            self._round(self._window_start(now))
        if len(holders) == 1:
            node = holders[0]
        else:
            views = [v for v in self.views.values() if v.info.node in holders and not v.dead]
            view = choose_group(views, request.expert, set(holders), self.config.dispatch, self.slack,
                                self._dispatched)
            self._dispatched += 1
            view.load += 1
            view.warm.add(request.expert)
            node = view.info.node
        enqueue = now
        ingress = self.config.ingress_node
        if node != ingress:
            nbytes = request.prompt_tokens * _TOKEN_BYTES
            enqueue = self.cluster.forward_request(ingress, node, nbytes, now)
            self.inter_node_bytes += nbytes + request.output_tokens * _TOKEN_BYTES
        if not redispatched:
            self._emit(Arrival(t_ns=now, request=request.id, expert=request.expert, node=node))
        self._pending[self._partition_of_node[node]].append(Delivery(enqueue, request, node))
        self._routed_since_sync += 1

    # -- faults the ingress handles ----------------------------------------------------------------
    def _fault(self, at_ns: int, fault: FaultSpec) -> None:
        self.fault_stats["faults_injected"] += 1
        if fault.kind == "drop-link":   # the engines degrade their own links when they reach `at_ns`
            a, b = fault.link
            self.cluster.degrade_fabric(a, b, fault.probability, at_ns)
            recovered = fault.probability < 1.0
            self.fault_stats["faults_recovered"] += recovered
            self._emit(Fault(t_ns=at_ns, kind=fault.kind, target=fault.target, spec=fault.text, groups=[],
                             recovered_at_ns=at_ns if recovered else 0, detail={"probability": fault.probability}))
            return
        self._kill_node(at_ns, fault)

    def _kill_node(self, at_ns: int, fault: FaultSpec) -> None:
        """Every engine advances to `at_ns`; the node dies; its requests are routed again and the
        experts only it held are placed in the survivors' capacity tiers."""
        node = int(fault.target.removeprefix("node"))
        if node in self.dead_nodes:
            return
        orphans = self._round(at_ns, kill_nodes=(node,))
        self.dead_nodes.add(node)
        gone = [spec.index for spec in self.runner.partitions
                if spec.index not in self._retired and set(spec.nodes) <= self.dead_nodes]
        if gone:   # their totals now: their runtimes may go with the node
            self._retired.update(self.runner.finish(gone))
        self.cluster.lost_node(node)
        doomed = [v for v in self.views.values() if node in {int(m.split("/")[0][4:]) for m in v.info.members}]
        for view in doomed:
            view.dead = True
        survivors = sorted({v.info.node for v in self.views.values() if not v.dead})
        if not survivors:
            raise ServingStopped(f"node{node} failed at {at_ns} ns and no node is left to serve", self.result())
        moved = self._replace_experts(node, survivors, at_ns)
        self.fault_stats["faults_recovered"] += 1
        self.fault_stats["requests_redispatched"] += len(orphans)
        self._emit(Fault(t_ns=at_ns, kind=fault.kind, target=fault.target, spec=fault.text,
                         groups=[v.info.name for v in doomed], recovered_at_ns=at_ns,
                         detail={"requests_redispatched": len(orphans), "experts_replaced": moved}))
        for request in orphans:
            self._route(request, at_ns, redispatched=True)

    def _replace_experts(self, node: int, survivors: list[int], at_ns: int) -> int:
        """Experts only the dead node held go to the survivors' tiers, round-robin."""
        expert_bytes = self.recipe.expert_model.weight_bytes()
        used = {n: sum(expert_bytes for e, h in self.holders.items() if n in h) for n in survivors}
        moved = 0
        for expert, holders in sorted(self.holders.items()):
            holders.discard(node)
            if holders:
                continue
            target = survivors[moved % len(survivors)]
            if used[target] + expert_bytes > self.cluster.capacity_tier_bytes:
                raise ServingStopped(
                    f"node{node} failed at {at_ns} ns and its experts do not fit in the survivors' "
                    f"{self.cluster.capacity_tier_name}: {expert_id(expert)} needs "
                    f"{expert_bytes / 1e9:.2f} GB on node{target}", self.result())
            used[target] += expert_bytes
            holders.add(target)
            self._stores[self._partition_of_node[target]].append((target, expert))
            moved += 1
        self.fault_stats["experts_replaced"] += moved
        return moved

    # -- results --------------------------------------------------------------------------------
    def _finish(self) -> list[PartitionResult]:
        """Every partition's totals, in partition order (those of dead partitions from their death)."""
        if self._results is None:
            if self.runner is None:
                return []
            live = [spec.index for spec in self.runner.partitions if spec.index not in self._retired]
            totals = {**self._retired, **(self.runner.finish(live) if live else {})}
            self._results = [totals[spec.index] for spec in self.runner.partitions]
            for index in live:
                self._timeline(*totals[index].timeline)
        return self._results

    def backend_info(self) -> dict:
        """The backends' own checks and counters, summed over partitions."""
        info: dict = {"backend": self.cluster.name, "partitions": len(self._finish()), "rounds": self.rounds,
                      "rounds_wall_s": round(self.rounds_wall_s, 3)}
        for result in self._finish():   # counts add up; maxima (a `max` in the name) stay maxima
            for key, value in result.backend.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    info[key] = max(info.get(key, value), value) if "max" in key else info.get(key, 0) + value
                else:
                    info.setdefault(key, value)
        return info

    def result(self) -> ServingResult:
        """Records, group statistics and summary of what has been served so far."""
        results = self._finish()
        stats = [g for r in results for g in r.groups]   # partitions hold consecutive groups, in order
        summary = summarize(self.metrics, stats, len(self.workload.requests), self.inter_node_bytes, self.setup_ns)
        faults = dict(self.fault_stats)
        for result in results:
            for key, value in result.fault_stats.items():
                faults[key] = faults.get(key, 0) + value
        summary.update({k: faults.get(k, 0) for k in ("faults_injected", "faults_recovered", "recovery_ns",
                                                       "runs_retried", "requests_redispatched")})
        if self.recipe.kind == "continuous":
            merged = EngineMetrics()
            for result in results:
                if result.metrics is not None:
                    merged.merge(result.metrics)
            summary.update(merged.summary(self.metrics, self.config.slo_ttft_ms, self.config.slo_tpot_ms,
                                          summary["virtual_ns"], [b for r in results for b in r.peak_kv_bytes]))
        summary["scheduler"] = self.recipe.kind
        return ServingResult(records=self.metrics.records, groups=stats, summary=summary,
                             placement=self.recipe.placement)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
