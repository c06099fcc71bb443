"""The continuous serving engine of one partition (a node, or the nodes its TP groups span):
iteration-level batching per TP group, paged KV in the HBM ledger, chunked prefill, preemption
(recompute or swap), expert switching in the background, faults; time moves from event to event.

Events, in (virtual time, class, stable id) order: faults, requests the ingress delivered
(dispatched to a group, then queued), switches landing, and group boundaries (a span ended, or
an idle group has work). At a boundary the group decides its next batch
(scheduler.step_scheduler) and runs it as a *span*: the fixed batch for as many iterations as
nothing would change it — until the first iteration end at or after the next event this engine
knows of (or the end of the round: later deliveries are unknown yet), a sequence finishing, a
prefill chunk ending short of its prompt, or a KV block that does not fit. The span's step times
are one vectorised cost-model evaluation (the backend's `span_times`); cutting a span at an
extra point changes nothing (a test runs the same workload one iteration at a time,
`max_span_iterations: 1`, and compares).
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from dataclasses import replace

import numpy as np

from rdu.base import format_bytes
from rdu.scheduler.backend import GroupInfo, ServingBackend
from rdu.scheduler.dispatch import group_on_node, hot_experts
from rdu.scheduler.faults import RestartBudget
from rdu.scheduler.kv import GroupMemory, blocks_for
from rdu.scheduler.metrics import EngineMetrics, GroupStats, RequestRecord
from rdu.scheduler.partition import FOREVER_NS, GroupLoad, PartitionEngine, PartitionResult, PartitionSpec, RoundInput
from rdu.scheduler.policies import make_policy
from rdu.scheduler.residency import ROUTER_KEY, Residency, model_id
from rdu.scheduler.step_scheduler import Batch, Seq, StepConfig, build_batch, select_model, span_limit
from rdu.scheduler.timeline import Done, Enqueue, Fault, KvResize, Preempt, Run, Switch, TimelineBuffer
from rdu.scheduler.workloads import Request
from rdu.socket_actor.core import SpanRequest
from rdu.socket_actor.operators import kv_bytes_per_token_per_socket
from rdu.socket_actor.tiers import CapacityError

__all__ = ["ContinuousEngine", "ContinuousGroup"]

_FAULT, _DISPATCH, _ENQUEUE, _READY, _STEP = range(5)   # event classes: their order at equal times
_FIRST_QUERY = 64                                  # iterations timed by the first query of a span (no history)
_MIN_QUERY = 16                                    # ... and at least this many when guessed from the last step


class ContinuousGroup:
    """One TP group's state: waiting and running sequences per model, HBM, the span in progress."""

    def __init__(self, info: GroupInfo, engine: "ContinuousEngine") -> None:
        self.info, self.engine = info, engine
        self.stats = GroupStats(name=info.name, node=info.node, expert_slots=0)
        self.memory = GroupMemory(info.hbm_usable_bytes, engine.step.block_size)
        policy = make_policy(engine.config.policy, [r.expert for r in engine.workload.requests])
        self.policy = policy
        self.residency = Residency(engine.backend, info, self.memory, policy, engine.expert_model,
                                   engine.router_model, self.stats, engine.emit if engine.listening else None)
        self.waiting: dict[int, deque] = defaultdict(deque)
        self.running: dict[int, list] = defaultdict(list)
        self.n_running = 0
        self.load = 0
        self.current_model: int | None = None
        self.last_model: int | None = None
        self.dirty = True
        self.busy = False
        self.kicked = False
        self.dead = False
        self.epoch = 0                     # bumped by a fault: the group's pending boundary is void
        self.span = None
        self.admissions = 0
        self.blocked_switch = False
        self.blocked_position = 1 << 62   # oldest request of the needed model whose switch waits for room
        self.last_step_ns = 0              # the last iteration's time: sizes the next span's first query
        self._block_bytes = {ROUTER_KEY: engine.step.block_size * kv_bytes_per_token_per_socket(
            engine.router_model, info.tp)}
        self._expert_block_bytes = engine.step.block_size * kv_bytes_per_token_per_socket(engine.expert_model,
                                                                                         info.tp)

    # -- what the step scheduler asks -----------------------------------------------------------
    def block_bytes(self, model: int) -> int:
        return self._block_bytes.get(model, self._expert_block_bytes)

    def models_with_work(self) -> list[int]:
        return sorted({m for m, seqs in self.running.items() if seqs} | {m for m, q in self.waiting.items() if q})

    def oldest(self, model: int) -> tuple[int, int]:
        seqs = list(self.running[model]) + list(self.waiting[model])
        return min((s.request.arrival_ns, s.request.id) for s in seqs)

    def warm_for(self, expert: int) -> bool:
        return expert in self.residency.resident or bool(self.waiting.get(expert)) or bool(self.running.get(expert))

    def warm_experts(self) -> frozenset[int]:
        """Every expert this group is warm for (what its node reports to the load balancer)."""
        keys = set(self.residency.resident)
        keys.update(m for m, q in self.waiting.items() if q)
        keys.update(m for m, seqs in self.running.items() if seqs)
        keys.discard(ROUTER_KEY)
        return frozenset(keys)

    def busy_models(self, now: int) -> set[int]:
        """Models with a sequence in flight, and models whose copy has not landed (never victims)."""
        loading = {m for m, ready in self.residency.resident.items() if ready > now}
        return {m for m, seqs in self.running.items() if seqs} | loading

    def needed_models(self) -> dict[int, int]:
        """Models somebody waits for -> their oldest waiting request (the head of the queue)."""
        return {m: q[0].request.id for m, q in self.waiting.items() if q}

    def make_room(self, nbytes: int) -> bool:
        now = self.engine.now
        return self.residency.make_room(nbytes, self.busy_models(now), self.needed_models(), now)

    def evictable_bytes(self) -> int:
        return self.residency.evictable_bytes(self.busy_models(self.engine.now), self.needed_models())

    def admitting(self, seq: Seq) -> bool:
        """While a needed model's switch waits for room, only requests older than the one it
        waits for are admitted: KV drains for it, and the older requests (whose models it may
        not evict) still make progress, so the wait always ends."""
        return not self.blocked_switch or seq.request.id < self.blocked_position

    def youngest_running(self) -> Seq:
        return max((s for seqs in self.running.values() for s in seqs), key=lambda s: s.order)

    def admit(self, seq: Seq, blocks: int, block_bytes: int, now: int) -> None:
        self.admissions += 1
        seq.order = self.admissions
        seq.blocks = blocks
        self.memory.take_kv(blocks * block_bytes)
        self.running[seq.model].append(seq)
        self.n_running += 1
        if seq.admitted_ns < 0:
            seq.admitted_ns = now
            if seq.model != ROUTER_KEY and not seq.hit:
                ready = self.residency.resident.get(seq.model, now)
                seq.switch_wait_ns = max(0, min(ready, now) - seq.decided_ns)

    def release(self, seq: Seq) -> None:
        self.memory.give_kv(seq.blocks * self.block_bytes(seq.model))
        seq.blocks = 0
        self.running[seq.model].remove(seq)
        self.n_running -= 1

    def preempt(self, seq: Seq, now: int, mode: str | None = None) -> int:
        """The sequence gives its KV blocks back and re-queues first. `recompute`: it prefills its
        prompt and the tokens generated so far again; `swap`: its KV is copied to the capacity
        tier and back when it resumes (it keeps its place in the sequence). Returns the KV bytes
        per member it held."""
        mode = mode or self.engine.config.preemption
        kv_bytes = seq.blocks * self.block_bytes(seq.model)
        self.release(seq)
        if mode == "swap" and seq.computed >= seq.prompt:
            seq.swapped_bytes = kv_bytes
        else:
            mode = "recompute"
            seq.prompt = seq.prompt + seq.generated if seq.computed >= seq.prompt else seq.prompt
            seq.computed = 0
        seq.preemptions += 1
        self.waiting[seq.model].appendleft(seq)
        self.engine.metrics.preemptions += 1
        if self.engine.listening:
            self.engine.emit(Preempt(t_ns=now, group=self.info.name, request=seq.request.id, model=model_id(seq.model),
                                     generated=seq.generated, mode=mode, kv_bytes=kv_bytes))
        return kv_bytes

    # -- switching --------------------------------------------------------------------------------
    def retry_switches(self, now: int) -> None:
        """Start the switches of needed models that are not resident (in order of their oldest
        waiting request); with `prefetch`, also those of requests still waiting for the router."""
        self.blocked_switch = False
        self.blocked_position = 1 << 62
        wanted = sorted((m for m, q in self.waiting.items() if q and m not in self.residency.resident),
                        key=lambda m: (self.waiting[m][0].request.id, m))
        for m in wanted:
            position = self.waiting[m][0].request.id
            if not self._start(m, now, prefetch=False, position=position):
                self.blocked_switch = True
                self.blocked_position = position
                break
        if self.policy.prefetch and not self.blocked_switch:
            routing = list(self.running.get(ROUTER_KEY, ())) + list(self.waiting.get(ROUTER_KEY, ()))
            for e in dict.fromkeys(s.request.expert for s in routing):
                if e not in self.residency.resident and not self._start(e, now, prefetch=True,
                                                                         position=1 << 62):
                    break

    def _start(self, model: int, now: int, prefetch: bool, position: int) -> bool:
        ready = self.residency.start(model, now, self.busy_models(now), self.needed_models(), prefetch, position)
        if ready is None:
            return False
        self.engine.push(ready, _READY, (self.info.index, model), ("ready", self, model, ready))
        return True

    def sequences(self) -> list[Seq]:
        """Every sequence the group holds, running or waiting."""
        return [s for seqs in self.running.values() for s in seqs] + [s for q in self.waiting.values() for s in q]


