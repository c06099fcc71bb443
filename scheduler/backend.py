"""What the serving engines need from a cluster, whatever runs it (Ray actors or the in-process
core). The scheduler never imports `node` and never touches Ray: `node` hands it a `Cluster`.

A `Cluster` is cut into partitions (scheduler/partition.py): each runs one engine against a
`ServingBackend` holding the sockets and capacity tiers of its nodes. A `PartitionRunner` runs
the engines (in this process, or in node runtime actors) and passes rounds to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from rdu.socket_actor.core import RunRequest, RunResult, SpanRequest, SpanResult
from rdu.socket_actor.model_spec import ModelSpec

if TYPE_CHECKING:
    from rdu.scheduler.engine_recipe import EngineRecipe
    from rdu.scheduler.partition import PartitionResult, PartitionSpec, RoundInput, RoundOutput

__all__ = ["GroupInfo", "ServingBackend", "Cluster", "PartitionRunner"]


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
    """The sockets and capacity tiers of one partition's nodes, as an engine drives them."""

    restart_ns: float            # a failed socket is back (empty) after this long
    max_restarts: int            # restarts of one socket a run survives; one more stops the run
    functional: bool             # batches also carry functional payloads

    def store(self, node: int, model_id: str, nominal_bytes: int) -> None:
        """Admit a model into a node's capacity tier (raises CapacityError when it does not fit)."""

    def copy_in(self, group: int, model_id: str, model: ModelSpec, send_ns: int,
                members: Sequence[str] | None = None) -> dict[str, int]:
        """Copy a model's shards capacity tier -> HBM into every member (or only `members`);
        return each member's arrival."""

    def evict(self, group: int, model_id: str) -> None:
        """Drop a model's shards from every member's HBM."""

    def run(self, group: int, request: RunRequest) -> RunResult:
        """Run a static batch on every member of a group (they all start at `request.start_ns`)."""

    def span_times(self, group: int, request: SpanRequest, iterations: int) -> tuple:
        """(step ns, collective ns) arrays of the span's first `iterations` steps: a pure query
        (the continuous engine picks how many iterations to run from them)."""

    def run_span(self, group: int, request: SpanRequest) -> SpanResult:
        """Execute `request.iterations` steps of a span on every member of the group (and resize
        their KV ledger entry to `request.kv_bytes`)."""

    def truncate_span(self, group: int, request: SpanRequest, iterations: int, at_ns: int) -> None:
        """A member failed at `at_ns`: the span keeps its first `iterations` steps (those that
        ended by then) on the surviving members, which are idle from `at_ns`."""

    def set_kv(self, group: int, kv_bytes: int) -> None:
        """Resize the KV ledger entry of every member (0 at the end of a run)."""

    def move_kv(self, group: int, kv_bytes: int, send_ns: int, to_hbm: bool) -> int:
        """Copy `kv_bytes` of KV per member between HBM and the capacity tier (a swap); return
        when the last member's copy lands."""

    def abort(self, group: int, job_id: str, at_ns: int) -> None:
        """Cut the group's static batch in progress short at `at_ns` (a member failed)."""

    def fail_socket(self, socket: str, at_ns: int, back_at_ns: int) -> None:
        """The socket dies at `at_ns`; it is back, empty, at `back_at_ns`."""

    def fail_node(self, node: int, at_ns: int) -> None:
        """The node's sockets and capacity tier are gone for good."""

    def degrade_link(self, a: str, b: str, probability: float, at_ns: int) -> list[str]:
        """Links between two sockets lose messages with `probability` (1: down) from `at_ns`."""

    def finish(self) -> dict:
        """Wait for outstanding work, check it, and report the backend's own counters."""


class PartitionRunner(Protocol):
    """Runs one engine per partition and carries rounds to them, in order."""

    partitions: list["PartitionSpec"]

    def setup(self) -> list[int]:
        """Every engine loads what starts resident; when each is ready (virtual ns)."""

    def round(self, inputs: dict[int, "RoundInput"]) -> dict[int, "RoundOutput"]:
        """Advance the engines of these partitions (by index) as their inputs say."""

    def finish(self, partitions: list[int]) -> dict[int, "PartitionResult"]:
        """These engines' totals (also after a stop or an interrupt); they get no more rounds."""

    def close(self) -> None:
        """Release what the runner holds (actors); idempotent."""


class Cluster(Protocol):
    """An emulated cluster: its TP groups, its capacity tiers, and engines run against it."""

    name: str
    nodes: int
    capacity_tier_bytes: int     # per node
    capacity_tier_name: str
    functional: bool

    def groups(self) -> list[GroupInfo]: ...

    def forward_request(self, src_node: int, dst_node: int, nbytes: int, send_ns: int) -> int:
        """Carry a request's bytes between nodes over the scale-out fabric; return the arrival."""

    def degrade_fabric(self, a: str, b: str, probability: float, at_ns: int) -> None:
        """The fabric's view of a drop-link fault (the links requests are forwarded on)."""

    def lost_node(self, node: int) -> None:
        """A kill-node fault took `node` (its engine already failed its sockets and tier)."""

    def start(self, recipe: "EngineRecipe") -> PartitionRunner:
        """Build one engine per partition (scheduler.partition.partition_groups) from `recipe`."""
