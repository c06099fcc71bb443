"""The in-process backend: every engine, socket core, capacity tier and link of the cluster in
this process.

It runs exactly the algorithm the Ray backend runs — one engine per partition of the cluster,
advanced round by round by the ingress — in one process: the fast path for laptops and very
large sweeps (thousands of sockets in timing mode). A TP group's members are identical, so a
batch is timed once per group and the result applied to every member's core.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from rdu.interconnect.links import transmit_path
from rdu.interconnect.topology import Topology
from rdu.node.cluster.emulated_cluster import EmulatedCluster
from rdu.node.cluster.model_store import ModelStore
from rdu.node.cluster.platform import NodeSpec
from rdu.scheduler.backend import GroupInfo
from rdu.scheduler.engine_recipe import EngineRecipe
from rdu.scheduler.partition import PartitionResult, PartitionSpec, RoundInput, RoundOutput, partition_groups
from rdu.socket_actor.core import RunRequest, RunResult, SocketCore, SpanRequest, SpanResult, span_tokens
from rdu.socket_actor.cost_model import Timing
from rdu.socket_actor.functional_payload import FunctionalChecks, in_process_tp, model_shards, request_payload
from rdu.socket_actor.model_spec import ModelSpec
from rdu.socket_actor.operators import shard_weight_bytes
from rdu.socket_actor.tp_group import TPGroup

__all__ = ["InlineCluster", "InlineNodeBackend", "InlineRunner"]

_CACHE_ENTRIES = 4096


class InlineNodeBackend:
    """The sockets and capacity tiers of one partition's nodes, in this process."""

    name = "inline"

    def __init__(self, spec: NodeSpec, nodes: int, partition: PartitionSpec, functional: bool = False) -> None:
        """With `functional`, every model also carries its functional payload: switches copy its
        shards into the members' HBM buffers and every batch really generates (in-process TP)."""
        self.spec = spec
        self.partition = partition
        self.functional = functional
        self.payloads_here = functional   # the payloads run in this process (not on socket actors)
        self.checks = FunctionalChecks()
        self.restart_ns = spec.socket.restart_ns
        self.max_restarts = spec.socket.max_restarts
        self.topology = Topology(spec.links, nodes, spec.sockets_per_node, only_nodes=partition.nodes)
        self.tp_groups = {info.index: TPGroup(name=info.name, members=list(info.members), socket=spec.socket,
                                              topology=self.topology) for info in partition.groups}
        self.sockets = {name: SocketCore(name, spec.socket, self.topology)
                        for group in self.tp_groups.values() for name in group.members}
        self.stores = {n: ModelStore(f"node{n}", spec.capacity_tier_bytes, spec.capacity_tier_name)
                       for n in partition.nodes}
        self._timings: OrderedDict[tuple, Timing] = OrderedDict()
        self._span_key: tuple | None = None
        self._span_steps: tuple | None = None

    def store(self, node: int, model_id: str, nominal_bytes: int) -> None:
        self.stores[node].put(model_id, nominal_bytes)

    def copy_arrivals(self, group: int, model: ModelSpec, send_ns: int,
                      members: Sequence[str] | None = None) -> tuple[int, dict[str, int]]:
        """(shard bytes, arrival per member) of a capacity tier -> HBM copy over the contended
        copy paths into every member of a group (or only into `members`)."""
        tp_group = self.tp_groups[group]
        shard = shard_weight_bytes(model, tp_group.tp)
        return shard, tp_group.copy_in(shard, send_ns, list(members) if members is not None else None)

    def copy_in(self, group: int, model_id: str, model: ModelSpec, send_ns: int,
                members: Sequence[str] | None = None) -> dict[str, int]:
        shard, arrivals = self.copy_arrivals(group, model, send_ns, members)
        payloads = self._payloads(group, model_id)
        for member, arrival in arrivals.items():
            self.sockets[member].load(model_id, shard, arrival, payloads.get(member))
        return arrivals

    def _payloads(self, group: int, model_id: str) -> dict[str, object]:
        """Each member's functional shard of `model_id` (none in timing mode)."""
        if not self.payloads_here:
            return {}
        members = self.tp_groups[group].members
        return dict(zip(members, model_shards(model_id, len(members))))

    def evict(self, group: int, model_id: str) -> None:
        for member in self.tp_groups[group].members:
            self.sockets[member].evict(model_id)

    def _timing(self, request: RunRequest) -> Timing:
        key = (request.model, request.members, request.prompt_lens, request.output_lens, request.mode,
               request.orchestration)
        cached = self._timings.get(key)
        if cached is None:
            cached = self.sockets[request.members[0]].timing(request)
            self._timings[key] = cached
            if len(self._timings) > _CACHE_ENTRIES:
                self._timings.popitem(last=False)
        return cached

    def run(self, group: int, request: RunRequest) -> RunResult:
        """The group's first member times the batch; the others follow its schedule."""
        leader, *followers = self.tp_groups[group].members
        result = self.sockets[leader].run(request, self._timing(request))
        for member in followers:
            self.sockets[member].follow(request, result.busy_ns)
        self._run_payload(group, request)
        return result

    def _run_payload(self, group: int, request: RunRequest | SpanRequest) -> None:
        """A functional run in this process: the batch's payload really generates with the
        members' shards (collectives summed in-process), checked against the reference."""
        if not self.payloads_here:
            return
        shards = [self.sockets[m].residents[request.model_id].weights for m in self.tp_groups[group].members]
        prompts, new_tokens = request_payload(request)
        ids, logits = in_process_tp(shards, prompts, new_tokens)
        self.checks.check(request.model_id, prompts, new_tokens, ids, logits)

    def span_times(self, group: int, request: SpanRequest, iterations: int) -> tuple:
        """The leader's timing of the span's first `iterations` steps; the last answer is kept, so
        executing the span the engine just timed costs no second evaluation."""
        key = request.timing_key()
        if self._span_key == key and len(self._span_steps[0]) >= iterations:
            steps, coll = self._span_steps
            return steps[:iterations], coll[:iterations]
        steps, coll = self.sockets[request.members[0]].span_times(request, iterations)
        self._span_key, self._span_steps = key, (steps, coll)
        return steps, coll

    def run_span(self, group: int, request: SpanRequest) -> SpanResult:
        """Every member executes the span with the leader's timing."""
        steps, coll = self.span_times(group, request, request.iterations)
        busy = int(steps.sum())
        results = [self.sockets[m].run_span(request, busy) for m in self.tp_groups[group].members]
        self._run_payload(group, request)
        r = results[0]
        return SpanResult(r.job_id, r.socket, r.start_ns, r.end_ns, busy, int(np.rint(coll).sum()))

    def truncated(self, group: int, request: SpanRequest, iterations: int) -> tuple[int, int]:
        """The busy time and tokens of a span's first `iterations` steps."""
        steps, _ = self.span_times(group, request, request.iterations)
        return int(steps[:iterations].sum()), span_tokens(request, iterations)

    def truncate_span(self, group: int, request: SpanRequest, iterations: int, at_ns: int) -> None:
        busy, tokens = self.truncated(group, request, iterations)
        for member in self.tp_groups[group].members:
            if member in self.sockets:
                self.sockets[member].truncate_span(request.job_id, iterations, busy, tokens, at_ns)

    def set_kv(self, group: int, kv_bytes: int) -> None:
        for member in self.tp_groups[group].members:
            if member in self.sockets:
                self.sockets[member].set_kv(kv_bytes)

    def move_kv(self, group: int, kv_bytes: int, send_ns: int, to_hbm: bool) -> int:
        """A swap: every member's share crosses its copy path (shared with switches)."""
        return max(transmit_path(self.topology.copy_path(member), kv_bytes, send_ns)
                   for member in self.tp_groups[group].members)

    # -- faults -----------------------------------------------------------------------------------
    def abort(self, group: int, job_id: str, at_ns: int) -> None:
        """A member failed: cut the group's batch in progress short on its surviving members."""
        for member in self.tp_groups[group].members:
            if member in self.sockets:
                self.sockets[member].abort(job_id, at_ns)

    def fail_socket(self, socket: str, at_ns: int, back_at_ns: int) -> None:
        """The socket dies at `at_ns` and comes back empty (HBM lost) at `back_at_ns`."""
        fresh = SocketCore(socket, self.spec.socket, self.topology)
        fresh.advance_to(back_at_ns)
        self.sockets[socket] = fresh

    def fail_node(self, node: int, at_ns: int) -> None:
        """The node is gone: its sockets and its capacity tier."""
        for name in [n for n in self.sockets if Topology.parse(n)[0] == node]:
            del self.sockets[name]
        self.stores[node] = ModelStore(f"node{node}", 0, self.spec.capacity_tier_name)

    def degrade_link(self, a: str, b: str, probability: float, at_ns: int) -> list[str]:
        """This partition's links between `a` and `b` lose messages (those it has)."""
        try:
            links = self.topology.degrade(a, b, probability, at_ns)
        except KeyError:
            return []   # the path runs through nodes this partition does not hold
        for core in self.sockets.values():
            core.topology_changed()
        self._timings.clear()
        self._span_key = None
        return links

    def finish(self) -> dict:
        return {"backend": self.name, "sockets": len(self.sockets),
                **(self.checks.to_dict() if self.functional else {})}

    def socket_snapshots(self) -> list[dict]:
        return [core.snapshot() for core in self.sockets.values()]


