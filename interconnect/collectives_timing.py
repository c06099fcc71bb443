"""Closed-form time of ring collectives over a tensor-parallel group, from its hop links.

A ring collective over `t` ranks moves the payload in `t` chunks; every step each rank sends
one chunk to its successor, all hops at once. Reduce-scatter and all-gather take `t - 1` steps,
all-reduce (reduce-scatter then all-gather) `2 (t - 1)`. On a uniform ring a step is one hop's
latency plus one chunk's serialisation; on a ring with slower hops (a group spanning nodes) the
time until the last rank is done follows the same per-rank recurrence as the event-level
collectives in `interconnect.collectives`, which must land on exactly these numbers when nothing
else contends for the links.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from interconnect.links import LinkDown, LinkSpec, path_spec, serialisation_ns
from interconnect.topology import Topology

__all__ = ["RingTiming"]


@dataclass(frozen=True)
class RingTiming:
    """Timing of ring collectives over `ranks` ranks connected by `hops` (member i -> member i+1)."""

    ranks: int
    hops: tuple[LinkSpec, ...]

    def __post_init__(self) -> None:
        # identical hops time identically; knowing it once makes every call cheap
        object.__setattr__(self, "_uniform", len(set(self.hops)) <= 1)

    @classmethod
    def for_group(cls, topology: Topology, members: list[str]) -> "RingTiming":
        """Ring in the order of `members`; each hop is the path from a member to the next."""
        if len(members) == 1:
            return cls(ranks=1, hops=())
        paths = [topology.path(src, members[(i + 1) % len(members)]) for i, src in enumerate(members)]
        for link in (link for path in paths for link in path):
            if link.down_since_ns is not None:
                raise LinkDown(f"link {link.name} of the ring {members[0]}..{members[-1]} is down since "
                               f"{link.down_since_ns} ns: every message is lost")
        hops = tuple(path_spec([link.spec for link in path]) for path in paths)
        return cls(ranks=len(members), hops=hops)

    @property
    def uniform(self) -> bool:
        return self._uniform

    def chunk_bytes(self, nbytes):
        """Bytes of the largest of the `ranks` chunks a payload is cut into."""
        if isinstance(nbytes, np.ndarray):
            return np.ceil(nbytes / self.ranks)
        return -(-int(nbytes) // self.ranks)

    def _finish_ns(self, nbytes, steps: int):
        """Time until the last rank finishes `steps` ring steps, all ranks starting together.

        Rank i sends when its clock and its outgoing link allow, and its successor's clock moves
        to the later of its own and the chunk's arrival: the same recurrence the event-level
        collectives follow, so both agree to the nanosecond. Uniform rings reduce to
        ``steps * (latency + chunk / bandwidth)``.
        """
        chunk = self.chunk_bytes(nbytes)
        if self.uniform:
            hop = self.hops[0]
            return steps * (math.ceil(hop.latency_ns) + serialisation_ns(chunk, hop.bandwidth_bytes_per_s))
        t = self.ranks
        ser = [serialisation_ns(chunk, hop.bandwidth_bytes_per_s) for hop in self.hops]
        lat = [math.ceil(hop.latency_ns) for hop in self.hops]
        zero = chunk * 0
        clock, free = [zero] * t, [zero] * t
        for _ in range(steps):
            start = [np.maximum(clock[i], free[i]) for i in range(t)]
            free = [start[i] + ser[i] for i in range(t)]
            arrival = [start[i] + lat[i] + ser[i] for i in range(t)]
            clock = [np.maximum(clock[i], arrival[i - 1]) for i in range(t)]
        finish = np.maximum.reduce(clock)
        return finish if isinstance(nbytes, np.ndarray) else int(finish)

    def steps(self, kind: str) -> int:
        per_phase = self.ranks - 1
        return {"all_reduce": 2 * per_phase, "reduce_scatter": per_phase, "all_gather": per_phase}[kind]

    def collective_ns(self, kind: str, nbytes):
        """Time of collective `kind` on a payload of `nbytes` per rank (0 for a single rank)."""
        if self.ranks == 1:
            return nbytes * 0 if isinstance(nbytes, np.ndarray) else 0
        return self._finish_ns(nbytes, self.steps(kind))

    def collectives_ns(self, kinds: list[str], nbytes: np.ndarray) -> np.ndarray:
        """`collective_ns` of several collectives at once: column j of `nbytes` is of kind j."""
        if self.ranks == 1:
            return np.zeros_like(nbytes)
        if not self.uniform:
            return np.column_stack([self.collective_ns(kind, nbytes[:, j]) for j, kind in enumerate(kinds)])
        hop = self.hops[0]
        steps = np.array([self.steps(kind) for kind in kinds], dtype=np.float64)
        return steps * (math.ceil(hop.latency_ns) + serialisation_ns(self.chunk_bytes(nbytes), hop.bandwidth_bytes_per_s))

    def wire_bytes(self, kind: str, nbytes):
        """Bytes each rank puts on the wire for collective `kind`."""
        if self.ranks == 1:
            return nbytes * 0
        return self.steps(kind) * self.chunk_bytes(nbytes)
