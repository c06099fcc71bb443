"""The `static` scheduler: the paper's benchmark cycle (Vidur's `faster_transformer`).

The router (and any pinned expert) is loaded into every group first; the workload's clock starts
when they are resident. A request arrives and is dispatched to a TP group (expert affinity or
least load, among the nodes whose DDR holds its expert). When the group is free it takes up to
`max_batch` waiting requests, runs the router on them at that batch size, and then, expert by
expert (requests that share an expert run as one batch), makes sure the expert is in HBM — a
DDR -> HBM switch that evicts a victim chosen by the residency policy — and runs it. KV is
reserved up front (`max_batch` x the longest request). Every time is decided by the backend;
events are processed in (virtual time, sequence) order, so the same inputs give the same results
on any backend.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from rdu.base import UserError, format_bytes
from rdu.interconnect.links import LinkDown
from rdu.scheduler.backend import GroupInfo, ServingBackend
from rdu.scheduler.faults import FaultSpec
from rdu.scheduler.metrics import GroupStats, MetricsCollector, RequestRecord, summarize
from rdu.scheduler.policies import ResidencyPolicy, make_policy
from rdu.scheduler.serving_types import ROUTER_ID, ServingConfig, ServingResult, ServingStopped, expert_id
from rdu.scheduler.timeline import Arrival, Done, Event, Fault, Run, Switch
from rdu.scheduler.workloads import Request, Workload
from rdu.socket_actor.core import RunRequest
from rdu.socket_actor.model_spec import ModelSpec
from rdu.socket_actor.operators import kv_bytes_per_token_per_socket, shard_weight_bytes
from rdu.socket_actor.tiers import CapacityError

__all__ = ["StaticServer"]

_TOKEN_BYTES = 4


@dataclass
class StaticGroup:
    info: GroupInfo
    stats: GroupStats
    policy: ResidencyPolicy
    slots: int                                   # experts that fit besides router and KV reserve
    queue: deque = field(default_factory=deque)
    resident: dict[int, int] = field(default_factory=dict)   # expert -> ready_at_ns
    router_ready_ns: int = 0
    busy: bool = False
    plan: deque = field(default_factory=deque)   # (expert, [requests]) left in the current cycle
    running: tuple | None = None                 # the expert run in progress, committed when it ends
    batch: list = field(default_factory=list)
    router_start_ns: int = 0
    router_end_ns: int = 0
    router_job: str = ""
    cycle: int = 0
    phase: str = "idle"                          # idle, router or experts
    epoch: int = 0                               # bumped by a fault: older events of the group are void
    available_at_ns: int = 0                     # when the group is back after a fault
    dead: bool = False

    @property
    def load(self) -> int:
        return len(self.queue) + len(self.batch)


class StaticServer:
    """Serves one workload with the static cycle; `run()` returns records, group stats and the summary."""

    def __init__(self, backend: ServingBackend, expert_model: ModelSpec, experts: int, router_model: ModelSpec,
                 workload: Workload, config: ServingConfig,
                 on_event: Callable[[Event], None] | None = None,
                 on_record: Callable[[RequestRecord], None] | None = None, keep_records: bool = True) -> None:
        if experts < 1:
            raise UserError(f"experts: expected at least 1, got {experts}")
        if config.max_batch < 1:
            raise UserError(f"scheduler.max_batch: expected at least 1, got {config.max_batch}")
        bad_pins = [e for e in config.pinned_experts if not 0 <= e < experts]
        if bad_pins:
            raise UserError(f"scheduler.pinned_experts: no expert {bad_pins[0]} (experts are 0..{experts - 1})")
        sockets = {m for info in backend.groups() for m in info.members}
        for fault in config.faults:
            targets = {"kill-socket": [fault.target], "drop-link": list(fault.link) if fault.kind == "drop-link" else [],
                       "kill-node": []}[fault.kind]
            missing = [t for t in targets if t not in sockets]
            if fault.kind == "kill-node" and int(fault.target.removeprefix("node")) >= backend.nodes:
                missing = [fault.target]
            if missing:
                raise UserError(f"fault {fault.text!r}: no {missing[0]} in this cluster of {backend.nodes} node(s)")
        self.backend = backend
        self.expert_model, self.router_model = expert_model, router_model
        self.experts, self.workload, self.config = experts, workload, config
        self.emit = on_event or (lambda event: None)
        sequence = [r.expert for r in workload.requests]
        self.groups = [self._make_group(info, sequence) for info in backend.groups()]
        self.placement = self._place_experts()
        self.metrics = MetricsCollector(on_record, keep=keep_records, requests=len(workload.requests))
        self.inter_node_bytes = 0
        self.setup_ns = 0
        self._restarts: dict[str, int] = {}   # kills survived per socket
        self.fault_stats = {"faults_injected": 0, "faults_recovered": 0, "recovery_ns": 0, "runs_retried": 0,
                            "requests_redispatched": 0}
        self._jobs = 0
        self._events: list[tuple[int, int, str, object]] = []
        self._seq = 0

    # -- set-up -------------------------------------------------------------------------------
    def _make_group(self, info: GroupInfo, sequence: list[int]) -> StaticGroup:
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
        return StaticGroup(info=info, stats=stats, policy=make_policy(self.config.policy, sequence), slots=int(slots))

    def _place_experts(self) -> dict[str, list[int]]:
        """Every node's DDR holds the router and all experts if they fit; otherwise the experts are
        spread round-robin over the nodes."""
        backend = self.backend
        expert_bytes, router_bytes = self.expert_model.weight_bytes(), self.router_model.weight_bytes()
        everything = self.experts * expert_bytes + router_bytes
        nodes = backend.nodes
        if everything <= backend.capacity_tier_bytes:
            placement = {f"node{n}": list(range(self.experts)) for n in range(nodes)}
        else:
            placement = {f"node{n}": list(range(n, self.experts, nodes)) for n in range(nodes)}
            worst = max(len(v) for v in placement.values()) * expert_bytes + router_bytes
            if worst > backend.capacity_tier_bytes:
                raise CapacityError(
                    f"{self.experts} experts of {expert_bytes / 1e9:.2f} GB ({self.experts * expert_bytes / 1e12:.2f} TB) "
                    f"plus the router do not fit in the {backend.capacity_tier_name} of {nodes} node(s) "
                    f"({backend.capacity_tier_bytes / 1e12:.2f} TB each; the busiest node needs {worst / 1e12:.2f} TB)")
        for n in range(nodes):
            backend.store(n, ROUTER_ID, router_bytes)
            for e in placement[f"node{n}"]:
                backend.store(n, expert_id(e), expert_bytes)
        self._holders = {e: {n for n in range(nodes) if e in set(placement[f"node{n}"])} for e in range(self.experts)}
        return placement

    # -- events -------------------------------------------------------------------------------
    def _push(self, time_ns: int, kind: str, payload: object) -> None:
        self._seq += 1
        if isinstance(payload, StaticGroup):  # a fault may void the events a group has pending
            payload = (payload, payload.epoch)
        heapq.heappush(self._events, (int(time_ns), self._seq, kind, payload))

    def _job_id(self, group: StaticGroup, what: str) -> str:
        self._jobs += 1
        return f"{group.info.name}/j{self._jobs}/{what}"

    def run(self) -> ServingResult:
        """Load the router (and pinned experts) everywhere, then serve the workload, whose clock
        starts once they are resident (`setup_ns`)."""
        setup_ns = 0
        for g in self.groups:
            arrivals = self.backend.copy_in(g.info.index, ROUTER_ID, self.router_model, 0)
            g.router_ready_ns = max(arrivals.values())
            self.emit(Switch(t_ns=0, group=g.info.name, model=ROUTER_ID, ready_ns=g.router_ready_ns, victims=[],
                             prefetch=False, arrivals=dict(arrivals),
                             shard_bytes=shard_weight_bytes(self.router_model, g.info.tp), kv_bytes=0))
            for e in self.config.pinned_experts:
                self._switch_in(g, e, 0, protected=set(), position=-1, prefetch=True)
            setup_ns = max([setup_ns, g.router_ready_ns, *g.resident.values()])
        self.setup_ns = setup_ns
        for request in self.workload.requests:
            shifted = Request(request.id, request.arrival_ns + setup_ns, request.prompt_tokens,
                              request.output_tokens, request.expert)
            self._push(shifted.arrival_ns, "arrival", shifted)
        for fault in self.config.faults:
            if fault.request is None:
                self._push(setup_ns + fault.virtual_ns, "fault", fault)
        handlers = {"arrival": self._on_arrival, "enqueue": self._on_enqueue, "free": self._on_free,
                    "decide": self._on_decide, "next": self._on_next, "fault": self._on_fault}
        group_events = {"free", "decide", "next"}
        while self._events:
            time_ns, _, kind, payload = heapq.heappop(self._events)
            if kind in group_events:
                group, epoch = payload
                if epoch != group.epoch or group.dead:
                    continue
                payload = group
            try:
                handlers[kind](time_ns, payload)
            except LinkDown as exc:
                raise ServingStopped(f"at {time_ns} ns: {exc}", self.result()) from None
        if self.metrics.completed != len(self.workload.requests):
            raise RuntimeError(f"served {self.metrics.completed} of {len(self.workload.requests)} requests")
        return self.result()

    def result(self) -> ServingResult:
        """Records, group statistics and summary of what has been served so far."""
        stats = [g.stats for g in self.groups]
        summary = summarize(self.metrics, stats, len(self.workload.requests), self.inter_node_bytes, self.setup_ns)
        summary.update(self.fault_stats)
        summary["scheduler"] = "static"
        return ServingResult(records=self.metrics.records, groups=stats, summary=summary, placement=self.placement)

    # -- dispatch -----------------------------------------------------------------------------
    def _choose_group(self, request: Request) -> StaticGroup:
        """Least-loaded eligible group; with expert affinity, a group that already holds (or is
        about to run) the expert, unless it is a whole batch busier than the least-loaded one:
        then the request spills over and that group warms up too (a hot expert gets replicas)."""
        eligible = [g for g in self.groups if not g.dead and g.info.node in self._holders[request.expert]]
        if not eligible:
            raise ServingStopped(f"no live group can serve expert {request.expert}", self.result())
        if self.config.dispatch == "round-robin":
            self._dispatched = getattr(self, "_dispatched", 0) + 1
            return eligible[(self._dispatched - 1) % len(eligible)]
        load = lambda g: (g.load + g.busy, g.info.index)  # noqa: E731
        coldest = min(eligible, key=load)
        if self.config.dispatch == "expert-affinity":
            warm = [g for g in eligible if request.expert in g.resident
                    or any(r.expert == request.expert for r in g.queue)]
            if warm:
                best = min(warm, key=load)
                if load(best)[0] <= load(coldest)[0] + self.config.max_batch:
                    return best
        return coldest

    def _on_arrival(self, now: int, request: Request) -> None:
        for fault in self.config.faults:
            if fault.request == request.id:
                self._on_fault(now, fault)
        group = self._choose_group(request)
        self.emit(Arrival(t_ns=now, request=request.id, expert=request.expert, node=group.info.node))
        arrive = now
        if group.info.node != self.config.ingress_node:
            nbytes = request.prompt_tokens * _TOKEN_BYTES
            arrive = self.backend.forward_request(self.config.ingress_node, group.info.node, nbytes, now)
            self.inter_node_bytes += nbytes + request.output_tokens * _TOKEN_BYTES
        self._push(arrive, "enqueue", (group, request))

    def _on_enqueue(self, now: int, payload: tuple[StaticGroup, Request]) -> None:
        group, request = payload
        if group.dead:  # its node failed while the request was on its way
            group = self._choose_group(request)
        group.queue.append(request)
        if not group.busy:
            self._push(now, "free", group)

    # -- a group's cycle: router, then expert by expert -----------------------------------------
    def _on_free(self, now: int, group: StaticGroup) -> None:
        if group.busy or not group.queue:
            return
        if now < group.available_at_ns:  # still recovering from a fault
            self._push(group.available_at_ns, "free", group)
            return
        group.busy = True
        group.phase = "router"
        group.cycle += 1
        group.batch = [group.queue.popleft() for _ in range(min(self.config.max_batch, len(group.queue)))]
        start = max(now, group.router_ready_ns)
        group.router_job = self._job_id(group, ROUTER_ID)
        result = self.backend.run(group.info.index, RunRequest(
            job_id=group.router_job, model_id=ROUTER_ID, model=self.router_model,
            members=group.info.members, prompt_lens=tuple(r.prompt_tokens for r in group.batch),
            output_lens=(self.workload.router_output_tokens,) * len(group.batch), start_ns=start,
            mode=self.config.mode, orchestration=self.config.orchestration))
        group.router_start_ns, group.router_end_ns = start, result.end_ns
        group.stats.router_ns += result.end_ns - start
        group.stats.collective_ns += result.collective_ns
        group.stats.setup_ns += result.setup_ns
        group.stats.stall_ns += start - now if start > now else 0
        group.stats.batches += 1
        self.emit(self._run_event(group, ROUTER_ID, self.router_model, start, result, group.batch,
                                  (self.workload.router_output_tokens,) * len(group.batch), 0, 0, 0))
        self._push(result.end_ns, "decide", group)

    def _on_decide(self, now: int, group: StaticGroup) -> None:
        by_expert: dict[int, list[Request]] = {}
        for request in group.batch:
            by_expert.setdefault(request.expert, []).append(request)
        ready_first = sorted(by_expert.items(), key=lambda item: item[0] not in group.resident)
        group.plan = deque(ready_first)
        group.phase = "experts"
        if group.policy.prefetch:
            pending = {e for e, _ in group.plan}
            upcoming = [e for e, _ in group.plan] + [r.expert for r in list(group.queue)[:self.config.max_batch]]
            for e in dict.fromkeys(upcoming):
                if e not in group.resident and not self._prefetch(group, e, now, pending):
                    break
        self._push(now, "next", group)

    def _prefetch(self, group: StaticGroup, expert: int, now: int, protected: set[int]) -> bool:
        """Start copying `expert` now if a slot is free or an unneeded expert can go."""
        pinned = set(self.config.pinned_experts)
        if len(group.resident) >= group.slots:
            candidates = set(group.resident) - protected - pinned
            if not candidates:
                return False
        self._switch_in(group, expert, now, protected | {expert}, position=-1, prefetch=True)
        return True

    def _switch_in(self, group: StaticGroup, expert: int, now: int, protected: set[int], position: int,
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
        self.emit(Switch(t_ns=now, group=group.info.name, model=expert_id(expert), ready_ns=ready,
                         victims=[expert_id(v) for v in victims], prefetch=prefetch, arrivals=dict(arrivals),
                         shard_bytes=shard_weight_bytes(self.expert_model, group.info.tp), kv_bytes=0))
        return ready

    def _on_next(self, now: int, group: StaticGroup) -> None:
        """The group's previous expert run (if any) has ended: commit it, then start the next."""
        if group.running is not None:
            self._commit(group)
        if not group.plan:
            group.busy = False
            group.phase = "idle"
            group.batch = []
            self.backend.set_kv(group.info.index, 0)  # the cycle is over: its KV cache leaves HBM
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
        job = self._job_id(group, expert_id(expert))
        result = self.backend.run(group.info.index, RunRequest(
            job_id=job, model_id=expert_id(expert),
            model=self.expert_model, members=group.info.members,
            prompt_lens=tuple(r.prompt_tokens for r in requests), output_lens=tuple(r.output_tokens for r in requests),
            start_ns=start, mode=self.config.mode, orchestration=self.config.orchestration))
        stall = start - now
        group.stats.stall_ns += stall
        group.stats.expert_ns += result.end_ns - start
        group.stats.collective_ns += result.collective_ns
        group.stats.setup_ns += result.setup_ns
        group.stats.accesses += 1
        group.stats.hits += hit
        self.emit(self._run_event(group, expert_id(expert), self.expert_model, start, result, requests,
                                  tuple(r.output_tokens for r in requests), 1, int(hit), stall))
        group.running = (expert, requests, result, hit, stall, job)
        self._push(result.end_ns, "next", group)

    def _run_event(self, group: StaticGroup, model_name: str, model: ModelSpec, start: int, result, requests: list,
                   output_lens: tuple[int, ...], accesses: int, hits: int, stall: int) -> Run:
        """The `run` event of a router batch or an expert batch of the cycle (its KV held for the run)."""
        tokens = sum(r.prompt_tokens for r in requests) + sum(output_lens)
        return Run(t_ns=start, group=group.info.name, model=model_name, end_ns=result.end_ns,
                   first_step_ns=result.ttft_ns, collective_ns=result.collective_ns, requests=[r.id for r in requests],
                   iterations=max(output_lens, default=0), prefill_tokens=sum(r.prompt_tokens for r in requests),
                   decodes=0, accesses=accesses, hits=hits, stall_ns=stall,
                   kv_bytes=kv_bytes_per_token_per_socket(model, group.info.tp) * tokens, queued=len(group.queue))

    def _commit(self, group: StaticGroup) -> None:
        """Record the requests of the run that just ended."""
        expert, requests, result, hit, stall, _ = group.running
        group.running = None
        first_token = result.start_ns + result.ttft_ns
        for request, finish in zip(requests, result.finish_ns):
            record = RequestRecord(
                id=request.id, arrival_ns=request.arrival_ns, expert=request.expert, node=group.info.node,
                group=group.info.name, prompt_tokens=request.prompt_tokens, output_tokens=request.output_tokens,
                batch_size=len(group.batch), expert_batch_size=len(requests),
                queue_ns=group.router_start_ns - request.arrival_ns,
                router_ns=group.router_end_ns - group.router_start_ns,
                expert_wait_ns=result.start_ns - group.router_end_ns, switch_wait_ns=stall, hbm_hit=hit,
                ttft_ns=first_token - request.arrival_ns,
                tpot_ns=(finish - first_token) // (request.output_tokens - 1) if request.output_tokens > 1 else 0,
                e2e_ns=finish - request.arrival_ns, finish_ns=finish)
            self.metrics.add(record)
            self.emit(Done(t_ns=finish, request=request.id, group=group.info.name, expert=request.expert, hit=hit,
                           output_tokens=request.output_tokens, ttft_ns=record.ttft_ns, tpot_ns=record.tpot_ns,
                           e2e_ns=record.e2e_ns, preemptions=0))

    # -- faults -------------------------------------------------------------------------------
    def _on_fault(self, now: int, fault: FaultSpec) -> None:
        self.fault_stats["faults_injected"] += 1
        handler = {"kill-socket": self._kill_socket, "kill-node": self._kill_node, "drop-link": self._drop_link}
        groups, recovered, detail = handler[fault.kind](now, fault)
        self.emit(Fault(t_ns=now, kind=fault.kind, target=fault.target, spec=fault.text, groups=groups,
                        recovered_at_ns=recovered, detail=detail))

    def _interrupt(self, group: StaticGroup, now: int) -> None:
        """A member of `group` failed at `now`: stop what the group is doing; the interrupted
        router batch goes back to the queue, an interrupted expert run back to the plan."""
        if group.phase == "router" and now < group.router_end_ns:
            self.backend.abort(group.info.index, group.router_job, now)
            group.stats.router_ns -= group.router_end_ns - max(now, group.router_start_ns)
            group.stats.stall_ns -= max(0, group.router_start_ns - now)  # it was still waiting to start
            group.queue.extendleft(reversed(group.batch))
            group.batch, group.busy, group.phase = [], False, "idle"
        elif group.running is not None and now < group.running[2].end_ns:
            expert, requests, result, hit, stall, job = group.running
            self.backend.abort(group.info.index, job, now)  # cut short, or cancelled before it began
            group.stats.expert_ns -= result.end_ns - max(now, result.start_ns)
            group.stats.stall_ns -= max(0, result.start_ns - now)  # it was still waiting for its switch
            group.plan.appendleft((expert, requests))
            group.running = None
            self.fault_stats["runs_retried"] += 1
        elif group.running is not None:  # it ended at this very moment: keep its results
            self._commit(group)
        group.epoch += 1

    def _kill_socket(self, now: int, fault: FaultSpec) -> tuple[list[str], int, dict]:
        """The socket dies; it is restarted empty and refilled from DDR with everything its group
        held; the group's interrupted batch is retried once it is back."""
        group = next((g for g in self.groups if fault.target in g.info.members), None)
        if group is None or group.dead:
            raise UserError(f"fault {fault.text!r}: no live socket {fault.target} in this cluster")
        self._restarts[fault.target] = self._restarts.get(fault.target, 0) + 1
        if self._restarts[fault.target] > self.backend.max_restarts:
            raise ServingStopped(f"{fault.target} failed at {now} ns for the {self._restarts[fault.target]}th time, "
                                 f"more than the {self.backend.max_restarts} restarts the platform allows "
                                 "(socket.max_restarts)", self.result())
        self._interrupt(group, now)
        back = now + int(self.backend.restart_ns)
        self.backend.fail_socket(fault.target, now, back)
        ready = [back]
        arrivals = self.backend.copy_in(group.info.index, ROUTER_ID, self.router_model, back, [fault.target])
        group.router_ready_ns = max(group.router_ready_ns, *arrivals.values())
        ready.append(group.router_ready_ns)
        for expert in list(group.resident):
            arrivals = self.backend.copy_in(group.info.index, expert_id(expert), self.expert_model, back,
                                            [fault.target])
            group.resident[expert] = max(group.resident[expert], *arrivals.values())
            ready.append(group.resident[expert])
        group.available_at_ns = max(ready)
        self._push(group.available_at_ns, "next" if group.busy else "free", group)
        self.fault_stats["faults_recovered"] += 1
        self.fault_stats["recovery_ns"] += group.available_at_ns - now
        return [group.info.name], group.available_at_ns, {"reloaded": len(group.resident) + 1}

    def _kill_node(self, now: int, fault: FaultSpec) -> tuple[list[str], int, dict]:
        """The node and its DDR are gone: its groups' work goes to the other nodes, and experts
        only it held are placed in the survivors' DDR (or the run stops if they do not fit)."""
        node = int(fault.target.removeprefix("node"))
        doomed = [g for g in self.groups if g.info.node == node and not g.dead]
        if not doomed:
            raise UserError(f"fault {fault.text!r}: no live node {node} in this cluster")
        orphans: list[Request] = []
        for group in doomed:
            self._interrupt(group, now)
            orphans += [r for _, requests in group.plan for r in requests] + list(group.queue)
            group.plan.clear()
            group.queue.clear()
            group.batch, group.busy, group.dead = [], False, True
        self.backend.fail_node(node, now)
        if all(g.dead for g in self.groups):
            raise ServingStopped(f"node{node} failed at {now} ns and no node is left to serve", self.result())
        moved = 0
        survivors = sorted({g.info.node for g in self.groups if not g.dead})
        for expert, holders in self._holders.items():
            holders.discard(node)
            if not holders:
                target = survivors[moved % len(survivors)]
                try:
                    self.backend.store(target, expert_id(expert), self.expert_model.weight_bytes())
                except CapacityError as exc:
                    raise ServingStopped(f"node{node} failed at {now} ns and its experts do not fit in the "
                                         f"survivors' DDR: {exc}", self.result()) from None
                holders.add(target)
                moved += 1
        for request in sorted(orphans, key=lambda r: r.id):
            self._push(now, "enqueue", (self._choose_group(request), request))
        self.fault_stats["requests_redispatched"] += len(orphans)
        self.fault_stats["faults_recovered"] += 1
        return [g.info.name for g in doomed], now, {"requests_redispatched": len(orphans), "experts_replaced": moved}

    def _drop_link(self, now: int, fault: FaultSpec) -> tuple[list[str], int, dict]:
        """Messages between two sockets are lost with probability p and resent after a timeout
        (the link's latency grows by the expected resends); with p = 1 the link is down and the
        first batch that needs it stops the run."""
        a, b = fault.link
        links = self.backend.degrade_link(a, b, fault.probability, now)
        if fault.probability < 1.0:
            self.fault_stats["faults_recovered"] += 1
        return [], now if fault.probability < 1.0 else 0, {"links": links, "probability": fault.probability}
