"""How to build a node's serving engine, as plain data: what a node runtime actor receives to
build the same engine the in-process backend builds, so both run the same algorithm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from rdu.scheduler.backend import ServingBackend
from rdu.scheduler.partition import PartitionResult, PartitionSpec, RoundInput, RoundOutput
from rdu.scheduler.serving_types import ServingConfig
from rdu.scheduler.workloads import Workload
from rdu.socket_actor.model_spec import ModelSpec

__all__ = ["EngineRecipe", "NodeEngine"]


class NodeEngine(Protocol):
    """The serving engine of one partition (scheduler.static or scheduler.continuous)."""

    def setup(self) -> int:
        """Store this partition's models in its capacity tiers and load what starts resident in
        HBM (the router, pinned experts); returns when that is ready (virtual ns)."""

    def start(self, setup_ns: int) -> None:
        """The workload's clock starts at `setup_ns` (the latest of every engine's set-up)."""

    def advance(self, round_input: RoundInput) -> RoundOutput: ...

    def finish(self) -> PartitionResult: ...


@dataclass(frozen=True)
class EngineRecipe:
    """Everything a partition's engine is built from, besides its backend."""

    kind: str                                  # "static" or "continuous" (resolved)
    expert_model: ModelSpec
    router_model: ModelSpec
    experts: int
    workload: Workload
    config: ServingConfig
    placement: dict[str, list[int]]            # node name -> experts its capacity tier holds
    listening: bool = True                     # produce the timeline (a run's observers need it)

    def build(self, backend: ServingBackend, partition: PartitionSpec) -> NodeEngine:
        if self.kind == "continuous":
            from rdu.scheduler.continuous import ContinuousEngine

            return ContinuousEngine(backend, partition, self)
        from rdu.scheduler.static import StaticEngine

        return StaticEngine(backend, partition, self)
