"""What both schedulers share: the serving configuration, the result, the stop signal, model ids."""

from __future__ import annotations

from dataclasses import dataclass

from rdu.scheduler.faults import FaultSpec
from rdu.scheduler.metrics import GroupStats, RequestRecord

__all__ = ["ServingConfig", "ServingResult", "ServingStopped", "ROUTER_ID", "expert_id", "SCHEDULER_KINDS",
           "PREEMPTION"]

ROUTER_ID = "router"
SCHEDULER_KINDS = ("auto", "static", "continuous")
PREEMPTION = ("recompute", "swap")     # swap: the KV goes to the capacity tier and back


def expert_id(expert: int) -> str:
    return f"expert{expert:04d}"


@dataclass(frozen=True)
class ServingConfig:
    """`kind: auto` is `static` for the paper's benchmark, `continuous` for traces and synthetic
    loads. `max_batch` is the static cycle's; the `max_num_*`,
    `block_size`, `preemption`, `model_selection` and `slo_*` fields are the continuous engine's."""

    policy: str = "lru"
    max_batch: int = 8
    dispatch: str = "expert-affinity"
    pinned_experts: tuple[int, ...] = ()
    mode: str | None = None
    orchestration: str | None = None
    ingress_node: int = 0
    faults: tuple[FaultSpec, ...] = ()
    kind: str = "auto"
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    block_size: int = 16
    preemption: str = "recompute"
    model_selection: str = "round-robin"
    placement: str = "spread"
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    max_span_iterations: int | None = None     # 1: step one iteration at a time (the exactness check)
    dispatch_window_ms: float = 1000.0          # how often nodes report their load to the ingress (virtual)

    def resolved_kind(self, workload_kind: str) -> str:
        if self.kind != "auto":
            return self.kind
        return "continuous" if workload_kind in ("trace", "synthetic") else "static"


@dataclass
class ServingResult:
    records: list[RequestRecord]
    groups: list[GroupStats]
    summary: dict
    placement: dict[str, list[int]]


class ServingStopped(RuntimeError):
    """The emulated cluster can no longer serve (a link down, no node left): the run stops, and
    `result` holds what was served until then."""

    def __init__(self, reason: str, result: ServingResult) -> None:
        super().__init__(reason)
        self.result = result
