"""Per-request records and the run summary (emulated results only: deterministic)."""

from __future__ import annotations

import csv
from array import array
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

__all__ = ["RequestRecord", "GroupStats", "MetricsCollector", "RecordsCsvWriter", "summarize", "percentiles",
           "EngineMetrics", "weighted_percentiles"]


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
    preemptions: int = 0   # times its KV was taken back (recomputed later); continuous engine only


@dataclass
class GroupStats:
    name: str
    node: int
    expert_slots: int
    router_ns: int = 0
    expert_ns: int = 0
    stall_ns: int = 0
    collective_ns: int = 0     # part of router_ns + expert_ns spent in TP collectives
    setup_ns: int = 0          # part of router_ns + expert_ns spent on run set-up (a named, fitted cost)
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
        self.queue, self.tpot_all = array("q"), array("q")
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
        self.queue.append(record.queue_ns)
        self.tpot_all.append(record.tpot_ns)
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
            "run_setup_within_runs": sum(g.setup_ns for g in groups),
        },
        "groups": [{"name": g.name, "node": g.node, "expert_slots": g.expert_slots, "batches": g.batches,
                    "switches": g.switches, "prefetches": g.prefetches, "evictions": g.evictions,
                    "hits": g.hits, "expert_runs": g.accesses, "router_ns": g.router_ns, "expert_ns": g.expert_ns,
                    "stall_ns": g.stall_ns} for g in groups],
    }


def weighted_percentiles(values: np.ndarray, weights: np.ndarray) -> dict[str, int]:
    """Percentiles of the multiset where each value counts `weights` times (the same numbers as
    `percentiles` of the expanded list, without ever building it)."""
    total = int(weights.sum()) if len(weights) else 0
    if total == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "mean": 0, "max": 0}
    order = np.argsort(values, kind="stable")
    v, w = values[order].astype(np.float64), weights[order]
    cum = np.cumsum(w)

    def at(rank: int) -> float:  # the value at 0-based position `rank` of the expanded sorted list
        return float(v[int(np.searchsorted(cum, rank, side="right"))])

    out = {}
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        position = (total - 1) * q / 100.0         # numpy's default (linear) percentile
        low = int(np.floor(position))
        high = min(low + 1, total - 1)
        out[name] = int(round(at(low) + (at(high) - at(low)) * (position - low)))
    out["mean"] = int(round(float((v * w).sum()) / total))
    out["max"] = int(v[-1])
    return out


