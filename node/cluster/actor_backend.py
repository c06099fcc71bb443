"""One partition's sockets as Ray actors, driven from the node's runtime (node_runtime.py).

The actors hold the sockets' state; the runtime keeps a cache of it (the same in-process cores
the inline backend uses) to time each step and decide the next at once. Every state-changing
command goes into a per-group log (socket_actor/command_log.py), sent to every member in one
call when it is long enough and at every fault; each member applies it with its own checks and
answers with a digest of its state, which must equal the cache's at that point. A command a
socket refuses, or a digest that differs, stops the run naming the socket and the command.
Answers are collected while the engine goes on; the run's results stand once all are in
(`finish` waits for every one).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rdu.node.cluster.inline_backend import InlineNodeBackend
from rdu.node.cluster.platform import NodeSpec
from rdu.scheduler.partition import PartitionSpec
from rdu.scheduler.serving_types import ServingStopped
from rdu.socket_actor.command_log import CommandLog, describe, digest
from rdu.socket_actor.core import RunRequest, RunResult, SpanRequest, SpanResult, span_tokens
from rdu.socket_actor.functional_payload import FunctionalChecks, model_shards
from rdu.socket_actor.model_spec import ModelSpec

__all__ = ["ActorNodeBackend", "ActorDivergence"]


class ActorDivergence(ServingStopped):
    """A socket actor refused a command, or its state differs from the runtime's cache: the run
    stops (the engines treat it as any other reason the cluster cannot go on)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"socket actor diverged: {reason}", None)


@dataclass
class _Sent:
    group: int
    last_command: str
    refs: dict[str, object]        # member -> its answer
    expected: dict[str, tuple]     # member -> the cache's digest at that point


