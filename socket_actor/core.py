"""`SocketCore`: the plain-Python core of one socket (no Ray), which the socket actor hosts.

It holds the socket's memory-tier ledgers at nominal sizes, the model shards resident in its HBM
(with their functional weights when the run carries payloads), a virtual clock in integer ns,
and counters. Operations are commands from the host side: load a shard (ready when its DDR ->
HBM copy arrives), evict it, run a generation that starts at a given time. Every result depends
only on the commands and the specs, never on the wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rdu.interconnect.topology import Topology
from rdu.interconnect.collectives_timing import RingTiming
from rdu.base import UserError
from rdu.socket_actor.cost_model import CostModel, Timing
from rdu.socket_actor.model_spec import ModelSpec
from rdu.socket_actor.operators import PhaseShape, kv_bytes_per_token_per_socket, window_pairs
from rdu.socket_actor.spec import SocketSpec
from rdu.socket_actor.tiers import MemoryTiers

__all__ = ["SocketCore", "Resident", "RunRequest", "RunResult", "SpanRequest", "SpanResult", "span_shape", "span_tokens",
           "KV_ENTRY"]

KV_ENTRY = "kv"   # the HBM ledger entry holding the KV blocks of the continuous engine


@dataclass
class Resident:
    """A model shard in this socket's HBM."""

    model_id: str
    shard_bytes: int
    ready_at_ns: int
    weights: object | None = None      # the functional shard (numerics.Shard), copied into HBM
    runs: int = 0


@dataclass(frozen=True)
class RunRequest:
    """Run one static batch of a resident model on this socket's TP group, starting at `start_ns`."""

    job_id: str
    model_id: str
    model: ModelSpec
    members: tuple[str, ...]
    prompt_lens: tuple[int, ...]
    output_lens: tuple[int, ...]
    start_ns: int
    mode: str | None = None
    orchestration: str | None = None


@dataclass(frozen=True)
class RunResult:
    job_id: str
    socket: str
    start_ns: int
    ttft_ns: int                 # prefill duration: first token of every sequence at start + ttft
    finish_ns: tuple[int, ...]   # absolute virtual time each sequence's last token is out
    end_ns: int
    busy_ns: int
    collective_ns: int = 0       # part of busy_ns spent in tensor-parallel collectives
    setup_ns: int = 0            # part of busy_ns spent on the run's set-up (a named, fitted cost)


@dataclass(frozen=True)
class SpanRequest:
    """A fixed batch of one resident model for `iterations` steps, starting at `start_ns`.

    Iteration 0 is the mixed step: prefill chunks (`chunk_lens` new tokens on top of
    `chunk_offsets` tokens already cached) plus decodes of sequences holding `decode_contexts`
    cached tokens. Iterations 1.. decode the fixed set whose cached tokens at iteration 1 are
    `next_contexts` (each grows by one per iteration). `kv_bytes` is what the group's KV blocks
    hold on each socket during the span (the ledger entry is resized to it); `setup` charges the
    model's activation (the run set-up) to the first iteration."""

    job_id: str
    model_id: str
    model: ModelSpec
    members: tuple[str, ...]
    start_ns: int
    iterations: int
    chunk_offsets: tuple[int, ...] = ()
    chunk_lens: tuple[int, ...] = ()
    decode_contexts: tuple[int, ...] = ()
    next_contexts: tuple[int, ...] = ()
    kv_bytes: int = 0
    setup: bool = False
    mode: str | None = None
    orchestration: str | None = None

    def timing_key(self) -> tuple:
        """Everything the step times depend on except the start and the number of iterations."""
        return (self.model, self.members, self.chunk_offsets, self.chunk_lens, self.decode_contexts,
                self.next_contexts, self.setup, self.mode, self.orchestration)


@dataclass(frozen=True)
class SpanResult:
    job_id: str
    socket: str
    start_ns: int
    end_ns: int
    busy_ns: int
    collective_ns: int = 0


