"""The gRPC data plane: one asyncio server per socket, a mailbox of received tensors, and a
client that keeps one persistent stream to each peer it sends to (peers found through a registry).

Closed on every deployment: a server refuses to start without the run's secret; every call
(Transfer, Health, Stats) is authenticated before any of its messages is parsed — by a per-sender
credential in the call metadata (interconnect/plane_auth.py), or, for a stream without one, by the
run secret in each tensor's header, checked before the header's fields are looked at. A stream
authenticated as one sender may carry only that sender's tensors. Headers are then checked, the
peer's mailbox budget reserved and only then the buffer allocated. Off loopback the plane runs
over mutual TLS with the run's certificate. Every refusal gets its own status and a log line:
INVALID_ARGUMENT (malformed), PERMISSION_DENIED (credential, sender, replay), RESOURCE_EXHAUSTED
(budgets); never UNKNOWN. Writes, receives and unary calls carry deadlines. Received bytes are
decoded with `np.frombuffer`, never unpickled.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from rdu.interconnect.grpc_runtime import grpc  # first: initialises gRPC for the plane (see there)
import numpy as np
from google.protobuf.message import DecodeError

from rdu.interconnect.mailbox import DEFAULT_DEADLINE_S, DEFAULT_PEER_BUDGET_BYTES, DEFAULT_UNCLAIMED_TTL_S, Mailbox, \
    MailboxFull
from rdu.interconnect.plane_auth import PlaneTLS, call_metadata, check_credential, is_loopback, secrets_equal
from rdu.interconnect.wire import MAX_CHUNK_BYTES, Received, TensorAssembler, WireError, check_header, \
    encode_chunks, parse_chunk, parse_header, split_whole
from rdu.protos import interconnect_pb2 as pb
from rdu.protos import interconnect_pb2_grpc as pb_grpc

__all__ = ["GRPC_OPTIONS", "DEFAULT_DEADLINE_S", "Mailbox", "InterconnectServer", "PeerClient", "PlaneStats",
           "TransferRejected", "LinkLost", "SERVICE_NAME"]

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_CHUNK_BYTES + (64 << 10)),
    ("grpc.max_send_message_length", MAX_CHUNK_BYTES + (64 << 10)),
]
SERVICE_NAME = "rdu.interconnect.Interconnect"
TRANSFER_METHOD = f"/{SERVICE_NAME}/Transfer"
EXPIRY_SWEEP_S = 5.0   # how often a quiet server drops expired unclaimed tensors
log = logging.getLogger("rdu.interconnect")


class TransferRejected(RuntimeError):
    """The receiving server refused a tensor (bad format, unknown peer, wrong token)."""


class LinkLost(RuntimeError):
    """Every attempt to send over a link was lost: the link is down."""


def _forget(waiter: asyncio.Future | None) -> None:
    """An acknowledgement nobody will wait for any more (its failure must not be logged as unretrieved)."""
    if waiter is None:
        return
    if waiter.done():
        if not waiter.cancelled():
            waiter.exception()
    else:
        waiter.cancel()


class _PeerUnavailable(RuntimeError):
    """The peer's server could not be reached (it may have restarted on another port)."""


@dataclass
class PlaneStats:
    tensors_received: int = 0
    bytes_received: int = 0
    tensors_sent: int = 0
    bytes_sent: int = 0
    rejected: int = 0
    dropped: int = 0          # messages a lossy link lost before delivery (fault injection)


