"""The raw event stream of a run, `events.msgpack`: one msgpack map per event, appended as the
run goes and flushed often, so a run that crashes still leaves everything up to the crash.

Events are the typed events of `rdu.scheduler.timeline`, written as maps (their `type` and
fields) in the order the serving loop produces them, which is not always time order (a run's
`done` events carry their future finish times). `read_events` returns the typed events a file
holds, refuses a record that is not one with one line, and stops cleanly at a truncated tail;
`read_run` also checks that they are the events of one run (its setup first).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import msgpack

from rdu.base import UserError
from rdu.scheduler.timeline import Event, Setup, from_record, to_record

__all__ = ["EventsWriter", "read_events", "read_run", "EVENTS_FILE"]

EVENTS_FILE = "events.msgpack"


class EventsWriter:
    """Appends events to a file; usable as an event sink (a callable)."""

    def __init__(self, path: str | Path, flush_every: int = 256) -> None:
        self.path = Path(path)
        self._file: BinaryIO = self.path.open("ab")
        self._packer = msgpack.Packer()
        self._pending = 0
        self.flush_every = flush_every
        self.count = 0

    def __call__(self, event: Event) -> None:
        self.write_packed(self._packer.pack(to_record(event)), 1)

    def write_packed(self, data: bytes, count: int) -> None:
        """Append `count` events already packed (an engine's timeline of one round)."""
        self._file.write(data)
        self.count += count
        self._pending += count
        if self._pending >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        self._file.flush()
        self._pending = 0

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


def read_events(path: str | Path) -> Iterator[Event]:
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
                    yield from_record(event, f"{path}: event {count}")
            except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
                raise UserError(f"{path}: event {count + 1}: corrupt event stream ({exc})") from None


def read_run(path: str | Path) -> tuple[Setup, Iterator[Event]]:
    """The setup event of the run in `path` and an iterator over the events after it; a stream
    that does not start with a setup, or holds a second one, is refused with one line."""
    events = read_events(path)
    first = next(events, None)
    if first is None:
        raise UserError(f"{path}: no events (the run stopped before it started)")
    if not isinstance(first, Setup):
        raise UserError(f"{path}: event 1: the stream does not start with a setup event (found {first.type})")

    def rest() -> Iterator[Event]:
        for count, event in enumerate(events, start=2):
            if isinstance(event, Setup):
                raise UserError(f"{path}: event {count}: a second setup event (two runs in one file?)")
            yield event
    return first, rest()
