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
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from interconnect.spec_fields import UserError
from interconnect.topology import Topology
from node.events_log import EVENTS_FILE, read_events
from node.live_stats import CopyLinks, Residency, node_of

__all__ = ["write_trace", "build_trace_json", "TRACE_FILE"]

TRACE_FILE = "trace.json"
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


class _TraceBuilder:
    """Collects trace events per track as pre-rendered JSON bodies: the members of a TP group
    share each span, so a span's body is rendered once and stamped onto every member's track
    (a run of the whole Azure trace has ~370k events; building them as dicts doubles the time)."""

    def __init__(self, setup: dict) -> None:
        self.setup = setup
        self.tracks = _Tracks(setup)
        self.members = {g["name"]: list(g["members"]) for g in setup["groups"]}
        self.group_node = {g["name"]: int(g["node"]) for g in setup["groups"]}
        self.residency = {name: Residency() for name in self.members}
        self.copy_links = CopyLinks(host_link=bool(setup.get("host_link")))
        self.waiting = {name: 0 for name in self.members}
        self.by_track: dict[tuple[int, int], list[tuple[float, float, int, str, str]]] = defaultdict(list)
        self.counters: list[tuple[int, str, float, str]] = []   # pid, name, ts, args JSON
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
                self.by_track[(track.pid, track.tid)].append((ts, -dur, depth, "X", body))

    def _counter(self, pid: int, name: str, t_ns: int, args_json: str) -> None:
        self.counters.append((pid, name, _us(t_ns), args_json))

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

    def _on_switch(self, event: dict) -> None:
        group = event["group"]
        residency = self.residency[group]
        residency.apply_switch(event)
        used = f'{{"GiB":{round(residency.used_bytes / _GIB, 3)}}}'
        for member in self.members[group]:
            self._counter(node_of(member) + 1, f"{member} HBM used", event["t_ns"], used)
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
        self.by_track[(pid, 0)].append((_us(event.get("t_ns", 0)), 0.0, 0, "i", body))

    def trace_json(self, ended: bool, events: int) -> str:
        """The whole trace as JSON text, every track in time order (parents before children)."""
        for group in list(self.latest_run):
            self._draw_run(group)
        parts = [_json(m) for m in self.tracks.metadata]
        for (pid, tid), spans in sorted(self.by_track.items()):
            spans.sort()  # by (ts, -dur, depth): parents first; emitted nearly in order, so close to linear
            parts.extend(f'{{"ph":"{ph}","pid":{pid},"tid":{tid},{body}}}' for _, _, _, ph, body in spans)
        self.counters.sort()
        parts.extend(f'{{"ph":"C","pid":{pid},"tid":0,"name":{_json(name)},"ts":{ts},"args":{args}}}'
                     for pid, name, ts, args in self.counters)
        other = {"run": self.setup.get("name", "?"), "platform": self.setup.get("platform", "?"), "events": events,
                 "complete": ended, "collectives": _COLLECTIVES_NOTE,
                 "time": "virtual time of the emulated machine, floored to whole microseconds"}
        return '{"traceEvents":[\n' + ",\n".join(parts) + f'\n],"displayTimeUnit":"ms","otherData":{_json(other)}}}'


def build_trace_json(events_path: str | Path) -> str:
    """The Chrome trace of the events in `events_path`, as JSON text (a truncated stream gives
    the trace up to where it stops)."""
    builder: _TraceBuilder | None = None
    ended, count = False, 0
    for event in read_events(events_path):
        count += 1
        if event["type"] == "setup":
            builder = _TraceBuilder(event)
        elif builder is None:
            raise UserError(f"{events_path}: the stream does not start with a setup event")
        elif event["type"] == "end":
            ended = True
        else:
            builder.feed(event)
    if builder is None:
        raise UserError(f"{events_path}: no events (the run stopped before it started)")
    return builder.trace_json(ended, count)


def write_trace(run_dir: str | Path) -> Path:
    """Write run_dir/trace.json from run_dir/events.msgpack; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    text = build_trace_json(run_dir / EVENTS_FILE)
    path = run_dir / TRACE_FILE
    partial = path.with_name(f".{TRACE_FILE}.{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return path
