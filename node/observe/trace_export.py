"""A run's timeline as a Chrome trace (`trace.json`), which Perfetto (ui.perfetto.dev) and
chrome://tracing open: built from `events.msgpack` alone, so it works on a crashed run too.

What it draws comes from the reducer the dashboard and the plots use (`timeline_state`): HBM
residency, the copies on their links, runs cut short by faults. Layout: one process per node; in
it, per socket, one track for what the socket computes (router and expert runs, each split into
prefill and decode, the waits for a switch, preemptions), one per lane of its DDR -> HBM copy
path that is its own (the links of `Topology.copy_path` that only its copies cross, e.g. its DDR
channel and its DDR -> HBM link) and one for its P2P port (the collective time of each run,
which the cost model gives as a total per run: the span covers the run and its name and args
carry the total); then one per lane the node's sockets share (GPU platforms: host DRAM and
PCIe), which every copy into the node crosses. Counters: HBM occupancy per socket, and requests
waiting per group.

Timestamps are microseconds, floored to whole microseconds: exact in floating point, so spans
that nest in integer nanoseconds still nest after a viewer converts them (a nanosecond lost to
rounding would make a decode span stick out of its run). Spans on one track never overlap
unless one contains the other.

Memory does not grow with the run: events are read one at a time, the reducer keeps only state
bounded by the cluster (the latest run of each group, HBM residency, lane queues), and the trace
events it makes go to an external merge sort (`_SpillSorter`: sorted runs of at most
`SPILL_ITEMS` events spilled to a hidden directory in the run directory, merged while the file is
written), so a 100k-request run is exported in the memory of a 300-request one.
"""

from __future__ import annotations

import heapq
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import msgpack

from rdu.base import UserError
from rdu.interconnect.topology import Topology
from rdu.node.observe.events_log import EVENTS_FILE, read_run
from rdu.node.observe.timeline_state import CopyHold, GroupState, Lane, RunSpan, TimelineState, TimelineView
from rdu.scheduler.timeline import End, Event, Fault, Preempt, Setup, to_record

__all__ = ["write_trace", "build_trace_json", "TRACE_FILE", "SPILL_ITEMS"]

TRACE_FILE = "trace.json"
SPILL_ITEMS = 100_000   # trace events held in memory before a sorted run is spilled (~40 MB)
_GIB = float(1 << 30)
_COLLECTIVES_NOTE = ("aggregated: the cost model gives a run's collective time as one total over its prefill and "
                     "decode steps; this span covers the run, collective_ns is the part spent in collectives")


