"""Serving a workload on a cluster of TP groups, by one of two schedulers chosen by name:

* `static` (scheduler/static.py): the paper's benchmark cycle, kept for the reproduction;
* `continuous` (scheduler/continuous.py): iteration-level batching with paged KV, chunked
  prefill, preemption and background expert switching, from event to event.

`CoEServer` checks the configuration and hands the run to the chosen engine; both return a
`ServingResult` and emit the same event dicts (plus the continuous engine's own).
"""

from __future__ import annotations

from collections.abc import Callable

from rdu.base import UserError
from rdu.scheduler.backend import ServingBackend
from rdu.scheduler.dispatch import DISPATCH, PLACEMENT
from rdu.scheduler.metrics import RequestRecord
from rdu.scheduler.policies import make_policy
from rdu.scheduler.serving_types import (PREEMPTION, ROUTER_ID, SCHEDULER_KINDS, ServingConfig, ServingResult,
                                     ServingStopped, expert_id)
from rdu.scheduler.step_scheduler import MODEL_SELECTION, StepConfig
from rdu.scheduler.workloads import Workload
from rdu.socket_actor.model_spec import ModelSpec

__all__ = ["ServingConfig", "CoEServer", "ServingResult", "ServingStopped", "DISPATCH", "PLACEMENT", "ROUTER_ID",
           "expert_id", "SCHEDULER_KINDS", "PREEMPTION", "MODEL_SELECTION"]


def _check(config: ServingConfig, experts: int) -> None:
    """One-line errors for a serving configuration that cannot run."""
    if experts < 1:
        raise UserError(f"experts: expected at least 1, got {experts}")
    choices = (("kind", config.kind, SCHEDULER_KINDS), ("dispatch", config.dispatch, DISPATCH),
               ("preemption", config.preemption, PREEMPTION), ("placement", config.placement, PLACEMENT),
               ("model_selection", config.model_selection, MODEL_SELECTION))
    for key, value, allowed in choices:
        if value not in allowed:
            raise UserError(f"scheduler.{key}: expected one of {', '.join(allowed)}, got {value!r}")
    for key in ("max_batch", "max_num_batched_tokens", "max_num_seqs", "block_size"):
        if getattr(config, key) < 1:
            raise UserError(f"scheduler.{key}: expected at least 1, got {getattr(config, key)}")
    if config.max_num_seqs > config.max_num_batched_tokens:
        raise UserError(f"scheduler.max_num_seqs: {config.max_num_seqs} sequences cannot all decode within "
                        f"max_num_batched_tokens {config.max_num_batched_tokens}")
    if config.preemption == "swap":
        raise UserError("scheduler.preemption: swap (KV to DDR and back) is not modelled yet; use recompute")
    make_policy(config.policy, [])
    bad_pins = [e for e in config.pinned_experts if not 0 <= e < experts]
    if bad_pins:
        raise UserError(f"scheduler.pinned_experts: no expert {bad_pins[0]} (experts are 0..{experts - 1})")


class CoEServer:
    """Serves one workload on one backend with the configured scheduler."""

    def __init__(self, backend: ServingBackend, expert_model: ModelSpec, experts: int, router_model: ModelSpec,
                 workload: Workload, config: ServingConfig,
                 on_event: Callable[[dict], None] | None = None,
                 on_record: Callable[[RequestRecord], None] | None = None, keep_records: bool = True) -> None:
        _check(config, experts)
        for fault in config.faults:  # a fault that can never fire is a mistake, not a quiet no-op
            if fault.request is not None and fault.request >= len(workload.requests):
                raise UserError(f"fault {fault.text!r}: request={fault.request} never arrives: the workload has "
                                f"{len(workload.requests)} requests (0..{len(workload.requests) - 1})")
        self.kind = config.resolved_kind(workload.kind)
        if config.kind == "auto" and getattr(backend, "functional", False):
            self.kind = "static"   # functional payloads ride on the static cycle's runs
        if self.kind == "continuous":
            if config.faults or getattr(backend, "functional", False):
                raise UserError("scheduler.kind: continuous does not inject faults or carry functional payloads "
                                "yet; use scheduler.kind: static")
            from rdu.scheduler.continuous import ContinuousServer

            step = StepConfig(config.max_num_batched_tokens, config.max_num_seqs, config.block_size,
                              config.model_selection, config.max_span_iterations)
            self.engine = ContinuousServer(backend, expert_model, experts, router_model, workload, config, step,
                                           on_event, on_record, keep_records)
        else:
            from rdu.scheduler.static import StaticServer

            self.engine = StaticServer(backend, expert_model, experts, router_model, workload, config, on_event,
                                       on_record, keep_records)
        self.placement = self.engine.placement

    def run(self) -> ServingResult:
        return self.engine.run()

    def result(self) -> ServingResult:
        return self.engine.result()
