"""A run's timeline as a Chrome trace (`trace.json`), which Perfetto (ui.perfetto.dev) and
chrome://tracing open: built from `events.msgpack` alone, so it works on a crashed run too.

Layout: one process per node; in it, per socket, one track for what the socket computes
(router and expert runs, each split into prefill and decode, and the waits for a switch), one
for its DDR -> HBM link (the copies of switches) and one for its P2P port (the collective time
of each run, which the cost model gives as a total per run: the span covers the run and its
name and args carry the total); on GPU platforms one more for the node's shared host link
(PCIe), which every copy crosses. Counters: HBM occupancy per socket, and requests waiting per
group.

Timestamps are microseconds, floored to whole microseconds: exact in floating point, so spans
that nest in integer nanoseconds still nest after a viewer converts them (a nanosecond lost to
rounding would make a decode span stick out of its run). Spans on one track never overlap
unless one contains the other.

Memory does not grow with the run: events are read one at a time, the builder keeps only state
bounded by the cluster (the latest run of each group, HBM residency, link queues), and the trace
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
from rdu.node.observe.events_log import EVENTS_FILE, read_events
from rdu.node.observe.live_stats import CopyLinks, Residency, node_of

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
    """Processes (nodes) and threads (sockets, links), with their metadata events."""

    def __init__(self, setup: dict) -> None:
        self.metadata: list[dict] = []
        self._tracks: dict[str, _Track] = {}
        nodes = int(setup["nodes"])
        members_by_node: dict[int, list[str]] = {n: [] for n in range(nodes)}
        for group in setup["groups"]:
            for member in group["members"]:
                members_by_node.setdefault(node_of(member), []).append(member)
        for node, members in sorted(members_by_node.items()):
            pid = node + 1
            self._meta("process_name", pid, 0, {"name": f"node{node} ({setup.get('platform', '?')})"})
            self._meta("process_sort_index", pid, 0, {"sort_index": node})
            tid = 0
            for member in sorted(members, key=Topology.parse):
                for key, label in ((member, f"{member} compute"), (f"{member}/ddr", f"{member} DDR->HBM link"),
                                   (f"{member}/p2p", f"{member} P2P link (collectives)")):
                    tid += 1
                    self._add(key, label, pid, tid)
            if setup.get("host_link"):
                tid += 1
                self._add(f"node{node}/host", f"node{node} host link (PCIe, shared)", pid, tid)

    def _meta(self, name: str, pid: int, tid: int, args: dict) -> None:
        self.metadata.append({"ph": "M", "name": name, "pid": pid, "tid": tid, "args": args})

    def _add(self, key: str, label: str, pid: int, tid: int) -> None:
        self._tracks[key] = _Track(pid, tid)
        self._meta("thread_name", pid, tid, {"name": label})
        self._meta("thread_sort_index", pid, tid, {"sort_index": tid})

    def get(self, key: str) -> _Track | None:
        return self._tracks.get(key)


_json = json.JSONEncoder(separators=(",", ":")).encode   # one encoder: json.dumps builds one per call


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


class _TraceBuilder:
    """Turns events into trace events, pre-rendered as JSON bodies: the members of a TP group
    share each span, so a span's body is rendered once and stamped onto every member's track
    (a run of the whole Azure trace has ~370k events; building them as dicts doubles the time).
    Trace events go to `sink` as they are made; the builder itself keeps only per-group and
    per-link state."""

    def __init__(self, setup: dict, sink: Callable[[_Item], None]) -> None:
        self.setup = setup
        self.tracks = _Tracks(setup)
        self.members = {g["name"]: list(g["members"]) for g in setup["groups"]}
        self.group_node = {g["name"]: int(g["node"]) for g in setup["groups"]}
        self.residency = {name: Residency() for name in self.members}
        self.copy_links = CopyLinks(host_link=bool(setup.get("host_link")))
        self.waiting = {name: 0 for name in self.members}
        self.sink = sink
        self.latest_run: dict[str, tuple[dict, str]] = {}       # group -> its latest run, drawn once it is over

    def _span(self, keys: list[str], name: str, category: str, start_ns: int, end_ns: int, args: dict | None,
              depth: int = 0) -> None:
        """One span on the track of each of `keys` (sockets or links)."""
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

    def _counter(self, pid: int, name: str, t_ns: int, args_json: str) -> None:
        self.sink((1, pid, name, _us(t_ns), args_json))

    def feed(self, event: dict) -> None:
        handler = getattr(self, f"_on_{event['type']}", None)
        if handler is None or ("group" in event and event["group"] not in self.members):
            return  # done/end events, or a group the setup did not announce
        handler(event)

    def _on_arrival(self, event: dict) -> None:
        group = event["group"]
        self.waiting[group] += 1
        self._counter(self.group_node[group] + 1, f"{group} requests waiting", event["t_ns"],
                      f'{{"requests":{self.waiting[group]}}}')

    def _on_router(self, event: dict) -> None:
        group = event["group"]
        self.waiting[group] = int(event["queued"])
        self._counter(self.group_node[group] + 1, f"{group} requests waiting", event["t_ns"],
                      f'{{"requests":{self.waiting[group]}}}')
        self._hold_run(event, "router")

    def _on_run(self, event: dict) -> None:
        self._hbm(event)  # a continuous span resizes the group's KV entry
        self._hold_run(event, "expert")

    def _hold_run(self, event: dict, category: str) -> None:
        """A run is drawn when the group's next one starts, or cut short by a fault that
        interrupts it (the group then retries it, and the two must not overlap)."""
        group = event["group"]
        if group in self.latest_run:
            self._draw_run(group)
        self.latest_run[group] = (event, category)

    def _draw_run(self, group: str, cut_at_ns: int | None = None) -> None:
        event, category = self.latest_run.pop(group)
        members = self.members[group]
        start, planned_end, ttft = int(event["t_ns"]), int(event["end_ns"]), int(event["ttft_ns"])
        end = planned_end if cut_at_ns is None else min(planned_end, cut_at_ns)
        stall = int(event.get("stall_ns", 0))
        if stall > 0:
            self._span(members, f"wait for {event['model']} switch", "switch_wait", start - stall,
                       min(start, end) if cut_at_ns is not None else start, {"stall_ns": stall})
        if end <= start:
            return  # interrupted before it began
        first_token = min(end, start + ttft)
        collective_ns = int(event.get("collective_ns", 0))
        args = {"group": group, "requests": len(event["requests"]), "ttft_ns": ttft, "run_ns": end - start,
                "collective_ns": collective_ns}
        if "hit" in event:
            args["hbm_hit"] = bool(event["hit"])
        if end < planned_end:
            args["interrupted_at_ns"] = end
        self._span(members, event["model"], category, start, end, args)
        self._span(members, "prefill", category, start, first_token, None, depth=1)
        if end > first_token:
            self._span(members, "decode", category, first_token, end, None, depth=1)
        if collective_ns > 0:
            self._span([f"{m}/p2p" for m in members], f"collectives {collective_ns / 1e6:,.2f} ms ({event['model']})",
                       "collective", start, end, {"collective_ns": collective_ns, "run_ns": planned_end - start,
                                                  "aggregated": True})

    def _hbm(self, event: dict) -> None:
        """Apply an event to its group's HBM residency (the one reducer the dashboard uses too) and
        draw the HBM counter of every member when what the ledgers hold changed."""
        group = event["group"]
        residency = self.residency[group]
        before = residency.used_bytes
        residency.apply(event)
        if residency.used_bytes == before and event["type"] != "switch":
            return
        used = f'{{"GiB":{round(residency.used_bytes / _GIB, 3)}}}'
        for member in self.members[group]:
            self._counter(node_of(member) + 1, f"{member} HBM used", event["t_ns"], used)

    def _on_evict(self, event: dict) -> None:
        self._hbm(event)

    def _on_kv(self, event: dict) -> None:
        self._hbm(event)

    def _on_switch(self, event: dict) -> None:
        self._hbm(event)
        verb = "prefetch" if event["prefetch"] else "copy"
        for copy in self.copy_links.copies(event):
            args = {"sent_ns": copy.sent_ns, "arrival_ns": copy.arrival_ns, "waited_for_link_ns": copy.start_ns -
                    copy.sent_ns, "shard_bytes": copy.shard_bytes, "to": copy.member, "victims": event["victims"]}
            self._span(list(copy.links), f"{verb} {copy.model}", "switch", copy.start_ns, copy.arrival_ns, args)

    def _on_fault(self, event: dict) -> None:
        group = event.get("group")
        for hit in [*event.get("groups", ()), *([group] if group else [])]:
            if hit in self.latest_run:
                self._draw_run(hit, cut_at_ns=int(event["t_ns"]))
        pid = self.group_node[group] + 1 if group in self.group_node else 1
        args = {k: v for k, v in event.items() if k not in ("type", "t_ns")}
        body = f'"s":"p","name":"fault","cat":"fault","ts":{_us(event.get("t_ns", 0))},"args":{_json(args)}'
        self.sink((0, pid, 0, _us(event.get("t_ns", 0)), 0.0, 0, "i", body))

    def finish(self) -> None:
        """Draw the runs still held (the last of each group)."""
        for group in list(self.latest_run):
            self._draw_run(group)

    def other_data(self, ended: bool, events: int) -> dict:
        return {"run": self.setup.get("name", "?"), "platform": self.setup.get("platform", "?"), "events": events,
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
    builder: _TraceBuilder | None = None
    ended, count = False, 0
    for event in read_events(events_path):
        count += 1
        if event["type"] == "setup":
            if builder is not None:
                raise UserError(f"{events_path}: event {count}: a second setup event (two runs in one file?)")
            builder = _TraceBuilder(event, sorter.add)
        elif builder is None:
            raise UserError(f"{events_path}: the stream does not start with a setup event")
        elif event["type"] == "end":
            ended = True
        else:
            builder.feed(event)
    if builder is None:
        raise UserError(f"{events_path}: no events (the run stopped before it started)")
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