_STATUS_OF = ((PermissionError, grpc.StatusCode.PERMISSION_DENIED),   # ReplayRefused included
              (MailboxFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
              (WireError, grpc.StatusCode.INVALID_ARGUMENT))


def _status_of(exc: Exception) -> grpc.StatusCode:
    """The status a refusal gets; anything unforeseen is INTERNAL (never gRPC's UNKNOWN)."""
    for kind, code in _STATUS_OF:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def _peer_of(context) -> str:
    try:
        return context.peer()
    except Exception:  # noqa: BLE001 (only for the log line)
        return "?"


class _Servicer:
    """The three RPCs, registered with raw-bytes requests so that the server itself parses them
    (after authenticating the call) and a malformed message is INVALID_ARGUMENT."""

    def __init__(self, server: "InterconnectServer") -> None:
        self.server = server

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Transfer": grpc.stream_stream_rpc_method_handler(
                self.transfer, request_deserializer=None, response_serializer=pb.Ack.SerializeToString),
            "Health": grpc.unary_unary_rpc_method_handler(
                self.health, request_deserializer=None, response_serializer=pb.HealthReply.SerializeToString),
            "Stats": grpc.unary_unary_rpc_method_handler(
                self.stats, request_deserializer=None, response_serializer=pb.StatsReply.SerializeToString),
        })

    async def _refuse(self, context, exc: Exception, what: str) -> None:
        """Count, log and abort the call with the status this refusal deserves."""
        code = _status_of(exc)
        self.server.stats.rejected += 1
        reason = str(exc)[:1024]
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s: %s from %s failed", self.server.name, what, _peer_of(context), exc_info=exc)
        else:   # the text only: a kept log record must not pin the refused message's frames and bytes
            log.warning("%s refused %s from %s: %s %s", self.server.name, what, _peer_of(context), code.name, reason)
        exc.__traceback__ = None
        await context.abort(code, f"{self.server.name}: {reason}")

    async def transfer(self, request_iterator, context):
        """Assemble consecutive tensors from one peer's stream; ack those that ask; abort on a broken rule."""
        owner = self.server
        failure: Exception | None = None
        assembler: TensorAssembler | None = None     # None between tensors
        try:
            sender = owner.authenticate(context.invocation_metadata())
            async for raw in request_iterator:
                if assembler is None:
                    whole = split_whole(raw)
                    if whole is not None:      # a tensor in one chunk (nearly every collective message)
                        ack = owner.receive_whole(sender, parse_header(whole[0], len(raw)), whole[1])
                        if ack is not None:
                            yield ack
                        continue
                    chunk = parse_chunk(raw)
                    owner.check_tensor_start(sender, chunk)
                    assembler = _RepeatSkipper() if owner.is_repeat(chunk) else _AdmittingAssembler(owner.mailbox)
                else:
                    chunk = parse_chunk(raw)
                assembler.add(chunk)
                if assembler.done:
                    ack = owner.accept(assembler)
                    assembler = None
                    if ack is not None:
                        yield ack
            if assembler is not None and assembler.in_progress:
                raise WireError(f"stream ended before the last chunk of {assembler.header.tensor_id!r}")
        except Exception as exc:  # noqa: BLE001 (every refusal gets a status, see _status_of)
            failure = exc
        finally:
            if assembler is not None and assembler.in_progress and assembler.admitted:
                owner.mailbox.cancel(assembler.header.src, assembler.header.tensor_id,
                                     int(assembler.header.total_bytes))
        if failure is not None:
            await self._refuse(context, failure, "a stream")

    async def _authenticated(self, request: bytes, context, message) -> bool:
        """Unary calls need a member's credential in their metadata (no header to carry a token)."""
        try:
            sender = self.server.authenticate(context.invocation_metadata())
            if sender is None:
                raise PermissionError("refused a call without the run's credential")
            message.ParseFromString(request)
            return True
        except Exception as exc:  # noqa: BLE001
            failure = WireError(f"malformed request: {exc}") if isinstance(exc, DecodeError) else exc
        await self._refuse(context, failure, "a call")
        return False

    async def health(self, request: bytes, context):
        if await self._authenticated(request, context, pb.HealthRequest()):
            return pb.HealthReply(socket=self.server.name, status="serving", virtual_ns=int(self.server.clock_ns()))

    async def stats(self, request: bytes, context):
        if await self._authenticated(request, context, pb.StatsRequest()):
            s = self.server.stats
            return pb.StatsReply(socket=self.server.name, tensors_received=s.tensors_received,
                                 bytes_received=s.bytes_received, tensors_sent=s.tensors_sent,
                                 bytes_sent=s.bytes_sent, rejected=s.rejected, dropped=s.dropped)


class _AdmittingAssembler(TensorAssembler):
    """An assembler whose admission reserves the peer's mailbox budget before allocating, and
    that remembers whether it did (to free it on failure)."""

    def __init__(self, mailbox: Mailbox) -> None:
        super().__init__(admit=self._reserve)
        self.mailbox = mailbox
        self.admitted = False

    def _reserve(self, header: pb.TensorHeader) -> None:
        self.mailbox.reserve(header.src, header.tensor_id, int(header.total_bytes))
        self.admitted = True


