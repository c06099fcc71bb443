"""The timeline of a run: typed events, one vocabulary for every producer and every observer.

The serving engines (and the run around them) produce these events; the event log
(`events.msgpack`), the live dashboard, the Perfetto trace and the plots consume them. On disk an
event is a msgpack map: its `type` and its fields (`to_record`); `from_record` reads one back and
refuses, with one line, a record that is not an event of this vocabulary (a missing field, a
wrong type, a time outside int64 nanoseconds).

Every event has a virtual time `t_ns` (when it happened; for a `run`, when the span started).
Events are written in the order they are produced, which is not time order: a `done` carries
its request's finish time, and the nodes of a partitioned run report window by window.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rdu.base import UserError

__all__ = ["Event", "Setup", "GroupLayout", "Arrival", "Enqueue", "Run", "Switch", "Evict", "KvResize", "Preempt",
           "Done", "Fault", "End", "EVENT_TYPES", "from_record", "to_record", "ROUTER_MODEL", "TimelineBuffer",
           "unpack_timeline"]

ROUTER_MODEL = "router"    # the model id of the router; experts are `expert0007`
_INT64 = 1 << 63


@dataclass(frozen=True, slots=True)
class Event:
    type: ClassVar[str] = ""
    doc: ClassVar[str] = ""
    t_ns: int


@dataclass(frozen=True, slots=True)
class GroupLayout:
    """A tensor-parallel group: its name, its node, its sockets in ring order."""

    name: str
    node: int
    members: list[str]


@dataclass(frozen=True, slots=True)
class Setup(Event):
    """The cluster: what a viewer needs to lay out nodes, groups, sockets, tiers and links."""

    type: ClassVar[str] = "setup"
    name: str
    platform: str
    nodes: int
    sockets_per_node: int
    tp: int
    experts: int
    model: str
    router_model: str
    policy: str
    scheduler: str
    requests: int
    groups: list[GroupLayout]
    hbm_usable_bytes: int
    sram_bytes: int
    capacity_tier_bytes: int          # per node: the sockets' DDR (RDU) or host DRAM (GPU)
    capacity_tier_name: str           # "ddr" or "host_dram"
    capacity_tier_used_bytes: list[int]   # per node, after the experts are placed
    expert_shard_bytes: int
    router_shard_bytes: int
    p2p_topology: str
    host_link: bool                   # copies into HBM share the node's host link (GPU nodes)


@dataclass(frozen=True, slots=True)
class Arrival(Event):
    """A request reaches the cluster's ingress and is dispatched to a node."""

    type: ClassVar[str] = "arrival"
    request: int
    expert: int
    node: int


@dataclass(frozen=True, slots=True)
class Enqueue(Event):
    """A request reaches its node (after forwarding) and joins a group's queue."""

    type: ClassVar[str] = "enqueue"
    request: int
    group: str


@dataclass(frozen=True, slots=True)
class Run(Event):
    """A group runs one model (the router or an expert) on a batch from `t_ns` to `end_ns`: the
    continuous engine's span of iterations with a fixed batch, or one batch of the static cycle.
    `first_step_ns`: its first iteration (the prefill of a static batch); `requests`: the
    sequences it carried; `accesses`/`hits`: requests whose expert run starts here, and those of
    them whose expert was resident when chosen; `stall_ns`: waiting for a switch before it began."""

    type: ClassVar[str] = "run"
    group: str
    model: str
    end_ns: int
    first_step_ns: int
    collective_ns: int
    requests: list[int]
    iterations: int
    prefill_tokens: int
    decodes: int
    accesses: int
    hits: int
    stall_ns: int
    kv_bytes: int                  # what each member's KV ledger entry holds during the run
    queued: int                    # requests still waiting for this model in the group


@dataclass(frozen=True, slots=True)
class Switch(Event):
    """A copy of a model's shards from the capacity tier into the HBM of a group's members,
    sent at `t_ns`, landed on each member at `arrivals[member]`, all by `ready_ns`; `victims`
    were evicted to make room."""

    type: ClassVar[str] = "switch"
    group: str
    model: str
    ready_ns: int
    victims: list[str]
    prefetch: bool
    arrivals: dict[str, int]
    shard_bytes: int
    kv_bytes: int


@dataclass(frozen=True, slots=True)
class Evict(Event):
    """Models dropped from a group's HBM without a switch (room for KV blocks)."""

    type: ClassVar[str] = "evict"
    group: str
    models: list[str]
    reason: str
    kv_bytes_needed: int


@dataclass(frozen=True, slots=True)
class KvResize(Event):
    """The KV ledger entry of every member of a group changes size."""

    type: ClassVar[str] = "kv"
    group: str
    kv_bytes: int


@dataclass(frozen=True, slots=True)
class Preempt(Event):
    """A running sequence loses its KV blocks and goes back to the front of the queue:
    `recompute` (prefill again later) or `swap` (its KV copied to the capacity tier, back later)."""

    type: ClassVar[str] = "preempt"
    group: str
    request: int
    model: str
    generated: int
    mode: str
    kv_bytes: int                  # the sequence's KV per member (what a swap moves)


@dataclass(frozen=True, slots=True)
class Done(Event):
    """A request's last token (`t_ns` is its finish time)."""

    type: ClassVar[str] = "done"
    request: int
    group: str
    expert: int
    hit: bool
    output_tokens: int
    ttft_ns: int
    tpot_ns: int
    e2e_ns: int
    preemptions: int


