"""What a node's runtime tells the sockets of a TP group to do, as one log per flush, and how a
socket applies it to its own state.

The runtime times each batch with the cost model and keeps a cache of every socket's state to
decide the next step at once; the sockets hold the real state (resident shards, the KV entry of
the HBM ledger, the clock, the counters) and confirm the cache: each applies the log, checking
every command against its own state (the model resident and landed, the socket free, the KV
fitting in HBM), and answers with a digest of where it ended. A command it refuses, or a digest
that differs from the cache's, is a divergence: the run stops, naming the socket and the command.

Spans (the continuous engine's batches) come in columns and are checked and applied as arrays:
a long run costs the sockets a few numpy operations per flush, not Python per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rdu.socket_actor.core import SocketCore

__all__ = ["CommandLog", "SpanColumns", "apply_log", "digest", "describe", "CommandRefused"]


class CommandRefused(RuntimeError):
    """A socket refused a command of its log (its state does not allow it)."""


@dataclass
class SpanColumns:
    """Consecutive spans of a group, one column per field."""

    jobs: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    start_ns: list[int] = field(default_factory=list)
    busy_ns: list[int] = field(default_factory=list)
    kv_bytes: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def add(self, job: str, model: str, start_ns: int, busy_ns: int, kv_bytes: int, tokens: int) -> None:
        self.jobs.append(job)
        self.models.append(model)
        self.start_ns.append(start_ns)
        self.busy_ns.append(busy_ns)
        self.kv_bytes.append(kv_bytes)
        self.tokens.append(tokens)


@dataclass
class CommandLog:
    """A group's commands since the last flush. `targets` of a command: None for every member
    of the group, else the members it concerns (a reload after a restart)."""

    ops: list[tuple] = field(default_factory=list)
    commands: int = 0

    def __len__(self) -> int:
        return self.commands

    def span(self, job: str, model: str, start_ns: int, busy_ns: int, kv_bytes: int, tokens: int) -> None:
        if not self.ops or self.ops[-1][0] != "spans":
            self.ops.append(("spans", SpanColumns()))
        self.ops[-1][1].add(job, model, start_ns, busy_ns, kv_bytes, tokens)
        self.commands += 1

    def add(self, *op) -> None:
        self.ops.append(op)
        self.commands += 1


def digest(core: SocketCore) -> tuple:
    """Where a socket stands: clock, HBM used, resident shards, counters (what must agree)."""
    c = core.counters
    return (core.clock_ns, core.tiers.hbm.used_bytes, tuple(sorted(core.residents)),
            (c.loads, c.evictions, c.bytes_loaded, c.runs, c.tokens, c.busy_ns))


def apply_log(core: SocketCore, log: CommandLog, payloads: dict | None = None) -> tuple:
    """Apply `log` to this socket (`core`); returns its digest. Raises CommandRefused naming the
    command this socket's state does not allow. `payloads`: functional shards copied in, by
    model id (loads of a functional run)."""
    me = core.name
    for op in log.ops:
        kind = op[0]
        try:
            if kind == "spans":
                _apply_spans(core, op[1])
            elif kind == "load":
                _, model_id, shard_bytes, arrivals = op
                if me in arrivals:
                    weights = (payloads or {}).get(model_id)
                    core.load(model_id, shard_bytes, arrivals[me], weights)
            elif kind == "evict":
                core.evict(op[1])
            elif kind == "kv":
                core.set_kv(op[1])
            elif kind == "truncate":
                _, job, iterations, busy_ns, tokens, at_ns = op
                core.truncate_span(job, iterations, busy_ns, tokens, at_ns)
            elif kind == "follow":
                _, request, busy_ns = op
                core.follow(request, busy_ns)
            elif kind == "abort":
                core.abort(op[1], op[2])
            elif kind == "advance":
                if op[1] == me:
                    core.advance_to(op[2])
            else:
                raise CommandRefused(f"unknown command {kind!r}")
        except CommandRefused:
            raise
        except Exception as exc:   # the socket's own checks: not resident, not free, does not fit
            raise CommandRefused(f"{me}: {describe(op)}: {exc}") from None
    return digest(core)


def describe(op: tuple) -> str:
    """A command of a log in a few words (what a divergence message names)."""
    if op[0] == "spans":
        spans = op[1]
        return f"span {spans.jobs[0]}" if len(spans.jobs) == 1 else f"spans {spans.jobs[0]} .. {spans.jobs[-1]}"
    if op[0] == "follow":
        return f"run {op[1].job_id}"
    return " ".join(str(part) for part in op[:2])


def _apply_spans(core: SocketCore, spans: SpanColumns) -> None:
    """The spans in one go: every check of `SocketCore.run_span`, as arrays, then the effect of
    the last (clock, KV entry) and the sum of all (counters)."""
    start = np.asarray(spans.start_ns, dtype=np.int64)
    busy = np.asarray(spans.busy_ns, dtype=np.int64)
    end = start + busy
    if start[0] < core.clock_ns or (len(start) > 1 and (start[1:] < end[:-1]).any()):
        first = 0 if start[0] < core.clock_ns else int(np.argmax(start[1:] < end[:-1])) + 1
        raise CommandRefused(f"{core.name}: span {spans.jobs[first]} starts at {int(start[first])} ns, before the "
                             f"socket is free at {int(core.clock_ns if first == 0 else end[first - 1])} ns")
    models, first_index = np.unique(np.asarray(spans.models), return_index=True)
    counts = np.bincount(np.searchsorted(models, spans.models), minlength=len(models))
    for model, first, count in zip(models.tolist(), first_index.tolist(), counts.tolist()):
        resident = core.residents.get(model)
        if resident is None:
            raise CommandRefused(f"{core.name}: span {spans.jobs[first]}: {model} is not resident in HBM")
        if resident.ready_at_ns > int(start[first]):
            raise CommandRefused(f"{core.name}: span {spans.jobs[first]} starts at {int(start[first])} ns, before "
                                 f"{model} lands at {resident.ready_at_ns} ns")
        resident.runs += count
    kv = np.asarray(spans.kv_bytes, dtype=np.int64)
    peak = int(kv.max())
    core.set_kv(peak)            # raises if HBM cannot hold the largest KV entry of these spans
    core.set_kv(int(kv[-1]))
    core.counters.runs += len(start)
    core.counters.tokens += int(np.asarray(spans.tokens, dtype=np.int64).sum())
    core.counters.busy_ns += int(busy.sum())
    last = len(start) - 1
    clock_before = int(end[last - 1]) if last else core.clock_ns
    core.clock_ns = int(end[last])
    core.track_span(spans.jobs[last], spans.models[last], int(start[last]), int(busy[last]), clock_before,
                    int(spans.tokens[last]))

