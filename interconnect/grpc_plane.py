"""The gRPC data plane: one asyncio server per socket, a mailbox of received tensors, and a
client that keeps one persistent stream to each peer it sends to (peers found through a registry).

Servers bind to 127.0.0.1 on a laptop (the node's IP on a cluster), cap message sizes at one
chunk plus headroom, and reject any stream that breaks the wire rules, comes from a socket that
is not a member of the run, or lacks the run's token (when one is set) — then keep serving.
Writes, receives and unary calls carry deadlines. Received bytes are decoded with `np.frombuffer`, never unpickled.
"""

from __future__ import annotations

import asyncio
import hmac
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import grpc
import numpy as np

from interconnect.wire import MAX_CHUNK_BYTES, Received, TensorAssembler, WireError, chunk_tensor
from protos import interconnect_pb2 as pb
from protos import interconnect_pb2_grpc as pb_grpc

__all__ = ["GRPC_OPTIONS", "DEFAULT_DEADLINE_S", "Mailbox", "InterconnectServer", "PeerClient", "PlaneStats",
           "TransferRejected", "LinkLost"]

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_CHUNK_BYTES + (64 << 10)),
    ("grpc.max_send_message_length", MAX_CHUNK_BYTES + (64 << 10)),
]
DEFAULT_DEADLINE_S = 30.0


class TransferRejected(RuntimeError):
    """The receiving server refused a tensor (bad format, unknown peer, wrong token)."""


class LinkLost(RuntimeError):
    """Every attempt to send over a link was lost: the link is down."""


class _PeerUnavailable(RuntimeError):
    """The peer's server could not be reached (it may have restarted on another port)."""


@dataclass
class PlaneStats:
    tensors_received: int = 0
    bytes_received: int = 0
    tensors_sent: int = 0
    bytes_sent: int = 0
    rejected: int = 0


class Mailbox:
    """Received tensors by id; a receiver waits for an id that may not have arrived yet."""

    def __init__(self) -> None:
        self._slots: dict[str, asyncio.Future] = {}

    def _slot(self, tensor_id: str) -> asyncio.Future:
        if tensor_id not in self._slots:
            self._slots[tensor_id] = asyncio.get_running_loop().create_future()
        return self._slots[tensor_id]

    def deliver(self, received: Received) -> None:
        slot = self._slot(received.header.tensor_id)
        if slot.done():
            raise WireError(f"tensor {received.header.tensor_id!r} delivered twice")
        slot.set_result(received)

    async def take(self, tensor_id: str, timeout_s: float = DEFAULT_DEADLINE_S) -> Received:
        slot = self._slot(tensor_id)
        try:
            async with asyncio.timeout(timeout_s):
                return await slot
        except TimeoutError:
            raise TimeoutError(f"no tensor {tensor_id!r} within {timeout_s} s") from None
        finally:
            self._slots.pop(tensor_id, None)


class _Servicer(pb_grpc.InterconnectServicer):
    def __init__(self, server: "InterconnectServer") -> None:
        self.server = server

    async def Transfer(self, request_iterator, context):  # noqa: N802 (gRPC naming)
        """Assemble consecutive tensors from one peer's stream; ack those that ask; abort on a broken rule."""
        owner = self.server
        assembler = TensorAssembler()
        try:
            async for chunk in request_iterator:
                assembler.add(chunk)
                if chunk.seq == 0:
                    owner.authorize(assembler.header)
                if assembler.done:
                    received = assembler.result()
                    owner.mailbox.deliver(received)
                    owner.stats.tensors_received += 1
                    owner.stats.bytes_received += received.array.nbytes
                    if received.header.want_ack:
                        yield pb.Ack(tensor_id=received.header.tensor_id, received_bytes=received.array.nbytes)
                    assembler = TensorAssembler()
        except PermissionError as exc:
            owner.stats.rejected += 1
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except WireError as exc:
            owner.stats.rejected += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Health(self, request, context):  # noqa: N802
        return pb.HealthReply(socket=self.server.name, status="serving", virtual_ns=int(self.server.clock_ns()))

    async def Stats(self, request, context):  # noqa: N802
        s = self.server.stats
        return pb.StatsReply(socket=self.server.name, tensors_received=s.tensors_received,
                             bytes_received=s.bytes_received, tensors_sent=s.tensors_sent,
                             bytes_sent=s.bytes_sent, rejected=s.rejected)