class ContinuousEngine(PartitionEngine):
    """Serves the requests the ingress delivers to one partition, round by round."""

    def __init__(self, backend: ServingBackend, partition: PartitionSpec, recipe) -> None:
        config = recipe.config
        self.backend, self.partition, self.recipe = backend, partition, recipe
        self.expert_model, self.router_model = recipe.expert_model, recipe.router_model
        self.experts, self.workload, self.config = recipe.experts, recipe.workload, config
        self.step = StepConfig(config.max_num_batched_tokens, config.max_num_seqs, config.block_size,
                               config.model_selection, config.max_span_iterations)
        self.listening = recipe.listening
        self.timeline = TimelineBuffer()
        self.emit = self.timeline if self.listening else (lambda event: None)
        self.use_router = recipe.experts > 1
        self.router_output_tokens = max(1, recipe.workload.router_output_tokens)
        self.now = 0
        self.until_ns = 0
        self.groups = [ContinuousGroup(info, self) for info in partition.groups]
        self._group_of_socket = {m: g for g in self.groups for m in g.info.members}
        self._holders = {e: {n for n in partition.nodes if e in set(recipe.placement[f"node{n}"])}
                         for e in range(recipe.experts)}
        self.metrics = EngineMetrics()
        self.fault_stats = {"faults_injected": 0, "faults_recovered": 0, "recovery_ns": 0, "runs_retried": 0}
        self.setup_ns = 0
        self.stopped = ""
        self._records: list[RequestRecord] = []
        self._orphans: list[Request] = []
        self._external: list = []
        self._steps: list = []
        self._jobs = 0
        self._dispatched = 0
        self._restarts = RestartBudget(backend.max_restarts)

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> int:
        """Store this partition's models, check what cannot work, and load the router and the
        experts that start resident; returns when they are."""
        for n in self.partition.nodes:
            if self.use_router:
                self.backend.store(n, model_id(ROUTER_KEY), self.router_model.weight_bytes())
            for e in self.recipe.placement[f"node{n}"]:
                self.backend.store(n, model_id(e), self.expert_model.weight_bytes())
        self._check_capacity()
        pinned = list(self.config.pinned_experts)
        if self.config.placement == "popularity":
            pinned += [e for e in hot_experts([r.expert for r in self.workload.requests]) if e not in pinned]
        ready_ns = 0
        for g in self.groups:
            keys = ([ROUTER_KEY] if self.use_router else []) + pinned
            for i, key in enumerate(keys):
                if key != ROUTER_KEY and i >= len(self.config.pinned_experts) + (1 if self.use_router else 0):
                    if g.memory.free_bytes - g.residency.shard_bytes(key) < g.memory.usable_bytes // 2:
                        break   # popularity placement keeps half of HBM for KV and switches
                ready = g.residency.start(key, 0, set(), {}, prefetch=key != ROUTER_KEY)
                if ready is None:
                    raise CapacityError(f"{g.info.name}: {model_id(key)} does not fit in HBM with the pinned models")
                g.residency.pinned.add(key)
                ready_ns = max(ready_ns, ready)
        return ready_ns

    def _check_capacity(self) -> None:
        """Refuse, before serving, what cannot work: an expert that does not fit beside the router,
        or a request whose KV alone would not fit next to them."""
        longest = max((r.prompt_tokens + r.output_tokens for r in self.workload.requests), default=1)
        for g in self.groups:
            weights = g.residency.expert_shard_bytes + (g.residency.router_shard_bytes if self.use_router else 0)
            kv = blocks_for(longest, self.step.block_size) * g.block_bytes(0)
            if weights + kv > g.info.hbm_usable_bytes:
                raise CapacityError(
                    f"{g.info.name} ({g.info.tp} x {format_bytes(g.info.hbm_usable_bytes)} usable HBM per socket): an "
                    f"expert shard of {format_bytes(g.residency.expert_shard_bytes)} does not fit "
                    + (f"next to the router ({format_bytes(g.residency.router_shard_bytes)}) and " if self.use_router
                       else "with ")
                    + f"the KV cache of the longest request ({longest} tokens, {format_bytes(kv)}) per socket")

    def start(self, setup_ns: int) -> None:
        """The workload's clock starts at `setup_ns`; this partition's faults are scheduled."""
        self.setup_ns = setup_ns
        sockets = set(self._group_of_socket)
        for i, fault in enumerate(self.config.faults):
            if fault.kind == "kill-node" or (fault.kind == "kill-socket" and fault.target not in sockets):
                continue   # a node loss is the ingress's (its requests move); other sockets are others'
            at = setup_ns + (fault.virtual_ns if fault.request is None
                             else self.workload.requests[fault.request].arrival_ns)
            self.push(at, _FAULT, (i,), ("fault", fault))

    # -- rounds ---------------------------------------------------------------------------------
    def _take_round(self, round_input: RoundInput) -> None:
        """A round's re-placed experts and deliveries; a delivery cuts the spans it lands in."""
        for node, expert in round_input.stores:
            self.backend.store(node, model_id(expert), self.expert_model.weight_bytes())
            self._holders[expert].add(node)
        for d in round_input.deliveries:
            self.push(d.enqueue_ns, _DISPATCH, (d.request.id,), ("dispatch", d.request, d.node))
        if round_input.deliveries and not self.stopped:
            self._cut_spans(min(d.enqueue_ns for d in round_input.deliveries))

    def clock_ns(self) -> int:
        return self.now

    def _next_event_ns(self) -> int:
        heads = [heap[0][0] for heap in (self._external, self._steps) if heap]
        return min(heads) if heads and not self.stopped else FOREVER_NS

    def loads(self) -> list[GroupLoad]:
        return [GroupLoad(index=g.info.index, node=g.info.node, load=g.load, warm=g.warm_experts(), dead=g.dead)
                for g in self.groups]

    def finish(self) -> PartitionResult:
        """Empty KV entries (the ledgers and the observers see it), totals of the run."""
        for g in self.groups:
            if g.dead:
                continue
            self.backend.set_kv(g.info.index, 0)
            if self.listening:
                self.emit(KvResize(t_ns=self.now, group=g.info.name, kv_bytes=0))
        return PartitionResult(groups=[g.stats for g in self.groups], metrics=self.metrics,
                               peak_kv_bytes=[g.memory.peak_kv_bytes for g in self.groups],
                               fault_stats=dict(self.fault_stats), backend=self.backend.finish(),
                               timeline=self.timeline.take())

    # -- events ---------------------------------------------------------------------------------
    def push(self, time_ns: int, cls: int, key: tuple, payload: tuple) -> None:
        heap = self._steps if cls == _STEP else self._external
        heapq.heappush(heap, (int(time_ns), cls, key, payload))

    def _next_external_ns(self) -> int:
        """The next event that can change a group's decision (not another group's boundary), of
        those known now: a later round's delivery that lands inside a span cuts it there
        (`_cut_spans`), as if it had been known."""
        return self._external[0][0] if self._external else 1 << 62

    def _job_id(self, group: ContinuousGroup, what: str) -> str:
        self._jobs += 1
        return f"{group.info.name}/s{self._jobs}/{what}"

    def _loop(self, until_ns: int) -> None:
        external, steps = self._external, self._steps
        while external or steps:
            if steps and (not external or steps[0][:3] < external[0][:3]):
                event = steps[0]
                if event[0] >= until_ns:
                    return
                heapq.heappop(steps)
                self.now = event[0]
                group, epoch = event[3][1], event[3][2]
                if epoch == group.epoch and not group.dead:
                    self._on_boundary(group)
                continue
            event = external[0]
            if event[0] >= until_ns:
                return
            heapq.heappop(external)
            self.now = event[0]
            payload = event[3]
            kind = payload[0]
            if kind == "dispatch":
                self._on_dispatch(payload[1], payload[2])
            elif kind == "enqueue":
                self._on_enqueue(payload[1], payload[2])
            elif kind == "ready":
                self._on_ready(*payload[1:])
            else:
                self._on_fault(payload[1])

    # -- arrivals and dispatch ---------------------------------------------------------------------
    def _on_dispatch(self, request: Request, node: int) -> None:
        """The request reached `node`: the node picks one of its groups, on what it knows now."""
        group = group_on_node(self.groups, request.expert, node, self.config.dispatch, self.step.max_num_seqs,
                              self._dispatched)
        if group is None:   # the node died after the request was routed to it: back to the ingress
            self._orphans.append(request)
            return
        self._dispatched += 1
        group.load += 1
        self.push(self.now, _ENQUEUE, (request.id,), ("enqueue", group, request))

    def _on_enqueue(self, group: ContinuousGroup, request: Request) -> None:
        if group.dead:
            self._orphans.append(request)
            return
        if self.listening:
            self.emit(Enqueue(t_ns=self.now, request=request.id, group=group.info.name))
        if self.use_router:
            seq = Seq(request, ROUTER_KEY, request.prompt_tokens, self.router_output_tokens)
            group.waiting[ROUTER_KEY].append(seq)
        else:
            self._decided(group, Seq(request, request.expert, request.prompt_tokens, request.output_tokens))
        self._touch(group)

    def _on_ready(self, group: ContinuousGroup, model: int, ready: int) -> None:
        if group.residency.resident.get(model) == ready and not group.dead:
            self._touch(group)

    def _touch(self, group: ContinuousGroup) -> None:
        """Something changed for `group`: its next boundary re-decides; an idle group wakes now."""
        group.dirty = True
        if not group.busy and not group.kicked:
            group.kicked = True
            self.push(self.now, _STEP, (group.info.index,), ("step", group, group.epoch))

    def _decided(self, group: ContinuousGroup, seq: Seq) -> None:
        """The request's expert is known (the router finished, or there is no router)."""
        seq.decided_ns = self.now
        seq.hit = group.residency.ready(seq.model, self.now)
        group.stats.accesses += 1
        group.stats.hits += seq.hit
        group.waiting[seq.model].append(seq)

    # -- boundaries --------------------------------------------------------------------------------
    def _on_boundary(self, group: ContinuousGroup) -> None:
        group.kicked = False
        if group.span is not None:
            self._commit(group)
        now = self.now
        group.retry_switches(now)
        batch = None
        for model in select_model(group, now, self.step):
            batch = build_batch(group, model, now, self.step)
            if batch is not None:
                break
        group.dirty = False
        if batch is None:
            group.busy = False
            group.current_model = None if not group.models_with_work() else group.current_model
            return
        group.current_model = batch.model
        self._start_span(group, batch, now)

    def _start_span(self, group: ContinuousGroup, batch, now: int) -> None:
        limit, contexts, held = span_limit(group, batch, self.step)
        model = batch.model
        start = now
        for moved, to_hbm in ((batch.swap_out_bytes, False), (batch.swap_in_bytes, True)):
            if moved:   # swaps of this step (KV out of HBM to make room, or back in) hold it up
                start = max(start, self.backend.move_kv(group.info.index, moved, now, to_hbm=to_hbm))
                self.metrics.swapped_bytes += moved * group.info.tp
        request = SpanRequest(
            job_id="", model_id=model_id(model), model=self.router_model if model == ROUTER_KEY else self.expert_model,
            members=group.info.members, start_ns=start, iterations=limit,
            chunk_offsets=tuple(s.computed for s, _ in batch.chunks), chunk_lens=tuple(c for _, c in batch.chunks),
            decode_contexts=tuple(s.computed for s in batch.decodes),
            next_contexts=tuple(int(c) for c in contexts) if limit > 1 else (),
            setup=model != group.last_model, mode=self.config.mode, orchestration=self.config.orchestration)
        iterations = self._iterations(group, request, limit, start)
        if iterations > 1:   # the blocks the decodes fill during the span
            grow = int((-(-(contexts + iterations - 1) // self.step.block_size) - held).sum())
            group.memory.take_kv(grow * group.block_bytes(model), provisional=True)
            seqs = batch.decodes + [s for s, _ in batch.chunks]
            for s, c in zip(seqs, contexts):
                s.blocks = blocks_for(int(c) + iterations - 1, self.step.block_size)
        request = replace(request, job_id=self._job_id(group, model_id(model)), iterations=iterations,
                          kv_bytes=group.memory.kv_bytes)
        steps, coll = self.backend.span_times(group.info.index, request, iterations)
        result = self.backend.run_span(group.info.index, request)
        group.busy = True
        if model != group.last_model:   # an activation: what the residency policy and `batches` count
            group.stats.batches += 1
            if model != ROUTER_KEY:
                group.policy.touch(model, min(s.request.id for s in batch.decodes + [s for s, _ in batch.chunks]))
        group.last_model = model
        group.stats.stall_ns += start - now
        group.span = (batch, request, np.asarray(steps[:iterations], dtype=np.int64), result,
                      np.asarray(coll[:iterations], dtype=np.float64))
        self.push(result.end_ns, _STEP, (group.info.index,), ("step", group, group.epoch))

    def _iterations(self, group: ContinuousGroup, request: SpanRequest, limit: int, now: int) -> int:
        """Iterations of the span: up to `limit`, ending at the first iteration end at or after
        the next external event."""
        if limit == 1:
            return 1
        horizon = self._next_external_ns()
        n = min(limit, self._first_query(group, horizon - now))
        while True:
            steps, _ = self.backend.span_times(group.info.index, request, n)
            ends = now + np.cumsum(steps)
            k = int(np.searchsorted(ends, horizon, side="left"))
            if k < n:
                return k + 1
            if n == limit:
                return limit
            n = min(limit, n * 8)

    @staticmethod
    def _first_query(group: ContinuousGroup, room_ns: int) -> int:
        """Iterations to time first: enough, by the group's last step time with a margin, to
        reach the horizon `room_ns` ahead, so most spans cost one cost-model evaluation (the
        answer does not depend on it: a short query is extended, extra rows are not used)."""
        if group.last_step_ns <= 0:
            return _FIRST_QUERY
        return max(_MIN_QUERY, int(room_ns / group.last_step_ns * 1.25) + 2)

    def _commit(self, group: ContinuousGroup) -> None:
        """Apply the span that just ended: tokens, finished sequences, metrics."""
        batch, request, steps, result, coll = group.span
        group.span = None
        group.memory.commit_peak()
        k = len(steps)
        group.last_step_ns = int(steps[-1])
        start = request.start_ns
        end0 = start + int(steps[0])
        end = result.end_ns
        model = batch.model
        busy = end - start
        expert = model != ROUTER_KEY
        if expert:
            group.stats.expert_ns += busy
        else:
            group.stats.router_ns += busy
        group.stats.collective_ns += result.collective_ns
        firsts = [s for s, _ in batch.chunks if s.computed == 0 and s.preemptions == 0] if expert else []
        seqs = self._advance_tokens(batch, steps, end0, end, expert)
        self.metrics.span(model, busy, batch, k, len(seqs))
        if self.listening:
            # accesses: requests first admitted in this span; a hit: its expert was resident when decided
            self.emit(Run(t_ns=start, group=group.info.name, model=model_id(model), end_ns=end,
                          first_step_ns=int(steps[0]), collective_ns=result.collective_ns,
                          requests=sorted({s.request.id for s in seqs} | {s.request.id for s, _ in batch.chunks}),
                          iterations=k, prefill_tokens=sum(c for _, c in batch.chunks), decodes=len(batch.decodes),
                          accesses=len(firsts), hits=sum(s.hit for s in firsts), stall_ns=0,
                          kv_bytes=request.kv_bytes, queued=len(group.waiting.get(model, ()))))
        self._retire([s for s in seqs if s.generated >= s.output], group)

    def _advance_tokens(self, batch: Batch, steps, end0: int, end: int, expert: bool) -> list[Seq]:
        """Move a span's sequences on by its iterations (the first one ends at `end0`, the last at
        `end`): prefill chunks computed, tokens generated, their times and the inter-token gaps an
        expert's tokens add to the metrics. Returns the sequences that generated tokens."""
        m = self.metrics
        gaps = []
        for s, c in batch.chunks:
            s.computed += c
            if s.computed >= s.prompt:
                s.generated += 1
                if s.first_token_ns < 0:
                    s.first_token_ns = end0
                elif expert:
                    gaps.append(end0 - s.last_token_ns)
                s.last_token_ns = end0
        for s in batch.decodes:
            s.computed += 1
            s.generated += 1
            if expert:
                gaps.append(end0 - s.last_token_ns)
            s.last_token_ns = end0
        seqs = batch.decodes + [s for s, _ in batch.chunks if s.computed >= s.prompt]
        k = len(steps)
        if k > 1:
            for s in seqs:
                s.computed += k - 1
                s.generated += k - 1
                s.last_token_ns = end
            if expert:
                m.itl_weighted(steps[1:], len(seqs))
        if expert and gaps:
            m.itl_values(gaps)
        for s in seqs:
            s.batch = len(seqs)
        return seqs

    def _retire(self, finished: list[Seq], group: ContinuousGroup) -> None:
        """Free the finished sequences' KV: a routed request goes on to its expert, an expert's is done."""
        for s in finished:
            group.release(s)
            group.dirty = True
            if s.model == ROUTER_KEY:
                expert_seq = Seq(s.request, s.request.expert, s.request.prompt_tokens, s.request.output_tokens)
                expert_seq.queue_ns = s.admitted_ns - s.request.arrival_ns
                expert_seq.router_ns = self.now - s.admitted_ns
                self._decided(group, expert_seq)
            else:
                self._record(group, s)
                self.metrics.kv_sample(group.memory)

    def _record(self, group: ContinuousGroup, s: Seq) -> None:
        r = s.request
        group.load -= 1
        finish = s.last_token_ns
        queue = s.queue_ns if self.use_router else s.admitted_ns - r.arrival_ns
        record = RequestRecord(
            id=r.id, arrival_ns=r.arrival_ns, expert=r.expert, node=group.info.node, group=group.info.name,
            prompt_tokens=r.prompt_tokens, output_tokens=r.output_tokens, batch_size=s.batch,
            expert_batch_size=s.batch, queue_ns=queue, router_ns=s.router_ns,
            expert_wait_ns=(s.admitted_ns - s.decided_ns) if self.use_router else 0,
            switch_wait_ns=s.switch_wait_ns, hbm_hit=s.hit, ttft_ns=s.first_token_ns - r.arrival_ns,
            tpot_ns=(finish - s.first_token_ns) // (r.output_tokens - 1) if r.output_tokens > 1 else 0,
            e2e_ns=finish - r.arrival_ns, finish_ns=finish, preemptions=s.preemptions)
        self._records.append(record)
        if self.listening:
            self.emit(Done(t_ns=finish, request=r.id, group=group.info.name, expert=r.expert, hit=s.hit,
                           output_tokens=r.output_tokens, ttft_ns=record.ttft_ns, tpot_ns=record.tpot_ns,
                           e2e_ns=record.e2e_ns, preemptions=s.preemptions))

    # -- faults ------------------------------------------------------------------------------------
    def _on_fault(self, fault) -> None:
        if fault.kind == "drop-link":   # every engine's view of the links changes; the ingress reports it
            a, b = fault.link
            self.backend.degrade_link(a, b, fault.probability, self.now)
            return
        self._kill_socket(fault, self.now)

    def _cut_spans(self, at_ns: int) -> None:
        """An event at `at_ns` became known (a delivery of this round): every span still running
        then stops at its first iteration end at or after it, exactly where it would have stopped
        had the event been known when it started."""
        for group in self.groups:
            if group.span is not None and not group.dead:
                self._shorten(group, at_ns, side="left")

    def _shorten(self, group: ContinuousGroup, at_ns: int, side: str) -> int:
        """Cut the group's span: keep the iterations ending before `at_ns` (`side="right"`: at or
        before it — a failure; `"left"`: up to the first end at or after it — a new event), give
        back the KV blocks reserved for the others, and move the group's boundary to the new end.
        Returns the iterations cut off."""
        batch, request, steps, result, coll = group.span
        ends = request.start_ns + np.cumsum(steps)
        kept = int(np.searchsorted(ends, at_ns, side=side)) + (side == "left")
        cut = len(steps) - min(kept, len(steps))
        if cut == 0:
            return 0
        self.backend.truncate_span(group.info.index, request, kept, int(ends[kept - 1]) if kept else at_ns)
        if len(steps) > 1:   # the blocks reserved for the iterations cut off go back
            seqs = batch.decodes + [s for s, _ in batch.chunks]
            contexts = [s.computed + 1 for s in batch.decodes] + [s.prompt for s, _ in batch.chunks]
            bs, back = self.step.block_size, 0
            for s, c in zip(seqs, contexts):   # (the span's contexts at its first decode iteration)
                keep_blocks = blocks_for(c + max(kept, 1) - 1, bs)
                back += s.blocks - keep_blocks
                s.blocks = keep_blocks
            group.memory.give_kv(back * group.block_bytes(batch.model))
        group.epoch += 1
        if kept:
            end = int(ends[kept - 1])
            result = replace(result, end_ns=end, busy_ns=end - request.start_ns,
                             collective_ns=int(np.rint(coll[:kept]).sum()))
            group.span = (batch, replace(request, iterations=kept), steps[:kept], result, coll[:kept])
            self.push(end, _STEP, (group.info.index,), ("step", group, group.epoch))
        else:
            group.span = None
            group.busy = False
        return cut

    def _emit_cut_run(self, group: ContinuousGroup, planned: tuple, lost: int) -> None:
        """The part of a span a failure cut off, as a `run` from the last kept iteration to the
        planned end (the `fault` that follows tells observers where it really stopped)."""
        batch, request, steps, result, coll = planned
        kept = len(steps) - lost
        start = request.start_ns + int(steps[:kept].sum())
        self.emit(Run(t_ns=start, group=group.info.name, model=model_id(batch.model), end_ns=result.end_ns,
                      first_step_ns=int(steps[kept]), collective_ns=int(np.rint(coll[kept:]).sum()),
                      requests=sorted({s.request.id for s in batch.decodes} | {s.request.id for s, _ in batch.chunks}),
                      iterations=lost, prefill_tokens=0 if kept else sum(c for _, c in batch.chunks),
                      decodes=len(batch.decodes), accesses=0, hits=0, stall_ns=0, kv_bytes=request.kv_bytes,
                      queued=len(group.waiting.get(batch.model, ()))))

    def _interrupt(self, group: ContinuousGroup, now: int) -> int:
        """A member of `group` failed at `now`: the span in progress keeps the iterations that
        ended by then; every running sequence loses its KV (recompute: prefilled again later).
        Returns the iterations lost."""
        lost = 0
        if group.span is not None:
            planned = group.span
            lost = self._shorten(group, now, side="right")
            self.fault_stats["runs_retried"] += lost > 0
            if group.span is not None:
                self._commit(group)
            if lost and self.listening:   # the iterations the failure cut off, as planned: observers cut them at `now`
                self._emit_cut_run(group, planned, lost)
        for s in sorted((s for seqs in group.running.values() for s in seqs), key=lambda s: -s.order):
            group.preempt(s, now, mode="recompute")
        group.busy = group.kicked = False
        group.epoch += 1
        group.last_model = None   # what ran before is gone from the restarted member: set-up again
        self.backend.set_kv(group.info.index, group.memory.kv_bytes)
        return lost

    def _kill_socket(self, fault, now: int) -> None:
        """The socket dies; it is restarted empty and refilled from the capacity tier with
        everything its group held; the group's sequences are prefilled again once it is back."""
        group = self._group_of_socket[fault.target]
        if group.dead:
            return   # its node is already gone: nothing left to kill
        self.fault_stats["faults_injected"] += 1
        self._restarts.spend(fault.target, now)
        lost = self._interrupt(group, now)
        back = now + int(self.backend.restart_ns)
        self.backend.fail_socket(fault.target, now, back)
        refills = []
        for key in sorted(group.residency.resident):
            model = self.router_model if key == ROUTER_KEY else self.expert_model
            arrival = self.backend.copy_in(group.info.index, model_id(key), model, back, [fault.target])[fault.target]
            ready = max(group.residency.resident[key], arrival)
            group.residency.resident[key] = ready
            refills.append((key, arrival))
            self.push(ready, _READY, (group.info.index, key), ("ready", group, key, ready))
        recovered = max([back, *group.residency.resident.values()])
        self.fault_stats["faults_recovered"] += 1
        self.fault_stats["recovery_ns"] += recovered - now
        if self.listening:
            self.emit(Fault(t_ns=now, kind=fault.kind, target=fault.target, spec=fault.text, groups=[group.info.name],
                            recovered_at_ns=recovered, detail={"reloaded": len(refills), "iterations_lost": lost}))
            for key, arrival in refills:   # the refill of the restarted socket, on its links
                self.emit(Switch(t_ns=back, group=group.info.name, model=model_id(key), ready_ns=arrival, victims=[],
                                 prefetch=False, arrivals={fault.target: arrival},
                                 shard_bytes=group.residency.shard_bytes(key), kv_bytes=group.memory.kv_bytes))
        self._touch(group)

    def _kill_node(self, node: int, now: int) -> None:
        """The node is gone at `now` (the end of this round): its groups' requests — queued,
        running or still on their way — go back to the ingress, to be served elsewhere."""
        doomed = [g for g in self.groups if not g.dead and any(m.startswith(f"node{node}/") for m in g.info.members)]
        orphans = {}
        for group in doomed:
            self._interrupt(group, now)
            for s in group.sequences():
                orphans[s.request.id] = s.request
            group.dead = True
            group.waiting.clear()
            group.running.clear()
            group.n_running = group.load = 0
            group.memory.kv_bytes = 0
        keep = []
        for event in self._external:   # requests routed here but not yet dispatched or queued
            payload = event[3]
            if payload[0] == "dispatch" and payload[2] == node or payload[0] == "enqueue" and payload[1] in doomed:
                request = payload[1] if payload[0] == "dispatch" else payload[2]
                orphans[request.id] = request
            else:
                keep.append(event)
        heapq.heapify(keep)
        self._external = keep
        self.backend.fail_node(node, now)
        for holders in self._holders.values():
            holders.discard(node)
        self._orphans += [orphans[i] for i in sorted(orphans)]
