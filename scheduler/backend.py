"""What the serving loop needs from a cluster, whatever runs it (Ray socket actors or the
in-process core). The scheduler never imports `node` and never touches Ray: `node` hands it an
object with these methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from socket_actor.core import RunRequest, RunResult
from socket_actor.model_spec import ModelSpec

__all__ = ["GroupInfo", "ServingBackend"]


@dataclass(frozen=True)
class GroupInfo:
    """A tensor-parallel group: its sockets (ring order), its node, the HBM each socket offers."""

    index: int
    name: str
    node: int
    members: tuple[str, ...]
    hbm_usable_bytes: int

    @property
    def tp(self) -> int:
        return len(self.members)


class ServingBackend(Protocol):
    """A cluster of TP groups on `nodes` nodes, each node with one DDR tier."""

    name: str
    nodes: int
    ddr_capacity_bytes: int      # per node
    ddr_tier_name: str

    def groups(self) -> list[GroupInfo]: ...

    def store(self, node: int, model_id: str, nominal_bytes: int) -> None:
        """Admit a model into a node's DDR (raises CapacityError when it does not fit)."""

    def copy_in(self, group: int, model_id: str, model: ModelSpec, send_ns: int) -> dict[str, int]:
        """Copy a model's shards DDR -> HBM into every member; return each member's arrival."""

    def evict(self, group: int, model_id: str) -> None:
        """Drop a model's shards from every member's HBM."""

    def run(self, group: int, request: RunRequest) -> RunResult:
        """Run a batch on every member of a group (they all start at `request.start_ns`)."""

    def forward(self, src_node: int, dst_node: int, nbytes: int, send_ns: int) -> int:
        """Carry a request's bytes between nodes over the scale-out links; return the arrival."""

    def finish(self) -> dict:
        """Wait for outstanding work, check it, and report the backend's own counters."""