@dataclass(frozen=True, slots=True)
class Fault(Event):
    """An injected fault and how it was handled (`detail`: what was interrupted, reloaded,
    re-dispatched or degraded, and when the cluster had recovered)."""

    type: ClassVar[str] = "fault"
    kind: str
    target: str
    spec: str
    groups: list[str]              # the groups it interrupted
    recovered_at_ns: int           # when the groups could serve again (0: never, or nothing to recover)
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class End(Event):
    """The run finished, was interrupted (Ctrl-C) or stopped (the cluster could not go on)."""

    type: ClassVar[str] = "end"
    interrupted: bool
    stopped: str
    summary: dict[str, Any]


EVENT_TYPES: dict[str, type[Event]] = {cls.type: cls for cls in
                                       (Setup, Arrival, Enqueue, Run, Switch, Evict, KvResize, Preempt, Done,
                                        Fault, End)}
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in (*EVENT_TYPES.values(), GroupLayout)}


def to_record(event: Event) -> dict:
    """The map written to the event log: `type` and every field (groups of a setup as maps)."""
    record = {"type": event.type}
    for name in _FIELDS[type(event)]:
        value = getattr(event, name)
        if name == "groups" and isinstance(event, Setup):
            value = [{"name": g.name, "node": g.node, "members": list(g.members)} for g in value]
        record[name] = value
    return record


def _checker(expected: Any):
    """A function (value, where) -> value that refuses a value not of the annotated type
    `expected` (recursively for lists and maps); built once per field, so reading a long log
    costs a few calls per event."""
    origin = typing.get_origin(expected)
    if expected is Any:
        return lambda value, where: value
    if expected is int:
        def whole(value, where):
            if value.__class__ is not int:
                if not isinstance(value, int) or isinstance(value, bool):
                    raise UserError(f"{where}: expected a whole number, got {type(value).__name__}")
            if not -_INT64 <= value < _INT64:
                raise UserError(f"{where}: {value} is outside int64")
            return value
        return whole
    if expected in (str, bool, float):
        allowed = (float, int) if expected is float else (expected,)

        def simple(value, where):
            if not isinstance(value, allowed) or (expected is float and isinstance(value, bool)):
                raise UserError(f"{where}: expected {expected.__name__}, got {type(value).__name__}")
            return value
        return simple
    if expected is GroupLayout:
        parts = [(name, _checker(hint)) for name, hint in _hints(GroupLayout).items()]

        def layout(value, where):
            if not isinstance(value, dict):
                raise UserError(f"{where}: expected a group {{name, node, members}}, got {type(value).__name__}")
            return GroupLayout(**{name: check(value.get(name), f"{where}.{name}") for name, check in parts})
        return layout
    if origin is list:
        item = _checker(typing.get_args(expected)[0])

        def sequence(value, where):
            if not isinstance(value, list):
                raise UserError(f"{where}: expected a list, got {type(value).__name__}")
            return [item(v, where) for v in value]
        return sequence
    if origin is dict:
        key_check, item = (_checker(t) for t in typing.get_args(expected))

        def mapping(value, where):
            if not isinstance(value, dict):
                raise UserError(f"{where}: expected a map, got {type(value).__name__}")
            return {key_check(k, where): item(v, where) for k, v in value.items()}
        return mapping
    raise TypeError(f"timeline: no check for {expected!r}")


def _hints(cls: type) -> dict[str, Any]:
    """Each field's annotated type, in field order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_READERS: dict[type, list] = {}


def _reader(cls: type) -> list:
    """(name, checker, required) of each field of an event class."""
    if cls not in _READERS:
        _READERS[cls] = [(f.name, _checker(hint), f.default is dataclasses.MISSING
                          and f.default_factory is dataclasses.MISSING)
                         for f, hint in zip(dataclasses.fields(cls), _hints(cls).values())]
    return _READERS[cls]


def from_record(record: object, where: str = "event") -> Event:
    """The event a log record holds; a `UserError` naming `where` and the field if it is not one
    (a stream written by another version, or damaged)."""
    if not isinstance(record, dict) or not isinstance(record.get("type"), str):
        raise UserError(f"{where}: not an event (expected a map with a type, found {type(record).__name__})")
    cls = EVENT_TYPES.get(record["type"])
    if cls is None:
        raise UserError(f"{where}: unknown event type {record['type']!r} (expected one of "
                        f"{', '.join(sorted(EVENT_TYPES))})")
    values = {}
    for name, check, required in _reader(cls):
        if name not in record:
            if required:
                raise UserError(f"{where} ({cls.type}): field {name!r} missing")
            continue
        values[name] = check(record[name], f"{where} ({cls.type}): field {name!r}")
    if values["t_ns"] < 0:
        raise UserError(f"{where} ({cls.type}): field 't_ns' = {values['t_ns']} is outside 0..2^63 ns")
    return cls(**values)


class TimelineBuffer:
    """An event sink that packs what an engine emits into msgpack records, to hand over in one
    piece (a round's timeline, written as is into the run's event log, from any process)."""

    def __init__(self) -> None:
        import msgpack

        self._packer = msgpack.Packer()
        self._chunks: list[bytes] = []
        self.count = 0

    def __call__(self, event: Event) -> None:
        self._chunks.append(self._packer.pack(to_record(event)))
        self.count += 1

    def take(self) -> tuple[bytes, int]:
        """The packed records so far and how many there are; the buffer starts empty again."""
        data, count = b"".join(self._chunks), self.count
        self._chunks, self.count = [], 0
        return data, count


def unpack_timeline(data: bytes, where: str = "timeline") -> list[Event]:
    """The typed events of packed records (what `TimelineBuffer.take` returned)."""
    import msgpack

    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    return [from_record(record, f"{where}: event {i + 1}") for i, record in enumerate(unpacker)]