class _RepeatSkipper(TensorAssembler):
    """Reads a retransmission of a tensor already delivered (its first copy's acknowledgement was
    late): the chunks are checked and counted but nothing is reserved, kept or delivered."""

    admitted = False

    def add(self, chunk: pb.TensorChunk) -> None:
        if self.done:
            raise WireError("chunk after the last chunk")
        if chunk.seq != self.next_seq:
            raise WireError(f"chunk {chunk.seq} out of order (expected {self.next_seq})")
        if chunk.seq == 0:
            self._check_header(chunk.header)
            self.header = chunk.header
        elif chunk.HasField("header"):
            raise WireError("header repeated after the first chunk")
        self.filled += len(chunk.data)
        if self.filled > self.header.total_bytes:
            raise WireError(f"more data than the {self.header.total_bytes} bytes announced")
        self.next_seq += 1
        self.done = chunk.last

    def result(self) -> Received:
        if self.filled != self.header.total_bytes:
            raise WireError(f"received {self.filled} bytes, header announced {self.header.total_bytes}")
        return Received(header=self.header, array=np.empty(0, dtype=np.uint8))


class InterconnectServer:
    """The gRPC server of one socket. Must be started inside the event loop that will use it.

    `run_token` is the run's secret (required: a server without one refuses to start); `tls`
    the run's certificate, required when `bind_host` is not loopback."""

    def __init__(self, name: str, bind_host: str = "127.0.0.1", members: Iterable[str] | None = None,
                 run_token: str = "", clock_ns: Callable[[], int] = lambda: 0, tls: PlaneTLS | None = None,
                 peer_budget_bytes: int = DEFAULT_PEER_BUDGET_BYTES,
                 unclaimed_ttl_s: float = DEFAULT_UNCLAIMED_TTL_S) -> None:
        self.name = name
        self.bind_host = bind_host
        self.members = set(members) if members is not None else None
        self.run_token = run_token
        self.clock_ns = clock_ns
        self.tls = tls
        self.mailbox = Mailbox(peer_budget_bytes, unclaimed_ttl_s)
        self.stats = PlaneStats()
        self._loss: dict[str, tuple[float, random.Random]] = {}
        self._server: grpc.aio.Server | None = None
        self._sweeper: asyncio.Task | None = None
        self.port = 0

    # -- checks, in the order a call meets them ---------------------------------------------------
    def authenticate(self, metadata) -> str | None:
        """The sender a call's metadata proves (None: it carries no credential, so each tensor's
        header must carry the run secret); a wrong credential is refused outright."""
        try:
            sender = check_credential(self.run_token, metadata)
        except PermissionError as exc:
            raise PermissionError(f"refused a call: {exc}") from None
        if sender is not None and self.members is not None and sender not in self.members:
            raise PermissionError(f"refused a call from unknown peer {sender!r}")
        return sender

    def check_tensor_start(self, sender: str | None, chunk: pb.TensorChunk) -> None:
        """Before a tensor's header is checked or anything allocated: the run secret (a stream
        without a credential) and who sends it to whom."""
        self.check_start(sender, chunk.header if chunk.HasField("header") else None)

    def check_start(self, sender: str | None, header: pb.TensorHeader | None) -> None:
        """`check_tensor_start` of a first chunk's header (None: the chunk has none)."""
        if sender is None and (header is None or not secrets_equal(header.run_token, self.run_token)):
            src = header.src[:64] if header is not None else "?"
            raise PermissionError(f"refused a tensor from {src!r} without the run's token")
        if header is None:
            return  # the assembler names the broken rule
        self.authorize(header, sender)

    def authorize(self, header: pb.TensorHeader, sender: str | None = None) -> None:
        """Membership, destination and, on a stream authenticated as `sender`, the sender itself."""
        if sender is not None and header.src != sender:
            raise PermissionError(f"refused a tensor claiming sender {header.src[:64]!r} on {sender}'s stream "
                                  f"(forged sender)")
        if self.members is not None and header.src not in self.members:
            raise PermissionError(f"refused a tensor from unknown peer {header.src[:64]!r}")
        if header.dst != self.name:
            raise PermissionError(f"refused a tensor addressed to {header.dst[:64]!r}")

    def is_repeat(self, chunk: pb.TensorChunk) -> bool:
        """A retransmission (attempt > 0) of a tensor this server already delivered."""
        return chunk.HasField("header") and self._repeats(chunk.header)

    def _repeats(self, header: pb.TensorHeader) -> bool:
        return header.attempt > 0 and self.mailbox.delivered(header.tensor_id)

    def set_loss(self, src: str, probability: float, seed: int = 0) -> None:
        """Fault injection: lose each message arriving from `src` with `probability` (seeded per
        link, drawn once per arriving message in stream order, so the same ones are lost every
        run); 0 makes the link healthy again. A lost message is neither delivered nor acknowledged."""
        if probability <= 0:
            self._loss.pop(src, None)
        else:
            self._loss[src] = (probability, random.Random(f"{seed}:{src}->{self.name}"))

    def link_loses(self, src: str) -> bool:
        """Whether the link from `src` loses the message that just arrived."""
        lossy = self._loss.get(src)
        return lossy is not None and lossy[1].random() < lossy[0]

    def receive_whole(self, sender: str | None, header: pb.TensorHeader, data: memoryview) -> pb.Ack | None:
        """A tensor that came in one chunk, checked by the rules the assembler applies (and in
        their order: who sends it, its header, its size, then its id and the peer's budget) in
        one pass; then delivered as `accept` delivers. The Ack to send back, if it asks."""
        self.check_start(sender, header)
        dtype, shape = check_header(header)
        size, total_bytes = len(data), header.total_bytes
        if size > MAX_CHUNK_BYTES:
            raise WireError(f"chunk of {size} bytes exceeds the {MAX_CHUNK_BYTES}-byte limit")
        if size != total_bytes:
            raise WireError(f"more data than the {total_bytes} bytes announced" if size > total_bytes
                            else f"received {size} bytes, header announced {total_bytes}")
        if not self._repeats(header):   # a repeat is only acknowledged
            self.mailbox.reserve(header.src, header.tensor_id, total_bytes)
            if self._lost(header):
                return None
            self._deliver(Received(header, np.frombuffer(data, dtype).reshape(shape).copy()))
        return self._ack(header)

    def accept(self, assembler: TensorAssembler) -> pb.Ack | None:
        """A tensor's last chunk arrived: deliver it (or drop it, as a lossy link loses it, or
        only acknowledge a repeat of one delivered before); the Ack to send back, if it asks."""
        received = assembler.result()
        header = received.header
        if not isinstance(assembler, _RepeatSkipper):   # delivered before: only acknowledge
            if self._lost(header):
                return None
            self._deliver(received)
        return self._ack(header)

    def _lost(self, header: pb.TensorHeader) -> bool:
        """Lost in transit on a lossy link: its budget freed, no delivery, no ack."""
        if not (self._loss and self.link_loses(header.src)):
            return False
        self.mailbox.cancel(header.src, header.tensor_id, int(header.total_bytes))
        self.stats.dropped += 1
        return True

    def _deliver(self, received: Received) -> None:
        self.mailbox.deliver(received)
        self.stats.tensors_received += 1
        self.stats.bytes_received += received.array.nbytes

    @staticmethod
    def _ack(header: pb.TensorHeader) -> pb.Ack | None:
        """The Ack to send back, if the tensor asks for one."""
        if header.want_ack:
            return pb.Ack(tensor_id=header.tensor_id, received_bytes=int(header.total_bytes))
        return None

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> str:
        """Bind (TLS off loopback) and serve; refuses to serve without a run secret or, off
        loopback, without the run's certificate (the secret would travel in clear text)."""
        if not self.run_token:
            raise ValueError(f"{self.name}: refusing to start an interconnect server without a run secret")
        if self.tls is None and not is_loopback(self.bind_host):
            raise ValueError(f"{self.name}: refusing to serve on {self.bind_host} in clear text: "
                             "a server off loopback needs the run's TLS certificate")
        self._server = grpc.aio.server(options=GRPC_OPTIONS)
        self._server.add_generic_rpc_handlers((_Servicer(self).handler(),))
        address = f"{self.bind_host}:0"
        if self.tls is not None:
            self.port = self._server.add_secure_port(address, self.tls.server_credentials())
        else:
            self.port = self._server.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"{self.name}: could not bind a gRPC port on {self.bind_host}")
        await self._server.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return f"{self.bind_host}:{self.port}"

    async def _sweep(self) -> None:
        """Expire unclaimed tensors even when no traffic comes (memory comes back without a call)."""
        while True:
            await asyncio.sleep(min(EXPIRY_SWEEP_S, self.mailbox.unclaimed_ttl_s / 2))
            self.mailbox.expire()

    async def stop(self, grace_s: float = 0.5) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None


