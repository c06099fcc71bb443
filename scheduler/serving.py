"""The Composition-of-Experts serving loop, in virtual time.

The router (and any pinned expert) is loaded into every group first; the workload's clock starts
when they are resident. A request arrives and is dispatched to a TP group (expert affinity or least load, among the
nodes whose DDR holds its expert). When the group is free it takes up to `max_batch` waiting
requests, runs the router on them at that batch size, and then, expert by expert (requests that
share an expert run as one batch), makes sure the expert is in HBM — a DDR -> HBM switch that
evicts a victim chosen by the residency policy — and runs it. Every time is decided by the
backend (the sockets' cost model and the links); events are processed in (virtual time,
sequence) order, so the same inputs give the same results on any backend.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from interconnect.spec_fields import UserError, format_bytes
from scheduler.backend import GroupInfo, ServingBackend
from scheduler.metrics import GroupStats, RequestRecord, summarize
from scheduler.policies import ResidencyPolicy, make_policy
from scheduler.workloads import Request, Workload
from socket_actor.core import RunRequest
from socket_actor.model_spec import ModelSpec
from socket_actor.operators import kv_bytes_per_token_per_socket, shard_weight_bytes
from socket_actor.tiers import CapacityError

__all__ = ["ServingConfig", "CoEServer", "ServingResult", "DISPATCH", "ROUTER_ID", "expert_id"]

DISPATCH = ("expert-affinity", "least-loaded")
ROUTER_ID = "router"
_TOKEN_BYTES = 4


def expert_id(expert: int) -> str:
    return f"expert{expert:04d}"


@dataclass(frozen=True)
class ServingConfig:
    policy: str = "lru"
    max_batch: int = 8
    dispatch: str = "expert-affinity"
    pinned_experts: tuple[int, ...] = ()
    mode: str | None = None
    orchestration: str | None = None
    ingress_node: int = 0


@dataclass
class ServingResult:
    records: list[RequestRecord]
    groups: list[GroupStats]
    summary: dict
    placement: dict[str, list[int]]


@dataclass
class _Group:
    info: GroupInfo
    stats: GroupStats
    policy: ResidencyPolicy
    slots: int                                   # experts that fit besides router and KV reserve
    queue: deque = field(default_factory=deque)
    resident: dict[int, int] = field(default_factory=dict)   # expert -> ready_at_ns
    router_ready_ns: int = 0
    busy: bool = False
    plan: deque = field(default_factory=deque)   # (expert, [requests]) left in the current cycle
    batch: list = field(default_factory=list)
    router_start_ns: int = 0
    router_end_ns: int = 0
    cycle: int = 0

    @property
    def load(self) -> int:
        return len(self.queue) + len(self.batch)


class CoEServer:
    """Serves one workload on one backend; `run()` returns records, group stats and the summary."""

    def __init__(self, backend: ServingBackend, expert_model: ModelSpec, experts: int, router_model: ModelSpec,
                 workload: Workload, config: ServingConfig,
                 on_event: Callable[[dict], None] | None = None) -> None:
        if experts < 1:
            raise UserError(f"experts: expected at least 1, got {experts}")
        if config.max_batch < 1:
            raise UserError(f"scheduler.max_batch: expected at least 1, got {config.max_batch}")
        if config.dispatch not in DISPATCH:
            raise UserError(f"scheduler.dispatch: expected one of {', '.join(DISPATCH)}, got {config.dispatch!r}")
        bad_pins = [e for e in config.pinned_experts if not 0 <= e < experts]
        if bad_pins:
            raise UserError(f"scheduler.pinned_experts: no expert {bad_pins[0]} (experts are 0..{experts - 1})")
        self.backend = backend
        self.expert_model, self.router_model = expert_model, router_model
        self.experts, self.workload, self.config = experts, workload, config
        self.emit = on_event or (lambda event: None)
        sequence = [r.expert for r in workload.requests]
        self.groups = [self._make_group(info, sequence) for info in backend.groups()]
        self.placement = self._place_experts()
        self.records: list[RequestRecord] = []
        self.inter_node_bytes = 0
        self._events: list[tuple[int, int, str, object]] = []
        self._seq = 0

    # -- set-up -------------------------------------------------------------------------------
    def _make_group(self, info: GroupInfo, sequence: list[int]) -> _Group:
        tp = info.tp
        expert_shard = shard_weight_bytes(self.expert_model, tp)
        router_shard = shard_weight_bytes(self.router_model, tp)
        longest = max((r.prompt_tokens + r.output_tokens for r in self.workload.requests), default=1)
        router_longest = max((r.prompt_tokens for r in self.workload.requests), default=1) + \
            self.workload.router_output_tokens
        kv_reserve = self.config.max_batch * max(
            kv_bytes_per_token_per_socket(self.expert_model, tp) * longest,
            kv_bytes_per_token_per_socket(self.router_model, tp) * router_longest)
        room = info.hbm_usable_bytes - router_shard - kv_reserve
        slots = room // expert_shard if room > 0 else 0
        if slots < 1 + len(self.config.pinned_experts):
            raise CapacityError(
                f"{info.name} ({tp} x {format_bytes(info.hbm_usable_bytes)} usable HBM per socket): an expert shard of "
                f"{format_bytes(expert_shard)} does not fit next to the router ({format_bytes(router_shard)}) and the "
                f"KV cache for {self.config.max_batch} sequences of up to {longest} tokens "
                f"({format_bytes(kv_reserve)}) per socket"
                + (f" and {len(self.config.pinned_experts)} pinned experts" if self.config.pinned_experts else ""))
        stats = GroupStats(name=info.name, node=info.node, expert_slots=int(slots))
        return _Group(info=info, stats=stats, policy=make_policy(self.config.policy, sequence), slots=int(slots))

    def _place_experts(self) -> dict[str, list[int]]:
        """Every node's DDR holds the router and all experts if they fit; otherwise the experts are
        spread round-robin over the nodes."""
        backend = self.backend
        expert_bytes, router_bytes = self.expert_model.weight_bytes(), self.router_model.weight_bytes()
        everything = self.experts * expert_bytes + router_bytes
        nodes = backend.nodes
        if everything <= backend.ddr_capacity_bytes:
            placement = {f"node{n}": list(range(self.experts)) for n in range(nodes)}
        else:
            placement = {f"node{n}": list(range(n, self.experts, nodes)) for n in range(nodes)}
            worst = max(len(v) for v in placement.values()) * expert_bytes + router_bytes
            if worst > backend.ddr_capacity_bytes:
                raise CapacityError(
                    f"{self.experts} experts of {expert_bytes / 1e9:.2f} GB ({self.experts * expert_bytes / 1e12:.2f} TB) "
                    f"plus the router do not fit in the {backend.ddr_tier_name} of {nodes} node(s) "
                    f"({backend.ddr_capacity_bytes / 1e12:.2f} TB each; the busiest node needs {worst / 1e12:.2f} TB)")
        for n in range(nodes):
            backend.store(n, ROUTER_ID, router_bytes)
            for e in placement[f"node{n}"]:
                backend.store(n, expert_id(e), expert_bytes)
        self._holders = {e: {n for n in range(nodes) if e in set(placement[f"node{n}"])} for e in range(self.experts)}
        return placement

    # -- events -------------------------------------------------------------------------------
    def _push(self, time_ns: int, kind: str, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (int(time_ns), self._seq, kind, payload))

    def run(self) -> ServingResult:
        """Load the router (and pinned experts) everywhere, then serve the workload, whose clock
        starts once they are resident (`setup_ns`)."""
        setup_ns = 0
        for g in self.groups:
            arrivals = self.backend.copy_in(g.info.index, ROUTER_ID, self.router_model, 0)
            g.router_ready_ns = max(arrivals.values())
            self.emit({"type": "switch", "t_ns": 0, "ready_ns": g.router_ready_ns, "group": g.info.name,
                       "model": ROUTER_ID, "victims": [], "prefetch": False, "arrivals": arrivals,
                       "shard_bytes": shard_weight_bytes(self.router_model, g.info.tp)})
            for e in self.config.pinned_experts:
                self._switch_in(g, e, 0, protected=set(), position=-1, prefetch=True)
            setup_ns = max([setup_ns, g.router_ready_ns, *g.resident.values()])
        self.setup_ns = setup_ns
        for request in self.workload.requests:
            shifted = Request(request.id, request.arrival_ns + setup_ns, request.prompt_tokens,
                              request.output_tokens, request.expert)
            self._push(shifted.arrival_ns, "arrival", shifted)
        handlers = {"arrival": self._on_arrival, "enqueue": self._on_enqueue, "free": self._on_free,
                    "decide": self._on_decide, "next": self._on_next}
        while self._events:
            time_ns, _, kind, payload = heapq.heappop(self._events)
            handlers[kind](time_ns, payload)
        if len(self.records) != len(self.workload.requests):
            raise RuntimeError(f"served {len(self.records)} of {len(self.workload.requests)} requests")
        stats = [g.stats for g in self.groups]
        summary = summarize(self.records, stats, len(self.workload.requests), self.inter_node_bytes, setup_ns)
        return ServingResult(records=self.records, groups=stats, summary=summary, placement=self.placement)

    # -- dispatch -----------------------------------------------------------------------------
    def _choose_group(self, request: Request) -> _Group:
        eligible = [g for g in self.groups if g.info.node in self._holders[request.expert]]
        if self.config.dispatch == "expert-affinity":
            warm = [g for g in eligible if request.expert in g.resident
                    or any(r.expert == request.expert for r in g.queue)]
            if warm:
                eligible = warm
        return min(eligible, key=lambda g: (g.load + g.busy, g.info.index))

    def _on_arrival(self, now: int, request: Request) -> None:
        group = self._choose_group(request)
        self.emit({"type": "arrival", "t_ns": now, "request": request.id, "expert": request.expert,
                   "group": group.info.name})
        arrive = now
        if group.info.node != self.config.ingress_node:
            nbytes = request.prompt_tokens * _TOKEN_BYTES
            arrive = self.backend.forward(self.config.ingress_node, group.info.node, nbytes, now)
            self.inter_node_bytes += nbytes + request.output_tokens * _TOKEN_BYTES
        self._push(arrive, "enqueue", (group, request))

    def _on_enqueue(self, now: int, payload: tuple[_Group, Request]) -> None:
        group, request = payload
        group.queue.append(request)
        if not group.busy:
            self._push(now, "free", group)

    # -- a group's cycle: router, then expert by expert -----------------------------------------
    def _on_free(self, now: int, group: _Group) -> None:
        if group.busy or not group.queue:
            return
        group.busy = True
        group.cycle += 1
        group.batch = [group.queue.popleft() for _ in range(min(self.config.max_batch, len(group.queue)))]
        start = max(now, group.router_ready_ns)
        result = self.backend.run(group.info.index, RunRequest(
            job_id=f"{group.info.name}/c{group.cycle}/router", model_id=ROUTER_ID, model=self.router_model,
            members=group.info.members, prompt_lens=tuple(r.prompt_tokens for r in group.batch),
            output_lens=(self.workload.router_output_tokens,) * len(group.batch), start_ns=start,
            mode=self.config.mode, orchestration=self.config.orchestration))
        group.router_start_ns, group.router_end_ns = start, result.end_ns
        group.stats.router_ns += result.end_ns - start
        group.stats.collective_ns += result.collective_ns
        group.stats.stall_ns += start - now if start > now else 0
        group.stats.batches += 1
        self.emit({"type": "router", "t_ns": start, "end_ns": result.end_ns, "ttft_ns": result.ttft_ns,
                   "collective_ns": result.collective_ns, "group": group.info.name, "model": ROUTER_ID,
                   "requests": [r.id for r in group.batch], "queued": len(group.queue)})
        self._push(result.end_ns, "decide", group)

    def _on_decide(self, now: int, group: _Group) -> None:
        by_expert: dict[int, list[Request]] = {}
        for request in group.batch:
            by_expert.setdefault(request.expert, []).append(request)
        ready_first = sorted(by_expert.items(), key=lambda item: item[0] not in group.resident)
        group.plan = deque(ready_first)
        if group.policy.prefetch:
            pending = {e for e, _ in group.plan}
            upcoming = [e for e, _ in group.plan] + [r.expert for r in list(group.queue)[:self.config.max_batch]]
            for e in dict.fromkeys(upcoming):
                if e not in group.resident and not self._prefetch(group, e, now, pending):
                    break
        self._push(now, "next", group)

    def _prefetch(self, group: _Group, expert: int, now: int, protected: set[int]) -> bool:
        """Start copying `expert` now if a slot is free or an unneeded expert can go."""
        pinned = set(self.config.pinned_experts)
        if len(group.resident) >= group.slots:
            candidates = set(group.resident) - protected - pinned
            if not candidates:
                return False
        self._switch_in(group, expert, now, protected | {expert}, position=-1, prefetch=True)
        return True

    def _switch_in(self, group: _Group, expert: int, now: int, protected: set[int], position: int,
                   prefetch: bool) -> int:
        pinned = set(self.config.pinned_experts)
        victims: list[int] = []
        while len(group.resident) - len(victims) >= group.slots:
            candidates = set(group.resident) - protected - pinned - set(victims)
            if not candidates:  # everything resident is still needed: evict a needed one, latest first
                candidates = set(group.resident) - pinned - {expert} - set(victims)
            victims.extend(group.policy.victims(candidates, 1, position))
        for victim in victims:
            self.backend.evict(group.info.index, expert_id(victim))
            del group.resident[victim]
            group.stats.evictions += 1
        arrivals = self.backend.copy_in(group.info.index, expert_id(expert), self.expert_model, now)
        ready = max(arrivals.values())
        group.resident[expert] = ready
        group.stats.switches += 1
        group.stats.prefetches += prefetch
        self.emit({"type": "switch", "t_ns": now, "ready_ns": ready, "group": group.info.name,
                   "model": expert_id(expert), "victims": [expert_id(v) for v in victims], "prefetch": prefetch,
                   "arrivals": arrivals, "shard_bytes": shard_weight_bytes(self.expert_model, group.info.tp)})
        return ready

    def _on_next(self, now: int, group: _Group) -> None:
        if not group.plan:
            group.busy = False
            group.batch = []
            self._push(now, "free", group)
            return
        expert, requests = group.plan.popleft()
        position = min(r.id for r in requests)
        hit = expert in group.resident and group.resident[expert] <= now
        if expert not in group.resident:
            protected = {e for e, _ in group.plan} | {expert}
            self._switch_in(group, expert, now, protected, position, prefetch=False)
        group.policy.touch(expert, position)
        ready = group.resident[expert]
        start = max(now, ready)
        result = self.backend.run(group.info.index, RunRequest(
            job_id=f"{group.info.name}/c{group.cycle}/{expert_id(expert)}", model_id=expert_id(expert),
            model=self.expert_model, members=group.info.members,
            prompt_lens=tuple(r.prompt_tokens for r in requests), output_lens=tuple(r.output_tokens for r in requests),
            start_ns=start, mode=self.config.mode, orchestration=self.config.orchestration))
        stall = start - now
        group.stats.stall_ns += stall
        group.stats.expert_ns += result.end_ns - start
        group.stats.collective_ns += result.collective_ns
        group.stats.accesses += 1
        group.stats.hits += hit
        self.emit({"type": "run", "t_ns": start, "end_ns": result.end_ns, "ttft_ns": result.ttft_ns,
                   "collective_ns": result.collective_ns, "group": group.info.name, "model": expert_id(expert),
                   "requests": [r.id for r in requests], "hit": hit, "stall_ns": stall})
        for request, finish in zip(requests, result.finish_ns):
            first_token = start + result.ttft_ns
            self.records.append(RequestRecord(
                id=request.id, arrival_ns=request.arrival_ns, expert=request.expert, node=group.info.node,
                group=group.info.name, prompt_tokens=request.prompt_tokens, output_tokens=request.output_tokens,
                batch_size=len(group.batch), expert_batch_size=len(requests),
                queue_ns=group.router_start_ns - request.arrival_ns,
                router_ns=group.router_end_ns - group.router_start_ns,
                expert_wait_ns=start - group.router_end_ns, switch_wait_ns=stall, hbm_hit=hit,
                ttft_ns=first_token - request.arrival_ns,
                tpot_ns=(finish - first_token) // (request.output_tokens - 1) if request.output_tokens > 1 else 0,
                e2e_ns=finish - request.arrival_ns, finish_ns=finish))
            record = self.records[-1]
            self.emit({"type": "done", "t_ns": finish, "request": request.id, "group": group.info.name,
                       "expert": request.expert, "hit": hit, "output_tokens": request.output_tokens,
                       "ttft_ns": record.ttft_ns, "tpot_ns": record.tpot_ns, "e2e_ns": record.e2e_ns})
        self._push(result.end_ns, "next", group)