class ActorNodeBackend(InlineNodeBackend):
    """The cache of one partition's sockets, confirmed by their actors."""

    name = "ray"

    def __init__(self, spec: NodeSpec, nodes: int, partition: PartitionSpec, sockets: dict[str, object],
                 stores: dict[int, object], functional: bool = False, flush_commands: int = 2048,
                 max_in_flight: int = 8) -> None:
        super().__init__(spec, nodes, partition, functional=functional)
        self.payloads_here = False   # the actors carry the payloads
        self.checks = FunctionalChecks()
        self.actors = dict(sockets)
        self.store_actors = dict(stores)
        self.flush_commands = flush_commands
        self.max_in_flight = max_in_flight
        self.logs = {g: CommandLog() for g in self.tp_groups}
        self._batch = {name: 0 for name in self.actors}
        self._sent: deque[_Sent] = deque()
        self._stores_pending: dict[int, list[tuple[str, int]]] = {}
        self._payload_refs: dict[tuple[int, str], dict[int, list]] = {}
        self.messages_lost = 0      # functional runs: plane messages really lost (drop-link), and resent
        self.messages_resent = 0
        self.commands = 0           # commands the cache applied and logged
        self.logs_sent = 0          # logs sent to a socket (one per member per flush)
        self.confirmed = 0          # ... of which the socket's answer matched the cache
        self.restarts = 0

    # -- the log and its confirmation -------------------------------------------------------------
    def _log(self, group: int) -> CommandLog:
        self.commands += 1
        return self.logs[group]

    def _live(self, group: int) -> list[str]:
        return [m for m in self.tp_groups[group].members if m in self.actors]

    def flush(self, group: int) -> None:
        """Send the group's log to its members; their answers are checked later."""
        import ray

        log = self.logs[group]
        if not log.ops:
            return
        members = self._live(group)
        log_ref = ray.put(log)
        refs = {}
        for m in members:
            refs[m] = self.actors[m].apply_log.remote(self._batch[m], log_ref)
            self._batch[m] += 1
            self.logs_sent += 1
        self._sent.append(_Sent(group, describe(log.ops[-1]), refs, {m: digest(self.sockets[m]) for m in members}))
        self.logs[group] = CommandLog()
        self.collect(block=len(self._sent) > self.max_in_flight)

    def collect(self, block: bool = False) -> None:
        """Check the answers that are in (all of the oldest batch when `block`)."""
        import ray

        while self._sent:
            sent = self._sent[0]
            pending = list(sent.refs.values())
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=None if block else 0)
            if len(ready) < len(pending):
                return
            self._sent.popleft()
            self._check(sent)
            block = block and len(self._sent) > self.max_in_flight

    def _check(self, sent: _Sent) -> None:
        import ray

        for member, ref in sent.refs.items():
            try:
                got = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                raise ActorDivergence(f"{member} refused a command the runtime's cache accepted: "
                                      f"{getattr(exc, 'cause', exc)}") from None
            if got != sent.expected[member]:
                raise ActorDivergence(f"{member}: after {sent.last_command} its state is {_show(got)}, the runtime "
                                      f"expected {_show(sent.expected[member])}")
            self.confirmed += 1

    def drain(self, groups: Sequence[int] | None = None) -> None:
        """Send every pending log (of `groups`) and check every answer."""
        for g in list(self.logs) if groups is None else groups:
            self.flush(g)
        while self._sent:
            self.collect(block=True)

    # -- commands: the cache, then the log ------------------------------------------------------
    def store(self, node: int, model_id: str, nominal_bytes: int) -> None:
        super().store(node, model_id, nominal_bytes)
        if not self.functional:
            self._stores_pending.setdefault(node, []).append((model_id, nominal_bytes))
            return
        import ray

        ranks = {r for g in self.tp_groups.values() for r, m in enumerate(g.members) if m.startswith(f"node{node}/")}
        tp = next(iter(self.tp_groups.values())).tp
        shards = model_shards(model_id, tp)
        actor = self.store_actors[node]
        ray.get(actor.put.remote(model_id, nominal_bytes, {r: shards[r] for r in sorted(ranks)}))
        self._payload_refs[(node, model_id)] = ray.get(actor.refs.remote(model_id))

    def _flush_stores(self) -> None:
        """The capacity tiers' own ledgers admit what the cache admitted (they refuse what does not fit)."""
        import ray

        if self._stores_pending:
            free = ray.get([self.store_actors[n].put_many.remote(models) for n, models in self._stores_pending.items()])
            for (n, _), got in zip(self._stores_pending.items(), free):
                if got != self.stores[n].ledger.free_bytes:
                    raise ActorDivergence(f"node{n} capacity tier: {got} bytes free, the runtime expected "
                                          f"{self.stores[n].ledger.free_bytes}")
            self._stores_pending.clear()

    def copy_in(self, group: int, model_id: str, model: ModelSpec, send_ns: int,
                members: Sequence[str] | None = None) -> dict[str, int]:
        self._flush_stores()
        if self.functional:   # the socket's log up to here first: the real copy happens now, out of band
            self.drain([group])
        shard, arrivals = self.copy_arrivals(group, model, send_ns, members)
        for member, arrival in arrivals.items():
            self.sockets[member].load(model_id, shard, arrival)
        if self.functional:   # a real copy out of the node's store into the member's HBM buffers
            self._load_payloads(group, model_id, shard, arrivals)
        else:
            self._log(group).add("load", model_id, shard, dict(arrivals))
        return arrivals

    def _load_payloads(self, group: int, model_id: str, shard: int, arrivals: dict[str, int]) -> None:
        import ray

        ranks = {m: r for r, m in enumerate(self.tp_groups[group].members)}
        used = ray.get([self.actors[m].load.remote(
            model_id, shard, arrival, self._payload_refs[(int(m.split("/")[0][4:]), model_id)][ranks[m]])
            for m, arrival in arrivals.items()])
        for member, got in zip(arrivals, used):
            if got != self.sockets[member].tiers.hbm.used_bytes:
                raise ActorDivergence(f"{member}: load {model_id}: HBM holds {got} bytes, the runtime expected "
                                      f"{self.sockets[member].tiers.hbm.used_bytes}")

    def evict(self, group: int, model_id: str) -> None:
        super().evict(group, model_id)
        self._log(group).add("evict", model_id)

    def run(self, group: int, request: RunRequest) -> RunResult:
        if self.functional:
            return self._execute(group, request)
        result = super().run(group, request)
        self._log(group).add("follow", request, result.busy_ns)
        if len(self.logs[group]) >= self.flush_commands:
            self.flush(group)
        return result

    def run_span(self, group: int, request: SpanRequest) -> SpanResult:
        if self.functional:
            return self._execute(group, request)
        result = super().run_span(group, request)
        self._log(group).span(request.job_id, request.model_id, request.start_ns, result.busy_ns,
                              request.kv_bytes, span_tokens(request, request.iterations))
        if len(self.logs[group]) >= self.flush_commands:
            self.flush(group)
        return result

    def _execute(self, group: int, request: RunRequest | SpanRequest) -> RunResult | SpanResult:
        """A functional run: every member runs the batch for real over the gRPC plane and times
        it (socket_actor/timed_run.py); the batch ends when the members' clocks say — the cost
        model's time when nothing is lost, later by the resends when messages are — and the
        cache follows them. The tokens are checked against the single-process reference."""
        import ray

        self.drain([group])   # everything before this batch confirmed first
        members = self._live(group)
        outputs = ray.get([self.actors[m].execute.remote(request) for m in members])
        ends = {out["end_ns"] for out in outputs}
        if len(ends) != 1:
            raise ActorDivergence(f"the members of {self.tp_groups[group].name} end {request.job_id} at different "
                                  f"times: {sorted(ends)}")
        busy = outputs[0]["busy_ns"]
        if isinstance(request, RunRequest):
            timing = self._timing(request)
            for m in members:
                self.sockets[m].follow(request, busy)
            late = busy - timing.total_ns   # lost messages delay everything after them: counted on all
            result = RunResult(job_id=request.job_id, socket=members[0], start_ns=request.start_ns,
                               ttft_ns=timing.ttft_ns, finish_ns=tuple(request.start_ns + f + late
                                                                       for f in timing.finish_ns),
                               end_ns=request.start_ns + busy, busy_ns=busy, collective_ns=timing.collective_ns,
                               setup_ns=timing.setup_ns)
        else:
            _, coll = self.span_times(group, request, request.iterations)
            for m in members:
                self.sockets[m].run_span(request, busy)
            result = SpanResult(request.job_id, members[0], request.start_ns, request.start_ns + busy, busy,
                                int(np.rint(coll).sum()))
        for member, out in zip(members, outputs):
            if tuple(out["digest"]) != digest(self.sockets[member]):
                raise ActorDivergence(f"{member}: after running {request.job_id} its state is "
                                      f"{_show(tuple(out['digest']))}, the runtime expected "
                                      f"{_show(digest(self.sockets[member]))}")
        self.messages_lost += sum(out.get("messages_lost", 0) for out in outputs)
        self.messages_resent += sum(out.get("messages_resent", 0) for out in outputs)
        first = outputs[0]
        self.checks.check(request.model_id, np.asarray(first["prompts"]), int(np.asarray(first["tokens"]).shape[1]),
                          first["tokens"], first["logits"])
        return result

    def truncate_span(self, group: int, request: SpanRequest, iterations: int, at_ns: int) -> None:
        super().truncate_span(group, request, iterations, at_ns)
        busy, tokens = self.truncated(group, request, iterations)
        self._log(group).add("truncate", request.job_id, iterations, busy, tokens, at_ns)

    def set_kv(self, group: int, kv_bytes: int) -> None:
        super().set_kv(group, kv_bytes)
        self._log(group).add("kv", kv_bytes)

    def abort(self, group: int, job_id: str, at_ns: int) -> None:
        super().abort(group, job_id, at_ns)
        self._log(group).add("abort", job_id, at_ns)

    # -- faults: the cache models them, the actors live them --------------------------------------
    def _group_of(self, socket: str) -> int:
        return next(g for g, tp in self.tp_groups.items() if socket in tp.members)

    def fail_socket(self, socket: str, at_ns: int, back_at_ns: int) -> None:
        """Really kill the socket's actor process; Ray restarts it empty; it rejoins the run."""
        import ray

        group = self._group_of(socket)
        self.drain([group])
        ray.kill(self.actors[socket], no_restart=False)
        _restart(self.actors[socket], socket)
        self._batch[socket] = 0
        self.restarts += 1
        super().fail_socket(socket, at_ns, back_at_ns)
        self._log(group).add("advance", socket, back_at_ns)

    def fail_node(self, node: int, at_ns: int) -> None:
        """Kill every actor of the node (sockets and store) for good."""
        import ray

        self.drain()
        for name in [n for n in self.actors if n.startswith(f"node{node}/")]:
            ray.kill(self.actors.pop(name), no_restart=True)
        if node in self.store_actors:
            ray.kill(self.store_actors.pop(node), no_restart=True)
        super().fail_node(node, at_ns)
        for g, tp in self.tp_groups.items():
            if not self._live(g):
                self.logs[g] = CommandLog()

    def degrade_link(self, a: str, b: str, probability: float, at_ns: int) -> list[str]:
        links = super().degrade_link(a, b, probability, at_ns)
        if self.functional and links:   # the gRPC plane loses real messages between the two sockets
            import ray

            calls = [self.actors[x].set_link_loss.remote(y, probability) for x, y in ((a, b), (b, a))
                     if x in self.actors]
            ray.get(calls)
        return links

    def finish(self) -> dict:
        """Send what is left and check every answer: the run's results stand on them."""
        self._flush_stores()
        self.drain()
        return {"backend": self.name, "sockets": len(self.actors), "commands": self.commands,
                "logs_sent": self.logs_sent, "logs_confirmed": self.confirmed, "actor_restarts": self.restarts,
                **({**self.checks.to_dict(), "messages_lost": self.messages_lost,
                    "messages_resent": self.messages_resent} if self.functional else {})}


def _restart(handle, name: str, timeout_s: float = 60.0) -> None:
    """Wait for Ray to bring a killed socket actor back (new and empty) and start its gRPC server."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(handle.start.remote(), timeout=timeout_s)
            return
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.ActorDiedError) as exc:
            if time.monotonic() > deadline or isinstance(exc, ray.exceptions.ActorDiedError) \
                    and "restart" not in str(exc).lower():
                raise ActorDivergence(f"socket actor {name} did not come back after a restart: {exc}") from None
            time.sleep(0.05)


def _show(state: tuple) -> str:
    clock, hbm, residents, counters = state
    return f"clock {clock} ns, HBM {hbm} bytes, {len(residents)} resident, counters {counters}"
