"""Tensors on the wire: numpy array <-> stream of `TensorChunk` messages, validated on arrival.

Raw bytes with a dtype/shape header; chunks of at most `MAX_CHUNK_BYTES`; nothing is pickled.
`TensorAssembler` checks every rule a well-behaved sender follows and raises `WireError`
(naming the rule) on the first one broken, so a server can reject the stream and keep serving.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from protos import interconnect_pb2 as pb

__all__ = ["MAX_CHUNK_BYTES", "MAX_TENSOR_BYTES", "ALLOWED_DTYPES", "WireError", "chunk_tensor",
           "TensorAssembler", "Received"]

MAX_CHUNK_BYTES = 1 << 20            # 1 MiB: the best chunk size measured on this machine size
MAX_TENSOR_BYTES = 1 << 30           # refuse anything larger than 1 GiB
ALLOWED_DTYPES = frozenset({"float32", "float16", "int32", "int64", "uint8"})


class WireError(ValueError):
    """A stream that breaks the wire format; the message says which rule."""


@dataclass
class Received:
    header: pb.TensorHeader
    array: np.ndarray


def chunk_tensor(header: pb.TensorHeader, array: np.ndarray,
                 chunk_bytes: int = MAX_CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Yield the chunks of `array`; the header (completed with dtype, shape, size) goes first."""
    array = np.ascontiguousarray(array)
    header.dtype = array.dtype.name
    del header.shape[:]
    header.shape.extend(int(s) for s in array.shape)
    header.total_bytes = array.nbytes
    view = memoryview(array).cast("B")
    count = max(1, -(-array.nbytes // chunk_bytes))
    for seq in range(count):
        piece = view[seq * chunk_bytes:(seq + 1) * chunk_bytes]
        yield pb.TensorChunk(header=header if seq == 0 else None, seq=seq, data=bytes(piece),
                             last=seq == count - 1)


class TensorAssembler:
    """Rebuilds one tensor from its chunks, enforcing the wire rules."""

    def __init__(self, max_tensor_bytes: int = MAX_TENSOR_BYTES) -> None:
        self.max_tensor_bytes = max_tensor_bytes
        self.header: pb.TensorHeader | None = None
        self.buffer: np.ndarray | None = None    # allocated once the header says how big
        self.filled = 0
        self.next_seq = 0
        self.done = False

    def add(self, chunk: pb.TensorChunk) -> None:
        if self.done:
            raise WireError("chunk after the last chunk")
        if chunk.seq != self.next_seq:
            raise WireError(f"chunk {chunk.seq} out of order (expected {self.next_seq})")
        if len(chunk.data) > MAX_CHUNK_BYTES:
            raise WireError(f"chunk of {len(chunk.data)} bytes exceeds the {MAX_CHUNK_BYTES}-byte limit")
        if chunk.seq == 0:
            if not chunk.HasField("header"):
                raise WireError("first chunk carries no header")
            self._check_header(chunk.header)
            self.header = chunk.header
            self.buffer = np.empty(self.header.total_bytes, dtype=np.uint8)
        elif chunk.HasField("header"):
            raise WireError("header repeated after the first chunk")
        assert self.header is not None and self.buffer is not None
        size = len(chunk.data)
        if self.filled + size > self.header.total_bytes:
            raise WireError(f"more data than the {self.header.total_bytes} bytes announced")
        self.buffer[self.filled:self.filled + size] = np.frombuffer(chunk.data, dtype=np.uint8)
        self.filled += size
        self.next_seq += 1
        self.done = chunk.last

    def _check_header(self, header: pb.TensorHeader) -> None:
        if not header.tensor_id:
            raise WireError("header has no tensor_id")
        if header.dtype not in ALLOWED_DTYPES:
            raise WireError(f"dtype {header.dtype!r} not allowed (allowed: {', '.join(sorted(ALLOWED_DTYPES))})")
        if any(dim < 0 for dim in header.shape):
            raise WireError(f"negative dimension in shape {list(header.shape)}")
        expected = int(np.prod(header.shape, dtype=np.int64)) * np.dtype(header.dtype).itemsize
        if expected != header.total_bytes:
            raise WireError(f"shape {list(header.shape)} of {header.dtype} is {expected} bytes, "
                            f"header says {header.total_bytes}")
        if header.total_bytes > self.max_tensor_bytes:
            raise WireError(f"tensor of {header.total_bytes} bytes exceeds the {self.max_tensor_bytes}-byte limit")
        if header.virtual_arrival_ns < header.virtual_send_ns or header.virtual_send_ns < 0:
            raise WireError("virtual arrival before virtual send")

    def result(self) -> Received:
        if self.header is None:
            raise WireError("empty stream")
        if not self.done:
            raise WireError("stream ended before the last chunk")
        if self.filled != self.header.total_bytes:
            raise WireError(f"received {self.filled} bytes, header announced {self.header.total_bytes}")
        array = self.buffer.view(np.dtype(self.header.dtype)).reshape(tuple(self.header.shape))
        return Received(header=self.header, array=array)
