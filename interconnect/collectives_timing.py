"""Closed-form time of collectives over a tensor-parallel group, from its hop links.

Two layers. `collective_ns` is the bare ring on the links (no software cost). `timed` (and its
sum `hardware_ns`) is what the hardware and its collective library do, what the cost model
charges, and what the event-level collectives of the functional plane (interconnect.collectives,
running the algorithm `algorithm` picks) reproduce to the nanosecond: a start-up cost per
call (software, synchronisation), then an algorithm chosen by size and topology — one-shot
(every rank sends straight to every peer: one hop latency, more bytes) for small messages where
the topology has direct paths, the ring otherwise — at the achieved share of link bandwidth.
It returns the latency part (start-up + hop latencies) and the bandwidth part separately,
because a collective streamed inside a fused kernel overlaps the second with compute.

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

from rdu.interconnect.links import LinkDown, LinkSpec, path_spec, serialisation_ns
from rdu.interconnect.topology import CollectiveSpec, Topology

__all__ = ["RingTiming", "ALGORITHMS"]

ALGORITHMS = ("ring", "one_shot")


@dataclass(frozen=True)
class RingTiming:
    """Timing of collectives over `ranks` ranks connected by `hops` (member i -> member i+1).

    `direct` is the path from a rank to any peer when every pair has one of the same kind (a
    switch or a full mesh inside one node), None otherwise; `shared_egress` says whether a
    rank's copies to its peers leave through one port (a switch) or separate links (a mesh).
    """

    ranks: int
    hops: tuple[LinkSpec, ...]
    collective: CollectiveSpec = CollectiveSpec()
    direct: LinkSpec | None = None
    shared_egress: bool = True

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
        nodes = {topology.parse(m)[0] for m in members}
        direct = None
        if len(nodes) == 1 and topology.spec.p2p_kind in ("switch", "full_mesh"):
            direct = path_spec([link.spec for link in topology.path(members[0], members[1])])
        return cls(ranks=len(members), hops=hops, collective=topology.spec.collective, direct=direct,
                   shared_egress=topology.spec.p2p_kind == "switch")

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


    # -- what the hardware and its collective library do ---------------------------------------
    def _scaled(self) -> "RingTiming":
        """The same ring at the bandwidth a collective achieves on it."""
        f = self.collective.bandwidth_fraction
        return RingTiming(self.ranks, tuple(LinkSpec(h.latency_ns, h.bandwidth_bytes_per_s * f) for h in self.hops))

    def _ring_parts(self, kind: str, nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hop latencies, serialisation) of the ring algorithm at the achieved bandwidth."""
        scaled = self.__dict__.get("_scaled_ring")
        if scaled is None:   # the cost model asks per span: build the scaled ring once
            scaled = self._scaled()
            object.__setattr__(self, "_scaled_ring", scaled)
        if scaled.uniform:   # steps x (latency + chunk serialisation), split in its two parts
            hop, steps = scaled.hops[0], scaled.steps(kind)
            return (np.full_like(nbytes, float(steps * math.ceil(hop.latency_ns))),
                    steps * serialisation_ns(scaled.chunk_bytes(nbytes), hop.bandwidth_bytes_per_s))
        total = np.asarray(scaled.collective_ns(kind, nbytes), dtype=np.float64)
        latency = np.asarray(scaled.collective_ns(kind, nbytes * 0.0), dtype=np.float64) + total * 0
        return latency, total - latency

    def _one_shot_parts(self, kind: str, nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hop latency, serialisation) of one-shot: each rank sends to each peer directly.

        All-reduce sends the whole message to every peer (then each rank reduces locally); all-gather and
        reduce-scatter send one rank's share. Through a switch the copies leave through one port."""
        assert self.direct is not None
        t = self.ranks
        per_peer = nbytes if kind == "all_reduce" else np.ceil(nbytes / t)
        egress = per_peer * (t - 1) if self.shared_egress else per_peer
        bandwidth = self.direct.bandwidth_bytes_per_s * self.collective.bandwidth_fraction
        return np.full_like(nbytes, float(math.ceil(self.direct.latency_ns))), serialisation_ns(egress, bandwidth)

    def algorithm(self, nbytes: float) -> str:
        """The algorithm a collective of `nbytes` per rank uses on this group (the same choice
        `timed` makes, and the one the functional plane runs)."""
        limit = self.collective.one_shot_max_bytes
        if self.direct is not None and limit > 0 and nbytes <= limit:
            return "one_shot"
        return "ring"

    def timed(self, kind: str, nbytes) -> tuple[np.ndarray, np.ndarray]:
        """(latency ns, bandwidth ns) of collective `kind` as the hardware runs it: start-up and hop
        latencies in the first, serialisation in the second; both 0 for a single rank."""
        nbytes = np.asarray(nbytes, dtype=np.float64)
        if self.ranks == 1:
            return nbytes * 0.0, nbytes * 0.0
        latency, bandwidth = self._ring_parts(kind, nbytes)
        if self.direct is not None and self.collective.one_shot_max_bytes > 0:
            lat1, bw1 = self._one_shot_parts(kind, nbytes)
            small = nbytes <= self.collective.one_shot_max_bytes
            latency, bandwidth = np.where(small, lat1, latency), np.where(small, bw1, bandwidth)
        return latency + math.ceil(self.collective.startup_ns), bandwidth

    def hardware_ns(self, kind: str, nbytes):
        """Total time of collective `kind` on `nbytes` per rank, as the hardware runs it."""
        latency, bandwidth = self.timed(kind, nbytes)
        total = latency + bandwidth
        return total if np.ndim(total) else int(total)
