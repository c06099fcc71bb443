"""A tensor-parallel group seen from its sockets: the ring its collectives use, the cost model
of a model on it, and what a model shard needs in each member's HBM.

Shared by the estimate command, the in-process core and the socket actors, so that every one
of them times the same group the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from rdu.interconnect.collectives_timing import RingTiming
from rdu.interconnect.links import transmit_path
from rdu.interconnect.topology import Topology
from rdu.socket_actor.cost_model import CostModel
from rdu.socket_actor.model_spec import ModelSpec
from rdu.socket_actor.operators import kv_bytes_per_token_per_socket, shard_weight_bytes
from rdu.socket_actor.spec import SocketSpec

__all__ = ["TPGroup"]


@dataclass
class TPGroup:
    """`members` (socket names, ring order) of identical sockets wired by `topology`."""

    name: str
    members: list[str]
    socket: SocketSpec
    topology: Topology

    def __post_init__(self) -> None:
        self.ring = RingTiming.for_group(self.topology, self.members)

    @property
    def tp(self) -> int:
        return len(self.members)

    def cost_model(self, model: ModelSpec, mode: str | None = None, orchestration: str | None = None) -> CostModel:
        return CostModel(self.socket, model, self.tp, self.ring, mode, orchestration)

    def shard_bytes(self, model: ModelSpec) -> int:
        return shard_weight_bytes(model, self.tp)

    def kv_bytes(self, model: ModelSpec, tokens: int) -> int:
        """KV cache one member needs for `tokens` positions (summed over sequences)."""
        return kv_bytes_per_token_per_socket(model, self.tp) * int(tokens)

    def copy_in(self, shard_bytes: int, send_ns: int, members: list[str] | None = None) -> dict[str, int]:
        """Copy a shard from DDR into every member's HBM (or only into `members`) over the
        (contended) copy paths; return each member's arrival time."""
        return {member: transmit_path(self.topology.copy_path(member), shard_bytes, send_ns)
                for member in (self.members if members is None else members)}
