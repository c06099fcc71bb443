"""Collectives over the gRPC plane: the numerics travel by the cheapest route, the time is the
platform's algorithm's.

Transport. A collective's tensors go to a root and back: every other rank sends its tensor to
the root, the root combines them in rank order (a sum formed as rank 0 + rank 1 + ...: the same
bits on every rank and every run) and sends each rank its result. That is 2 (n - 1) messages
and 2 dependent hops per collective, whatever the size (large tensors travel in chunks of at
most 1 MiB), where the ring the hardware runs needs 2 n (n - 1) messages in 2 (n - 1) dependent
steps: on a host whose cores are shared by every socket process each message is CPU time (on a
2-core machine an 8-rank all-reduce of 1 KiB took ~3.3 ms of CPU, ~0.24 ms per message counting
both ends, against ~2.2 ms for bare grpc.aio streams; about half of a message is the kernel's
send and wake-ups), and check-tp's batch-1 decode on 8 sockets ran at 3-8 tokens/s with the
ring, ~25 with this transport in 2026-11, ~32-45 (by load) since 2026-12. The root rotates with
the collective's number (collective k of an epoch is rooted at member (k - 1) mod n), so every
link between two members carries messages, and a lossy one loses real ones.

Time. What a rank's clock reads after a collective does not depend on the route: it is the
group's start (the latest clock any member entered with) plus the analytic time of the algorithm
the timing model picks for that size on that group (`RingTiming.hardware_ns`: ring, one-shot
where the topology has direct paths, hops across nodes; the formula the cost model charges),
plus one retransmission timeout for every message that was really lost and resent. With nothing
lost and the ranks entering together, it is the analytic time to the nanosecond.

Losses are charged to the whole group, once each: the root sees how often each rank's message
to it was resent (its `attempt`) before it answers, so those are charged in the same collective;
a rank that receives the root's answer only after resends learns it too late for that
collective, owes the timeouts (`owed_ns`) and declares them when it next sends to a root, so
they are charged in the group's next collective. `settle` (the end of a request: a collective of
no virtual time) charges what is still owed and makes every member agree on the end; a resend of
its own answers is owed to the group's next request (`owed_ns` says how much).

No rank waits for its own messages to be written (on a shared host a write's completion took
~1.5 ms, on the group's critical path, and each wait woke the collective once more): they are
queued on the plane (`PeerClient.post`) and written in the background, in order per peer. A
rank's message to the root that cannot be sent fails the rank's wait for the answer at once;
a root's answer that cannot be sent surfaces at the root's next collective (`flush` waits for
them all). A root wakes once for the members' tensors, when the last one arrives.

Headers. Every message carries its virtual send time and the time it counts as arriving: a
rank's message to the root is sent at the rank's clock and counts as arriving that much later as
the timeouts it carries (those it owes, plus one per resend of itself); the root's answer is
sent at the collective's end and counts as arriving then (plus its own resends' timeouts).
`timed_bytes` is the size the collective is timed by (a nominal model's, while the payload is a
small functional tensor).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rdu.interconnect.collectives_timing import RingTiming
from rdu.interconnect.grpc_plane import Mailbox, PeerClient
from rdu.interconnect.topology import Topology
from rdu.protos import interconnect_pb2 as pb

__all__ = ["Collectives", "CollectiveResult", "TRANSPORT"]

TRANSPORT = "root"   # how the tensors move, whatever algorithm times them


@dataclass
class CollectiveResult:
    tensor: np.ndarray
    clock_ns: int
    wire_bytes: int
    algorithm: str = "none"     # the algorithm the collective is timed as (ring, one_shot)


class Collectives:
    """One rank's side of the collectives of the group `members`."""

    def __init__(self, me: str, members: list[str], topology: Topology, client: PeerClient, mailbox: Mailbox,
                 timeout_s: float = 30.0) -> None:
        if me not in members:
            raise ValueError(f"{me} is not a member of {members}")
        self.me, self.members = me, list(members)
        self.ranks = len(members)
        self.rank = members.index(me)
        self.topology = topology
        self.client, self.mailbox, self.timeout_s = client, mailbox, timeout_s
        self._timing: RingTiming | None = None
        self._hardware_ns: dict[tuple[str, int], int] = {}
        self._timed: dict[tuple[str, int], tuple[str, int]] = {}   # (kind, bytes) -> (algorithm, analytic ns)
        self.calls = 0
        self.epoch = ""
        self.wire_bytes = 0
        self.messages = 0                        # messages this rank sent
        self.owed_ns = 0                         # timeouts of resent answers, charged at the next collective
        self.algorithms: Counter[str] = Counter()   # collectives timed as each algorithm
        self._answer_failure: BaseException | None = None   # why an answer of this root could not be sent

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
        self._timed.clear()

    def begin(self, epoch: str) -> None:
        """Number the collectives that follow from 1 under `epoch` (a job id every rank knows), so
        a rank that restarted counts the same as the others."""
        self.epoch, self.calls = epoch, 0

    def analytic_ns(self, kind: str, nbytes: int) -> int:
        """`RingTiming.hardware_ns` of a collective of `nbytes` per rank (remembered per size: a
        numpy evaluation per collective was measurable CPU)."""
        key = (kind, nbytes)
        if key not in self._hardware_ns:
            self._hardware_ns[key] = int(self.timing.hardware_ns(kind, nbytes))
        return self._hardware_ns[key]

    # -- messages -------------------------------------------------------------------------------
    def _tensor_id(self, call: int, label: str, phase: str, src: str) -> str:
        return f"{self.epoch}{call}/{label}/{phase}/{src}"

    def _post(self, tensor_id: str, kind: str, label: str, phase: str, dst: str, array: np.ndarray, send_ns: int,
              arrival_ns: int, timed_bytes: int, on_failure: Callable[[BaseException], None]) -> None:
        """Queue one message (counted now; written in the background, `on_failure` hears if it cannot be)."""
        header = pb.TensorHeader(
            tensor_id=tensor_id, dst=dst, virtual_send_ns=send_ns, virtual_arrival_ns=arrival_ns,
            timed_bytes=timed_bytes,
            step=pb.CollectiveStep(collective=kind, label=label, index=0 if phase == "up" else 1, steps=2))
        self.wire_bytes += array.nbytes
        self.messages += 1
        self.client.post(header, array, on_failure)

    async def _take(self, tensor_id: str, src: str) -> tuple[np.ndarray, pb.TensorHeader]:
        """The tensor `tensor_id` (sent this rank by `src`, and only by `src`)."""
        received = await self.mailbox.take(tensor_id, self.timeout_s, sender=src)
        return received.array, received.header

    # -- the transport: to a root and back ------------------------------------------------------
    async def _via_root(self, kind: str, label: str, mine: np.ndarray, clock_ns: int, timed_bytes: int,
                        combine: Callable[[list[np.ndarray]], list[np.ndarray]], analytic_ns: int) -> tuple[np.ndarray, int]:
        """Send `mine` to this collective's root; return this rank's result and its clock. The
        root applies `combine` to every rank's tensor (in rank order) and sends rank r the r-th
        tensor it returns; the clock is the group's start plus `analytic_ns` plus the timeouts
        charged (see the module docstring)."""
        self._reap()
        self.calls += 1
        call = self.calls
        root = self.members[(call - 1) % self.ranks]
        if root != self.me:
            owed, self.owed_ns = self.owed_ns, 0
            answer_id = self._tensor_id(call, label, "down", root)   # if the message cannot go, no answer comes
            self._post(self._tensor_id(call, label, "up", self.me), kind, label, "up", root, mine, clock_ns,
                       clock_ns + owed, timed_bytes, lambda failure: self.mailbox.fail(answer_id, failure))
            result, header = await self._take(answer_id, root)
            end_ns = int(header.virtual_send_ns)
            self.owed_ns += int(header.virtual_arrival_ns) - end_ns   # the answer's resends: charged next time
            return result, end_ns
        parts: list[np.ndarray] = [mine] * self.ranks
        start_ns, charged_ns = clock_ns, self.owed_ns
        self.owed_ns = 0
        peers = [(r, peer) for r, peer in enumerate(self.members) if peer != self.me]
        for header in await self._gather(call, label, peers, parts):
            start_ns = max(start_ns, int(header.virtual_send_ns))
            charged_ns += int(header.virtual_arrival_ns) - int(header.virtual_send_ns)
        end_ns = start_ns + analytic_ns + charged_ns
        results = combine(parts)
        answer_id = self._tensor_id(call, label, "down", self.me)
        for r, peer in peers:   # written in the background: the root goes on at once (see _reap)
            self._post(answer_id, kind, label, "down", peer, results[r], end_ns, end_ns, timed_bytes,
                       self._answer_failed)
        return results[self.rank], end_ns

    async def _gather(self, call: int, label: str, peers: list[tuple[int, str]],
                      parts: list[np.ndarray]) -> list[pb.TensorHeader]:
        """At a root: every peer's tensor of this collective into `parts` (by rank); their
        headers. Those already here are taken first, then the root waits once for all the others
        (not once per arrival)."""
        ids = [(r, peer, self._tensor_id(call, label, "up", peer)) for r, peer in peers]
        here = [part for part in ids if self.mailbox.holds(part[2])]
        late = [part for part in ids if not self.mailbox.holds(part[2])]
        headers = [await self._take_part(part, parts) for part in here]
        if late:
            await self.mailbox.wait_all([tensor_id for _, _, tensor_id in late], self.timeout_s)
        return headers + [await self._take_part(part, parts) for part in late]

    async def _take_part(self, part: tuple[int, str, str], parts: list[np.ndarray]) -> pb.TensorHeader:
        rank, peer, tensor_id = part
        parts[rank], header = await self._take(tensor_id, peer)
        return header

    def _answer_failed(self, failure: BaseException) -> None:
        """An answer of this root could not be sent: the failure surfaces at its next collective."""
        if self._answer_failure is None:
            self._answer_failure = failure

    def _reap(self) -> None:
        """Raise the failure of an answer this rank sent as a root (a refused tensor, a link that
        lost every copy). A root does not wait for its answers' writes to complete (on a shared
        host that took ~1.5 ms each, on the group's critical path); sends to one peer still go in
        order (`PeerClient`)."""
        failure, self._answer_failure = self._answer_failure, None
        if failure is not None:
            raise failure

    async def flush(self) -> None:
        """Wait until every answer this rank sent as a root is written (or raise its failure)."""
        await self.client.drain()
        self._reap()

    @staticmethod
    def _sum_in_rank_order(parts: list[np.ndarray]) -> np.ndarray:
        """parts[0] + parts[1] + ... in that order: the same bits on every rank and every run."""
        total = np.array(parts[0], copy=True)
        for part in parts[1:]:
            total += part
        return total

    def _split(self, tensor: np.ndarray) -> list[np.ndarray]:
        return [np.ascontiguousarray(c) for c in np.array_split(tensor.reshape(-1), self.ranks)]

    def _begin(self, kind: str, nbytes: int) -> tuple[str, int]:
        """(algorithm, analytic ns) of a collective of `nbytes` per rank on this group."""
        key = (kind, nbytes)
        timed = self._timed.get(key)
        if timed is None:
            timed = self._timed[key] = (self.timing.algorithm(nbytes), self.analytic_ns(kind, nbytes))
        self.algorithms[timed[0]] += 1
        return timed

    # -- the collectives ------------------------------------------------------------------------
    async def all_reduce(self, tensor: np.ndarray, clock_ns: int, label: str,
                         timed_bytes: int | None = None) -> CollectiveResult:
        """Sum of every rank's `tensor`, on every rank; timed as `timed_bytes` per rank (default:
        the tensor's own size)."""
        if self.ranks == 1:
            self.calls += 1
            return CollectiveResult(tensor.copy(), clock_ns, 0)
        start_bytes = self.wire_bytes
        nbytes = tensor.nbytes if timed_bytes is None else int(timed_bytes)
        algorithm, analytic_ns = self._begin("all_reduce", nbytes)
        mine = np.ascontiguousarray(tensor)

        def combine(parts: list[np.ndarray]) -> list[np.ndarray]:
            return [self._sum_in_rank_order(parts)] * self.ranks

        result, clock_ns = await self._via_root("all_reduce", label, mine, clock_ns, nbytes, combine, analytic_ns)
        return CollectiveResult(result.reshape(tensor.shape).astype(tensor.dtype, copy=False), clock_ns,
                                self.wire_bytes - start_bytes, algorithm)

    async def reduce_scatter(self, tensor: np.ndarray, clock_ns: int, label: str,
                             timed_bytes: int | None = None) -> CollectiveResult:
        """This rank's fully reduced chunk: chunk `(rank + 1) % t` of the flattened sum (the chunk
        a ring's reduce-scatter leaves on it)."""
        t = self.ranks
        if t == 1:
            self.calls += 1
            return CollectiveResult(self._split(tensor)[0], clock_ns, 0)
        start_bytes = self.wire_bytes
        nbytes = tensor.nbytes if timed_bytes is None else int(timed_bytes)
        algorithm, analytic_ns = self._begin("reduce_scatter", nbytes)

        def combine(parts: list[np.ndarray]) -> list[np.ndarray]:
            chunks = self._split(self._sum_in_rank_order(parts))
            return [chunks[(r + 1) % t] for r in range(t)]

        result, clock_ns = await self._via_root("reduce_scatter", label, np.ascontiguousarray(tensor), clock_ns,
                                                nbytes, combine, analytic_ns)
        return CollectiveResult(result, clock_ns, self.wire_bytes - start_bytes, algorithm)

    async def all_gather(self, part: np.ndarray, clock_ns: int, label: str, axis: int = -1,
                         timed_bytes: int | None = None) -> CollectiveResult:
        """Every rank's `part`, concatenated in rank order along `axis`, on every rank; timed as a
        gathered tensor of `timed_bytes` (default: `ranks` parts)."""
        if self.ranks == 1:
            self.calls += 1
            return CollectiveResult(part.copy(), clock_ns, 0)
        start_bytes = self.wire_bytes
        nbytes = part.nbytes * self.ranks if timed_bytes is None else int(timed_bytes)
        algorithm, analytic_ns = self._begin("all_gather", nbytes)

        def combine(parts: list[np.ndarray]) -> list[np.ndarray]:
            return [np.concatenate(parts, axis=axis)] * self.ranks

        result, clock_ns = await self._via_root("all_gather", label, np.ascontiguousarray(part), clock_ns, nbytes,
                                                combine, analytic_ns)
        return CollectiveResult(result, clock_ns, self.wire_bytes - start_bytes, algorithm)

    async def all_gather_then(self, part: np.ndarray, clock_ns: int, label: str,
                              finish: Callable[[list[np.ndarray]], np.ndarray],
                              timed_bytes: int | None = None) -> CollectiveResult:
        """Every rank's `part`, gathered at the root, which sends every rank `finish(parts)` (parts
        in rank order): an all-gather whose root also does what every rank would do next with the
        gathered tensor. Timed as an all-gather of `timed_bytes` (default: `ranks` parts)."""
        if self.ranks == 1:
            self.calls += 1
            return CollectiveResult(finish([part]), clock_ns, 0)
        start_bytes = self.wire_bytes
        nbytes = part.nbytes * self.ranks if timed_bytes is None else int(timed_bytes)
        algorithm, analytic_ns = self._begin("all_gather", nbytes)
        result, clock_ns = await self._via_root("all_gather", label, np.ascontiguousarray(part), clock_ns, nbytes,
                                                lambda parts: [finish(parts)] * self.ranks, analytic_ns)
        return CollectiveResult(result, clock_ns, self.wire_bytes - start_bytes, algorithm)

    async def rendezvous(self) -> None:
        """Every member exchanges an empty message with every root, as a collective library does
        when a communicator is made: each stream has carried a message and each server knows its
        callers before the first collective is timed. Every member of the group must call it
        together. It costs no virtual time and leaves the numbering and what is owed as they were."""
        if self.ranks == 1:
            return
        saved = self.epoch, self.calls, self.owed_ns
        self.begin("rendezvous#")
        empty = np.zeros(0, dtype=np.int64)
        try:
            for _ in self.members:
                await self._via_root("rendezvous", "hello", empty, 0, 0, lambda parts: [empty] * self.ranks, 0)
            await self.flush()
        finally:
            self.epoch, self.calls, self.owed_ns = saved

    async def settle(self, clock_ns: int, label: str = "settle") -> int:
        """The end every member agrees on: the latest clock of the group plus the timeouts still
        owed (answers resent in the last collectives). A collective of no virtual time, over the
        same transport; a resend of its own answer is owed to the group's next collective."""
        if self.ranks == 1:
            return clock_ns
        mine = np.array([clock_ns], dtype=np.int64)
        _, clock_ns = await self._via_root("settle", label, mine, clock_ns, 0, lambda parts: [mine[:0]] * self.ranks,
                                           0)
        await self.flush()
        return clock_ns