def span_shape(request: SpanRequest, iterations: int, window: int | None) -> PhaseShape:
    """The PhaseShape rows of a span's first `iterations` steps (see `SpanRequest`): every
    sequence contributes its own tokens, attention pairs and cache reads, so the mixed step is
    the sum of `prefill_shape`-like chunks at their offsets and `decode_shapes`-like decodes."""
    offsets = np.asarray(request.chunk_offsets, dtype=np.float64)
    lens = np.asarray(request.chunk_lens, dtype=np.float64)
    ctx0 = np.asarray(request.decode_contexts, dtype=np.float64)
    cap = np.inf if window is None else float(window)
    read0 = np.minimum(ctx0, cap - 1)
    first = [lens.sum() + ctx0.size, float(lens.size + ctx0.size),
             (window_pairs(offsets + lens, window) - window_pairs(offsets, window)).sum() + (read0 + 1).sum(),
             (lens * (offsets + lens)).sum() + (read0 + 1).sum(),
             np.minimum(offsets, cap).sum() + read0.sum()]
    rest = iterations - 1
    n = float(len(request.next_contexts))
    if rest <= 0:
        return PhaseShape(*(np.array([v], dtype=np.float64) for v in first))
    j = np.arange(rest, dtype=np.float64)
    ctx = np.asarray(request.next_contexts, dtype=np.float64)
    if window is None:
        read = ctx.sum() + n * j
    else:
        read = np.minimum(ctx[:, None] + j[None, :], cap - 1).sum(0)
    keys = read + n
    columns = [np.full(rest, n), np.full(rest, n), keys, keys, read]
    return PhaseShape(*(np.concatenate([[f], c]) for f, c in zip(first, columns)))


def span_tokens(request: SpanRequest, iterations: int) -> int:
    """Tokens the first `iterations` steps of a span produce (prefill chunks count one each)."""
    if iterations <= 0:
        return 0
    return len(request.next_contexts) * (iterations - 1) + len(request.decode_contexts) + len(request.chunk_lens)


@dataclass
class SocketCounters:
    loads: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    runs: int = 0
    tokens: int = 0
    busy_ns: int = 0


