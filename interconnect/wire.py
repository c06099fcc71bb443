"""Tensors on the wire: numpy array <-> stream of `TensorChunk` messages, validated on arrival.

Raw bytes with a dtype/shape header; chunks of at most `MAX_CHUNK_BYTES`; nothing is pickled.
`TensorAssembler` checks every rule a well-behaved sender follows and raises `WireError`
(naming the rule) on the first one broken, so a server can reject the stream and keep serving.

The plane itself never builds a `TensorChunk` object for a chunk's data: `encode_chunks` writes
the message's bytes directly (the protobuf encoding of its fields, the data field last: one copy
of the tensor's bytes instead of three) and `parse_chunk` reads the four fields of a received
message itself, the data staying a view of the bytes gRPC handed over (the header, a small
message, is parsed by protobuf). Both speak exactly the `TensorChunk` encoding of
protos/interconnect.proto: any protobuf client interoperates; a message that is not one, or
repeats a field, is a `WireError`.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from rdu.protos import interconnect_pb2 as pb

__all__ = ["MAX_CHUNK_BYTES", "MAX_TENSOR_BYTES", "MAX_DIMS", "ALLOWED_DTYPES", "WireError", "chunk_tensor",
           "encode_chunks", "Chunk", "TensorAssembler", "Received", "parse_chunk", "split_whole", "parse_header",
           "check_header"]

MAX_CHUNK_BYTES = 1 << 20            # 1 MiB: the best chunk size measured on this machine size
MAX_TENSOR_BYTES = 1 << 30           # refuse anything larger than 1 GiB
MAX_TIMED_BYTES = 1 << 50           # a message timed as more than 1 PiB is no model of anything
MAX_ATTEMPTS = 64                    # retransmissions of one message
MAX_DIMS = 32                        # numpy's own limit on older versions; no tensor here has more than 4
ALLOWED_DTYPES = frozenset({"float32", "float16", "int32", "int64", "uint8"})


class WireError(ValueError):
    """A stream that breaks the wire format; the message says which rule."""


@dataclass
class Received:
    header: pb.TensorHeader
    array: np.ndarray


_ITEMSIZE = {name: np.dtype(name).itemsize for name in ALLOWED_DTYPES}
_DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}
_NAME_OF = {dtype: name for name, dtype in _DTYPES.items()}


def chunk_tensor(header: pb.TensorHeader, array: np.ndarray,
                 chunk_bytes: int = MAX_CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Yield the chunks of `array`; the header (completed with dtype, shape, size) goes first."""
    array = np.ascontiguousarray(array)
    header.dtype = _NAME_OF.get(array.dtype) or array.dtype.name
    del header.shape[:]
    header.shape.extend(array.shape)
    header.total_bytes = array.nbytes
    if array.nbytes <= chunk_bytes:    # most tensors: one chunk, no views to cut
        yield pb.TensorChunk(header=header, seq=0, data=array.tobytes(), last=True)
        return
    view = memoryview(array).cast("B")
    count = -(-array.nbytes // chunk_bytes)
    for seq in range(count):
        piece = view[seq * chunk_bytes:(seq + 1) * chunk_bytes]
        yield pb.TensorChunk(header=header if seq == 0 else None, seq=seq, data=bytes(piece),
                             last=seq == count - 1)


def _varint(value: int) -> bytes:
    """The protobuf varint of a non-negative integer."""
    if value < _TABLED_VARINTS:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_TABLED_VARINTS = 1 << 14            # every varint of one or two bytes, made once (a header's and a small tensor's length)
_SMALL_VARINTS = tuple(bytes((value,)) if value < 0x80 else bytes(((value & 0x7F) | 0x80, value >> 7))
                       for value in range(_TABLED_VARINTS))


def encode_chunks(header: pb.TensorHeader, array: np.ndarray,
                  chunk_bytes: int = MAX_CHUNK_BYTES) -> Iterable[bytes]:
    """The wire bytes of the chunks of `array`, each a `TensorChunk` message (see the module
    docstring): the header (completed with dtype, shape, size) on the first, the data field last,
    so each message costs one copy of its slice of the array. A tensor of one chunk (most of a
    collective's) comes as a tuple of its one message; a larger one as a generator, so that its
    chunks are made one at a time as they are written."""
    array = np.ascontiguousarray(array)
    header.dtype = _NAME_OF.get(array.dtype) or array.dtype.name
    del header.shape[:]
    header.shape.extend(array.shape)
    header.total_bytes = nbytes = array.nbytes
    head = header.SerializeToString()
    view = memoryview(array.reshape(-1).view(np.uint8))
    if nbytes <= chunk_bytes:
        return (b"".join((b"\x0a", _varint(len(head)), head, b"\x20\x01\x1a", _varint(nbytes), view)),)
    return _chunks(head, view, nbytes, chunk_bytes)


def _chunks(head: bytes, view: memoryview, nbytes: int, chunk_bytes: int) -> Iterator[bytes]:
    count = -(-nbytes // chunk_bytes)
    for seq in range(count):
        piece = view[seq * chunk_bytes:(seq + 1) * chunk_bytes]
        fields = [b"\x0a", _varint(len(head)), head] if seq == 0 else [b"\x10", _varint(seq)]
        if seq == count - 1:
            fields.append(b"\x20\x01")
        fields += (b"\x1a", _varint(len(piece)), piece)
        yield b"".join(fields)


POPULATED_BUFFER_BYTES = 4 << 20     # from this size on a received tensor's buffer is mapped populated


def receive_buffer(nbytes: int) -> np.ndarray:
    """A fresh writable buffer of `nbytes` for a tensor being received. Large ones are mapped with
    MAP_POPULATE: the kernel provides every page at once instead of one fault per page while the
    chunks are copied in, and without numpy's transparent-huge-page hint (on a busy or virtualised
    host a huge-page fault may compact memory first: copying 64 MiB into a fresh np.empty buffer
    took 100-250 ms of CPU there, instead of ~30 ms populated)."""
    flags = getattr(mmap, "MAP_POPULATE", 0)
    if nbytes < POPULATED_BUFFER_BYTES or not flags:
        return np.empty(nbytes, dtype=np.uint8)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags), dtype=np.uint8)