class _Outgoing:
    """A tensor queued on a stream. A sender that waits for its write has a `done` future; a
    posted one (`PeerClient.post`) has none: the client counts it once written and recovers it
    when its write fails (`on_failure` hears of a failure that stays one)."""

    __slots__ = ("header", "array", "done", "on_failure")

    def __init__(self, header: pb.TensorHeader, array: np.ndarray, done: asyncio.Future | None,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.header, self.array, self.done, self.on_failure = header, array, done, on_failure


class _PeerStream:
    """The long-lived stream to one peer: writes queued tensors in order, reads acks, remembers
    how it ended.

    gRPC takes one write at a time on a call, so one writer task per stream drains its queue: a
    sender only queues a tensor (`enqueue`) and goes on, and sends to one peer go in the order
    they were queued. A sender that waits for its write anyway (`write`, as `PeerClient.send`
    does) writes from its own task when the stream is idle. Each write has a deadline without a timer of its own (a timer per write
    was measurable CPU per message): one watchdog per stream, armed when a write starts while
    none is armed, finds a write older than `deadline_s` and cancels the call.

    Acknowledgements are read only once a tensor asks for one (`want_ack`): a pending read on
    every stream cost ~15% of a collective's CPU, and a stream that never asks has nothing to
    read. Without a reader, a stream learns how its call ended when a write finds it finished
    (`PeerClient._ending`)."""

    def __init__(self, peer: str, channel: grpc.aio.Channel, metadata: tuple = (),
                 deadline_s: float = DEFAULT_DEADLINE_S,
                 on_posted: Callable[["_PeerStream", _Outgoing, BaseException | None], None] | None = None) -> None:
        self.peer = peer
        # chunks are written as the bytes `encode_chunks` made (no serializer: no message object)
        self.call = channel.stream_stream(TRANSFER_METHOD, request_serializer=None,
                                          response_deserializer=pb.Ack.FromString)(metadata=metadata)
        self.deadline_s = deadline_s
        self.on_posted = on_posted
        self.loop = asyncio.get_running_loop()   # asked once: a system call per call on Python 3.11
        self.failure: str | None = None
        self.timed_out = False
        self.waiting: dict[str, asyncio.Future] = {}
        self.reader: asyncio.Task | None = None
        self._queue: deque[_Outgoing] = deque()
        self._writer: asyncio.Task | None = None
        self._inline: asyncio.Future | None = None     # a sender writing from its own task (`write`)
        self._writing_since_s: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    def enqueue(self, item: _Outgoing) -> None:
        """Queue one tensor (written after those queued before it)."""
        self._queue.append(item)
        if self._writer is None and self._inline is None:
            self._writer = self.loop.create_task(self._drain())

    async def write(self, header: pb.TensorHeader, array: np.ndarray) -> None:
        """Write one tensor and return once it is written (raising why not). On an idle stream
        it goes out from the caller's own task, at once (a stream's first tensor is then written
        before the peer may have ended the call, which would leave gRPC's local INTERNAL status
        instead of the peer's reason); otherwise after those queued before it."""
        if self._writer is not None or self._inline is not None or self._queue:
            item = _Outgoing(header, array, self.loop.create_future())
            self.enqueue(item)
            await item.done
            return
        self._inline = self.loop.create_future()
        try:
            await self._write_one(header, array)
        except BaseException as exc:
            raise TimeoutError(f"not written within {self.deadline_s} s") if self.timed_out else exc
        finally:
            inline, self._inline = self._inline, None
            inline.set_result(None)
            if self._queue and self._writer is None:
                self._writer = self.loop.create_task(self._drain())

    async def written(self) -> None:
        """Wait until everything queued so far is written (or failed)."""
        while self.busy:
            await asyncio.wait([w for w in (self._writer, self._inline) if w is not None])

    async def _write_one(self, header: pb.TensorHeader, array: np.ndarray) -> None:
        """Write a tensor's chunks, under the stream's write deadline (see the class docstring)."""
        loop = self.loop
        self._writing_since_s = loop.time()
        if self._watchdog is None:
            self._watchdog = loop.call_at(self._writing_since_s + self.deadline_s, self._check_deadline)
        try:
            for chunk in encode_chunks(header, array):
                await self.call.write(chunk)
        finally:
            self._writing_since_s = None

    async def _drain(self) -> None:
        """Write the queue in order; a failed write fails every tensor still queued."""
        try:
            while self._queue:
                item = self._queue[0]
                await self._write_one(item.header, item.array)
                self._queue.popleft()
                self._finish(item, None)
        except BaseException as exc:  # noqa: BLE001 (the writer's failure is every queued sender's)
            failure = TimeoutError(f"not written within {self.deadline_s} s") if self.timed_out else exc
            while self._queue:
                self._finish(self._queue.popleft(), failure)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._writer = None

    def _finish(self, item: _Outgoing, failure: BaseException | None) -> None:
        if item.done is None:
            if self.on_posted is not None:
                self.on_posted(self, item, failure)
        elif item.done.done():
            pass
        elif failure is None:
            item.done.set_result(None)
        elif isinstance(failure, asyncio.CancelledError):
            item.done.cancel()
        else:
            item.done.set_exception(failure)

    def _check_deadline(self) -> None:
        """The watchdog: cancel the call when its write in progress is older than the deadline."""
        self._watchdog = None
        since = self._writing_since_s
        if since is None:
            return   # idle: the next write arms it again
        loop = self.loop
        if loop.time() < since + self.deadline_s:
            self._watchdog = loop.call_at(since + self.deadline_s, self._check_deadline)
            return
        self.timed_out = True
        self.failure = self.failure or f"DEADLINE_EXCEEDED: a write took more than {self.deadline_s} s"
        self.call.cancel()

    def expect_ack(self, tensor_id: str) -> asyncio.Future:
        """A future that the peer's acknowledgement of `tensor_id` resolves (the reader starts now)."""
        if self.reader is None:
            self.reader = asyncio.get_running_loop().create_task(self._read_acks())
        waiter = asyncio.get_running_loop().create_future()
        self.waiting[tensor_id] = waiter
        return waiter

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

    @property
    def busy(self) -> bool:
        """Tensors are queued or being written."""
        return self._writer is not None or self._inline is not None

    async def close(self) -> None:
        self.call.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.busy:
            await asyncio.wait([w for w in (self._writer, self._inline) if w is not None])
        if self.reader is None:
            self.failure = self.failure or "stream closed"
            return
        try:
            await self.reader
        except asyncio.CancelledError:
            pass


class PeerClient:
    """Sends tensors to peers over one persistent stream per peer (reopened if it broke).

    A link to a peer may be lossy (fault injection: the peer's server loses messages from this
    socket, `InterconnectServer.set_loss`). Messages to such a peer (`set_loss` here) ask for an
    acknowledgement; when none comes within `ack_deadline_s` the sender presumes the message
    lost and sends it again (attempt 1, 2, ...), up to `max_attempts` times, each copy arriving
    one retransmission timeout of virtual time later than the one before.

    Every call carries this sender's credential (derived from `run_token`, the run secret, which
    itself is never sent); with `tls` the channels are mutual TLS with the run's certificate."""

    def __init__(self, name: str, resolve: Callable[[str], Awaitable[str]], stats: PlaneStats,
                 run_token: str = "", deadline_s: float = DEFAULT_DEADLINE_S, retransmit_timeout_ns: float = 50_000,
                 ack_deadline_s: float = 0.05, max_attempts: int = 6, tls: PlaneTLS | None = None) -> None:
        self.name = name
        self.tls = tls
        self.metadata = call_metadata(run_token, name) if run_token else ()
        self.retransmit_timeout_ns = retransmit_timeout_ns
        self.ack_deadline_s = ack_deadline_s
        self.max_attempts = max_attempts
        self._lossy: set[str] = set()
        self.lost_messages = 0      # sends presumed lost (no acknowledgement in time) and repeated
        self.resolve = resolve
        self.stats = stats
        self.run_token = run_token
        self.deadline_s = deadline_s
        self._addresses: dict[str, str] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._streams: dict[str, _PeerStream] = {}
        self._tasks: set[asyncio.Task] = set()     # posted tensors going the long way (see `post`)
        self._closed = False

    async def _stub(self, peer: str) -> pb_grpc.InterconnectStub:
        return pb_grpc.InterconnectStub(await self._channel(peer))

    async def _channel(self, peer: str) -> grpc.aio.Channel:
        if peer not in self._addresses:
            self._addresses[peer] = await self.resolve(peer)
        address = self._addresses[peer]
        if address not in self._channels:
            if self.tls is not None:
                self._channels[address] = grpc.aio.secure_channel(address, self.tls.channel_credentials(),
                                                                  options=GRPC_OPTIONS + self.tls.channel_options)
            else:
                self._channels[address] = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        return self._channels[address]

    async def _stream(self, peer: str) -> _PeerStream:
        stream = self._streams.get(peer)
        if stream is None or not stream.alive:
            stream = _PeerStream(peer, await self._channel(peer), self.metadata, self.deadline_s, self._posted)
            self._streams[peer] = stream
        return stream

    async def connect(self, peers: Iterable[str], timeout_s: float = 30.0) -> None:
        """Open the stream to each of `peers` now and wait until its channel is ready (what a
        collective library does when a communicator is made), so the first messages do not pay
        for name resolution and connection set-up."""
        for peer in peers:
            await self._stream(peer)
            channel = await self._channel(peer)
            async with asyncio.timeout(timeout_s):
                await channel.channel_ready()

    async def health(self, peer: str, timeout_s: float = 5.0) -> pb.HealthReply:
        """Ask a peer's server whether it serves (an authenticated call like every other)."""
        stub = await self._stub(peer)
        return await stub.Health(pb.HealthRequest(), timeout=timeout_s, metadata=self.metadata)

    async def peer_stats(self, peer: str, timeout_s: float = 5.0) -> pb.StatsReply:
        """A peer server's plane counters (authenticated)."""
        stub = await self._stub(peer)
        return await stub.Stats(pb.StatsRequest(), timeout=timeout_s, metadata=self.metadata)

    def set_loss(self, peer: str, probability: float) -> None:
        """Treat the link to `peer` as lossy when `probability` > 0: every message to it waits for
        its acknowledgement and is sent again when that does not come (0: a healthy link)."""
        if probability > 0:
            self._lossy.add(peer)
        else:
            self._lossy.discard(peer)

    def forget(self, peer: str, stream: _PeerStream | None = None) -> None:
        """Drop a peer's cached address and stream (it may have restarted on another port); with
        `stream`, only if that is still the stream to the peer (another send may have opened a new one)."""
        if stream is not None and self._streams.get(peer) is not stream:
            return
        self._addresses.pop(peer, None)
        self._streams.pop(peer, None)

    def post(self, header: pb.TensorHeader, array: np.ndarray,
             on_failure: Callable[[BaseException], None] | None = None) -> None:
        """Queue one tensor for `header.dst` and return at once (no acknowledgement asked, unless
        the link is lossy): the cheap path of a collective's messages, no task and no wait per
        message on a healthy link with its stream open. Sends to one peer still go in the order
        they were started; a write that fails goes again as `send` would send it, and if that
        fails too, `on_failure` hears why. `drain` waits until everything posted is written."""
        stream = self._streams.get(header.dst)
        if stream is None or not stream.alive or header.dst in self._lossy:
            self._background(self.send(header, array), on_failure)
            return
        header.src = self.name
        header.run_token = ""   # the stream is authenticated by this sender's credential instead
        header.want_ack = False
        stream.enqueue(_Outgoing(header, array, None, on_failure))

    async def drain(self) -> None:
        """Wait until every tensor posted so far is written, or failed."""
        while True:
            pending = [stream for stream in self._streams.values() if stream.busy] or list(self._tasks)
            if not pending:
                return
            for waiting in pending:
                await (waiting.written() if isinstance(waiting, _PeerStream) else asyncio.wait([waiting]))

    def _background(self, send: Awaitable[None], on_failure: Callable[[BaseException], None] | None) -> None:
        """Run `send` as a task the client keeps (`drain` waits for it); its failure goes to `on_failure`."""
        task = asyncio.get_running_loop().create_task(send)
        self._tasks.add(task)

        def finished(done: asyncio.Task) -> None:
            self._tasks.discard(done)
            failure = None if done.cancelled() else done.exception()
            if failure is not None and on_failure is not None:
                on_failure(failure)

        task.add_done_callback(finished)

    def _posted(self, stream: _PeerStream, item: _Outgoing, failure: BaseException | None) -> None:
        """A posted tensor was written (count it) or its write failed: then it goes the way of
        `send` (a peer that restarted elsewhere gets it again at its new address)."""
        if failure is None:
            self.stats.tensors_sent += 1
            self.stats.bytes_sent += item.array.nbytes
        elif not isinstance(failure, asyncio.CancelledError) and not self._closed:
            self._background(self._repost(stream, item, failure), item.on_failure)

    async def _repost(self, stream: _PeerStream, item: _Outgoing, failure: BaseException) -> None:
        mapped = await self._failure(stream, item.header, failure)
        if not isinstance(mapped, _PeerUnavailable):
            raise mapped
        self.forget(item.header.dst, stream)
        await self.send(item.header, item.array)

    async def send(self, header: pb.TensorHeader, array: np.ndarray, wait_ack: bool = False) -> None:
        """Write one tensor to `header.dst`. With `wait_ack`, return only once the peer accepted it
        (raising `TransferRejected` if it refused); otherwise a refusal surfaces on a later send.
        Sends to one peer may run concurrently (as tasks): they are written one at a time, in the
        order they were started."""
        header.src = self.name
        header.run_token = ""   # the stream is authenticated by this sender's credential instead
        lossy = header.dst in self._lossy
        header.want_ack = wait_ack or lossy
        if not lossy:
            await self._deliver(header, array, self.deadline_s)
        else:
            first_arrival_ns = header.virtual_arrival_ns
            for attempt in range(self.max_attempts):
                header.attempt = attempt
                header.virtual_arrival_ns = first_arrival_ns + int(attempt * self.retransmit_timeout_ns)
                if await self._deliver(header, array, self.ack_deadline_s):
                    break
                self.lost_messages += 1     # no acknowledgement in time: presumed lost, sent again
            else:
                raise LinkLost(f"{self.name} -> {header.dst}: {header.tensor_id} unacknowledged "
                               f"{self.max_attempts} times: the link is down")
        self.stats.tensors_sent += 1
        self.stats.bytes_sent += array.nbytes

    async def _deliver(self, header: pb.TensorHeader, array: np.ndarray, ack_deadline_s: float) -> bool:
        """Write one copy, asking the registry again while the peer is unreachable (it may have
        restarted elsewhere). False: its acknowledgement did not come within `ack_deadline_s`."""
        for attempt in range(self.max_attempts):
            try:
                return await self._write(header, array, ack_deadline_s)
            except _PeerUnavailable as exc:  # the peer restarted elsewhere: ask the registry again
                self.forget(header.dst)
                if attempt == self.max_attempts - 1:
                    raise TransferRejected(f"{header.dst} unreachable for {header.tensor_id} after "
                                           f"{self.max_attempts} attempts: {exc}") from None
                await asyncio.sleep(self.ack_deadline_s * (attempt + 1))
        return False

    async def _write(self, header: pb.TensorHeader, array: np.ndarray, ack_deadline_s: float) -> bool:
        """One attempt: write the tensor's chunks on the peer's stream (and wait for the ack when
        asked: False if it did not come within `ack_deadline_s` on a lossy link). Raises
        `_PeerUnavailable` when the peer could not be reached at all, so nothing was delivered and
        the tensor can go again."""
        stream = self._streams.get(header.dst)
        if stream is None or not stream.alive:
            stream = await self._stream(header.dst)
        if not stream.alive:
            self._raise_for(stream, header)
        waiter = None
        if header.want_ack:  # asked for, or a lossy link: the delivery is acknowledged
            waiter = stream.expect_ack(header.tensor_id)
        try:
            await stream.write(header, array)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, TimeoutError) as exc:
            _forget(stream.waiting.pop(header.tensor_id, None))
            raise await self._failure(stream, header, exc) from None
        if waiter is not None:
            try:
                async with asyncio.timeout(ack_deadline_s):
                    await waiter
            except TransferRejected:
                self._raise_for(stream, header)
            except TimeoutError:
                if header.dst not in self._lossy:
                    raise TimeoutError(f"{self.name} -> {header.dst}: no acknowledgement of {header.tensor_id} "
                                       f"within {ack_deadline_s} s") from None
                stream.waiting.pop(header.tensor_id, None)
                return False
        return True

    async def _failure(self, stream: _PeerStream, header: pb.TensorHeader, exc: BaseException) -> BaseException:
        """What a failed write of `header`'s tensor means: its deadline passed (TimeoutError), the
        peer is unreachable (`_PeerUnavailable`: it can go again) or it was refused (final)."""
        if isinstance(exc, TimeoutError):
            return TimeoutError(f"{self.name} -> {header.dst}: {header.tensor_id} not written within "
                                f"{self.deadline_s} s")
        if not isinstance(exc, (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)):
            return exc
        try:
            self._raise_for(stream, header, exc, await self._ending(stream, exc))
        except (_PeerUnavailable, TransferRejected) as mapped:
            return mapped
        return exc

    @staticmethod
    async def _ending(stream: _PeerStream, exc: Exception) -> str | None:
        """How the stream's call ended, when a write found it already finished before its reader
        noticed (the peer's process died: UNAVAILABLE, so the tensor goes again to its new address)."""
        if isinstance(exc, grpc.aio.AioRpcError) or not stream.call.done():
            return None
        return f"{(await stream.call.code()).name}: {await stream.call.details()}"

    @staticmethod
    def _raise_for(stream: _PeerStream, header: pb.TensorHeader, exc: Exception | None = None,
                   ending: str | None = None) -> None:
        """Why a write failed: the peer unreachable (retry elsewhere) or a refusal (final)."""
        if isinstance(exc, grpc.aio.AioRpcError):
            failure = f"{exc.code().name}: {exc.details()}"
        else:
            failure = stream.failure or ending or (f"stream closed ({exc})" if exc else "stream closed")
        stream.failure = stream.failure or failure   # the next send opens a new stream
        if failure.startswith("UNAVAILABLE"):
            raise _PeerUnavailable(failure)
        raise TransferRejected(f"{header.dst} refused {header.tensor_id}: {failure}")

    async def close(self) -> None:
        self._closed = True                        # what was posted and not written is not sent again
        for task in list(self._tasks):
            task.cancel()
        for stream in self._streams.values():
            await stream.close()
        self._streams.clear()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