class InlineRunner:
    """One engine per partition, all in this process."""

    def __init__(self, spec: NodeSpec, nodes: int, groups: list[GroupInfo], recipe: EngineRecipe,
                 functional: bool) -> None:
        self.partitions = partition_groups(groups)
        self.backends = [InlineNodeBackend(spec, nodes, p, functional) for p in self.partitions]
        self.engines = [recipe.build(b, p) for b, p in zip(self.backends, self.partitions)]

    def setup(self) -> list[int]:
        return [engine.setup() for engine in self.engines]

    def round(self, inputs: dict[int, RoundInput]) -> dict[int, RoundOutput]:
        return {i: self.engines[i].advance(round_input) for i, round_input in inputs.items()}

    def finish(self, partitions: list[int]) -> dict[int, PartitionResult]:
        return {i: self.engines[i].finish() for i in partitions}

    def close(self) -> None:
        pass


class InlineCluster(EmulatedCluster):
    """A cluster of `nodes` nodes of `spec`, cut into TP groups of `tp`, served in this process."""

    name = "inline"

    def __init__(self, spec: NodeSpec, nodes: int, tp: int, functional: bool = False) -> None:
        super().__init__(spec, nodes, tp, functional)
        self.runner: InlineRunner | None = None

    def start(self, recipe: EngineRecipe) -> InlineRunner:
        self.runner = InlineRunner(self.spec, self.nodes, self._groups, recipe, self.functional)
        return self.runner

    @property
    def sockets(self) -> dict[str, SocketCore]:
        """Every socket core of the running engines (for tests and the dashboard)."""
        return {name: core for b in (self.runner.backends if self.runner else []) for name, core in b.sockets.items()}

    def socket_snapshots(self) -> list[dict]:
        return [core.snapshot() for core in self.sockets.values()]
