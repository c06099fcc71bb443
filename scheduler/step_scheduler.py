"""The batching policy of the continuous engine (vLLM v1 style), one decision per iteration
boundary of a group: which model steps (a step runs one model: their weights differ), then its
running decodes first, chunks of its admitted prompts, and FCFS admissions of waiting prompts
whose whole prompt fits in KV, within `max_num_batched_tokens` and `max_num_seqs`. When KV blocks
run out, idle models are evicted, then the youngest running sequence is preempted (recompute).

`span_limit` says for how many iterations the batch stays fixed: the decisions at the next
boundaries would be "the same sequences, one token further" until a sequence finishes, a prefill
chunk ends short of its prompt, a waiting prompt becomes admissible, or a block does not fit."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rdu.scheduler.kv import blocks_for

__all__ = ["Seq", "Batch", "StepConfig", "MODEL_SELECTION", "select_model", "build_batch", "span_limit"]

MODEL_SELECTION = ("round-robin", "oldest-first")


class Seq:
    """One sequence of one model: the router's classification of a request, or its expert run."""

    __slots__ = ("request", "model", "prompt", "output", "computed", "generated", "blocks", "order",
                 "admitted_ns", "decided_ns", "first_token_ns", "last_token_ns", "preemptions", "switch_wait_ns",
                 "hit", "router_ns", "queue_ns", "batch", "swapped_bytes")

    def __init__(self, request, model: int, prompt: int, output: int) -> None:
        self.request, self.model, self.prompt, self.output = request, model, prompt, output
        self.computed = self.generated = self.blocks = 0
        self.order = 0                      # admission order in the group: the youngest is preempted first
        self.admitted_ns = self.first_token_ns = self.last_token_ns = -1
        self.decided_ns = 0
        self.preemptions = self.switch_wait_ns = self.router_ns = self.queue_ns = self.batch = 0
        self.swapped_bytes = 0              # KV per member waiting in the capacity tier (swap preemption)
        self.hit = True


@dataclass(frozen=True)
class StepConfig:
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    block_size: int = 16
    model_selection: str = "round-robin"
    max_span_iterations: int | None = None    # None: event to event; 1: one iteration at a time (tests)


@dataclass
class Batch:
    """Iteration 0 of a span: prefill chunks of `chunks` seqs (lengths) and decodes of `decodes`."""

    model: int
    decodes: list = field(default_factory=list)
    chunks: list = field(default_factory=list)       # (seq, chunk tokens)
    preempted: list = field(default_factory=list)
    swap_out_bytes: int = 0                          # KV per member swapped out to make room, before the step
    swap_in_bytes: int = 0                           # ... and swapped back in for the sequences it resumes


def select_model(group, now: int, config: StepConfig) -> list[int]:
    """Models in the order the policy would try them: the current one first if nothing happened
    since it was chosen (`group.dirty` false); else round-robin after the current one, or the model
    of the oldest request first."""
    runnable = [m for m in group.models_with_work() if group.residency.ready(m, now)]
    if not runnable:
        return []
    current = group.current_model
    if not group.dirty and current in runnable:
        return [current] + [m for m in runnable if m != current]
    if config.model_selection == "oldest-first":
        return sorted(runnable, key=lambda m: (group.oldest(m), m))
    after = sorted(runnable, key=lambda m: (m <= current if current is not None else False, m))
    return after


def build_batch(group, model: int, now: int, config: StepConfig) -> Batch | None:
    """Iteration 0 of `model`'s next span (None if it has nothing it can run now)."""
    batch = Batch(model)
    running = group.running[model]
    block_bytes = group.block_bytes(model)
    bs = config.block_size
    while True:   # every decode gets a slot for its next token, preempting the youngest if needed
        decodes = [s for s in running if s.computed >= s.prompt]
        need = sum(blocks_for(s.computed + 1, bs) - s.blocks for s in decodes) * block_bytes
        if need <= group.memory.free_bytes or group.make_room(need):
            break
        victim = group.youngest_running()
        kv_bytes = group.preempt(victim, now)
        if victim.swapped_bytes:
            batch.swap_out_bytes += kv_bytes
        batch.preempted.append(victim)
    for s in decodes:
        grow = blocks_for(s.computed + 1, bs) - s.blocks
        if grow:
            s.blocks += grow
            group.memory.take_kv(grow * block_bytes)
    batch.decodes = decodes
    budget = config.max_num_batched_tokens - len(decodes)
    for s in running:
        if s.computed < s.prompt and budget > 0:
            chunk = min(s.prompt - s.computed, budget)
            batch.chunks.append((s, chunk))
            budget -= chunk
    waiting = group.waiting[model]
    while waiting and budget > 0 and group.n_running < config.max_num_seqs and group.admitting(waiting[0]):
        head = waiting[0]
        if head.swapped_bytes:   # a swapped-out decode resumes: its KV comes back, it decodes this step
            blocks = blocks_for(head.computed + 1, bs)
            if blocks * block_bytes > group.memory.free_bytes and not group.make_room(blocks * block_bytes):
                break
            waiting.popleft()
            group.admit(head, blocks, block_bytes, now)
            batch.swap_in_bytes += head.swapped_bytes
            head.swapped_bytes = 0
            batch.decodes.append(head)
            budget -= 1
            continue
        need = blocks_for(head.prompt, bs) * block_bytes
        if need > group.memory.free_bytes and not group.make_room(need):
            break
        waiting.popleft()
        group.admit(head, blocks_for(head.prompt, bs), block_bytes, now)
        chunk = min(head.prompt, budget)
        batch.chunks.append((head, chunk))
        budget -= chunk
    if not batch.decodes and not batch.chunks:
        return None
    return batch


def span_limit(group, batch: Batch, config: StepConfig) -> tuple[int, np.ndarray, np.ndarray]:
    """(iterations the batch stays fixed, cached tokens and blocks of the decoding set at
    iteration 1). 1 when iteration 0 ends a prefill chunk short of its prompt, finishes a
    sequence, or leaves room to admit the next waiting prompt."""
    bs = config.block_size
    cap = config.max_span_iterations
    if any(s.computed + c < s.prompt for s, c in batch.chunks):
        return 1, np.zeros(0, np.int64), np.zeros(0, np.int64)
    seqs = batch.decodes + [s for s, _ in batch.chunks]
    contexts = np.array([s.computed + 1 for s in batch.decodes] + [s.prompt for s, _ in batch.chunks], np.int64)
    held = np.array([s.blocks for s in seqs], np.int64)
    remaining = min(s.output - s.generated - 1 for s in seqs)
    if remaining <= 0 or cap == 1:
        return 1, contexts, held
    waiting = group.waiting[batch.model]
    if waiting and group.n_running < config.max_num_seqs and config.max_num_batched_tokens > len(seqs) \
            and group.admitting(waiting[0]):
        need = blocks_for(waiting[0].prompt, bs) * group.block_bytes(batch.model)
        if need <= group.memory.free_bytes + group.evictable_bytes():
            return 1, contexts, held
    limit = 1 + remaining
    if cap is not None:
        limit = min(limit, cap)
    fits = group.memory.growth_fits(contexts, held, group.block_bytes(batch.model), limit - 1)
    return 1 + fits, contexts, held
