"""What the plots of a run show, gathered in one pass over its events and its requests table, in
memory that does not grow with the number of requests: time series are filled into the bins of
one `TimeGrid` while the events are read, latencies are int64 arrays (8 bytes a request).

HBM residency, the copies on their links and the runs (cut short by faults) come from the reducer
the dashboard and the trace use (`timeline_state`), so the three views agree.
"""

from __future__ import annotations

import csv
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rdu.base import UserError
from rdu.node.observe.events_log import read_run
from rdu.node.observe.time_bins import StepSeries, TimeGrid
from rdu.node.observe.timeline_state import CopyHold, GroupState, RunSpan, TimelineState, TimelineView
from rdu.scheduler.timeline import ROUTER_MODEL, Done, End, Event, Evict, Fault, Run, Setup, Switch

__all__ = ["RunData", "GroupSeries", "ACTIVITIES", "gather", "latencies_from_csv", "LATENCY_KEYS"]

ACTIVITIES = ("router", "expert prefill", "expert decode", "switch wait")
LATENCY_KEYS = ("ttft_ns", "tpot_ns", "e2e_ns")


@dataclass
class GroupSeries:
    """One TP group over virtual time (per member: the members of a group are alike)."""

    weights_bytes: StepSeries                # HBM held by model shards
    kv_bytes: StepSeries                     # the KV ledger entry
    batch_sequences: StepSeries              # sequences of its latest run
    busy_ns: dict[str, np.ndarray]           # activity -> busy time per bin
    busy_total_ns: dict[str, int]            # activity -> exact total
    copies_ns: np.ndarray                    # its members' own copy lanes, mean busy time per bin
    copy_total_ns: float = 0.0


@dataclass
class RunData:
    """What the plots need; `grid` holds the bins every series shares."""

    setup: Setup
    grid: TimeGrid
    groups: dict[str, GroupSeries]
    shared_lanes_ns: dict[str, np.ndarray] = field(default_factory=dict)   # lane label -> busy time per bin
    shared_total_ns: dict[str, int] = field(default_factory=dict)
    demand_switches: np.ndarray | None = None
    prefetches: np.ndarray | None = None
    evictions: np.ndarray | None = None
    switches_total: int = 0
    evictions_total: int = 0
    kv_seen: bool = False
    faults: list[tuple[int, str]] = field(default_factory=list)   # (t_ns, "kill-node node1")
    latencies: dict[str, array] = field(default_factory=lambda: {key: array("q") for key in LATENCY_KEYS})
    complete: bool = False

    @property
    def end_ns(self) -> int:
        return self.grid.end_ns


class _Gatherer(TimelineView):
    """Fills a `RunData` from the reducer's reports and the events it does not reduce."""

    def __init__(self, setup: Setup, where: str, latencies: bool) -> None:
        grid = TimeGrid()
        self.data = data = RunData(setup=setup, grid=grid, groups={})
        self.latencies = latencies
        self.state = TimelineState(setup, self, where)
        for name, group in self.state.groups.items():
            data.groups[name] = GroupSeries(
                weights_bytes=grid.steps(), kv_bytes=grid.steps(), batch_sequences=grid.steps(),
                busy_ns={activity: grid.sums() for activity in ACTIVITIES},
                busy_total_ns={activity: 0 for activity in ACTIVITIES}, copies_ns=grid.sums())
        self._copy_share = {name: 1.0 / max(1, len(group.members)) for name, group in self.state.groups.items()}
        for lane in self.state.lanes.values():
            if lane.shared:
                data.shared_lanes_ns[lane.label] = grid.sums()
                data.shared_total_ns[lane.label] = 0
        data.demand_switches, data.prefetches, data.evictions = grid.sums(), grid.sums(), grid.sums()

    def feed(self, event: Event) -> None:
        self.state.feed(event)
        data, grid = self.data, self.data.grid
        if isinstance(event, Run):
            series = data.groups.get(event.group)
            if series is not None:
                grid.set_step(series.batch_sequences, event.t_ns, len(event.requests))
                grid.see(event.end_ns)
        elif isinstance(event, Switch):
            if event.victims:
                grid.add_count(data.evictions, event.t_ns, len(event.victims))
                data.evictions_total += len(event.victims)
            if event.model != ROUTER_MODEL:
                grid.add_count(data.prefetches if event.prefetch else data.demand_switches, event.t_ns)
                data.switches_total += 1
        elif isinstance(event, Evict):
            grid.add_count(data.evictions, event.t_ns, len(event.models))
            data.evictions_total += len(event.models)
        elif isinstance(event, Done):
            grid.see(event.t_ns)
            if self.latencies:
                data.latencies["ttft_ns"].append(event.ttft_ns)
                data.latencies["e2e_ns"].append(event.e2e_ns)
                if event.output_tokens > 1:
                    data.latencies["tpot_ns"].append(event.tpot_ns)
        elif isinstance(event, Fault):
            grid.see(event.t_ns)
            data.faults.append((event.t_ns, f"{event.kind} {event.target}".strip()))
        elif isinstance(event, End):
            grid.see(event.t_ns)
            data.complete = True

    # -- what the reducer reports ---------------------------------------------------------------
    def hbm_changed(self, group: GroupState, t_ns: int) -> None:
        series = self.data.groups[group.name]
        grid = self.data.grid
        grid.set_step(series.weights_bytes, t_ns, group.residency.weights_bytes)
        grid.set_step(series.kv_bytes, t_ns, group.residency.kv_bytes)
        self.data.kv_seen |= group.residency.kv_bytes > 0

    def copy_held(self, hold: CopyHold) -> None:
        held = hold.end_ns - hold.start_ns
        if hold.lane.shared:
            self.data.grid.add_span(self.data.shared_lanes_ns[hold.lane.label], hold.start_ns, hold.end_ns)
            self.data.shared_total_ns[hold.lane.label] += held
        else:
            series, share = self.data.groups[hold.group], self._copy_share[hold.group]
            self.data.grid.add_span(series.copies_ns, hold.start_ns, hold.end_ns, share)
            series.copy_total_ns += held * share

    def run_ended(self, group: GroupState, span: RunSpan) -> None:
        series, grid = self.data.groups[group.name], self.data.grid
        prefill_end = span.prefill_end_ns
        parts = [("router", span.start_ns, span.end_ns)] if span.router else \
            [("expert prefill", span.start_ns, prefill_end), ("expert decode", prefill_end, span.end_ns)]
        parts.append(("switch wait", *span.stall))
        for activity, start, end in parts:
            if end > start:
                grid.add_span(series.busy_ns[activity], start, end)
                series.busy_total_ns[activity] += end - start


def gather(events_path: str | Path, latencies: bool = True) -> RunData:
    """One pass over a run's events (a crashed run's too); with `latencies`, also the latencies
    of the `done` events (for a run without its requests table)."""
    setup, events = read_run(events_path)
    gatherer = _Gatherer(setup, f"{events_path}: event 1 (setup)", latencies)
    for event in events:
        gatherer.feed(event)
    gatherer.state.finish()
    return gatherer.data


def latencies_from_csv(path: Path) -> dict[str, array]:
    """Latencies of a finished run from requests.csv (the per-request table the run wrote)."""
    out = {key: array("q") for key in LATENCY_KEYS}
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                out["ttft_ns"].append(int(row["ttft_ns"]))
                out["e2e_ns"].append(int(row["e2e_ns"]))
                if int(row["output_tokens"]) > 1:
                    out["tpot_ns"].append(int(row["tpot_ns"]))
    except (KeyError, ValueError, OverflowError, TypeError, csv.Error, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a requests table ({exc})") from None
    return out
