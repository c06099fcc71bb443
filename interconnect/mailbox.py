"""A socket's mailbox of received tensors: bounded per peer, expiring, and deliver-once.

A receiver waits for a tensor id that may not have arrived yet; a tensor that arrives before
anyone asks for it waits in the mailbox, which is where a hostile or runaway peer could pile up
memory. So every peer has a byte budget for what it has in flight or unclaimed here (a header
that would exceed it is refused before its buffer is allocated), unclaimed tensors expire after a
deadline, and an id is accepted once only (a replay or a duplicate is refused, for a bounded
window of recent ids).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from rdu.interconnect.wire import Received

__all__ = ["Mailbox", "MailboxFull", "ReplayRefused", "DEFAULT_DEADLINE_S", "DEFAULT_PEER_BUDGET_BYTES",
           "DEFAULT_UNCLAIMED_TTL_S"]

DEFAULT_DEADLINE_S = 30.0
DEFAULT_PEER_BUDGET_BYTES = 256 << 20     # in flight + unclaimed per peer (4x the largest bench transfer)
DEFAULT_UNCLAIMED_TTL_S = 120.0           # a tensor nobody claimed within 2 min is dropped
REMEMBERED_IDS = 1 << 15                  # ids kept for replay refusal (~6 MB at most)
MAX_FAILED_IDS = 1 << 10                  # failures kept for ids nobody waits for yet
log = logging.getLogger("rdu.interconnect")


class MailboxFull(RuntimeError):
    """A peer's in-flight and unclaimed tensors would exceed its byte budget."""


class ReplayRefused(PermissionError):
    """A tensor id that was already delivered (or is arriving right now) came again."""


@dataclass
class _Parcel:
    received: Received
    src: str
    nbytes: int
    expires_at_s: float


class _Gather:
    """A `wait_all`: how many of its tensors have still to come, and the future it waits on."""

    __slots__ = ("remaining", "future")

    def __init__(self, remaining: int, future: asyncio.Future) -> None:
        self.remaining, self.future = remaining, future

    def arrived(self) -> None:
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(None)


def _expire(waiter: asyncio.Future, message: str) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(message))