def _us(t_ns: int) -> float:
    """Whole microseconds, floored (monotonic, so nesting survives)."""
    return float(int(t_ns) // 1000)


@dataclass(frozen=True)
class _Track:
    pid: int
    tid: int


class _Tracks:
    """Processes (nodes) and threads (sockets, copy lanes), with their metadata events: per
    socket its compute, its own copy lanes and its P2P port; per node the lanes its sockets'
    copies share."""

    def __init__(self, setup: Setup, lanes_of: dict[str, tuple[Lane, ...]]) -> None:
        self.metadata: list[dict] = []
        self._tracks: dict[str, _Track] = {}
        members_by_node: dict[int, list[str]] = {}
        for group in setup.groups:
            for member in group.members:
                members_by_node.setdefault(Topology.parse(member)[0], []).append(member)
        for node, members in sorted(members_by_node.items()):
            pid = node + 1
            self._meta("process_name", pid, 0, {"name": f"node{node} ({setup.platform})"})
            self._meta("process_sort_index", pid, 0, {"sort_index": node})
            tid = 0
            shared: dict[str, Lane] = {}
            for member in sorted(dict.fromkeys(members), key=Topology.parse):
                tid += 1
                self._add(member, f"{member} compute", pid, tid)
                for lane in lanes_of.get(member, ()):
                    if lane.shared:
                        shared[lane.name] = lane
                    else:
                        tid += 1
                        self._add(lane.name, lane.label, pid, tid)
                tid += 1
                self._add(_p2p(member), f"{member} P2P link (collectives)", pid, tid)
            for lane in shared.values():
                tid += 1
                self._add(lane.name, lane.label, pid, tid)

    def _meta(self, name: str, pid: int, tid: int, args: dict) -> None:
        self.metadata.append({"ph": "M", "name": name, "pid": pid, "tid": tid, "args": args})

    def _add(self, key: str, label: str, pid: int, tid: int) -> None:
        self._tracks[key] = _Track(pid, tid)
        self._meta("thread_name", pid, tid, {"name": label})
        self._meta("thread_sort_index", pid, tid, {"sort_index": tid})

    def get(self, key: str) -> _Track | None:
        return self._tracks.get(key)


def _p2p(member: str) -> str:
    """The key of a socket's P2P track (collectives are not copies: no lane of the reducer)."""
    return f"{member} p2p"


_json = json.JSONEncoder(separators=(",", ":"), default=repr).encode   # one encoder: json.dumps builds one per call


# A trace event as a sort key that carries its own rendering: spans and instants
# (0, pid, tid, ts, -dur, depth, ph, body) sort by track, then time, parents first; counters
# (1, pid, name, ts, args_json) after them, by series then time. Both are plain tuples of
# numbers and strings so that msgpack round-trips them for the external sort.
_Item = tuple


class _SpillSorter:
    """An external merge sort of trace events: memory is bounded by `max_items` and the merge
    fan-in, not by the number of events (sorted runs are merged level by level, `FAN_IN` at a
    time, so at most `FAN_IN` files are ever read at once); with `spill_dir=None` everything
    stays in memory (small traces)."""

    FAN_IN = 16

    def __init__(self, spill_dir: Path | None, max_items: int | None = None) -> None:
        self.spill_dir = spill_dir
        self.max_items = max(1, int(SPILL_ITEMS if max_items is None else max_items))
        self._buffer: list[_Item] = []
        self._levels: list[list[Path]] = []   # level k holds runs merged from FAN_IN**k spills
        self._files = 0

    def add(self, item: _Item) -> None:
        self._buffer.append(item)
        if self.spill_dir is not None and len(self._buffer) >= self.max_items:
            self._buffer.sort()
            self._push(0, self._write(self._buffer))
            self._buffer = []

    def _write(self, items) -> Path:
        """One sorted run file from sorted `items` (an iterable, consumed lazily)."""
        path = self.spill_dir / f"run{self._files:06d}.msgpack"
        self._files += 1
        packer, chunk = msgpack.Packer(), []
        with path.open("wb") as handle:
            for item in items:
                chunk.append(packer.pack(item))
                if len(chunk) >= 4096:
                    handle.write(b"".join(chunk))
                    chunk = []
            handle.write(b"".join(chunk))
        return path

    def _push(self, level: int, path: Path) -> None:
        """Add a run at `level`; a full level is merged into one run of the next."""
        while len(self._levels) <= level:
            self._levels.append([])
        self._levels[level].append(path)
        if len(self._levels[level]) >= self.FAN_IN:
            runs, self._levels[level] = self._levels[level], []
            merged = self._write(heapq.merge(*(self._read_run(run) for run in runs)))
            for run in runs:
                run.unlink()
            self._push(level + 1, merged)

    @staticmethod
    def _read_run(path: Path) -> Iterator[_Item]:
        with path.open("rb") as handle:
            yield from msgpack.Unpacker(handle, use_list=False, raw=False, read_size=1 << 16)

    def sorted_items(self) -> Iterator[_Item]:
        """Every item added, in order (at most FAN_IN spilled runs, read back lazily)."""
        self._buffer.sort()
        runs = [run for level in self._levels for run in level]
        if not runs:
            return iter(self._buffer)
        while len(runs) > self.FAN_IN:  # one run per level is left over: bound the final fan-in too
            merged = self._write(heapq.merge(*(self._read_run(run) for run in runs[:self.FAN_IN])))
            for run in runs[:self.FAN_IN]:
                run.unlink()
            runs = [merged, *runs[self.FAN_IN:]]
        return heapq.merge(*(self._read_run(run) for run in runs), self._buffer)


class _TraceBuilder(TimelineView):
    """Draws what the reducer (`TimelineState`, shared with the dashboard and the plots) derives
    from the events as trace events, pre-rendered as JSON bodies: the members of a TP group
    share each span, so a span's body is rendered once and stamped onto every member's track
    (a run of the whole Azure trace has ~370k events; building them as dicts doubles the time).
    Trace events go to `sink` as they are made; the builder keeps only per-group and per-lane state."""

    def __init__(self, setup: Setup, sink: Callable[[_Item], None], where: str = "setup") -> None:
        self.setup = setup
        self.sink = sink
        self.state = TimelineState(setup, self, where)
        self.tracks = _Tracks(setup, self.state.lanes_of)

    def _span(self, keys: list[str], name: str, category: str, start_ns: int, end_ns: int, args: dict | None,
              depth: int = 0) -> None:
        """One span on the track of each of `keys` (sockets or lanes)."""
        if end_ns < start_ns:
            return
        ts = _us(start_ns)
        dur = _us(end_ns) - ts
        body = f'"name":{_json(name)},"cat":"{category}","ts":{ts},"dur":{dur}' + \
            (f',"args":{_json(args)}' if args else "")
        for key in keys:
            track = self.tracks.get(key)
            if track is not None:
                self.sink((0, track.pid, track.tid, ts, -dur, depth, "X", body))

    def _instant(self, places: list[tuple[int, int]], scope: str, name: str, category: str, t_ns: int,
                 args: dict) -> None:
        """One instant at each (pid, tid) of `places`, its body rendered once."""
        ts = _us(t_ns)
        body = f'"s":"{scope}","name":{_json(name)},"cat":"{category}","ts":{ts},"args":{_json(args)}'
        for pid, tid in places:
            self.sink((0, pid, tid, ts, 0.0, 0, "i", body))

    def _counter(self, pid: int, name: str, t_ns: int, args_json: str) -> None:
        self.sink((1, pid, name, _us(t_ns), args_json))

    def feed(self, event: Event) -> None:
        self.state.feed(event)
        if isinstance(event, Fault):
            self._fault(event)
        elif isinstance(event, Preempt):
            self._preempt(event)

    def finish(self) -> None:
        """Draw the runs still held (the last of each group)."""
        self.state.finish()

    # -- what the reducer reports ---------------------------------------------------------------
    def waiting_changed(self, group: GroupState, t_ns: int) -> None:
        self._counter(group.node + 1, f"{group.name} requests waiting", t_ns, f'{{"requests":{group.waiting}}}')

    def hbm_changed(self, group: GroupState, t_ns: int) -> None:
        used = f'{{"GiB":{round(group.residency.used_bytes / _GIB, 3)}}}'
        for member in group.members:
            self._counter(Topology.parse(member)[0] + 1, f"{member} HBM used", t_ns, used)

    def copy_held(self, hold: CopyHold) -> None:
        args = {"to": hold.member, "group": hold.group, "links": list(hold.lane.links), "sent_ns": hold.sent_ns,
                "arrival_ns": hold.arrival_ns, "waited_for_link_ns": hold.start_ns - hold.sent_ns,
                "shard_bytes": hold.shard_bytes}
        self._span([hold.lane.name], f"{'prefetch' if hold.prefetch else 'copy'} {hold.model}", "switch",
                   hold.start_ns, hold.end_ns, args)

    def run_ended(self, group: GroupState, span: RunSpan) -> None:
        run, members = span.run, group.members
        if run.stall_ns > 0:
            self._span(members, f"wait for {run.model} switch", "switch_wait", *span.stall, {"stall_ns": run.stall_ns})
        start, end = span.start_ns, span.end_ns
        if end <= start:
            return  # interrupted before it began
        category = "router" if span.router else "expert"
        args = {"group": group.name, "requests": len(run.requests), "iterations": run.iterations,
                "prefill_tokens": run.prefill_tokens, "decodes": run.decodes, "first_step_ns": run.first_step_ns,
                "run_ns": end - start, "collective_ns": run.collective_ns, "kv_bytes": run.kv_bytes,
                "queued": run.queued}
        if run.accesses:
            args["hbm_hits"] = f"{run.hits} of {run.accesses}"
        if span.interrupted:
            args["interrupted_at_ns"] = end
        self._span(members, run.model, category, start, end, args)
        prefill_end = span.prefill_end_ns
        if prefill_end > start:
            self._span(members, "prefill", category, start, prefill_end, None, depth=1)
        if end > prefill_end:
            self._span(members, "decode", category, prefill_end, end, None, depth=1)
        if run.collective_ns > 0:
            self._span([_p2p(m) for m in members], f"collectives {run.collective_ns / 1e6:,.2f} ms ({run.model})",
                       "collective", start, end, {"collective_ns": run.collective_ns, "run_ns": run.end_ns - start,
                                                  "aggregated": True})

    # -- events drawn as they are ---------------------------------------------------------------
    def _fault(self, event: Fault) -> None:
        group = self.state.groups.get(event.groups[0]) if event.groups else None
        args = {key: value for key, value in to_record(event).items() if key not in ("type", "t_ns")}
        self._instant([(group.node + 1 if group is not None else 1, 0)], "p", "fault", "fault", event.t_ns, args)

    def _preempt(self, event: Preempt) -> None:
        """On the compute track of every member: its KV blocks went (the sequence re-queues)."""
        group = self.state.groups.get(event.group)
        if group is None:
            return
        args = {"request": event.request, "model": event.model, "generated": event.generated, "mode": event.mode,
                "kv_bytes": event.kv_bytes}
        tracks = [self.tracks.get(member) for member in group.members]
        self._instant([(t.pid, t.tid) for t in tracks if t is not None], "t", f"preempt request {event.request}",
                      "preempt", event.t_ns, args)

    def other_data(self, ended: bool, events: int) -> dict:
        return {"run": self.setup.name, "platform": self.setup.platform, "events": events,
                "complete": ended, "collectives": _COLLECTIVES_NOTE,
                "time": "virtual time of the emulated machine, floored to whole microseconds"}


def _render(item: _Item) -> str:
    if item[0] == 0:
        _, pid, tid, _, _, _, ph, body = item
        return f'{{"ph":"{ph}","pid":{pid},"tid":{tid},{body}}}'
    _, pid, name, ts, args = item
    return f'{{"ph":"C","pid":{pid},"tid":0,"name":{_json(name)},"ts":{ts},"args":{args}}}'


def _stream_trace(events_path: str | Path, out: TextIO, spill_dir: Path | None) -> None:
    """Write the Chrome trace of `events_path` to `out`: metadata first, then every track in
    time order (parents before children), then the counters (a truncated stream gives the
    trace up to where it stops)."""
    sorter = _SpillSorter(spill_dir)
    setup, events = read_run(events_path)
    builder = _TraceBuilder(setup, sorter.add, f"{events_path}: event 1 (setup)")
    ended, count = False, 1
    for event in events:
        count += 1
        if isinstance(event, End):
            ended = True
        builder.feed(event)
    builder.finish()
    out.write('{"traceEvents":[\n')
    first = True
    for meta in builder.tracks.metadata:
        out.write(_json(meta) if first else ",\n" + _json(meta))
        first = False
    for item in sorter.sorted_items():
        out.write(_render(item) if first else ",\n" + _render(item))
        first = False
    out.write(f'\n],"displayTimeUnit":"ms","otherData":{_json(builder.other_data(ended, count))}}}')


def build_trace_json(events_path: str | Path) -> str:
    """The Chrome trace of the events in `events_path`, as JSON text, built in memory (for
    small runs and tests; `write_trace` streams to a file in bounded memory)."""
    out = io.StringIO()
    _stream_trace(events_path, out, spill_dir=None)
    return out.getvalue()


def write_trace(run_dir: str | Path) -> Path:
    """Write run_dir/trace.json from run_dir/events.msgpack; returns its path. The trace is
    streamed to a hidden sibling and renamed into place, so a failure never leaves a half
    trace (nor touches an existing one); the spill directory is ours and removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    path = run_dir / TRACE_FILE
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a trace this tool wrote")
    partial = path.with_name(f".{TRACE_FILE}.{os.getpid()}")
    try:
        spill_dir = Path(tempfile.mkdtemp(prefix=f".trace-spill-{os.getpid()}-", dir=run_dir))
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot write there ({exc.strerror})") from None
    try:
        with partial.open("w", encoding="utf-8", buffering=1 << 20) as out:
            _stream_trace(run_dir / EVENTS_FILE, out, spill_dir)
        partial.replace(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot write the trace ({exc.strerror})") from None
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(spill_dir, ignore_errors=True)
    return path