class InterconnectServer:
    """The gRPC server of one socket. Must be started inside the event loop that will use it."""

    def __init__(self, name: str, bind_host: str = "127.0.0.1", members: Iterable[str] | None = None,
                 run_token: str = "", clock_ns: Callable[[], int] = lambda: 0) -> None:
        self.name = name
        self.bind_host = bind_host
        self.members = set(members) if members is not None else None
        self.run_token = run_token
        self.clock_ns = clock_ns
        self.mailbox = Mailbox()
        self.stats = PlaneStats()
        self._server: grpc.aio.Server | None = None
        self.port = 0

    def authorize(self, header: pb.TensorHeader) -> None:
        if self.run_token and not hmac.compare_digest(header.run_token, self.run_token):
            raise PermissionError(f"{self.name}: refused a tensor from {header.src!r} without the run's token")
        if self.members is not None and header.src not in self.members:
            raise PermissionError(f"{self.name}: refused a tensor from unknown peer {header.src!r}")
        if header.dst != self.name:
            raise PermissionError(f"{self.name}: refused a tensor addressed to {header.dst!r}")

    async def start(self) -> str:
        self._server = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_InterconnectServicer_to_server(_Servicer(self), self._server)
        self.port = self._server.add_insecure_port(f"{self.bind_host}:0")
        if not self.port:
            raise RuntimeError(f"{self.name}: could not bind a gRPC port on {self.bind_host}")
        await self._server.start()
        return f"{self.bind_host}:{self.port}"

    async def stop(self, grace_s: float = 0.5) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None