class Chunk:
    """A received `TensorChunk`: `header` (None when the message has none), `seq`, `data` (a view
    of the received bytes) and `last`; `HasField("header")` as on the protobuf message."""

    __slots__ = ("header", "seq", "data", "last")

    def __init__(self, header: pb.TensorHeader | None, seq: int, data, last: bool) -> None:
        self.header, self.seq, self.data, self.last = header, seq, data, last

    def HasField(self, name: str) -> bool:  # noqa: N802 (the protobuf message's name)
        return name == "header" and self.header is not None


_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _read_varint(raw, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


_WHOLE_TAIL = b"\x20\x01\x1a"   # `last` set, then the data field: what follows the header of a one-chunk tensor


def split_whole(raw) -> tuple[memoryview, memoryview] | None:
    """(header bytes, data) when `raw` is exactly how `encode_chunks` writes a tensor of one chunk
    (header, last, data; seq 0 is not written); None for anything else, which `parse_chunk` then
    reads field by field. Never raises: a message this shortcut does not take goes the long way."""
    end = len(raw)
    if end < 6 or raw[0] != 0x0A:
        return None
    size, pos = _short_varint(raw, 1, end)
    head_end = pos + size
    if size < 0 or raw[head_end:head_end + 3] != _WHOLE_TAIL:
        return None
    nbytes, pos = _short_varint(raw, head_end + 3, end)
    if nbytes < 0 or pos + nbytes != end:
        return None
    view = memoryview(raw)
    return view[head_end - size:head_end], view[pos:]


def _short_varint(raw, pos: int, end: int) -> tuple[int, int]:
    """A varint of at most 3 bytes (< 2 MiB) at `pos`: (value, next position), or (-1, pos)."""
    if pos + 3 <= end:   # the usual case, unrolled: one or two bytes
        first = raw[pos]
        if first < 0x80:
            return first, pos + 1
        second = raw[pos + 1]
        if second < 0x80:
            return (first & 0x7F) | (second << 7), pos + 2
    value = shift = 0
    for at in range(pos, min(pos + 3, end)):
        byte = raw[at]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at + 1
        shift += 7
    return -1, pos


def parse_header(raw, message_bytes: int) -> pb.TensorHeader:
    """A chunk's header field, parsed by protobuf; anything it refuses is a `WireError`."""
    try:
        return pb.TensorHeader.FromString(raw)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise WireError(f"malformed TensorChunk ({message_bytes} bytes): its header: {exc}") from None


def parse_chunk(raw) -> Chunk:
    """Decode one chunk off the wire (the `TensorChunk` encoding, read field by field); anything
    else — truncated, an unknown wire type, a field given twice, a header protobuf cannot parse —
    is a `WireError` like any broken rule (the server parses itself, so such input gets
    INVALID_ARGUMENT instead of gRPC's UNKNOWN). Unknown fields are skipped, as protobuf does."""
    view = memoryview(raw)
    end = len(view)
    pos = 0
    header, seq, data, last = None, 0, view[0:0], False
    seen = 0
    while pos < end:
        key, pos = _read_varint(raw, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0 or field > 0x1FFFFFFF:
            raise WireError(f"malformed TensorChunk ({end} bytes): field number {field}")
        if 1 <= field <= 4:
            if seen & (1 << field):
                raise WireError(f"malformed TensorChunk ({end} bytes): field {field} repeated")
            seen |= 1 << field
            if wire != (_LEN if field in (1, 3) else _VARINT):
                raise WireError(f"malformed TensorChunk ({end} bytes): field {field} of wire type {wire}")
        if wire == _VARINT:
            value, pos = _read_varint(raw, pos, end)
            if field == 2:
                value &= 0xFFFFFFFF      # an int32, as protobuf reads it
                seq = value - (1 << 32) if value >= 1 << 31 else value
            elif field == 4:
                last = value != 0
        elif wire == _LEN:
            size, pos = _read_varint(raw, pos, end)
            if size > end - pos:
                raise WireError(f"malformed TensorChunk ({end} bytes): a field of {size} bytes is truncated")
            if field == 1:
                header = parse_header(view[pos:pos + size], end)
            elif field == 3:
                data = view[pos:pos + size]
            pos += size
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
            if pos > end:
                raise WireError(f"malformed TensorChunk ({end} bytes): truncated")
        else:
            raise WireError(f"malformed TensorChunk ({end} bytes): wire type {wire}")
    return Chunk(header, seq, data, last)


class TensorAssembler:
    """Rebuilds one tensor from its chunks, enforcing the wire rules.

    `admit` (optional) sees a header once its format is checked and before its buffer is
    allocated, so a server can refuse it (identity, memory budget) without allocating anything."""

    def __init__(self, max_tensor_bytes: int = MAX_TENSOR_BYTES,
                 admit: Callable[[pb.TensorHeader], None] | None = None) -> None:
        self.max_tensor_bytes = max_tensor_bytes
        self.admit = admit
        self.header: pb.TensorHeader | None = None
        self.buffer: np.ndarray | None = None    # allocated once the header says how big
        self.total_bytes = 0
        self.filled = 0
        self.next_seq = 0
        self.done = False

    def add(self, chunk: pb.TensorChunk) -> None:
        if self.done:
            raise WireError("chunk after the last chunk")
        if chunk.seq != self.next_seq:
            raise WireError(f"chunk {chunk.seq} out of order (expected {self.next_seq})")
        data = chunk.data   # read once: each access of a bytes field may copy it
        size = len(data)
        if size > MAX_CHUNK_BYTES:
            raise WireError(f"chunk of {size} bytes exceeds the {MAX_CHUNK_BYTES}-byte limit")
        if self.next_seq == 0:
            if not chunk.HasField("header"):
                raise WireError("first chunk carries no header")
            header = chunk.header
            self._check_header(header)
            if self.admit is not None:
                self.admit(header)
            self.header, self.total_bytes = header, header.total_bytes
            self.buffer = receive_buffer(self.total_bytes)
        elif chunk.HasField("header"):
            raise WireError("header repeated after the first chunk")
        assert self.header is not None and self.buffer is not None
        if self.filled + size > self.total_bytes:
            raise WireError(f"more data than the {self.total_bytes} bytes announced")
        if size:
            self.buffer[self.filled:self.filled + size] = np.frombuffer(data, dtype=np.uint8)
        self.filled += size
        self.next_seq += 1
        self.done = chunk.last

    def _check_header(self, header: pb.TensorHeader) -> None:
        check_header(header, self.max_tensor_bytes)

    @property
    def in_progress(self) -> bool:
        """A tensor has started (its header arrived) but its last chunk has not."""
        return self.header is not None and not self.done

    def result(self) -> Received:
        if self.header is None:
            raise WireError("empty stream")
        if not self.done:
            raise WireError("stream ended before the last chunk")
        if self.filled != self.total_bytes:
            raise WireError(f"received {self.filled} bytes, header announced {self.total_bytes}")
        array = self.buffer.view(_DTYPES[self.header.dtype]).reshape(tuple(self.header.shape))
        return Received(header=self.header, array=array)


def check_header(header: pb.TensorHeader, max_tensor_bytes: int = MAX_TENSOR_BYTES) -> tuple[np.dtype, tuple]:
    """Every rule a tensor's header must follow (`WireError` names the one broken); its dtype and shape."""
    if not header.tensor_id:
        raise WireError("header has no tensor_id")
    dtype = header.dtype
    itemsize = _ITEMSIZE.get(dtype)
    if itemsize is None:
        raise WireError(f"dtype {dtype!r} not allowed (allowed: {', '.join(sorted(ALLOWED_DTYPES))})")
    if len(header.shape) > MAX_DIMS:
        raise WireError(f"shape has {len(header.shape)} dimensions, more than {MAX_DIMS}")
    shape = tuple(header.shape)
    if shape and min(shape) < 0:
        raise WireError(f"negative dimension in shape {_short(shape)}")
    total_bytes = header.total_bytes
    if total_bytes < 0:
        raise WireError(f"negative total_bytes {total_bytes}")
    if total_bytes > max_tensor_bytes:
        raise WireError(f"tensor of {total_bytes} bytes exceeds the {max_tensor_bytes}-byte limit")
    expected = _shape_bytes(shape, itemsize, max_tensor_bytes)
    if expected is None:
        raise WireError(f"shape {_short(shape)} of {dtype} exceeds the {max_tensor_bytes}-byte limit")
    if expected != total_bytes:
        raise WireError(f"shape {_short(shape)} of {dtype} is {expected} bytes, header says {total_bytes}")
    send_ns = header.virtual_send_ns
    if header.virtual_arrival_ns < send_ns or send_ns < 0:
        raise WireError("virtual arrival before virtual send")
    if not 0 <= header.timed_bytes <= MAX_TIMED_BYTES:
        raise WireError(f"timed_bytes {header.timed_bytes} outside [0, {MAX_TIMED_BYTES}]")
    if not 0 <= header.attempt <= MAX_ATTEMPTS:
        raise WireError(f"attempt {header.attempt} outside [0, {MAX_ATTEMPTS}]")
    return _DTYPES[dtype], shape


def _shape_bytes(shape, itemsize: int, limit_bytes: int) -> int | None:
    """prod(shape) * itemsize in exact integers, None as soon as it passes `limit_bytes` (a
    product that would overflow int64 never gets computed, let alone allocated). A zero anywhere
    makes the tensor empty whatever the other dimensions say."""
    if 0 in shape:
        return 0
    total = itemsize
    for dim in shape:
        total *= int(dim)
        if total > limit_bytes:
            return None
    return total


def _short(shape) -> str:
    """A shape for an error message, cut short when a hostile header sends thousands of dims."""
    dims = list(shape)
    return str(dims) if len(dims) <= 8 else f"[{', '.join(map(str, dims[:8]))}, ... ({len(dims)} dims)]"
