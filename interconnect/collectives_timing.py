"""Closed-form time of ring collectives over a tensor-parallel group, from its hop links.

A ring collective over `t` ranks moves the payload in `t` chunks; every step each rank sends
one chunk to its successor, all hops at once. Reduce-scatter and all-gather take `t - 1` steps,
all-reduce (reduce-scatter then all-gather) `2 (t - 1)`. A step lasts as long as its slowest hop:
latency plus one chunk's serialisation. The event-level collectives in `interconnect.collectives`
must land on exactly these numbers when nothing else contends for the links.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from interconnect.links import LinkSpec, path_spec, serialisation_ns
from interconnect.topology import Topology

__all__ = ["RingTiming"]


@dataclass(frozen=True)
class RingTiming:
    """Timing of ring collectives over `ranks` ranks connected by `hops` (member i -> member i+1)."""

    ranks: int
    hops: tuple[LinkSpec, ...]

    @classmethod
    def for_group(cls, topology: Topology, members: list[str]) -> "RingTiming":
        """Ring in the order of `members`; each hop is the path from a member to the next."""
        if len(members) == 1:
            return cls(ranks=1, hops=())
        hops = tuple(path_spec([link.spec for link in topology.path(src, members[(i + 1) % len(members)])])
                     for i, src in enumerate(members))
        # identical hops time identically: keep one of each to make every call cheap
        return cls(ranks=len(members), hops=tuple(dict.fromkeys(hops)))

    def chunk_bytes(self, nbytes):
        """Bytes of the largest of the `ranks` chunks a payload is cut into."""
        if isinstance(nbytes, np.ndarray):
            return np.ceil(nbytes / self.ranks)
        return -(-int(nbytes) // self.ranks)

    def step_ns(self, nbytes):
        """One ring step: the slowest hop's latency plus the serialisation of one chunk."""
        chunk = self.chunk_bytes(nbytes)
        times = [math.ceil(hop.latency_ns) + serialisation_ns(chunk, hop.bandwidth_bytes_per_s) for hop in self.hops]
        if isinstance(nbytes, np.ndarray):
            return np.maximum.reduce(times)
        return max(times)

    def steps(self, kind: str) -> int:
        per_phase = self.ranks - 1
        return {"all_reduce": 2 * per_phase, "reduce_scatter": per_phase, "all_gather": per_phase}[kind]

    def collective_ns(self, kind: str, nbytes):
        """Time of collective `kind` on a payload of `nbytes` per rank (0 for a single rank)."""
        if self.ranks == 1:
            return nbytes * 0 if isinstance(nbytes, np.ndarray) else 0
        return self.steps(kind) * self.step_ns(nbytes)

    def wire_bytes(self, kind: str, nbytes):
        """Bytes each rank puts on the wire for collective `kind`."""
        if self.ranks == 1:
            return nbytes * 0
        return self.steps(kind) * self.chunk_bytes(nbytes)