class Mailbox:
    """Received tensors by id, with per-peer budgets, expiry and deliver-once ids."""

    def __init__(self, peer_budget_bytes: int = DEFAULT_PEER_BUDGET_BYTES,
                 unclaimed_ttl_s: float = DEFAULT_UNCLAIMED_TTL_S, remembered_ids: int = REMEMBERED_IDS,
                 clock_s: Callable[[], float] = time.monotonic) -> None:
        self.peer_budget_bytes = peer_budget_bytes
        self.unclaimed_ttl_s = unclaimed_ttl_s
        self.remembered_ids = remembered_ids
        self.clock_s = clock_s
        self._waiters: dict[str, asyncio.Future] = {}
        self._gathers: dict[str, _Gather] = {}              # an id a `wait_all` waits for -> its gather
        self._deadlines: dict[asyncio.Future, tuple[float, str, float]] = {}   # -> (deadline, what, timeout)
        self._failed: dict[str, BaseException] = {}          # why an id that nobody waits for yet will not come
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_due_s = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unclaimed: OrderedDict[str, _Parcel] = OrderedDict()   # arrival order = expiry order
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._reserved_bytes: dict[str, int] = {}
        self.expired = 0

    # -- the server side -------------------------------------------------------------------------
    def reserve(self, src: str, tensor_id: str, nbytes: int) -> None:
        """Admit a tensor whose header just arrived, before its buffer exists: refuse a replayed
        id (`ReplayRefused`) or a peer over its budget (`MailboxFull`). Unclaimed tensors past their
        deadline are dropped first when the budget would be exceeded (and by the server's sweeper)."""
        if tensor_id in self._seen:
            raise ReplayRefused(f"tensor {tensor_id!r} already delivered: replay or duplicate refused")
        held = self._reserved_bytes.get(src, 0)
        if held + nbytes > self.peer_budget_bytes and self.expire():
            held = self._reserved_bytes.get(src, 0)
        if held + nbytes > self.peer_budget_bytes:
            raise MailboxFull(f"{src} has {held} bytes in flight or unclaimed here; {nbytes} more exceed its "
                              f"{self.peer_budget_bytes}-byte budget")
        self._reserved_bytes[src] = held + nbytes
        self._remember(tensor_id)

    def holds(self, tensor_id: str) -> bool:
        """Whether `tensor_id` arrived and waits here to be taken."""
        return tensor_id in self._unclaimed

    def delivered(self, tensor_id: str) -> bool:
        """Whether `tensor_id` was admitted here already (within the remembered window)."""
        return tensor_id in self._seen

    def cancel(self, src: str, tensor_id: str, nbytes: int) -> None:
        """A reserved tensor never completed (its stream broke): free its budget and its id."""
        self._release(src, nbytes)
        self._seen.pop(tensor_id, None)

    def deliver(self, received: Received) -> None:
        """A complete, reserved tensor: hand it to its waiting receiver or keep it until claimed."""
        header = received.header
        waiter = self._waiters.pop(header.tensor_id, None)
        if waiter is not None and not waiter.done():
            self._release(header.src, int(header.total_bytes))
            waiter.set_result(received)
            return
        self._unclaimed[header.tensor_id] = _Parcel(received, header.src, int(header.total_bytes),
                                                    self.clock_s() + self.unclaimed_ttl_s)
        gather = self._gathers.pop(header.tensor_id, None) if self._gathers else None
        if gather is not None:
            gather.arrived()

    def expire(self) -> int:
        """Drop unclaimed tensors past their deadline; returns how many went."""
        if not self._unclaimed:
            return 0
        now, gone = self.clock_s(), 0
        while self._unclaimed:
            tensor_id, parcel = next(iter(self._unclaimed.items()))
            if parcel.expires_at_s > now:
                break
            del self._unclaimed[tensor_id]
            self._release(parcel.src, parcel.nbytes)
            gone += 1
            log.warning("mailbox: dropped tensor %r from %s (%d bytes), unclaimed for %.0f s",
                        tensor_id, parcel.src, parcel.nbytes, self.unclaimed_ttl_s)
        self.expired += gone
        return gone

    def held_bytes(self, src: str | None = None) -> int:
        """Bytes in flight or unclaimed, of one peer or of all."""
        if src is not None:
            return self._reserved_bytes.get(src, 0)
        return sum(self._reserved_bytes.values())

    # -- the receiver side -----------------------------------------------------------------------
    async def take(self, tensor_id: str, timeout_s: float = DEFAULT_DEADLINE_S, sender: str | None = None) -> Received:
        """The tensor `tensor_id`, waiting up to `timeout_s` for it; with `sender`, only from that
        socket (another member's tensor under this id is refused, not used)."""
        failure = self._failed.pop(tensor_id, None) if self._failed else None
        parcel = self._unclaimed.pop(tensor_id, None)
        if parcel is not None:
            self._release(parcel.src, parcel.nbytes)
            return self._from(parcel.received, sender)
        if failure is not None:
            raise failure
        waiter = self._waiters.get(tensor_id)
        if waiter is None:
            waiter = self._waiters[tensor_id] = self._running_loop().create_future()
        self._deadline(waiter, timeout_s, tensor_id)
        try:
            return self._from(await waiter, sender)
        finally:
            self._deadlines.pop(waiter, None)
            if self._waiters.get(tensor_id) is waiter:
                del self._waiters[tensor_id]

    async def wait_all(self, tensor_ids: list[str], timeout_s: float = DEFAULT_DEADLINE_S) -> None:
        """Return once every one of `tensor_ids` has arrived (each then taken with `take`): one
        wake-up for a root that waits for every member's tensor, not one per arrival."""
        missing = [tensor_id for tensor_id in tensor_ids if tensor_id not in self._unclaimed]
        if not missing:
            return
        gather = _Gather(len(missing), self._running_loop().create_future())
        for tensor_id in missing:
            self._gathers[tensor_id] = gather
        self._deadline(gather.future, timeout_s, missing[0])
        try:
            await gather.future
        finally:
            self._deadlines.pop(gather.future, None)
            for tensor_id in missing:
                if self._gathers.get(tensor_id) is gather:
                    del self._gathers[tensor_id]

    def fail(self, tensor_id: str, failure: BaseException) -> None:
        """`tensor_id` will not come (say the message it answers could not be sent): its receiver
        gets `failure` instead of waiting for its deadline."""
        waiter = self._waiters.get(tensor_id)
        if waiter is None:
            self._failed[tensor_id] = failure
            while len(self._failed) > MAX_FAILED_IDS:
                del self._failed[next(iter(self._failed))]
        elif not waiter.done():
            waiter.set_exception(failure)

    def _deadline(self, future: asyncio.Future, timeout_s: float, tensor_id: str) -> None:
        """`future` fails with TimeoutError unless done within `timeout_s`. One timer serves
        every deadline (a timer per receive was measurable CPU per message): it is moved only
        when an earlier deadline comes."""
        loop = self._running_loop()
        due_s = loop.time() + timeout_s
        self._deadlines[future] = (due_s, tensor_id, timeout_s)
        if self._watchdog is None or due_s < self._watchdog_due_s:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._watchdog, self._watchdog_due_s = loop.call_at(due_s, self._expire_waits, loop), due_s

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this mailbox serves, asked for once (`asyncio.get_running_loop` makes a
        system call per call on Python 3.11: it checks the process id)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
            self._watchdog = None      # a timer of an earlier loop never fires in this one
        return loop

    def _expire_waits(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the waits past their deadline; arm the timer for the next deadline, if any."""
        self._watchdog = None
        now_s, earliest_s = loop.time(), None
        for future, (due_s, tensor_id, timeout_s) in list(self._deadlines.items()):
            if due_s <= now_s:
                del self._deadlines[future]
                _expire(future, f"no tensor {tensor_id!r} within {timeout_s} s")
            elif earliest_s is None or due_s < earliest_s:
                earliest_s = due_s
        if earliest_s is not None:
            self._watchdog, self._watchdog_due_s = loop.call_at(earliest_s, self._expire_waits, loop), earliest_s

    @staticmethod
    def _from(received: Received, sender: str | None) -> Received:
        if sender is not None and received.header.src != sender:
            raise PermissionError(f"tensor {received.header.tensor_id!r} came from {received.header.src!r}, "
                                  f"not from {sender!r}")
        return received

    def _release(self, src: str, nbytes: int) -> None:
        left = self._reserved_bytes.get(src, 0) - nbytes
        if left > 0:
            self._reserved_bytes[src] = left
        else:
            self._reserved_bytes.pop(src, None)

    def _remember(self, tensor_id: str) -> None:
        self._seen[tensor_id] = None
        while len(self._seen) > self.remembered_ids:
            self._seen.popitem(last=False)
