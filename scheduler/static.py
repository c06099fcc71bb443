"""The `static` scheduler: the paper's benchmark cycle (Vidur's `faster_transformer`).

The router (and any pinned expert) is loaded into every group first; the workload's clock starts
when they are resident. A request the ingress routed to this partition's node is dispatched to
one of its TP groups (expert affinity or least load). When the group is free it takes up to
`max_batch` waiting requests, runs the router on them at that batch size, and then, expert by
expert (requests that share an expert run as one batch), makes sure the expert is in HBM — a
DDR -> HBM switch that evicts a victim chosen by the residency policy — and runs it. KV is
reserved up front (`max_batch` x the longest request). Every time is decided by the backend;
events are processed in (virtual time, class, sequence) order, so the same inputs give the same
results on any backend. The engine advances round by round (scheduler.partition), like the
continuous one.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from rdu.base import format_bytes
from rdu.scheduler.backend import GroupInfo, ServingBackend
from rdu.scheduler.dispatch import group_on_node
from rdu.scheduler.faults import FaultSpec, RestartBudget
from rdu.scheduler.metrics import GroupStats, RequestRecord
from rdu.scheduler.partition import FOREVER_NS, GroupLoad, PartitionEngine, PartitionResult, PartitionSpec, RoundInput
from rdu.scheduler.policies import ResidencyPolicy, make_policy
from rdu.scheduler.serving_types import ROUTER_ID, expert_id
from rdu.scheduler.timeline import Done, Enqueue, Fault, KvResize, Run, Switch, TimelineBuffer
from rdu.scheduler.workloads import Request
from rdu.socket_actor.core import RunRequest
from rdu.socket_actor.model_spec import ModelSpec
from rdu.socket_actor.operators import kv_bytes_per_token_per_socket, shard_weight_bytes
from rdu.socket_actor.tiers import CapacityError

__all__ = ["StaticEngine", "StaticGroup"]

# Event classes, in their order at equal times: a request's arrival (and a fault that fires with
# it), faults at a virtual time, then the groups' own events in the order they were scheduled.
_ARRIVING, _TIMED_FAULT, _GROUP = range(3)


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
    kv_bytes: int = 0                            # the KV entry its members' ledgers hold (the batch in progress)

    @property
    def load(self) -> int:
        """Requests it holds, and one more while it is busy (what dispatch balances)."""
        return len(self.queue) + len(self.batch) + self.busy

    def warm_for(self, expert: int) -> bool:
        return expert in self.resident or any(r.expert == expert for r in self.queue)


class StaticEngine(PartitionEngine):
    """Serves the requests the ingress delivers to one partition with the static cycle."""

    def __init__(self, backend: ServingBackend, partition: PartitionSpec, recipe) -> None:
        self.backend, self.partition, self.recipe = backend, partition, recipe
        self.expert_model, self.router_model = recipe.expert_model, recipe.router_model
        self.experts, self.workload, self.config = recipe.experts, recipe.workload, recipe.config
        self.listening = recipe.listening
        self.timeline = TimelineBuffer()
        self.emit = self.timeline if self.listening else (lambda event: None)
        sequence = [r.expert for r in self.workload.requests]
        self.groups = [self._make_group(info, sequence) for info in partition.groups]
        self._group_of_socket = {m: g for g in self.groups for m in g.info.members}
        self.setup_ns = 0
        self.until_ns = 0
        self._now = 0
        self.stopped = ""
        self._restarts = RestartBudget(backend.max_restarts)
        self.fault_stats = {"faults_injected": 0, "faults_recovered": 0, "recovery_ns": 0, "runs_retried": 0}
        self._jobs = 0
        self._events: list[tuple] = []
        self._seq = 0
        self._dispatched = 0
        self._records: list[RequestRecord] = []
        self._orphans: list[Request] = []

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

    # -- set-up and rounds ----------------------------------------------------------------------
    def setup(self) -> int:
        """Store this partition's models, load the router (and pinned experts) into every group;
        returns when they are resident."""
        for n in self.partition.nodes:
            self.backend.store(n, ROUTER_ID, self.router_model.weight_bytes())
            for e in self.recipe.placement[f"node{n}"]:
                self.backend.store(n, expert_id(e), self.expert_model.weight_bytes())
        ready_ns = 0
        for g in self.groups:
            arrivals = self.backend.copy_in(g.info.index, ROUTER_ID, self.router_model, 0)
            g.router_ready_ns = max(arrivals.values())
            self.emit(Switch(t_ns=0, group=g.info.name, model=ROUTER_ID, ready_ns=g.router_ready_ns, victims=[],
                             prefetch=False, arrivals=dict(arrivals),
                             shard_bytes=shard_weight_bytes(self.router_model, g.info.tp), kv_bytes=0))
            for e in self.config.pinned_experts:
                self._switch_in(g, e, 0, protected=set(), position=-1, prefetch=True)
            ready_ns = max([ready_ns, g.router_ready_ns, *g.resident.values()])
        return ready_ns

    def start(self, setup_ns: int) -> None:
        """The workload's clock starts at `setup_ns`; this partition's faults are scheduled."""
        self.setup_ns = setup_ns
        for fault in self.config.faults:
            if fault.kind == "kill-node" or (fault.kind == "kill-socket" and fault.target not in self._group_of_socket):
                continue   # a node loss is the ingress's (its requests move); other sockets are others'
            if fault.request is None:
                self._push(setup_ns + fault.virtual_ns, "fault", fault, _TIMED_FAULT)
            else:
                at = setup_ns + self.workload.requests[fault.request].arrival_ns
                self._push(at, "fault", fault, _ARRIVING, (fault.request, 0))

    def _take_round(self, round_input: RoundInput) -> None:
        """A round's re-placed experts and deliveries."""
        for node, expert in round_input.stores:
            self.backend.store(node, expert_id(expert), self.expert_model.weight_bytes())
        for d in round_input.deliveries:
            self._push(d.enqueue_ns, "dispatch", (d.request, d.node), _ARRIVING, (d.request.id, 1))

    def clock_ns(self) -> int:
        return self._now

    def _next_event_ns(self) -> int:
        return self._events[0][0] if self._events and not self.stopped else FOREVER_NS

    def loads(self) -> list[GroupLoad]:
        return [GroupLoad(index=g.info.index, node=g.info.node, load=g.load,
                          warm=frozenset(g.resident) | frozenset(r.expert for r in g.queue), dead=g.dead)
                for g in self.groups]

    def finish(self) -> PartitionResult:
        return PartitionResult(groups=[g.stats for g in self.groups], metrics=None, peak_kv_bytes=[],
                               fault_stats=dict(self.fault_stats), backend=self.backend.finish(),
                               timeline=self.timeline.take())

    # -- events -------------------------------------------------------------------------------
    def _push(self, time_ns: int, kind: str, payload: object, cls: int = _GROUP, order: tuple = ()) -> None:
        self._seq += 1
        if isinstance(payload, StaticGroup):  # a fault may void the events a group has pending
            payload = (payload, payload.epoch)
        heapq.heappush(self._events, (int(time_ns), cls, order or (self._seq,), self._seq, kind, payload))

    def _job_id(self, group: StaticGroup, what: str) -> str:
        self._jobs += 1
        return f"{group.info.name}/j{self._jobs}/{what}"

    def _loop(self, until_ns: int) -> None:
        handlers = {"dispatch": self._on_dispatch, "enqueue": self._on_enqueue, "free": self._on_free,
                    "decide": self._on_decide, "next": self._on_next, "fault": self._on_fault}
        group_events = {"free", "decide", "next"}
        while self._events and self._events[0][0] < until_ns:
            time_ns, _, _, _, kind, payload = heapq.heappop(self._events)
            self._now = time_ns
            if kind in group_events:
                group, epoch = payload
                if epoch != group.epoch or group.dead:
                    continue
                payload = group
            handlers[kind](time_ns, payload)

    # -- dispatch -----------------------------------------------------------------------------
    def _on_dispatch(self, now: int, payload: tuple[Request, int]) -> None:
        """The request reached its node: least-loaded group there, or with expert affinity one
        that already holds (or is about to run) the expert, unless it is a whole batch busier
        than the least-loaded one: then the request spills over and that group warms up too."""
        request, node = payload
        group = group_on_node(self.groups, request.expert, node, self.config.dispatch, self.config.max_batch,
                              self._dispatched)
        if group is None:   # the node died after the request was routed to it: back to the ingress
            self._orphans.append(request)
            return
        self._dispatched += 1
        self._push(now, "enqueue", (group, request))

    def _on_enqueue(self, now: int, payload: tuple[StaticGroup, Request]) -> None:
        group, request = payload
        if group.dead:  # its node failed while the request was on its way: back to the ingress
            self._orphans.append(request)
            return
        self.emit(Enqueue(t_ns=now, request=request.id, group=group.info.name))
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
                         shard_bytes=shard_weight_bytes(self.expert_model, group.info.tp), kv_bytes=group.kv_bytes))
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
            self._kv(group, now, 0)
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
        group.kv_bytes = kv_bytes_per_token_per_socket(model, group.info.tp) * tokens   # the batch's, now held
        return Run(t_ns=start, group=group.info.name, model=model_name, end_ns=result.end_ns,
                   first_step_ns=result.ttft_ns, collective_ns=result.collective_ns, requests=[r.id for r in requests],
                   iterations=max(output_lens, default=0), prefill_tokens=sum(r.prompt_tokens for r in requests),
                   decodes=0, accesses=accesses, hits=hits, stall_ns=stall,
                   kv_bytes=group.kv_bytes, queued=len(group.queue))

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
            self._records.append(record)
            self.emit(Done(t_ns=finish, request=request.id, group=group.info.name, expert=request.expert, hit=hit,
                           output_tokens=request.output_tokens, ttft_ns=record.ttft_ns, tpot_ns=record.tpot_ns,
                           e2e_ns=record.e2e_ns, preemptions=0))

    # -- faults -------------------------------------------------------------------------------
    def _on_fault(self, now: int, fault: FaultSpec) -> None:
        if fault.kind == "drop-link":   # every engine's view of the links changes; the ingress reports it
            a, b = fault.link
            self.backend.degrade_link(a, b, fault.probability, now)
        else:
            self._kill_socket(now, fault)

    def _interrupt(self, group: StaticGroup, now: int) -> None:
        """A member of `group` failed at `now`: stop what the group is doing; the interrupted
        router batch goes back to the queue, an interrupted expert run back to the plan."""
        if group.phase == "router" and now < group.router_end_ns:
            self.backend.abort(group.info.index, group.router_job, now)
            group.stats.router_ns -= group.router_end_ns - max(now, group.router_start_ns)
            group.stats.stall_ns -= max(0, group.router_start_ns - now)  # it was still waiting to start
            group.queue.extendleft(reversed(group.batch))
            group.batch, group.busy, group.phase = [], False, "idle"
            self._kv(group, now, 0)   # the aborted batch's KV went with it
        elif group.running is not None and now < group.running[2].end_ns:
            expert, requests, result, hit, stall, job = group.running
            self.backend.abort(group.info.index, job, now)  # cut short, or cancelled before it began
            group.stats.expert_ns -= result.end_ns - max(now, result.start_ns)
            group.stats.stall_ns -= max(0, result.start_ns - now)  # it was still waiting for its switch
            group.plan.appendleft((expert, requests))
            group.running = None
            self.fault_stats["runs_retried"] += 1
            self._kv(group, now, 0)   # the aborted batch's KV went with it
        elif group.running is not None:  # it ended at this very moment: keep its results
            self._commit(group)
        group.epoch += 1

    def _kv(self, group: StaticGroup, now: int, kv_bytes: int) -> None:
        """The KV entry of the group's ledgers changes size (observers follow the ledgers)."""
        group.kv_bytes = kv_bytes
        self.emit(KvResize(t_ns=now, group=group.info.name, kv_bytes=kv_bytes))

    def _kill_socket(self, now: int, fault: FaultSpec) -> None:
        """The socket dies; it is restarted empty and refilled from its node's capacity tier with
        everything its group held; the group's interrupted batch is retried once it is back."""
        group = self._group_of_socket[fault.target]
        if group.dead:
            return   # its node is already gone: nothing left to kill
        self.fault_stats["faults_injected"] += 1
        self._restarts.spend(fault.target, now)
        self._interrupt(group, now)
        back = now + int(self.backend.restart_ns)
        self.backend.fail_socket(fault.target, now, back)
        refills = [(ROUTER_ID, self.router_model, None)] + [(expert_id(e), self.expert_model, e) for e in group.resident]
        copies = [(name, model, key, self.backend.copy_in(group.info.index, name, model, back, [fault.target]))
                  for name, model, key in refills]
        for name, model, key, arrivals in copies:
            if key is None:
                group.router_ready_ns = max(group.router_ready_ns, *arrivals.values())
            else:
                group.resident[key] = max(group.resident[key], *arrivals.values())
        group.available_at_ns = max([back, group.router_ready_ns, *group.resident.values()])
        self._push(group.available_at_ns, "next" if group.busy else "free", group)
        self.fault_stats["faults_recovered"] += 1
        self.fault_stats["recovery_ns"] += group.available_at_ns - now
        self.emit(Fault(t_ns=now, kind=fault.kind, target=fault.target, spec=fault.text, groups=[group.info.name],
                        recovered_at_ns=group.available_at_ns, detail={"reloaded": len(copies)}))
        for name, model, key, arrivals in copies:   # the refill of the restarted socket, on its links
            self.emit(Switch(t_ns=back, group=group.info.name, model=name, ready_ns=max(arrivals.values()), victims=[],
                             prefetch=False, arrivals=dict(arrivals),
                             shard_bytes=shard_weight_bytes(model, group.info.tp), kv_bytes=group.kv_bytes))

    def _kill_node(self, node: int, now: int) -> None:
        """The node is gone at `now` (the end of this round): its groups' requests — queued, in a
        cycle, or still on their way — go back to the ingress, to be served elsewhere."""
        doomed = [g for g in self.groups if not g.dead and any(m.startswith(f"node{node}/") for m in g.info.members)]
        orphans: dict[int, Request] = {}
        for group in doomed:
            self._interrupt(group, now)
            for request in [r for _, requests in group.plan for r in requests] + list(group.queue):
                orphans[request.id] = request
            group.plan.clear()
            group.queue.clear()
            group.batch, group.busy, group.dead = [], False, True
        keep = []
        for event in self._events:   # requests routed here but not yet dispatched or queued
            kind, payload = event[4], event[5]
            if kind == "dispatch" and payload[1] == node or kind == "enqueue" and payload[0] in doomed:
                request = payload[0] if kind == "dispatch" else payload[1]
                orphans[request.id] = request
            else:
                keep.append(event)
        heapq.heapify(keep)
        self._events = keep
        self.backend.fail_node(node, now)
        self._orphans += [orphans[i] for i in sorted(orphans)]
