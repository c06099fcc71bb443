"""Functional forward passes timed by a nominal model: what a socket actor runs when its TP group
generates for real (`SocketActor.generate`, `SocketActor.execute`), as plain Python (no Ray).

The small functional model computes; the time is the cost model's of the nominal model (say the
run's real Llama-2-7B): every step of the request takes exactly the time of the row the runtime's
cache charges for it. A step that carries a functional forward pass is cut at the nominal
model's collectives (`StepPlan`): compute gaps from the cost model's segments, and each
collective's analytic time (`RingTiming.hardware_ns` of the nominal bytes) — the functional
model's few collectives stand in for evenly spread nominal ones and really travel over the gRPC
plane (interconnect.collectives), the others are charged their analytic time. Gaps plus
collectives add up to the step's time, so with nothing lost a member's clock after a step is the
cost model's, to the nanosecond; every message really lost and resent adds one retransmission
timeout. Steps beyond the functional ones are charged their analytic time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rdu.base import UserError
from rdu.interconnect.collectives import Collectives
from rdu.socket_actor.command_log import digest
from rdu.socket_actor.core import RunRequest, SocketCore, SpanRequest, span_shape
from rdu.socket_actor.cost_model import CostModel
from rdu.socket_actor.functional_payload import request_payload
from rdu.socket_actor.model_spec import ModelSpec
from rdu.socket_actor.numerics import KVCache, Shard, collective_kinds, forward_shard
from rdu.socket_actor.operators import PhaseShape, SHAPE_KEYS, decode_step_shape, prefill_shape

__all__ = ["NominalTiming", "StepPlan", "Schedule", "generation_schedule", "request_schedule", "run_functional",
           "FunctionalRun", "execute"]


@dataclass(frozen=True)
class NominalTiming:
    """Time a functional generation as the nominal model would take it (say the run's real
    Llama-2-7B), while the small functional model computes: step times from the cost model of
    `model` on `prompt_lens` (default: the functional prompts' length), collective messages timed
    by that model's bytes. `setup` charges the run's set-up to the prefill step."""

    model: ModelSpec
    prompt_lens: tuple[int, ...] | None = None
    setup: bool = False


@dataclass(frozen=True)
class StepPlan:
    """One step carrying a forward pass: the gap of compute before each collective of the timing
    model (and after the last), and each collective's kind, bytes and analytic time."""

    gaps_ns: tuple[int, ...]
    collectives: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class Schedule:
    """The time of every step of a request (`step_ns`, the rows the runtime charges) and the
    plans of its first `len(plans)` steps, which carry the functional forward passes."""

    step_ns: np.ndarray
    plans: tuple[StepPlan, ...]

    @property
    def total_ns(self) -> int:
        return int(self.step_ns.sum())

    @property
    def rest_ns(self) -> int:
        """The steps after the functional ones, charged their analytic time."""
        return int(self.step_ns[len(self.plans):].sum())


def _apportion(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights` into integers that sum to it exactly."""
    whole = sum(weights)
    if whole <= 0:
        return [0] * (len(weights) - 1) + [total]
    cuts, running = [0], 0
    for weight in weights:
        running += weight
        cuts.append(total * running // whole)
    return [b - a for a, b in zip(cuts, cuts[1:])]


def _plans(cost: CostModel, step_ns: np.ndarray, first: PhaseShape, decode: PhaseShape | None,
           functional_steps: int) -> tuple[StepPlan, ...]:
    """Plans of the first `functional_steps` steps: the first step cut like `first`, the others
    like `decode` (every decode step of a fixed batch moves the same bytes; its compute shares
    barely move), so that each plan's gaps plus its collectives' analytic times add up to its
    step's time exactly. Where a fused step hides more collective time than its compute, the
    gaps are 0 and the step takes its collectives' time."""
    count = min(functional_steps, len(step_ns))
    templates = []
    for shape in (first, decode)[:1 if decode is None or count < 2 else 2]:
        segments = cost.segments(shape)
        collectives = tuple((seg.collective, seg.collective_bytes,
                             int(cost.ring.hardware_ns(seg.collective, seg.collective_bytes))) for seg in segments[:-1])
        templates.append((collectives, [seg.compute_ns + seg.staging_ns for seg in segments]))
    plans = []
    for step in range(count):
        collectives, weights = templates[min(step, len(templates) - 1)]
        compute_ns = max(int(step_ns[step]) - sum(c[2] for c in collectives), 0)
        plans.append(StepPlan(tuple(_apportion(compute_ns, weights)), collectives))
    return tuple(plans)


def _concat(*shapes: PhaseShape) -> PhaseShape:
    return PhaseShape(*(np.concatenate([getattr(s, k) for s in shapes]) for k in SHAPE_KEYS))


def _row(shape: PhaseShape, row: int) -> PhaseShape:
    return PhaseShape(*(np.asarray(getattr(shape, k))[row:row + 1] for k in SHAPE_KEYS))


def generation_schedule(cost: CostModel, prompt_lens: tuple[int, ...], output_lens: tuple[int, ...], setup: bool,
                        functional_steps: int) -> Schedule:
    """A static batch: its prefill then its decode steps as sequences finish, one evaluation of
    the same rows `CostModel.generate` (and so `SocketCore.timing`) charges."""
    generation = cost.generate(prompt_lens, output_lens, setup=setup)
    step_ns = np.concatenate([generation.prefill.step_ns, generation.decode.step_ns]).astype(np.int64)
    window = cost.model.sliding_window
    return Schedule(step_ns, _plans(cost, step_ns, prefill_shape(prompt_lens, window),
                                    decode_step_shape(prompt_lens, window), functional_steps))


def request_schedule(core: SocketCore, request: RunRequest | SpanRequest, functional_steps: int) -> Schedule:
    """Every step of a served batch, as the runtime's cache times it: `SocketCore.timing` for a
    static batch (prefill with the run's set-up, then decodes as sequences finish),
    `SocketCore.span_times` for a span (the mixed first iteration, then decodes)."""
    cost = core.cost_model(request.model, request.members, request.mode, request.orchestration)
    if isinstance(request, RunRequest):
        return generation_schedule(cost, request.prompt_lens, request.output_lens, True, functional_steps)
    step_ns = np.asarray(core.span_times(request)[0], dtype=np.int64)
    window = request.model.sliding_window
    shapes = span_shape(request, min(request.iterations, 2), window)
    decode = _row(shapes, 1) if request.iterations > 1 else None
    return Schedule(step_ns, _plans(cost, step_ns, _row(shapes, 0), decode, functional_steps))


def _stand_ins(functional: int, nominal: list[str], kinds: list[str]) -> list[int]:
    """Which of the timing model's collectives each of the functional model's stands in for:
    the first for the first, the last for the last, the others spread evenly between them (a
    2-layer functional model in a 32-layer nominal one). Their kinds must agree."""
    if len(nominal) < functional:
        raise UserError(f"the timing model has {len(nominal)} collectives per step, fewer than the functional "
                        f"model's {functional}: time it by a model with at least as many layers")
    if functional == 1:
        picks = [len(nominal) - 1]
    else:
        picks = [round(j * (len(nominal) - 1) / (functional - 1)) for j in range(functional)]
    for j, k in enumerate(picks):
        if nominal[k] != kinds[j]:
            raise UserError(f"the functional model's collective {j} ({kinds[j]}) cannot stand for the timing "
                            f"model's {k} ({nominal[k]})")
    return picks


@dataclass
class FunctionalRun:
    """What a member's functional forward passes produced: generated ids (batch, steps), logits
    (steps, batch, vocab), the clock after them."""

    ids: np.ndarray
    logits: np.ndarray
    clock_ns: int
    algorithms: dict[str, int] = field(default_factory=dict)


def _pick_embedding(shard: Shard, parts: list[np.ndarray]) -> np.ndarray:
    """At a root: each rank's [logits part | embedding row of its own best token] gathered in rank
    order -> [full logits | the embedding row of the overall best token], per sequence. The best
    token overall (numpy's argmax: the first maximum) is the first maximum of the rank whose part
    holds it, so that rank sent its row: the row the embedding all-reduce would sum (its other
    terms are zeros, so the same bits)."""
    vocab_part = shard.weights["embed"].shape[0]
    logits = np.concatenate([p[:, :vocab_part] for p in parts], axis=-1)
    best = np.argmax(logits, axis=-1)
    rows = np.stack([parts[owner][i, vocab_part:] for i, owner in enumerate(best // vocab_part)])
    return np.concatenate([logits, rows], axis=-1)


async def _gather_logits(shard: Shard, group: Collectives, local: np.ndarray, label: str, clock_ns: int,
                         nbytes: int, fuse: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
    """The logits all-gather: (full logits, next step's embedding or None, clock). With `fuse`
    the next decode step's embedding all-reduce rides on it (each rank sends the embedding row of
    its own best token; the root picks the overall best's), one collective fewer per token."""
    if not fuse:
        result = await group.all_gather(local, clock_ns, label, timed_bytes=nbytes)
        return result.tensor, None, result.clock_ns
    rows = shard.weights["embed"][np.argmax(local, axis=-1)]
    packed = np.concatenate([local, rows], axis=-1).astype(np.float32, copy=False)
    result = await group.all_gather_then(packed, clock_ns, label, lambda parts: _pick_embedding(shard, parts),
                                         timed_bytes=nbytes)
    vocab = shard.cfg.vocab_size
    return result.tensor[:, :vocab], result.tensor[:, vocab:], result.clock_ns


async def _step(shard: Shard, group: Collectives, tokens: np.ndarray, cache: KVCache, plan: StepPlan,
                stand_ins: dict[int, int], clock_ns: int, embedded: np.ndarray | None,
                fuse: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
    """One forward pass of `tokens`, its collectives over the plane, timed by `plan`: (logits,
    next step's embedding if `fuse`, clock). With `embedded` the embedding all-reduce already
    travelled (with the previous step's logits): its nominal collective is charged its time."""
    run = forward_shard(shard, tokens, cache, embedded)
    collective = next(run)
    logits = next_embedded = None
    for k, (kind, nbytes, analytic_ns) in enumerate(plan.collectives):
        clock_ns += plan.gaps_ns[k]
        if k not in stand_ins or (embedded is not None and stand_ins[k] == 0):
            clock_ns += analytic_ns   # a collective of the timing model that does not travel here
            continue
        if collective.kind == "all_reduce":
            result = await group.all_reduce(collective.tensor, clock_ns, collective.label, timed_bytes=nbytes)
            tensor, clock_ns = result.tensor, result.clock_ns
        else:
            tensor, next_embedded, clock_ns = await _gather_logits(shard, group, collective.tensor, collective.label,
                                                                   clock_ns, nbytes, fuse)
        try:
            collective = run.send(tensor)
        except StopIteration as done:
            logits = done.value
    if logits is None:
        raise RuntimeError(f"{group.me}: the functional step did not end with the timing model's step")
    return logits, next_embedded, clock_ns + plan.gaps_ns[-1]


async def run_functional(shard: Shard, group: Collectives, prompts: np.ndarray, schedule: Schedule,
                         start_ns: int) -> FunctionalRun:
    """Greedy generation of `prompts` (batch, length) for the schedule's functional steps, with
    this member's shard, combining partial results over the plane; then the remaining steps'
    analytic time, and the group's agreement on the end (`Collectives.settle`)."""
    cfg = shard.cfg
    tokens = np.asarray(prompts, dtype=np.int64)
    cache = KVCache(cfg, cfg.kv_heads_per_shard(group.ranks), batch=len(tokens))
    kinds = collective_kinds(cfg)
    nominal_kinds = [c[0] for c in schedule.plans[0].collectives] if schedule.plans else kinds
    stand_ins = {k: j for j, k in enumerate(_stand_ins(len(kinds), nominal_kinds, kinds))}
    algorithms_before = group.algorithms.copy()
    clock, ids, all_logits, embedded = int(start_ns), [], [], None
    for step, plan in enumerate(schedule.plans):
        fuse = step + 1 < len(schedule.plans)
        logits, embedded, clock = await _step(shard, group, tokens, cache, plan, stand_ins, clock, embedded, fuse)
        all_logits.append(logits)
        ids.append(np.argmax(logits, axis=-1))
        tokens = ids[-1][:, None]
    clock = await group.settle(clock + schedule.rest_ns)
    algorithms = dict(group.algorithms - algorithms_before)   # this run's collectives, by algorithm
    empty = np.zeros((len(tokens), 0), dtype=np.int64)
    return FunctionalRun(np.stack(ids, axis=1) if ids else empty,
                         np.stack(all_logits) if all_logits else np.zeros((0, len(tokens), cfg.vocab_size), np.float32),
                         clock, algorithms)


async def execute(core: SocketCore, group: Collectives, shard: Shard, request: RunRequest | SpanRequest) -> dict:
    """A served batch (a static batch or a span), run for real by one member of its TP group and
    then applied to the member's core exactly as the runtime's cache applies it.

    The batch's functional payload (`functional_payload.request_payload`: at most PROMPT_CAP
    prompt tokens, OUTPUT_CAP new ones) runs tensor-parallel over the plane with this member's
    shard, starting at `request.start_ns`; every step of the request is timed by the nominal
    model (`request_schedule`), the functional ones with their collectives, the rest analytically;
    the group agrees on the end. The core then follows the request (`SocketCore.follow` /
    `SocketCore.run_span`) with busy = the clock's advance, so with nothing lost its state digest
    is the cache's. Applying comes after the run: members whose state refuses the request refuse
    it together, after the others' collectives completed, never leaving one waiting."""
    prompts, new_tokens = request_payload(request)
    schedule = request_schedule(core, request, new_tokens)
    group.begin(f"{request.job_id}#")
    run = await run_functional(shard, group, prompts, schedule, request.start_ns)
    busy_ns = run.clock_ns - request.start_ns
    if isinstance(request, RunRequest):
        end_ns = core.follow(request, busy_ns)
    else:
        end_ns = core.run_span(request, busy_ns).end_ns
    return {"job_id": request.job_id, "start_ns": request.start_ns, "end_ns": end_ns, "busy_ns": busy_ns,
            "analytic_ns": schedule.total_ns, "steps": len(schedule.step_ns), "functional_steps": len(schedule.plans),
            "tokens": run.ids, "logits": run.logits, "prompts": prompts, "algorithms": run.algorithms,
            "digest": digest(core)}
