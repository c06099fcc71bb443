"""A node's host runtime as a Ray actor: it runs the serving engine of its partition against the
partition's socket actors (through node/cluster/actor_backend.py), placed with them, and answers
the cluster's ingress round by round. Plain Python; node/cluster/ray_backend.py wraps it with
`ray.remote`."""

from __future__ import annotations

import time

from rdu.node.cluster.actor_backend import ActorDivergence, ActorNodeBackend
from rdu.node.cluster.platform import NodeSpec
from rdu.scheduler.engine_recipe import EngineRecipe
from rdu.scheduler.partition import PartitionResult, PartitionSpec, RoundInput, RoundOutput

__all__ = ["NodeRuntime"]


class NodeRuntime:
    """The engines of the partitions this runtime hosts (one, or several whose nodes share a Ray
    node), each with the cache of its sockets."""

    def __init__(self, spec: NodeSpec, nodes: int, partitions: list[PartitionSpec], recipe: EngineRecipe,
                 sockets: dict[str, object], stores: dict[int, object], functional: bool = False,
                 flush_commands: int = 2048) -> None:
        self.backends = {p.index: ActorNodeBackend(spec, nodes, p, {m: sockets[m] for g in p.groups for m in g.members},
                                                   {n: stores[n] for n in p.nodes}, functional, flush_commands)
                         for p in partitions}
        self.engines = {p.index: recipe.build(self.backends[p.index], p) for p in partitions}
        self.stopped = ""
        # the emulator's own measurements, never a result: CPU and wall this runtime spent in rounds
        self.cpu_s = 0.0
        self.wall_s = 0.0

    def setup(self) -> dict[int, int]:
        return {i: engine.setup() for i, engine in self.engines.items()}

    def advance(self, inputs: dict[int, RoundInput]) -> dict[int, RoundOutput]:
        """One round of each engine; the socket actors' answers that are in are checked, and a
        divergence stops the run (reported, not raised: the ingress stops every partition)."""
        started, started_wall = time.process_time(), time.perf_counter()
        outputs = {i: self.engines[i].advance(round_input) for i, round_input in inputs.items()}
        for i in inputs:
            try:
                self.backends[i].collect()
            except ActorDivergence as exc:
                self.stopped = self.stopped or str(exc)
        for output in outputs.values():
            output.stopped = output.stopped or self.stopped
        self.cpu_s += time.process_time() - started
        self.wall_s += time.perf_counter() - started_wall
        return outputs

    def memory(self) -> dict:
        """This runtime's process memory (the emulator's own measurement: `make bench`)."""
        from rdu.socket_actor.actor import process_memory

        return process_memory()

    def finish(self, partitions: list[int]) -> dict[int, PartitionResult]:
        """These engines' totals, once every socket confirmed its share."""
        results = {}
        for i in partitions:
            engine = self.engines[i]
            try:
                results[i] = engine.finish()
                results[i].backend["runtime_cpu_max_s"] = round(self.cpu_s, 3)
                results[i].backend["runtime_wall_max_s"] = round(self.wall_s, 3)
            except ActorDivergence as exc:
                results[i] = PartitionResult(groups=[g.stats for g in engine.groups],
                                             metrics=getattr(engine, "metrics", None), peak_kv_bytes=[],
                                             fault_stats=dict(engine.fault_stats), backend={}, stopped=str(exc))
        return results
