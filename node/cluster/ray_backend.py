"""The Ray backend: the serving loop's commands executed by socket actors and DDR store actors.

The scheduler must know when a batch ends before it can decide the next one, and a round trip
to eight actors per decision would make a long trace crawl. So the driver keeps a *shadow* of
the cluster (the in-process core, fed the same commands) to answer at once, while the commands
stream to the actors in batches; each actor applies them to its own `SocketCore` — its own HBM
ledger and clock; a group's first socket times each batch with its own cost model and the
others follow that schedule — and every result it returns is checked against the shadow's.
A socket actor that disagrees (a different time, a capacity error the shadow did not see) stops
the run with an error naming the socket and the command.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from rdu.interconnect.topology import Topology
from rdu.node.cluster.inline_backend import InlineBackend
from rdu.node.cluster.platform import NodeSpec
from rdu.node.cluster.ray_nodes import RayNodes
from rdu.scheduler.backend import GroupInfo
from rdu.socket_actor.core import RunRequest, RunResult, SpanRequest, SpanResult
from rdu.socket_actor.functional_payload import FunctionalChecks, batch_payload, model_shards
from rdu.socket_actor.model_spec import ModelSpec

__all__ = ["RayBackend", "ActorDivergence"]


class ActorDivergence(RuntimeError):
    """A socket actor's result differs from the in-process shadow's."""


@dataclass
class _Batch:
    socket: str
    ref: object
    expected: list


class RayBackend:
    name = "ray"

    def __init__(self, spec: NodeSpec, nodes: int, tp: int, run_token: str = "", bind_host: str = "127.0.0.1",
                 flush_every: int = 512, max_in_flight: int = 64, max_restarts: int = 4,
                 on_node_lost: Callable[[int, set[str]], None] | None = None, functional: bool = False) -> None:
        """`on_node_lost(node, ray_node_ids)` is called when a kill-node fault fires, after the
        emulated node's actors are gone, with the Ray nodes that hosted them (tests use it to take
        those Ray nodes away as well)."""
        self.shadow = InlineBackend(spec, nodes, tp)   # timing only: the actors carry the payloads
        self.functional = functional
        self.checks = FunctionalChecks()
        self._payload_refs: dict[tuple[int, str], dict[int, list]] = {}
        self.nodes = nodes
        self.capacity_tier_bytes = self.shadow.capacity_tier_bytes
        self.capacity_tier_name = self.shadow.capacity_tier_name
        self.restart_ns = self.shadow.restart_ns
        self.max_restarts = self.shadow.max_restarts
        self.cluster = RayNodes(spec, nodes, run_token=run_token, bind_host=bind_host, max_restarts=max_restarts)
        self.on_node_lost = on_node_lost
        self.flush_every = flush_every
        self.max_in_flight = max_in_flight
        self._pending: dict[str, list[tuple[tuple, object]]] = {}
        self._in_flight: deque[_Batch] = deque()
        self._ddr_pending: dict[int, list[tuple[str, int]]] = {}
        self.commands = 0
        self.verified = 0
        self._stats_refs: list = []
        self._stats: list[dict] | None = None
        self.restarts = 0

    def start(self) -> None:
        self.cluster.start()
        self._pending = {name: [] for name in self.cluster.sockets}
        self._batch_numbers = {name: 0 for name in self.cluster.sockets}

    def groups(self) -> list[GroupInfo]:
        return self.shadow.groups()

    # -- commands -------------------------------------------------------------------------------
    def _enqueue(self, socket: str, command: tuple, expected: object) -> None:
        queue = self._pending[socket]
        queue.append((command, expected))
        self.commands += 1
        if len(queue) >= self.flush_every:
            self._flush(socket)

    def _flush(self, socket: str) -> None:
        queue = self._pending[socket]
        if not queue:
            return
        ref = self.cluster.sockets[socket].run_many.remote(self._batch_numbers[socket],
                                                           [command for command, _ in queue])
        self._batch_numbers[socket] += 1
        self._in_flight.append(_Batch(socket, ref, queue))
        self._pending[socket] = []
        while len(self._in_flight) > self.max_in_flight:
            self._check(self._in_flight.popleft())

    def _check(self, batch: _Batch) -> None:
        import ray

        try:
            results = ray.get(batch.ref)
        except ray.exceptions.RayTaskError as exc:
            raise ActorDivergence(f"{batch.socket} failed a command the in-process core accepted: "
                                  f"{exc.cause if hasattr(exc, 'cause') else exc}") from None
        for got, (command, expected) in zip(results, batch.expected):
            if got != expected:
                raise ActorDivergence(f"{batch.socket}: {command[0]} {command[1]!r} gave {got!r}, "
                                      f"the in-process core {expected!r}")
            self.verified += 1

    def store(self, node: int, model_id: str, nominal_bytes: int) -> None:
        self.shadow.store(node, model_id, nominal_bytes)
        if not self.functional:
            self._ddr_pending.setdefault(node, []).append((model_id, nominal_bytes))
            return
        import ray

        tp = self.shadow.tp_groups[0].tp
        ranks = {r for g in self.shadow.tp_groups for r, m in enumerate(g.members) if m.startswith(f"node{node}/")}
        shards = model_shards(model_id, tp)
        store = self.cluster.model_stores[node]
        ray.get(store.put.remote(model_id, nominal_bytes, {r: shards[r] for r in sorted(ranks)}))
        self._payload_refs[(node, model_id)] = ray.get(store.refs.remote(model_id))

    def _flush_ddr(self) -> None:
        import ray

        if self._ddr_pending:
            ray.get([self.cluster.model_stores[node].put_many.remote(models) for node, models in self._ddr_pending.items()])
            self._ddr_pending.clear()

    def copy_in(self, group: int, model_id: str, model: ModelSpec, send_ns: int,
                members: list[str] | None = None) -> dict[str, int]:
        self._flush_ddr()
        shard, arrivals = self.shadow.copy_arrivals(group, model, send_ns, members)
        ranks = {m: r for r, m in enumerate(self.shadow.tp_groups[group].members)}
        for member, arrival in arrivals.items():
            self.shadow.sockets[member].load(model_id, shard, arrival)
            refs = None
            if self.functional:  # a real copy out of the member's node's DDR store
                refs = self._payload_refs[(Topology.parse(member)[0], model_id)][ranks[member]]
            self._enqueue(member, ("load", model_id, shard, arrival, refs),
                          self.shadow.sockets[member].tiers.hbm.used_bytes)
        return arrivals

    def evict(self, group: int, model_id: str) -> None:
        for member in self.shadow.tp_groups[group].members:
            size = self.shadow.sockets[member].evict(model_id)
            self._enqueue(member, ("evict", model_id), size)

    def run(self, group: int, request: RunRequest) -> RunResult:
        result = self.shadow.run(group, request)
        members = self.shadow.tp_groups[group].members
        leader, *followers = members
        self._enqueue(leader, ("run", request), result)
        for member in followers:
            self._enqueue(member, ("follow", request, result.busy_ns), result.end_ns)
        if self.functional:
            self._run_payload(members, request)
        return result

    def span_times(self, group: int, request: SpanRequest, iterations: int) -> tuple:
        """Answered at once by the shadow (a pure query: nothing goes to the actors)."""
        return self.shadow.span_times(group, request, iterations)

    def run_span(self, group: int, request: SpanRequest) -> SpanResult:
        """The shadow executes the span; the command streams to the actors: the leader times it
        with its own cost model, the others follow, each resizing its own KV ledger entry."""
        result = self.shadow.run_span(group, request)
        leader, *followers = self.shadow.tp_groups[group].members
        self._enqueue(leader, ("run_span", request), result)
        for member in followers:
            self._enqueue(member, ("follow_span", request, result.busy_ns), result.end_ns)
        return result

    def set_kv(self, group: int, kv_bytes: int) -> None:
        self.shadow.set_kv(group, kv_bytes)
        for member in self.shadow.tp_groups[group].members:
            if member in self.shadow.sockets:
                self._enqueue(member, ("set_kv", kv_bytes), self.shadow.sockets[member].tiers.hbm.used_bytes)

    def _run_payload(self, members: list[str], request: RunRequest) -> None:
        """The batch really runs on the members' functional shards, over the gRPC plane, and is
        checked against the single-process reference."""
        import ray

        for member in members:
            self._drain(member)   # the weights it needs are loaded
        prompts, new_tokens = batch_payload(request.model_id, request.prompt_lens, request.output_lens)
        outputs = ray.get([self.cluster.sockets[m].generate.remote(
            request.model_id, tuple(members), prompts.tolist(), new_tokens, request.mode, request.orchestration, False,
            request.job_id) for m in members])
        self.checks.check(request.model_id, prompts, new_tokens, outputs[0]["tokens"], outputs[0]["logits"])

    def forward_request(self, src_node: int, dst_node: int, nbytes: int, send_ns: int) -> int:
        return self.shadow.forward_request(src_node, dst_node, nbytes, send_ns)

    # -- faults: the shadow models them, the actors live them -------------------------------------
    def _drain(self, socket: str) -> None:
        """Send and check everything queued for `socket` (before it dies)."""
        self._flush(socket)
        keep = deque()
        while self._in_flight:
            batch = self._in_flight.popleft()
            if batch.socket == socket:
                self._check(batch)
            else:
                keep.append(batch)
        self._in_flight = keep

    def abort(self, group: int, job_id: str, at_ns: int) -> None:
        self.shadow.abort(group, job_id, at_ns)
        for member in self.shadow.tp_groups[group].members:
            if member in self.shadow.sockets:
                self._enqueue(member, ("abort", job_id, at_ns), self.shadow.sockets[member].clock_ns)

    def fail_socket(self, socket: str, at_ns: int, back_at_ns: int) -> None:
        """Really kill the socket's actor process; Ray restarts it empty; it rejoins the run."""
        import ray

        self._drain(socket)
        handle = self.cluster.sockets[socket]
        ray.kill(handle, no_restart=False)
        self.cluster.restart_socket(socket)
        self._batch_numbers[socket] = 0
        self.restarts += 1
        self.shadow.fail_socket(socket, at_ns, back_at_ns)
        self._enqueue(socket, ("advance_to", back_at_ns), back_at_ns)

    def fail_node(self, node: int, at_ns: int) -> None:
        """Kill every actor of the node (sockets and DDR store) for good."""
        import ray

        doomed = [name for name in self.cluster.sockets if name.startswith(f"node{node}/")]
        hosts = {ray_node for name, ray_node in self.cluster.ray_node_of().items() if name in doomed}
        for name in doomed:
            self._drain(name)
        self.shadow.fail_node(node, at_ns)
        for name in doomed:
            ray.kill(self.cluster.sockets.pop(name), no_restart=True)
            self._pending.pop(name, None)
        ray.kill(self.cluster.model_stores[node], no_restart=True)
        self._ddr_pending.pop(node, None)
        if self.on_node_lost is not None:
            self.on_node_lost(node, hosts)

    def degrade_link(self, a: str, b: str, probability: float, at_ns: int) -> list[str]:
        links = self.shadow.degrade_link(a, b, probability, at_ns)
        for socket in self.cluster.sockets:
            self._enqueue(socket, ("degrade_link", a, b, probability, at_ns), links)
        return links

    def finish(self) -> dict:
        """Send what is left, check every answer, and collect the actors' own statistics."""
        import ray

        self._flush_ddr()
        for socket in list(self._pending):
            self._flush(socket)
        while self._in_flight:
            self._check(self._in_flight.popleft())
        snapshots = ray.get([handle.stats.remote() for handle in self.cluster.sockets.values()])
        for snapshot in snapshots:
            shadow = self.shadow.sockets[snapshot["socket"]].snapshot()
            if snapshot["clock_ns"] != shadow["clock_ns"] or snapshot["counters"] != shadow["counters"]:
                raise ActorDivergence(f"{snapshot['socket']}: final state {snapshot['counters']} at "
                                      f"{snapshot['clock_ns']} ns differs from the in-process core's")
        return {"backend": self.name, "sockets": len(snapshots), "commands": self.commands,
                "verified": self.verified, "actor_restarts": self.restarts,
                **(self.checks.to_dict() if self.functional else {})}

    def socket_snapshots(self) -> list[dict] | None:
        """The socket actors' latest statistics, without waiting: returns what the previous
        request brought back (None until the first answer) and asks again."""
        import ray

        if self._stats_refs:
            ready, _ = ray.wait(self._stats_refs, num_returns=len(self._stats_refs), timeout=0)
            if len(ready) < len(self._stats_refs):
                return self._stats
            self._stats = ray.get(self._stats_refs)
        self._stats_refs = [handle.stats.remote() for handle in self.cluster.sockets.values()]
        return self._stats

    def shutdown(self) -> None:
        self.cluster.shutdown()
