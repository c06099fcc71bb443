"""What the serving loop needs from a cluster, whatever runs it (Ray socket actors or the
in-process core). The scheduler never imports `node` and never touches Ray: `node` hands it an
object with these methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from rdu.socket_actor.core import RunRequest, RunResult, SpanRequest, SpanResult
from rdu.socket_actor.model_spec import ModelSpec

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
    capacity_tier_bytes: int      # per node
    capacity_tier_name: str
    restart_ns: float            # a failed socket is back (empty) after this long
    max_restarts: int            # restarts of one socket a run survives; one more stops the run

    def groups(self) -> list[GroupInfo]: ...

    def store(self, node: int, model_id: str, nominal_bytes: int) -> None:
        """Admit a model into a node's DDR (raises CapacityError when it does not fit)."""

    def copy_in(self, group: int, model_id: str, model: ModelSpec, send_ns: int,
                members: list[str] | None = None) -> dict[str, int]:
        """Copy a model's shards DDR -> HBM into every member (or only `members`); return each
        member's arrival."""

    def evict(self, group: int, model_id: str) -> None:
        """Drop a model's shards from every member's HBM."""

    def run(self, group: int, request: RunRequest) -> RunResult:
        """Run a batch on every member of a group (they all start at `request.start_ns`)."""

    def span_times(self, group: int, request: SpanRequest, iterations: int) -> tuple:
        """(step ns, collective ns) arrays of the span's first `iterations` steps: a pure query
        (the continuous engine picks how many iterations to run from them)."""

    def run_span(self, group: int, request: SpanRequest) -> SpanResult:
        """Execute `request.iterations` steps of a span on every member of the group (and resize
        their KV ledger entry to `request.kv_bytes`)."""

    def set_kv(self, group: int, kv_bytes: int) -> None:
        """Resize the KV ledger entry of every member (0 at the end of a run)."""

    def forward_request(self, src_node: int, dst_node: int, nbytes: int, send_ns: int) -> int:
        """Carry a request's bytes between nodes over the scale-out links; return the arrival."""

    def abort(self, group: int, job_id: str, at_ns: int) -> None:
        """Cut the group's batch in progress short at `at_ns` (a member failed)."""

    def fail_socket(self, socket: str, at_ns: int, back_at_ns: int) -> None:
        """The socket dies at `at_ns`; it is back, empty, at `back_at_ns`."""

    def fail_node(self, node: int, at_ns: int) -> None:
        """The node's sockets and DDR are gone for good."""

    def degrade_link(self, a: str, b: str, probability: float, at_ns: int) -> list[str]:
        """Links between two sockets lose messages with `probability` (1: down) from `at_ns`."""

    def finish(self) -> dict:
        """Wait for outstanding work, check it, and report the backend's own counters."""
