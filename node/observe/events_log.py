"""The raw event stream of a run, `events.msgpack`: one msgpack map per event, appended as the
run goes and flushed often, so a run that crashes still leaves everything up to the crash.

Events are plain maps with a `type` and a virtual time `t_ns` (see `EVENT_TYPES`); they are
written in the order the serving loop produces them, which is not always time order (a run's
`done` events carry their future finish times). `read_events` returns what a file holds and
stops cleanly at a truncated tail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import msgpack

from rdu.base import UserError

__all__ = ["EventsWriter", "read_events", "EVENT_TYPES", "EVENTS_FILE"]

EVENTS_FILE = "events.msgpack"

EVENT_TYPES = {
    "setup": "the cluster: platform, nodes, sockets, groups (members, expert slots), shard sizes, links",
    "arrival": "a request arrives and is dispatched to a group",
    "router": "a group runs the router on a batch: t_ns start, end_ns, ttft_ns, collective_ns, requests",
    "switch": "a DDR -> HBM copy: t_ns sent, ready_ns, per-member arrivals, shard_bytes, victims evicted",
    "run": "an expert runs a batch: t_ns start, end_ns, ttft_ns, collective_ns, requests, hit, stall_ns",
    "done": "a request's last token: t_ns finish, ttft_ns, tpot_ns, e2e_ns",
    "fault": "an injected fault and its recovery",
    "end": "the run finished (or was interrupted): summary",
}


class EventsWriter:
    """Appends events to a file; usable as an event sink (a callable)."""

    def __init__(self, path: str | Path, flush_every: int = 256) -> None:
        self.path = Path(path)
        self._file: BinaryIO = self.path.open("ab")
        self._packer = msgpack.Packer()
        self._pending = 0
        self.flush_every = flush_every
        self.count = 0

    def __call__(self, event: dict) -> None:
        self._file.write(self._packer.pack(event))
        self.count += 1
        self._pending += 1
        if self._pending >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        self._file.flush()
        self._pending = 0

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


_INT64 = 1 << 63
# What the observers (dashboard, trace export, plots) read of each event type, and its type.
# A stream that lacks one is not one this version wrote: a one-line error, not a traceback.
_REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "setup": {"name": str, "nodes": int, "groups": list},
    "arrival": {"group": str},
    "router": {"group": str, "end_ns": int, "ttft_ns": int, "requests": list},
    "switch": {"group": str, "model": str, "ready_ns": int, "victims": list, "prefetch": bool, "arrivals": dict,
               "shard_bytes": int},
    "run": {"group": str, "model": str, "end_ns": int, "ttft_ns": int, "requests": list},
    "done": {"group": str, "ttft_ns": int, "tpot_ns": int},
    "fault": {"kind": str, "target": str},
    "end": {"summary": dict},
}


def _check_event(event: object, where: str) -> None:
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise UserError(f"{where}: not an event (expected a map with a type, found {type(event).__name__})")
    kind = event["type"]
    fields = {"t_ns": int, **_REQUIRED.get(kind, {})}
    for name, expected in fields.items():
        value = event.get(name)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise UserError(f"{where} ({kind}): field {name!r} missing or not {getattr(expected, '__name__', expected)}")
        if expected is int and not 0 <= value < _INT64:
            raise UserError(f"{where} ({kind}): field {name!r} = {value} is outside 0..2^63 ns")
    if kind == "setup":
        for group in event["groups"]:
            if not (isinstance(group, dict) and isinstance(group.get("name"), str)
                    and isinstance(group.get("node"), int) and isinstance(group.get("members"), list)
                    and all(isinstance(m, str) for m in group["members"])):
                raise UserError(f"{where} (setup): a group is not {{name, node, members}}: {group!r}")


def read_events(path: str | Path) -> Iterator[dict]:
    """Every complete event in `path`; a truncated last event (a crash mid-write) is dropped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such events file")
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    count = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            unpacker.feed(chunk)
            try:
                for event in unpacker:
                    count += 1
                    _check_event(event, f"{path}: event {count}")
                    yield event
            except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
                raise UserError(f"{path}: corrupt event stream ({exc})") from None
