"""Ring collectives over the gRPC plane: real numerics, virtual time from the link model.

Every rank cuts its tensor into `t` chunks. In each step a rank sends one chunk to its successor
(timed on the links of that hop, which this rank is the only one to drive in a ring) and waits
for one from its predecessor; its clock moves to the later of its own time and the chunk's
arrival. Reduce-scatter adds what it receives; all-gather stores it. A rank takes each chunk
only from its predecessor (the mailbox refuses the id from any other sender). With equal chunks and no
other traffic, the elapsed virtual time is exactly `RingTiming.collective_ns`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rdu.interconnect.grpc_plane import Mailbox, PeerClient
from rdu.interconnect.links import transmit_path
from rdu.interconnect.topology import Topology
from rdu.protos import interconnect_pb2 as pb

__all__ = ["RingCollectives", "CollectiveResult"]


@dataclass
class CollectiveResult:
    tensor: np.ndarray
    clock_ns: int
    wire_bytes: int


class RingCollectives:
    """One rank's side of ring collectives over `members` (ring order)."""

    def __init__(self, me: str, members: list[str], topology: Topology, client: PeerClient, mailbox: Mailbox,
                 timeout_s: float = 30.0) -> None:
        if me not in members:
            raise ValueError(f"{me} is not a member of {members}")
        self.me, self.members = me, list(members)
        self.ranks = len(members)
        self.rank = members.index(me)
        self.successor = members[(self.rank + 1) % self.ranks]
        self.predecessor = members[(self.rank - 1) % self.ranks]
        self.links = topology.path(me, self.successor) if self.ranks > 1 else []
        self.client, self.mailbox, self.timeout_s = client, mailbox, timeout_s
        self.calls = 0
        self.epoch = ""
        self.wire_bytes = 0

    def begin(self, epoch: str) -> None:
        """Number the collectives that follow from 1 under `epoch` (a job id every rank knows), so
        a rank that restarted counts the same as the others."""
        self.epoch, self.calls = epoch, 0

    def _tensor_id(self, call: int, label: str, phase: str, step: int, src: str) -> str:
        return f"{self.epoch}{call}/{label}/{phase}{step}/{src}"

    async def _exchange(self, call: int, kind: str, label: str, phase: str, step: int, steps: int,
                        chunk: np.ndarray, clock_ns: int) -> tuple[np.ndarray, int]:
        """Send `chunk` to the successor and receive the predecessor's chunk of the same step."""
        arrival = transmit_path(self.links, chunk.nbytes, clock_ns)
        header = pb.TensorHeader(
            tensor_id=self._tensor_id(call, label, phase, step, self.me), dst=self.successor,
            virtual_send_ns=clock_ns, virtual_arrival_ns=arrival,
            step=pb.CollectiveStep(collective=kind, label=label, index=step, steps=steps))
        incoming = self._tensor_id(call, label, phase, step, self.predecessor)
        await self.client.send(header, chunk)          # buffered write: returns before the peer reads
        received = await self.mailbox.take(incoming, self.timeout_s, sender=self.predecessor)
        self.wire_bytes += chunk.nbytes
        return received.array, max(clock_ns, int(received.header.virtual_arrival_ns))

    async def _reduce_scatter(self, call: int, kind: str, label: str, chunks: list[np.ndarray],
                              clock_ns: int, steps: int) -> int:
        t, r = self.ranks, self.rank
        for step in range(t - 1):
            send_index, recv_index = (r - step) % t, (r - step - 1) % t
            incoming, clock_ns = await self._exchange(call, kind, label, "rs", step, steps,
                                                      chunks[send_index], clock_ns)
            chunks[recv_index] = chunks[recv_index] + incoming
        return clock_ns

    async def _all_gather(self, call: int, kind: str, label: str, chunks: list[np.ndarray], owned: int,
                          clock_ns: int, steps: int, first_step: int) -> int:
        t = self.ranks
        for step in range(t - 1):
            send_index, recv_index = (owned - step) % t, (owned - step - 1) % t
            incoming, clock_ns = await self._exchange(call, kind, label, "ag", first_step + step, steps,
                                                      chunks[send_index], clock_ns)
            chunks[recv_index] = incoming
        return clock_ns

    def _split(self, tensor: np.ndarray) -> list[np.ndarray]:
        return [np.ascontiguousarray(c) for c in np.array_split(tensor.reshape(-1), self.ranks)]

    async def all_reduce(self, tensor: np.ndarray, clock_ns: int, label: str) -> CollectiveResult:
        """Sum of every rank's `tensor`, on every rank."""
        self.calls += 1
        start_bytes = self.wire_bytes
        if self.ranks == 1:
            return CollectiveResult(tensor.copy(), clock_ns, 0)
        chunks = self._split(tensor)
        steps = 2 * (self.ranks - 1)
        clock_ns = await self._reduce_scatter(self.calls, "all_reduce", label, chunks, clock_ns, steps)
        owned = (self.rank + 1) % self.ranks   # the chunk this rank holds fully reduced
        clock_ns = await self._all_gather(self.calls, "all_reduce", label, chunks, owned, clock_ns, steps,
                                          first_step=self.ranks - 1)
        result = np.concatenate(chunks).reshape(tensor.shape).astype(tensor.dtype, copy=False)
        return CollectiveResult(result, clock_ns, self.wire_bytes - start_bytes)

    async def reduce_scatter(self, tensor: np.ndarray, clock_ns: int, label: str) -> CollectiveResult:
        """This rank's fully reduced chunk: chunk `(rank + 1) % t` of the flattened sum."""
        self.calls += 1
        start_bytes = self.wire_bytes
        chunks = self._split(tensor)
        if self.ranks > 1:
            clock_ns = await self._reduce_scatter(self.calls, "reduce_scatter", label, chunks, clock_ns,
                                                  self.ranks - 1)
        return CollectiveResult(chunks[(self.rank + 1) % self.ranks], clock_ns, self.wire_bytes - start_bytes)

    async def all_gather(self, part: np.ndarray, clock_ns: int, label: str, axis: int = -1) -> CollectiveResult:
        """Every rank's `part`, concatenated in rank order along `axis`, on every rank."""
        self.calls += 1
        start_bytes = self.wire_bytes
        if self.ranks == 1:
            return CollectiveResult(part.copy(), clock_ns, 0)
        parts: list[np.ndarray] = [np.empty(0)] * self.ranks
        parts[self.rank] = np.ascontiguousarray(part)
        clock_ns = await self._all_gather(self.calls, "all_gather", label, parts, self.rank, clock_ns,
                                          self.ranks - 1, first_step=0)
        return CollectiveResult(np.concatenate(parts, axis=axis), clock_ns, self.wire_bytes - start_bytes)
