"""Per-request records and the run summary (emulated results only: deterministic)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, fields

import numpy as np

__all__ = ["RequestRecord", "GroupStats", "summarize", "records_csv", "percentiles"]


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


def percentiles(values: list[int] | np.ndarray) -> dict[str, int]:
    if len(values) == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "mean": 0, "max": 0}
    array = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"p50": int(round(p50)), "p90": int(round(p90)), "p99": int(round(p99)),
            "mean": int(round(array.mean())), "max": int(array.max())}


def summarize(records: list[RequestRecord], groups: list[GroupStats], requests_in: int,
              inter_node_bytes: int, setup_ns: int = 0) -> dict:
    """The numbers of `summary.json`. `virtual_ns` counts from the first arrival (after the
    set-up that loads the router, `setup_ns`) to the last completion."""
    finish = max((r.finish_ns for r in records), default=setup_ns) - setup_ns
    tokens = sum(r.output_tokens for r in records)
    busy = sum(g.busy_ns for g in groups)
    accesses = sum(g.accesses for g in groups)
    return {
        "requests_in": requests_in,
        "requests_completed": len(records),
        "output_tokens": tokens,
        "virtual_ns": finish,
        "setup_ns": setup_ns,
        "throughput_tokens_per_s": round(tokens / (finish / 1e9), 6) if finish else 0.0,
        "throughput_requests_per_s": round(len(records) / (finish / 1e9), 6) if finish else 0.0,
        "ttft_ns": percentiles([r.ttft_ns for r in records]),
        "tpot_ns": percentiles([r.tpot_ns for r in records if r.output_tokens > 1]),
        "e2e_ns": percentiles([r.e2e_ns for r in records]),
        "switch_wait_ns": percentiles([r.switch_wait_ns for r in records]),
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


def records_csv(records: list[RequestRecord]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    names = [f.name for f in fields(RequestRecord)]
    writer.writerow(names)
    for record in sorted(records, key=lambda r: r.id):
        values = (getattr(record, n) for n in names)
        writer.writerow([int(v) if isinstance(v, bool) else v for v in values])
    return out.getvalue()
