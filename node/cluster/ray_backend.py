"""The Ray backend: a run partitioned across Ray workers.

Each emulated node is a placement group holding its socket actors and its model store actor;
each partition of the cluster (a node, or the nodes one TP group spans) gets a node runtime actor
placed with them that runs the partition's serving engine (node_runtime.py) against its socket
actors, which hold the sockets' state and confirm every command (actor_backend.py). The driver
is the cluster's ingress: it routes requests and gathers what the runtimes report, round by
round (scheduler/ingress.py). The algorithm is the in-process backend's, so the results are
identical; the work of the nodes runs in as many processes as there are partitions.
"""

from __future__ import annotations

from collections.abc import Callable

from rdu.node.cluster.emulated_cluster import EmulatedCluster
from rdu.node.cluster.node_runtime import NodeRuntime
from rdu.node.cluster.platform import NodeSpec
from rdu.node.cluster.ray_nodes import RayNodes
from rdu.scheduler.engine_recipe import EngineRecipe
from rdu.scheduler.partition import PartitionResult, PartitionSpec, RoundInput, RoundOutput, partition_groups

__all__ = ["RayCluster", "RayRunner"]


class RayRunner:
    """Node runtime actors, each hosting the engines of one or more partitions; a round is one
    call to each, in parallel."""

    def __init__(self, cluster: "RayCluster", recipe: EngineRecipe) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.partitions = partition_groups(cluster.groups())
        actors = cluster.actors
        runtime = ray.remote(NodeRuntime)
        self.hosted = runtime_blocks(self.partitions, cluster.host_of_node, cluster.runtime_slots)
        self.runtimes = []
        for block in self.hosted:
            specs = [self.partitions[i] for i in block]
            strategy = PlacementGroupSchedulingStrategy(actors.placement_groups[specs[0].nodes[0]],
                                                        placement_group_bundle_index=0)
            self.runtimes.append(runtime.options(num_cpus=0, scheduling_strategy=strategy, max_restarts=0).remote(
                cluster.spec, cluster.nodes, specs, recipe, actors.sockets,
                {n: actors.model_stores[n] for p in specs for n in p.nodes}, cluster.functional,
                cluster.flush_commands))

    def _calls(self, method: str, partitions, args=None) -> dict:
        """Call `method` on every runtime hosting one of `partitions` (with its share of `args`,
        a dict by partition), in parallel; their answers merged by partition."""
        import ray

        refs = []
        for runtime, block in zip(self.runtimes, self.hosted):
            mine = [i for i in block if i in partitions]
            if mine:
                share = {i: args[i] for i in mine} if args is not None else mine
                refs.append(getattr(runtime, method).remote(share))
        answers: dict = {}
        for part in ray.get(refs):
            answers.update(part)
        return answers

    def setup(self) -> list[int]:
        import ray

        answers: dict = {}
        for part in ray.get([r.setup.remote() for r in self.runtimes]):
            answers.update(part)
        return [answers[i] for i in range(len(self.partitions))]

    def round(self, inputs: dict[int, RoundInput]) -> dict[int, RoundOutput]:
        return self._calls("advance", set(inputs), inputs)

    def finish(self, partitions: list[int]) -> dict[int, PartitionResult]:
        return self._calls("finish", set(partitions))

    def close(self) -> None:
        import ray

        for runtime in self.runtimes:
            ray.kill(runtime, no_restart=True)
        self.runtimes = []


def runtime_blocks(partitions: list[PartitionSpec], host_of_node: dict[int, str],
                   slots: dict[str, int]) -> list[list[int]]:
    """Which partitions each node runtime hosts: the partitions whose nodes share a Ray node are
    split into as many runtimes as that Ray node has CPUs (a runtime per partition when there
    are enough), each runtime placed with its partitions' sockets."""
    by_host: dict[str, list[int]] = {}
    for spec in partitions:
        by_host.setdefault(host_of_node[spec.nodes[0]], []).append(spec.index)
    blocks = []
    for host, indices in by_host.items():
        count = max(1, min(len(indices), slots.get(host, 1)))
        size = -(-len(indices) // count)
        blocks += [indices[i:i + size] for i in range(0, len(indices), size)]
    return sorted(blocks)


class RayCluster(EmulatedCluster):
    """Emulated nodes on Ray: socket actors, model stores, and node runtimes for a run."""

    name = "ray"

    def __init__(self, spec: NodeSpec, nodes: int, tp: int, run_token: str = "", bind_host: str = "127.0.0.1",
                 max_restarts: int = 0, functional: bool = False, flush_commands: int = 2048,
                 on_node_lost: Callable[[int, set[str]], None] | None = None) -> None:
        """`on_node_lost(node, ray_node_ids)` is called when a kill-node fault has taken an
        emulated node's actors, with the Ray nodes that hosted them (tests take those Ray nodes
        away as well)."""
        super().__init__(spec, nodes, tp, functional)
        self.flush_commands = flush_commands
        self.on_node_lost = on_node_lost
        self.actors = RayNodes(spec, nodes, run_token=run_token, bind_host=bind_host, max_restarts=max_restarts)
        self.runner: RayRunner | None = None
        self._hosts: dict[str, str] = {}
        self.host_of_node: dict[int, str] = {}
        self.runtime_slots: dict[str, int] = {}
        self._stats_refs: list = []
        self._stats: list[dict] | None = None

    def launch(self) -> None:
        """Start every socket actor, model store and the peer registry; learn where they landed
        (node runtimes go with them: as many per Ray node as it has CPUs, see `runtime_blocks`)."""
        import ray

        self.actors.start()
        self._hosts = self.actors.ray_node_of()
        self.host_of_node = {n: self._hosts[f"node{n}/socket0"] for n in range(self.nodes)}
        self.runtime_slots = {node["NodeID"]: int(node["Resources"].get("CPU", 1))
                              for node in ray.nodes() if node.get("Alive")}

    def lost_node(self, node: int) -> None:
        """A kill-node fault took `node` (its runtime killed its actors)."""
        if self.on_node_lost is not None:
            hosts = {host for name, host in self._hosts.items() if name.startswith(f"node{node}/")}
            self.on_node_lost(node, hosts)

    def start(self, recipe: EngineRecipe) -> RayRunner:
        self.runner = RayRunner(self, recipe)
        return self.runner

    def socket_snapshots(self) -> list[dict] | None:
        """The socket actors' latest statistics, without waiting: returns what the previous
        request brought back (None until the first answer) and asks again."""
        import ray

        if self._stats_refs:
            ready, _ = ray.wait(self._stats_refs, num_returns=len(self._stats_refs), timeout=0)
            if len(ready) < len(self._stats_refs):
                return self._stats
            try:
                self._stats = ray.get(self._stats_refs)
            except ray.exceptions.RayError:
                self._stats_refs = []
                return self._stats   # a socket died (a fault): ask the living next time
        self._stats_refs = [handle.stats.remote() for handle in self.actors.sockets.values()]
        return self._stats

    def shutdown(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.actors.shutdown()
