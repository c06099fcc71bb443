"""A node's host runtime as a Ray actor: it runs the serving engine of its partition against the
partition's socket actors (through node/cluster/actor_backend.py), placed with them, and answers
the cluster's ingress round by round. Plain Python; node/cluster/ray_backend.py wraps it with
`ray.remote`."""

from __future__ import annotations

from rdu.node.cluster.actor_backend import ActorDivergence, ActorNodeBackend
from rdu.node.cluster.platform import NodeSpec
from rdu.scheduler.engine_recipe import EngineRecipe
from rdu.scheduler.partition import PartitionResult, PartitionSpec, RoundInput, RoundOutput

__all__ = ["NodeRuntime"]


class NodeRuntime:
    """The engine of one partition and the cache of its sockets."""

    def __init__(self, spec: NodeSpec, nodes: int, partition: PartitionSpec, recipe: EngineRecipe,
                 sockets: dict[str, object], stores: dict[int, object], functional: bool = False,
                 flush_commands: int = 2048) -> None:
        self.partition = partition
        self.backend = ActorNodeBackend(spec, nodes, partition, sockets, stores, functional, flush_commands)
        self.engine = recipe.build(self.backend, partition)
        self.stopped = ""

    def setup(self) -> int:
        return self.engine.setup()

    def advance(self, round_input: RoundInput) -> RoundOutput:
        """One round of the engine; the socket actors' answers that are in are checked, and a
        divergence stops the run (reported, not raised: the ingress stops every partition)."""
        output = self.engine.advance(round_input)
        try:
            self.backend.collect()
        except ActorDivergence as exc:
            self.stopped = self.stopped or str(exc)
        if self.stopped:
            output.stopped = output.stopped or self.stopped
        return output

    def finish(self) -> PartitionResult:
        """The engine's totals, once every socket confirmed its share."""
        try:
            return self.engine.finish()
        except ActorDivergence as exc:
            engine = self.engine
            return PartitionResult(groups=[g.stats for g in engine.groups], metrics=getattr(engine, "metrics", None),
                                   peak_kv_bytes=[], fault_stats=dict(engine.fault_stats), backend={},
                                   stopped=str(exc))

    def pid(self) -> int:
        import os

        return os.getpid()