class _PeerStream:
    """The long-lived stream to one peer: writes chunks, reads acks, remembers how it ended."""

    def __init__(self, peer: str, stub: pb_grpc.InterconnectStub) -> None:
        self.peer = peer
        self.call = stub.Transfer()
        self.failure: str | None = None
        self.waiting: dict[str, asyncio.Future] = {}
        self.reader = asyncio.get_running_loop().create_task(self._read_acks())

    async def _read_acks(self) -> None:
        try:
            async for ack in self.call:
                waiter = self.waiting.pop(ack.tensor_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(ack)
        except grpc.aio.AioRpcError as exc:
            self.failure = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            self.failure = "stream closed"
        self.failure = self.failure or "stream ended"
        for waiter in self.waiting.values():
            if not waiter.done():
                waiter.set_exception(TransferRejected(f"{self.peer}: {self.failure}"))
        self.waiting.clear()

    @property
    def alive(self) -> bool:
        return self.failure is None

    async def close(self) -> None:
        self.call.cancel()
        try:
            await self.reader
        except asyncio.CancelledError:
            pass


class PeerClient:
    """Sends tensors to peers over one persistent stream per peer (reopened if it broke).

    A link to a peer may be made lossy (`set_loss`, fault injection): each message is then lost
    with that probability (seeded, so the same messages are lost every run); the sender notices
    the missing acknowledgement when its deadline expires and sends again, up to
    `max_attempts` times, and the message arrives one retransmission timeout later per loss."""

    def __init__(self, name: str, resolve: Callable[[str], Awaitable[str]], stats: PlaneStats,
                 run_token: str = "", deadline_s: float = DEFAULT_DEADLINE_S, retransmit_timeout_ns: float = 50_000,
                 ack_deadline_s: float = 0.05, max_attempts: int = 6) -> None:
        self.name = name
        self.retransmit_timeout_ns = retransmit_timeout_ns
        self.ack_deadline_s = ack_deadline_s
        self.max_attempts = max_attempts
        self._loss: dict[str, tuple[float, random.Random]] = {}
        self.lost_messages = 0
        self.resolve = resolve
        self.stats = stats
        self.run_token = run_token
        self.deadline_s = deadline_s
        self._addresses: dict[str, str] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._streams: dict[str, _PeerStream] = {}

    async def _stub(self, peer: str) -> pb_grpc.InterconnectStub:
        if peer not in self._addresses:
            self._addresses[peer] = await self.resolve(peer)
        address = self._addresses[peer]
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        return pb_grpc.InterconnectStub(self._channels[address])

    async def _stream(self, peer: str) -> _PeerStream:
        stream = self._streams.get(peer)
        if stream is None or not stream.alive:
            stream = _PeerStream(peer, await self._stub(peer))
            self._streams[peer] = stream
        return stream

    def set_loss(self, peer: str, probability: float, seed: int = 0) -> None:
        """Lose each message to `peer` with `probability` (0 makes the link healthy again)."""
        if probability <= 0:
            self._loss.pop(peer, None)
        else:
            self._loss[peer] = (probability, random.Random(f"{seed}:{self.name}->{peer}"))

    async def _losses_before_delivery(self, peer: str, tensor_id: str) -> int:
        """How many attempts of this message are lost (waiting out each ack deadline)."""
        if peer not in self._loss:
            return 0
        probability, rng = self._loss[peer]
        for attempt in range(self.max_attempts):
            if rng.random() >= probability:
                return attempt
            self.lost_messages += 1
            await asyncio.sleep(self.ack_deadline_s)   # no acknowledgement within the deadline
        raise LinkLost(f"{self.name} -> {peer}: {tensor_id} lost {self.max_attempts} times: the link is down")

    def forget(self, peer: str) -> None:
        """Drop a peer's cached address and stream (it may have restarted on another port)."""
        self._addresses.pop(peer, None)
        self._streams.pop(peer, None)

    async def send(self, header: pb.TensorHeader, array: np.ndarray, wait_ack: bool = False) -> None:
        """Write one tensor to `header.dst`. With `wait_ack`, return only once the peer accepted it
        (raising `TransferRejected` if it refused); otherwise a refusal surfaces on a later send."""
        header.src = self.name
        header.run_token = self.run_token
        lost = await self._losses_before_delivery(header.dst, header.tensor_id)
        if lost:
            header.virtual_arrival_ns += int(lost * self.retransmit_timeout_ns)
        header.want_ack = wait_ack or header.dst in self._loss
        for attempt in range(self.max_attempts):
            try:
                await self._write(header, array)
                break
            except _PeerUnavailable as exc:  # the peer restarted elsewhere: ask the registry again
                self.forget(header.dst)
                if attempt == self.max_attempts - 1:
                    raise TransferRejected(f"{header.dst} unreachable for {header.tensor_id} after "
                                           f"{self.max_attempts} attempts: {exc}") from None
                await asyncio.sleep(self.ack_deadline_s * (attempt + 1))
        self.stats.tensors_sent += 1
        self.stats.bytes_sent += array.nbytes

    async def _write(self, header: pb.TensorHeader, array: np.ndarray) -> None:
        """One attempt: write the tensor's chunks on the peer's stream (and wait for the ack when
        asked). Raises `_PeerUnavailable` when the peer could not be reached at all, so nothing
        was delivered and the tensor can go again."""
        stream = await self._stream(header.dst)
        if not stream.alive:
            self._raise_for(stream, header)
        waiter = None
        if header.want_ack:  # asked for, or a lossy link: the delivery is acknowledged
            waiter = asyncio.get_running_loop().create_future()
            stream.waiting[header.tensor_id] = waiter
        try:
            async with asyncio.timeout(self.deadline_s):
                for chunk in chunk_tensor(header, array):
                    await stream.call.write(chunk)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            self._raise_for(stream, header, exc)
        except TimeoutError:
            raise TimeoutError(f"{self.name} -> {header.dst}: {header.tensor_id} not written within "
                               f"{self.deadline_s} s") from None
        if waiter is not None:
            try:
                async with asyncio.timeout(self.deadline_s):
                    await waiter
            except TransferRejected:
                self._raise_for(stream, header)

    @staticmethod
    def _raise_for(stream: _PeerStream, header: pb.TensorHeader, exc: Exception | None = None) -> None:
        """Why a write failed: the peer unreachable (retry elsewhere) or a refusal (final)."""
        if isinstance(exc, grpc.aio.AioRpcError):
            failure = f"{exc.code().name}: {exc.details()}"
        else:
            failure = stream.failure or f"stream closed ({exc})" if exc else stream.failure or "stream closed"
        if failure.startswith("UNAVAILABLE"):
            raise _PeerUnavailable(failure)
        raise TransferRejected(f"{header.dst} refused {header.tensor_id}: {failure}")

    async def close(self) -> None:
        for stream in self._streams.values():
            await stream.close()
        self._streams.clear()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