class SocketCore:
    """One socket's state machine; the TP group's members receive the same commands."""

    def __init__(self, name: str, spec: SocketSpec, topology: Topology) -> None:
        self.name = name
        self.spec = spec
        self.topology = topology
        self.tiers = MemoryTiers(name, spec)
        self.clock_ns = 0
        self.residents: dict[str, Resident] = {}
        self.counters = SocketCounters()
        self._cost_models: dict[tuple, CostModel] = {}
        self._last_run: tuple[str, RunRequest, int, int] | None = None  # job, request, busy, clock before
        self._last_span: tuple | None = None   # job, model, start, busy, clock before, tokens of the span in progress

    # -- residency ------------------------------------------------------------------------------
    def load(self, model_id: str, shard_bytes: int, ready_at_ns: int, weights: object | None = None) -> None:
        """Place a shard in HBM; it can run from `ready_at_ns` (when its DDR -> HBM copy lands)."""
        if model_id in self.residents:
            raise ValueError(f"{self.name}: {model_id} is already resident")
        self.tiers.hbm.allocate(model_id, shard_bytes)
        self.residents[model_id] = Resident(model_id, int(shard_bytes), int(ready_at_ns), weights)
        self.counters.loads += 1
        self.counters.bytes_loaded += int(shard_bytes)

    def evict(self, model_id: str) -> int:
        """Drop a shard (weights are read-only: nothing is written back). Returns its size."""
        if model_id not in self.residents:
            raise KeyError(f"{self.name}: {model_id} is not resident")
        del self.residents[model_id]
        self.counters.evictions += 1
        return self.tiers.hbm.release(model_id)

    def free_at_ns(self, model_id: str | None = None) -> int:
        """Earliest time this socket could start running `model_id` (or anything)."""
        ready = self.residents[model_id].ready_at_ns if model_id is not None else 0
        return max(self.clock_ns, ready)

    # -- execution ------------------------------------------------------------------------------
    def cost_model(self, model: ModelSpec, members: tuple[str, ...], mode: str | None = None,
                   orchestration: str | None = None) -> CostModel:
        key = (model, members, mode, orchestration)
        if key not in self._cost_models:
            ring = RingTiming.for_group(self.topology, list(members))
            self._cost_models[key] = CostModel(self.spec, model, len(members), ring, mode, orchestration)
        return self._cost_models[key]

    def timing(self, request: RunRequest) -> Timing:
        """The timing of `request` on this socket's TP group (pure: no state changes)."""
        cost = self.cost_model(request.model, request.members, request.mode, request.orchestration)
        return cost.generate(request.prompt_lens, request.output_lens).timing()

    def _admit(self, request: RunRequest) -> Resident:
        """Check that this socket can start `request`: a member, the model resident and ready,
        the socket free, room in HBM for the batch's KV cache, which the ledger then holds (in
        place of the previous batch's) until the group goes idle or its next batch starts."""
        resident = self._startable(request, "job")
        tokens = sum(request.prompt_lens) + sum(request.output_lens)
        self.set_kv(kv_bytes_per_token_per_socket(request.model, len(request.members)) * tokens)
        return resident

    def _account(self, request: RunRequest, resident: Resident, busy_ns: int) -> None:
        self._last_run = (request.job_id, request, busy_ns, self.clock_ns)
        self.clock_ns = request.start_ns + busy_ns
        resident.runs += 1
        self.counters.runs += 1
        self.counters.tokens += int(sum(request.output_lens))
        self.counters.busy_ns += busy_ns

    def run(self, request: RunRequest, timing: Timing | None = None) -> RunResult:
        """Time and execute a batch: prefill, then decode until every sequence is done.

        The members of a TP group run one schedule in lockstep: one of them times it (`run`),
        the others apply that timing (`follow`). A caller that already timed the batch may pass
        its `timing`."""
        resident = self._admit(request)
        if timing is None:
            timing = self.timing(request)
        busy = timing.total_ns
        self._account(request, resident, busy)
        finish = tuple(request.start_ns + f for f in timing.finish_ns)
        return RunResult(job_id=request.job_id, socket=self.name, start_ns=request.start_ns,
                         ttft_ns=timing.ttft_ns, finish_ns=finish, end_ns=self.clock_ns, busy_ns=busy,
                         collective_ns=timing.collective_ns, setup_ns=timing.setup_ns)

    def follow(self, request: RunRequest, busy_ns: int) -> int:
        """Execute a batch whose timing the group's first member computed; returns the end time."""
        resident = self._admit(request)
        self._account(request, resident, busy_ns)
        return self.clock_ns

    def abort(self, job_id: str, at_ns: int) -> int:
        """Cut the batch in progress short at `at_ns` (a member of the group failed), or cancel it
        if it has not begun yet (it was waiting for a switch to land): the socket is free from
        then, and the batch counts as not run. Returns the clock."""
        if self._last_run is None or self._last_run[0] != job_id:
            raise ValueError(f"{self.name}: {job_id} is not the batch in progress")
        _, request, busy, clock_before = self._last_run
        end_ns = request.start_ns + busy
        if not at_ns < end_ns:
            raise ValueError(f"{self.name}: {job_id} already ended at {end_ns} ns, before {at_ns} ns")
        self.counters.busy_ns -= end_ns - max(at_ns, request.start_ns)
        self.counters.runs -= 1
        self.counters.tokens -= int(sum(request.output_lens))
        if request.model_id in self.residents:
            self.residents[request.model_id].runs -= 1
        self.clock_ns = max(clock_before, at_ns) if at_ns < request.start_ns else at_ns
        self._last_run = None
        self.set_kv(0)  # the batch's KV cache goes with it
        return self.clock_ns

    def topology_changed(self) -> None:
        """The links changed (a degraded or lost link): time every group afresh."""
        self._cost_models.clear()

    def advance_to(self, clock_ns: int) -> None:
        """Move the clock forward (idle time); never backward."""
        self.clock_ns = max(self.clock_ns, int(clock_ns))

    # -- spans of the continuous engine ---------------------------------------------------------
    def span_times(self, request: SpanRequest, iterations: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(step ns, collective ns) of the span's first `iterations` steps (pure: no state changes),
        one vectorised evaluation of the compiled cost model over the rows."""
        cost = self.cost_model(request.model, request.members, request.mode, request.orchestration)
        shape = span_shape(request, iterations or request.iterations, request.model.sliding_window)
        times = cost.steps(shape, setup=request.setup)
        return times.step_ns, np.asarray(times.collective_step_ns, dtype=np.float64)

    def set_kv(self, kv_bytes: int) -> int:
        """Resize this socket's KV ledger entry (raises CapacityError if HBM cannot hold it)."""
        hbm = self.tiers.hbm
        if KV_ENTRY in hbm:
            hbm.release(KV_ENTRY)
        if kv_bytes > 0:
            hbm.allocate(KV_ENTRY, int(kv_bytes))
        return hbm.used_bytes

    def _admit_span(self, request: SpanRequest) -> Resident:
        resident = self._startable(request, "span")
        self.set_kv(request.kv_bytes)
        return resident

    def _startable(self, request: RunRequest | SpanRequest, what: str) -> Resident:
        """The resident model `request` runs, after checking that this socket may start it now: a
        member of its group, the model in HBM and ready, the socket free."""
        if self.name not in request.members:
            raise ValueError(f"{self.name} is not a member of {request.members}")
        resident = self.residents.get(request.model_id)
        if resident is None:
            raise UserError(f"{self.name}: {request.model_id} is not resident in HBM")
        if request.start_ns < self.free_at_ns(request.model_id):
            raise ValueError(f"{self.name}: {what} {request.job_id} starts at {request.start_ns} ns, before the "
                             f"socket is free at {self.free_at_ns(request.model_id)} ns")
        return resident

    def run_span(self, request: SpanRequest, busy_ns: int | None = None) -> SpanResult:
        """Execute a span: KV entry resized, clock moved by its steps. A caller that already timed
        it passes `busy_ns` (the group's other members follow the first one's schedule)."""
        resident = self._admit_span(request)
        collective = 0
        if busy_ns is None:
            steps, coll = self.span_times(request)
            busy_ns, collective = int(steps.sum()), int(np.rint(coll).sum())
        tokens = span_tokens(request, request.iterations)
        self.track_span(request.job_id, request.model_id, request.start_ns, int(busy_ns), self.clock_ns, tokens)
        self.clock_ns = request.start_ns + int(busy_ns)
        resident.runs += 1
        self.counters.runs += 1
        self.counters.tokens += tokens
        self.counters.busy_ns += int(busy_ns)
        return SpanResult(request.job_id, self.name, request.start_ns, self.clock_ns, int(busy_ns), collective)

    def track_span(self, job_id: str, model_id: str, start_ns: int, busy_ns: int, clock_before: int,
                   tokens: int) -> None:
        """Remember the span in progress (a failure may cut it short)."""
        self._last_span = (job_id, model_id, start_ns, busy_ns, clock_before, tokens)

    def truncate_span(self, job_id: str, iterations: int, busy_ns: int, tokens: int, at_ns: int) -> int:
        """A member of the group failed at `at_ns`: the span in progress keeps its first
        `iterations` steps (`busy_ns` and `tokens` of them); this socket is idle from then.
        Returns the clock."""
        if self._last_span is None or self._last_span[0] != job_id:
            raise ValueError(f"{self.name}: {job_id} is not the span in progress")
        _, model_id, start_ns, busy, clock_before, full_tokens = self._last_span
        if not start_ns + busy > at_ns:
            raise ValueError(f"{self.name}: {job_id} already ended at {start_ns + busy} ns, by {at_ns} ns")
        self.counters.busy_ns -= busy - int(busy_ns)
        self.counters.tokens -= full_tokens - int(tokens)
        if iterations == 0:
            self.counters.runs -= 1
            if model_id in self.residents:
                self.residents[model_id].runs -= 1
        kept_end = start_ns + int(busy_ns) if iterations else clock_before
        self.clock_ns = max(kept_end, int(at_ns))
        self._last_span = None
        return self.clock_ns

    # -- reporting ------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {
            "socket": self.name,
            "clock_ns": self.clock_ns,
            "tiers": self.tiers.snapshot(),
            "resident": sorted(self.residents),
            "counters": dict(vars(self.counters)),
        }