class WeightedValues:
    """A multiset of integers given as (value, count) pairs, in memory bounded by the number of
    distinct values (plus a buffer) rather than by the pairs: the buffer is folded into sorted
    unique values with their total counts whenever it fills. Percentiles stay exact."""

    def __init__(self, buffer_pairs: int = 1 << 18) -> None:
        self.buffer_pairs = buffer_pairs
        self._values, self._counts = array("q"), array("q")
        self._unique = np.zeros(0, dtype=np.int64)
        self._unique_counts = np.zeros(0, dtype=np.int64)

    def add(self, values, count: int) -> None:
        values = list(values)
        self._values.extend(values)
        self._counts.extend([count] * len(values))
        if len(self._values) >= self.buffer_pairs:
            self._fold()

    def add_pairs(self, values: np.ndarray, counts: np.ndarray) -> None:
        """Add (value, count) pairs, e.g. another multiset's `arrays()`."""
        self._values.extend(np.asarray(values, dtype=np.int64).tolist())
        self._counts.extend(np.asarray(counts, dtype=np.int64).tolist())
        if len(self._values) >= self.buffer_pairs:
            self._fold()

    def _fold(self) -> None:
        if not len(self._values):
            return
        values = np.concatenate([self._unique, np.frombuffer(self._values, dtype=np.int64)])
        counts = np.concatenate([self._unique_counts, np.frombuffer(self._counts, dtype=np.int64)])
        self._unique, inverse = np.unique(values, return_inverse=True)
        self._unique_counts = np.zeros(len(self._unique), dtype=np.int64)
        np.add.at(self._unique_counts, inverse, counts)
        self._values, self._counts = array("q"), array("q")

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted distinct values and how often each occurs."""
        self._fold()
        return self._unique, self._unique_counts


class EngineMetrics:
    """What the continuous engine adds to the summary, kept as flat arrays: inter-token gaps as
    (value, count) pairs per span folded by value, never an object per token."""

    def __init__(self) -> None:
        self.itl = WeightedValues()
        self.preemptions = 0
        self.iterations = 0
        self.step_tokens = 0
        self.step_seqs = 0
        self.max_step_tokens = 0
        self.max_step_seqs = 0
        self.model_ns: dict[int, int] = {}
        self.kv_samples = array("d")
        self.swapped_bytes = 0          # KV moved between HBM and the capacity tier by swap preemption

    def merge(self, other: "EngineMetrics") -> None:
        """Add another partition's metrics (partitions merge in order: the result is deterministic)."""
        self.itl.add_pairs(*other.itl.arrays())
        self.preemptions += other.preemptions
        self.iterations += other.iterations
        self.step_tokens += other.step_tokens
        self.step_seqs += other.step_seqs
        self.max_step_tokens = max(self.max_step_tokens, other.max_step_tokens)
        self.max_step_seqs = max(self.max_step_seqs, other.max_step_seqs)
        for model, ns in sorted(other.model_ns.items()):
            self.model_ns[model] = self.model_ns.get(model, 0) + ns
        self.kv_samples.extend(other.kv_samples)
        self.swapped_bytes += other.swapped_bytes

    def itl_values(self, gaps: list[int]) -> None:
        self.itl.add(gaps, 1)

    def itl_weighted(self, steps: np.ndarray, count: int) -> None:
        self.itl.add(steps.tolist(), count)

    def span(self, model: int, busy_ns: int, batch, k: int, rest: int) -> None:
        """Per iteration: tokens and sequences of the step (iteration 0 mixed, then `rest` decodes)."""
        first_tokens = sum(c for _, c in batch.chunks) + len(batch.decodes)
        first_seqs = len(batch.chunks) + len(batch.decodes)
        self.iterations += k
        self.step_tokens += first_tokens + rest * (k - 1)
        self.step_seqs += first_seqs + rest * (k - 1)
        self.max_step_tokens = max(self.max_step_tokens, first_tokens, rest if k > 1 else 0)
        self.max_step_seqs = max(self.max_step_seqs, first_seqs, rest if k > 1 else 0)
        self.model_ns[model] = self.model_ns.get(model, 0) + busy_ns

    def kv_sample(self, memory) -> None:
        """KV share of the HBM the weights leave, when a request completes."""
        pool = memory.usable_bytes - memory.weights_bytes
        self.kv_samples.append(memory.kv_bytes / pool if pool > 0 else 0.0)

    def summary(self, metrics: MetricsCollector, slo_ttft_ms: float | None, slo_tpot_ms: float | None,
                virtual_ns: int, peak_kv_bytes: list[int]) -> dict:
        values, counts = self.itl.arrays()
        busy = sum(self.model_ns.values())
        router = self.model_ns.get(-1, 0)
        experts = {m: ns for m, ns in self.model_ns.items() if m >= 0}
        kv = np.frombuffer(self.kv_samples, dtype=np.float64) if len(self.kv_samples) else np.zeros(1)
        out = {
            "itl_ns": weighted_percentiles(values, counts),
            "queue_ns": percentiles(metrics.queue),
            "preemptions": self.preemptions,
            "swapped_bytes": self.swapped_bytes,
            "kv_utilisation": {"mean_at_completion": round(float(kv.mean()), 6),
                               "max_at_completion": round(float(kv.max()), 6),
                               "peak_kv_bytes_per_socket": max(peak_kv_bytes, default=0)},
            "tokens_per_step": {"mean": round(self.step_tokens / self.iterations, 3) if self.iterations else 0.0,
                                "max": self.max_step_tokens},
            "seqs_per_step": {"mean": round(self.step_seqs / self.iterations, 3) if self.iterations else 0.0,
                              "max": self.max_step_seqs},
            "iterations": self.iterations,
            "model_time_share": {
                "router": round(router / busy, 6) if busy else 0.0,
                "experts": round(sum(experts.values()) / busy, 6) if busy else 0.0,
                "busiest_expert": round(max(experts.values(), default=0) / busy, 6) if busy else 0.0,
                "experts_run": len(experts)},
        }
        if slo_ttft_ms is not None or slo_tpot_ms is not None:
            ttft = np.frombuffer(metrics.ttft, dtype=np.int64)
            tpot = np.frombuffer(metrics.tpot_all, dtype=np.int64)
            ok = np.ones(len(ttft), dtype=bool)
            if slo_ttft_ms is not None:
                ok &= ttft <= slo_ttft_ms * 1e6
            if slo_tpot_ms is not None:
                ok &= tpot <= slo_tpot_ms * 1e6
            good = int(ok.sum())
            out["slo"] = {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms, "attained": round(good / len(ok), 6)
                          if len(ok) else 0.0,
                          "goodput_requests_per_s": round(good / (virtual_ns / 1e9), 6) if virtual_ns else 0.0}
        return out
