"""Per-request records and the run summary (emulated results only: deterministic)."""

from __future__ import annotations

import csv
from array import array
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

__all__ = ["RequestRecord", "GroupStats", "MetricsCollector", "RecordsCsvWriter", "summarize", "percentiles"]


@dataclass
class RequestRecord:
    """One served request; every time in virtual nanoseconds."""

    id: int
    arrival_ns: int
    expert: int
    node: int
    group: str
    prompt_tokens: int
    output_tokens: int
    batch_size: int
    expert_batch_size: int
    queue_ns: int          # arrival -> its batch's router starts (incl. forwarding to the node)
    router_ns: int         # the router run of its batch
    expert_wait_ns: int    # router done -> its expert run starts (other experts, switching)
    switch_wait_ns: int    # part of expert_wait_ns spent waiting for its expert's DDR -> HBM copy
    hbm_hit: bool
    ttft_ns: int
    tpot_ns: int
    e2e_ns: int
    finish_ns: int


@dataclass
class GroupStats:
    name: str
    node: int
    expert_slots: int
    router_ns: int = 0
    expert_ns: int = 0
    stall_ns: int = 0
    collective_ns: int = 0     # part of router_ns + expert_ns spent in TP collectives
    switches: int = 0
    prefetches: int = 0
    evictions: int = 0
    accesses: int = 0
    hits: int = 0
    batches: int = 0

    @property
    def busy_ns(self) -> int:
        return self.router_ns + self.expert_ns + self.stall_ns


class MetricsCollector:
    """What the summary needs, in compact arrays (flat memory on long runs); every record also
    goes to `sink` (the run's requests.csv, say), and is kept in `records` only on request."""

    def __init__(self, sink: Callable[[RequestRecord], None] | None = None, keep: bool = True,
                 requests: int = 0) -> None:
        self.sink = sink
        self.served = bytearray(requests)     # one flag per request id: served once, or again?
        self.duplicated = 0
        self.records: list[RequestRecord] = []
        self.keep = keep
        self.ttft, self.tpot, self.e2e, self.switch_wait = array("q"), array("q"), array("q"), array("q")
        self.completed = 0
        self.output_tokens = 0
        self.last_finish_ns = 0

    def add(self, record: RequestRecord) -> None:
        if record.id < len(self.served):
            if self.served[record.id]:
                self.duplicated += 1
                return
            self.served[record.id] = 1
        self.completed += 1
        self.output_tokens += record.output_tokens
        self.last_finish_ns = max(self.last_finish_ns, record.finish_ns)
        self.ttft.append(record.ttft_ns)
        self.e2e.append(record.e2e_ns)
        self.switch_wait.append(record.switch_wait_ns)
        if record.output_tokens > 1:
            self.tpot.append(record.tpot_ns)
        if self.keep:
            self.records.append(record)
        if self.sink is not None:
            self.sink(record)


class RecordsCsvWriter:
    """requests.csv written row by row as requests complete (in the order they were served)."""

    def __init__(self, path: str | Path) -> None:
        self._file = Path(path).open("w", newline="", encoding="utf-8")
        self._names = [f.name for f in fields(RequestRecord)]
        self._writer = csv.writer(self._file, lineterminator="\n")
        self._writer.writerow(self._names)

    def __call__(self, record: RequestRecord) -> None:
        self._writer.writerow([int(v) if isinstance(v, bool) else v for v in (getattr(record, n) for n in self._names)])

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def percentiles(values: list[int] | np.ndarray) -> dict[str, int]:
    if len(values) == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "mean": 0, "max": 0}
    array = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"p50": int(round(p50)), "p90": int(round(p90)), "p99": int(round(p99)),
            "mean": int(round(array.mean())), "max": int(array.max())}


def summarize(metrics: MetricsCollector, groups: list[GroupStats], requests_in: int,
              inter_node_bytes: int, setup_ns: int = 0) -> dict:
    """The numbers of `summary.json`. `virtual_ns` counts from the first arrival (after the
    set-up that loads the router, `setup_ns`) to the last completion."""
    finish = max(metrics.last_finish_ns - setup_ns, 0)
    tokens = metrics.output_tokens
    busy = sum(g.busy_ns for g in groups)
    accesses = sum(g.accesses for g in groups)
    return {
        "requests_in": requests_in,
        "requests_completed": metrics.completed,
        "requests_lost": requests_in - metrics.completed,
        "requests_duplicated": metrics.duplicated,
        "output_tokens": tokens,
        "virtual_ns": finish,
        "setup_ns": setup_ns,
        "throughput_tokens_per_s": round(tokens / (finish / 1e9), 6) if finish else 0.0,
        "throughput_requests_per_s": round(metrics.completed / (finish / 1e9), 6) if finish else 0.0,
        "ttft_ns": percentiles(metrics.ttft),
        "tpot_ns": percentiles(metrics.tpot),
        "e2e_ns": percentiles(metrics.e2e),
        "switch_wait_ns": percentiles(metrics.switch_wait),
        "switches": sum(g.switches for g in groups),
        "prefetches": sum(g.prefetches for g in groups),
        "evictions": sum(g.evictions for g in groups),
        "switch_time_share": round(sum(g.stall_ns for g in groups) / busy, 6) if busy else 0.0,
        "collective_time_share": round(sum(g.collective_ns for g in groups) / busy, 6) if busy else 0.0,
        "hbm_hit_rate": round(sum(g.hits for g in groups) / accesses, 6) if accesses else 0.0,
        "expert_runs": accesses,
        "inter_node_bytes": inter_node_bytes,
        "time_breakdown_ns": {
            "router": sum(g.router_ns for g in groups),
            "switching_stall": sum(g.stall_ns for g in groups),
            "expert": sum(g.expert_ns for g in groups),
            "collectives_within_runs": sum(g.collective_ns for g in groups),
        },
        "groups": [{"name": g.name, "node": g.node, "expert_slots": g.expert_slots, "batches": g.batches,
                    "switches": g.switches, "prefetches": g.prefetches, "evictions": g.evictions,
                    "hits": g.hits, "expert_runs": g.accesses, "router_ns": g.router_ns, "expert_ns": g.expert_ns,
                    "stall_ns": g.stall_ns} for g in groups],
    }
