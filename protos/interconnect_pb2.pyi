from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorHeader(_message.Message):
    __slots__ = ("tensor_id", "src", "dst", "dtype", "shape", "total_bytes", "virtual_send_ns", "virtual_arrival_ns", "step", "run_token", "want_ack", "timed_bytes", "attempt")
    TENSOR_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_SEND_NS_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_ARRIVAL_NS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RUN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WANT_ACK_FIELD_NUMBER: _ClassVar[int]
    TIMED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    tensor_id: str
    src: str
    dst: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    total_bytes: int
    virtual_send_ns: int
    virtual_arrival_ns: int
    step: CollectiveStep
    run_token: str
    want_ack: bool
    timed_bytes: int
    attempt: int
    def __init__(self, tensor_id: _Optional[str] = ..., src: _Optional[str] = ..., dst: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., total_bytes: _Optional[int] = ..., virtual_send_ns: _Optional[int] = ..., virtual_arrival_ns: _Optional[int] = ..., step: _Optional[_Union[CollectiveStep, _Mapping]] = ..., run_token: _Optional[str] = ..., want_ack: _Optional[bool] = ..., timed_bytes: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class CollectiveStep(_message.Message):
    __slots__ = ("collective", "label", "index", "steps")
    COLLECTIVE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    collective: str
    label: str
    index: int
    steps: int
    def __init__(self, collective: _Optional[str] = ..., label: _Optional[str] = ..., index: _Optional[int] = ..., steps: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("header", "seq", "data", "last")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    header: TensorHeader
    seq: int
    data: bytes
    last: bool
    def __init__(self, header: _Optional[_Union[TensorHeader, _Mapping]] = ..., seq: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("tensor_id", "received_bytes")
    TENSOR_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    tensor_id: str
    received_bytes: int
    def __init__(self, tensor_id: _Optional[str] = ..., received_bytes: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("socket", "status", "virtual_ns")
    SOCKET_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_NS_FIELD_NUMBER: _ClassVar[int]
    socket: str
    status: str
    virtual_ns: int
    def __init__(self, socket: _Optional[str] = ..., status: _Optional[str] = ..., virtual_ns: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("socket", "tensors_received", "bytes_received", "tensors_sent", "bytes_sent", "rejected", "dropped")
    SOCKET_FIELD_NUMBER: _ClassVar[int]
    TENSORS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TENSORS_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    socket: str
    tensors_received: int
    bytes_received: int
    tensors_sent: int
    bytes_sent: int
    rejected: int
    dropped: int
    def __init__(self, socket: _Optional[str] = ..., tensors_received: _Optional[int] = ..., bytes_received: _Optional[int] = ..., tensors_sent: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., rejected: _Optional[int] = ..., dropped: _Optional[int] = ...) -> None: ...
