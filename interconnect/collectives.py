"""Collectives over the gRPC plane: real numerics, virtual time from the link model, and the
algorithm the timing model picks (`RingTiming.algorithm`): the ring, or one-shot for small
messages where the topology has a direct path between every pair (switch, full mesh).

* ring: every rank cuts its tensor into `t` chunks; in each step it sends one chunk to its
  successor (timed on the links of that hop, which only this rank drives) and waits for one
  from its predecessor. Reduce-scatter adds what it receives, all-gather stores it: 2 (t - 1)
  dependent steps for an all-reduce. A rank takes each chunk only from its predecessor.
* one-shot: every rank sends its whole share to every peer at once and combines what it
  receives locally, in rank order: one dependent step. Through a switch the copies leave by one
  port, interleaved (`transmit_shared`); on a full mesh each has its own link.

Sums are formed in a fixed order (ring: the order of the ring steps; one-shot: rank 0, 1, ...),
so every run gives the same bits. A collective first pays the collective library's start-up
(`CollectiveSpec.startup_ns`), then every message is timed by the link model at the bandwidth
share collectives achieve, on `timed_bytes` (the nominal size the run times by, carried in the
message header; the payload may be a much smaller functional tensor). With no other traffic the
virtual time a collective takes is exactly `RingTiming.hardware_ns` of its kind and size.

A collective completes on a rank no earlier than the timing model says it completes on the group:
on a ring with slower hops (a group across nodes) some ranks receive their last chunk before the
others, and they wait for the slowest, as the cost model's lockstep TP group does; lost messages,
contention or a late rank only ever make it later.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from rdu.interconnect.collectives_timing import RingTiming
from rdu.interconnect.grpc_plane import Mailbox, PeerClient
from rdu.interconnect.links import transmit_path, transmit_shared
from rdu.interconnect.topology import Topology
from rdu.protos import interconnect_pb2 as pb

__all__ = ["Collectives", "CollectiveResult"]


@dataclass
class CollectiveResult:
    tensor: np.ndarray
    clock_ns: int
    wire_bytes: int
    algorithm: str = "none"


class Collectives:
    """One rank's side of the collectives of the group `members` (ring order)."""

    def __init__(self, me: str, members: list[str], topology: Topology, client: PeerClient, mailbox: Mailbox,
                 timeout_s: float = 30.0) -> None:
        if me not in members:
            raise ValueError(f"{me} is not a member of {members}")
        self.me, self.members = me, list(members)
        self.ranks = len(members)
        self.rank = members.index(me)
        self.successor = members[(self.rank + 1) % self.ranks]
        self.predecessor = members[(self.rank - 1) % self.ranks]
        self.topology = topology
        self.client, self.mailbox, self.timeout_s = client, mailbox, timeout_s
        # peers in the order this rank sends to them: starting after itself, so that no rank is
        # every sender's first destination
        self.peers = [members[(self.rank + k) % self.ranks] for k in range(1, self.ranks)]
        self._successor_path = topology.path(me, self.successor) if self.ranks > 1 else []
        self._peer_paths = [topology.path(me, peer) for peer in self.peers]
        self._timing: RingTiming | None = None
        self._hardware_ns: dict[tuple[str, int], int] = {}
        self.calls = 0
        self.epoch = ""
        self.wire_bytes = 0
        self.algorithms: Counter[str] = Counter()   # collectives run with each algorithm

    @property
    def timing(self) -> RingTiming:
        """The group's timing model on this rank's view of the links (built on first use)."""
        if self._timing is None:
            self._timing = RingTiming.for_group(self.topology, self.members)
        return self._timing

    def topology_changed(self) -> None:
        """Links were degraded: time (and choose algorithms) afresh."""
        self._timing = None
        self._hardware_ns.clear()

    def begin(self, epoch: str) -> None:
        """Number the collectives that follow from 1 under `epoch` (a job id every rank knows), so
        a rank that restarted counts the same as the others."""
        self.epoch, self.calls = epoch, 0

    # -- messages -------------------------------------------------------------------------------
    def _tensor_id(self, call: int, label: str, phase: str, step: int, src: str) -> str:
        return f"{self.epoch}{call}/{label}/{phase}{step}/{src}"

    async def _send(self, call: int, kind: str, label: str, phase: str, step: int, steps: int, dst: str,
                    array: np.ndarray, send_ns: int, arrival_ns: int, timed_bytes: int) -> None:
        header = pb.TensorHeader(
            tensor_id=self._tensor_id(call, label, phase, step, self.me), dst=dst, virtual_send_ns=send_ns,
            virtual_arrival_ns=arrival_ns, timed_bytes=timed_bytes,
            step=pb.CollectiveStep(collective=kind, label=label, index=step, steps=steps))
        await self.client.send(header, array)          # buffered write: returns before the peer reads
        self.wire_bytes += array.nbytes

    async def _take(self, call: int, label: str, phase: str, step: int, src: str) -> tuple[np.ndarray, int]:
        """The tensor `src` sent this rank for this step (from `src` only), and its arrival."""
        received = await self.mailbox.take(self._tensor_id(call, label, phase, step, src), self.timeout_s,
                                           sender=src)
        return received.array, int(received.header.virtual_arrival_ns)

    def _start(self, kind: str, nbytes: int) -> tuple[str, int, float]:
        """(algorithm, start-up ns, bandwidth fraction) of a collective of `nbytes` per rank."""
        timing = self.timing
        algorithm = timing.algorithm(nbytes)
        self.algorithms[algorithm] += 1
        return algorithm, math.ceil(timing.collective.startup_ns), timing.collective.bandwidth_fraction

    def _done(self, kind: str, nbytes: int, start_ns: int, clock_ns: int) -> int:
        """This rank's clock at the end of a collective that started at `start_ns`: when its last
        message arrived, but never before the group is done by the timing model."""
        key = (kind, nbytes)
        if key not in self._hardware_ns:   # a numpy evaluation: worth remembering per size
            self._hardware_ns[key] = int(self.timing.hardware_ns(kind, nbytes))
        return max(clock_ns, start_ns + self._hardware_ns[key])

    # -- the ring -------------------------------------------------------------------------------
    async def _exchange(self, call: int, kind: str, label: str, phase: str, step: int, steps: int,
                        chunk: np.ndarray, clock_ns: int, chunk_bytes: int, fraction: float) -> tuple[np.ndarray, int]:
        """Send `chunk` to the successor and receive the predecessor's chunk of the same step."""
        arrival = transmit_path(self._successor_path, chunk_bytes, clock_ns, fraction)
        await self._send(call, kind, label, phase, step, steps, self.successor, chunk, clock_ns, arrival, chunk_bytes)
        received, arrived = await self._take(call, label, phase, step, self.predecessor)
        return received, max(clock_ns, arrived)

    async def _ring_reduce_scatter(self, call: int, kind: str, label: str, chunks: list[np.ndarray], clock_ns: int,
                                   steps: int, chunk_bytes: int, fraction: float) -> int:
        t, r = self.ranks, self.rank
        for step in range(t - 1):
            send_index, recv_index = (r - step) % t, (r - step - 1) % t
            incoming, clock_ns = await self._exchange(call, kind, label, "rs", step, steps, chunks[send_index],
                                                      clock_ns, chunk_bytes, fraction)
            chunks[recv_index] = chunks[recv_index] + incoming
        return clock_ns

    async def _ring_all_gather(self, call: int, kind: str, label: str, chunks: list[np.ndarray], owned: int,
                               clock_ns: int, steps: int, first_step: int, chunk_bytes: int, fraction: float) -> int:
        t = self.ranks
        for step in range(t - 1):
            send_index, recv_index = (owned - step) % t, (owned - step - 1) % t
            incoming, clock_ns = await self._exchange(call, kind, label, "ag", first_step + step, steps,
                                                      chunks[send_index], clock_ns, chunk_bytes, fraction)
            chunks[recv_index] = incoming
        return clock_ns

    # -- one-shot -------------------------------------------------------------------------------
    def _one_shot_arrivals(self, per_peer_bytes: int, clock_ns: int, fraction: float) -> dict[str, int]:
        """When this rank's copy to each peer arrives (link model, all sent at `clock_ns`)."""
        paths = self._peer_paths
        if self.timing.shared_egress:
            arrival = transmit_shared(paths, per_peer_bytes, clock_ns, fraction)
            return {peer: arrival for peer in self.peers}
        return {peer: transmit_path(path, per_peer_bytes, clock_ns, fraction) for peer, path in zip(self.peers, paths)}

    async def _one_shot(self, call: int, kind: str, label: str, outgoing: dict[str, np.ndarray], clock_ns: int,
                        per_peer_bytes: int, fraction: float) -> tuple[list[np.ndarray | None], int]:
        """Send `outgoing[peer]` to every peer at once; return what each rank sent this rank (by
        rank; this rank's own slot empty) and the clock once the last of it arrived."""
        arrivals = self._one_shot_arrivals(per_peer_bytes, clock_ns, fraction)
        await asyncio.gather(*(self._send(call, kind, label, "os", 0, 1, peer, outgoing[peer], clock_ns,
                                          arrivals[peer], per_peer_bytes) for peer in self.peers))
        received: list[np.ndarray | None] = [None] * self.ranks
        for peer in reversed(self.peers):   # the peer that sent to this rank first comes first
            received[self.members.index(peer)], arrived = await self._take(call, label, "os", 0, peer)
            clock_ns = max(clock_ns, arrived)
        return received, clock_ns

    @staticmethod
    def _sum_in_rank_order(parts: list[np.ndarray]) -> np.ndarray:
        """parts[0] + parts[1] + ... in that order: the same bits on every rank and every run."""
        total = np.array(parts[0], copy=True)
        for part in parts[1:]:
            total += part
        return total

    # -- the collectives ------------------------------------------------------------------------
    def _split(self, tensor: np.ndarray) -> list[np.ndarray]:
        return [np.ascontiguousarray(c) for c in np.array_split(tensor.reshape(-1), self.ranks)]

    async def all_reduce(self, tensor: np.ndarray, clock_ns: int, label: str,
                         timed_bytes: int | None = None) -> CollectiveResult:
        """Sum of every rank's `tensor`, on every rank; timed as `timed_bytes` per rank (default:
        the tensor's own size)."""
        self.calls += 1
        if self.ranks == 1:
            return CollectiveResult(tensor.copy(), clock_ns, 0)
        start_bytes = self.wire_bytes
        nbytes = tensor.nbytes if timed_bytes is None else int(timed_bytes)
        algorithm, startup_ns, fraction = self._start("all_reduce", nbytes)
        start_ns, clock_ns = clock_ns, clock_ns + startup_ns
        if algorithm == "one_shot":
            mine = np.ascontiguousarray(tensor)
            parts, clock_ns = await self._one_shot(self.calls, "all_reduce", label, dict.fromkeys(self.peers, mine),
                                                   clock_ns, nbytes, fraction)
            parts[self.rank] = mine
            result = self._sum_in_rank_order(parts).reshape(tensor.shape)
        else:
            chunks = self._split(tensor)
            steps, chunk_bytes = 2 * (self.ranks - 1), int(self.timing.chunk_bytes(nbytes))
            clock_ns = await self._ring_reduce_scatter(self.calls, "all_reduce", label, chunks, clock_ns, steps,
                                                       chunk_bytes, fraction)
            owned = (self.rank + 1) % self.ranks   # the chunk this rank holds fully reduced
            clock_ns = await self._ring_all_gather(self.calls, "all_reduce", label, chunks, owned, clock_ns, steps,
                                                   self.ranks - 1, chunk_bytes, fraction)
            result = np.concatenate(chunks).reshape(tensor.shape)
        return CollectiveResult(result.astype(tensor.dtype, copy=False),
                                self._done("all_reduce", nbytes, start_ns, clock_ns), self.wire_bytes - start_bytes,
                                algorithm)

    async def reduce_scatter(self, tensor: np.ndarray, clock_ns: int, label: str,
                             timed_bytes: int | None = None) -> CollectiveResult:
        """This rank's fully reduced chunk: chunk `(rank + 1) % t` of the flattened sum."""
        self.calls += 1
        chunks = self._split(tensor)
        owned = (self.rank + 1) % self.ranks
        if self.ranks == 1:
            return CollectiveResult(chunks[owned], clock_ns, 0)
        start_bytes = self.wire_bytes
        nbytes = tensor.nbytes if timed_bytes is None else int(timed_bytes)
        algorithm, startup_ns, fraction = self._start("reduce_scatter", nbytes)
        start_ns, clock_ns = clock_ns, clock_ns + startup_ns
        chunk_bytes = int(self.timing.chunk_bytes(nbytes))
        if algorithm == "one_shot":
            outgoing = {peer: chunks[(self.members.index(peer) + 1) % self.ranks] for peer in self.peers}
            parts, clock_ns = await self._one_shot(self.calls, "reduce_scatter", label, outgoing, clock_ns,
                                                   chunk_bytes, fraction)
            parts[self.rank] = chunks[owned]
            mine = self._sum_in_rank_order(parts)
        else:
            clock_ns = await self._ring_reduce_scatter(self.calls, "reduce_scatter", label, chunks, clock_ns,
                                                       self.ranks - 1, chunk_bytes, fraction)
            mine = chunks[owned]
        return CollectiveResult(mine, self._done("reduce_scatter", nbytes, start_ns, clock_ns),
                                self.wire_bytes - start_bytes, algorithm)

    async def all_gather(self, part: np.ndarray, clock_ns: int, label: str, axis: int = -1,
                         timed_bytes: int | None = None) -> CollectiveResult:
        """Every rank's `part`, concatenated in rank order along `axis`, on every rank; timed as a
        gathered tensor of `timed_bytes` (default: `ranks` parts)."""
        self.calls += 1
        if self.ranks == 1:
            return CollectiveResult(part.copy(), clock_ns, 0)
        start_bytes = self.wire_bytes
        nbytes = part.nbytes * self.ranks if timed_bytes is None else int(timed_bytes)
        algorithm, startup_ns, fraction = self._start("all_gather", nbytes)
        start_ns, clock_ns = clock_ns, clock_ns + startup_ns
        chunk_bytes = int(self.timing.chunk_bytes(nbytes))
        mine = np.ascontiguousarray(part)
        if algorithm == "one_shot":
            parts, clock_ns = await self._one_shot(self.calls, "all_gather", label, dict.fromkeys(self.peers, mine),
                                                   clock_ns, chunk_bytes, fraction)
        else:
            parts = [np.empty(0)] * self.ranks
            parts[self.rank] = mine
            clock_ns = await self._ring_all_gather(self.calls, "all_gather", label, parts, self.rank, clock_ns,
                                                   self.ranks - 1, 0, chunk_bytes, fraction)
        parts[self.rank] = mine
        return CollectiveResult(np.concatenate(parts, axis=axis), self._done("all_gather", nbytes, start_ns, clock_ns),
                                self.wire_bytes - start_bytes, algorithm)

