"""Serving a workload on a cluster of TP groups, by one of two schedulers chosen by name:

* `static` (scheduler/static.py): the paper's benchmark cycle, kept for the reproduction;
* `continuous` (scheduler/continuous.py): iteration-level batching with paged KV, chunked
  prefill, preemption and background expert switching, from event to event.

`CoEServer` checks the configuration, places the experts in the nodes' capacity tiers, and hands
the run to the ingress, which routes requests to one engine per partition of the cluster
(scheduler/ingress.py, scheduler/partition.py). Both engines produce the same typed timeline
(scheduler/timeline.py).
"""

from __future__ import annotations

from collections.abc import Callable

from rdu.base import UserError
from rdu.scheduler.backend import Cluster
from rdu.scheduler.dispatch import DISPATCH, PLACEMENT, place_experts
from rdu.scheduler.engine_recipe import EngineRecipe
from rdu.scheduler.ingress import Ingress
from rdu.scheduler.metrics import RequestRecord
from rdu.scheduler.policies import make_policy
from rdu.scheduler.serving_types import (PREEMPTION, ROUTER_ID, SCHEDULER_KINDS, ServingConfig, ServingResult,
                                     ServingStopped, expert_id)
from rdu.scheduler.step_scheduler import MODEL_SELECTION
from rdu.scheduler.timeline import Event
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
    if not config.dispatch_window_ms > 0:
        raise UserError(f"scheduler.dispatch_window_ms: expected a time > 0, got {config.dispatch_window_ms}")
    make_policy(config.policy, [])
    bad_pins = [e for e in config.pinned_experts if not 0 <= e < experts]
    if bad_pins:
        raise UserError(f"scheduler.pinned_experts: no expert {bad_pins[0]} (experts are 0..{experts - 1})")


class CoEServer:
    """Serves one workload on one cluster with the configured scheduler: the ingress routes the
    requests, one engine per partition of the cluster serves them (scheduler/ingress.py)."""

    def __init__(self, cluster: Cluster, expert_model: ModelSpec, experts: int, router_model: ModelSpec,
                 workload: Workload, config: ServingConfig,
                 on_event: Callable[[Event], None] | None = None,
                 on_record: Callable[[RequestRecord], None] | None = None, keep_records: bool = True,
                 on_timeline: Callable[[bytes, int], None] | None = None,
                 stop_requested: Callable[[], bool] | None = None) -> None:
        _check(config, experts)
        sockets = {m for info in cluster.groups() for m in info.members}
        for fault in config.faults:   # a fault that can never fire is a mistake, not a quiet no-op
            if fault.request is not None and fault.request >= len(workload.requests):
                raise UserError(f"fault {fault.text!r}: request={fault.request} never arrives: the workload has "
                                f"{len(workload.requests)} requests (0..{len(workload.requests) - 1})")
            targets = [fault.target] if fault.kind == "kill-socket" else list(fault.link) if fault.kind == "drop-link" \
                else []
            missing = [t for t in targets if t not in sockets]
            if fault.kind == "kill-node" and int(fault.target.removeprefix("node")) >= cluster.nodes:
                missing = [fault.target]
            if missing:
                raise UserError(f"fault {fault.text!r}: no {missing[0]} in this cluster of {cluster.nodes} node(s)")
        self.kind = config.resolved_kind(workload.kind)
        self.placement = place_experts(cluster, experts, expert_model.weight_bytes(), router_model.weight_bytes(),
                                       config.placement if self.kind == "continuous" else "spread",
                                       [r.expert for r in workload.requests])
        self.recipe = EngineRecipe(self.kind, expert_model, router_model, experts, workload, config, self.placement,
                                   listening=on_event is not None or on_timeline is not None)
        self.ingress = Ingress(cluster, self.recipe, int(config.dispatch_window_ms * 1e6), on_event, on_timeline,
                               on_record, keep_records, stop_requested)

    def prepare(self) -> None:
        """The engines built and their set-up done (the run's set-up phase; `run` does it if not)."""
        try:
            self.ingress.prepare()
        except BaseException:
            self.ingress.close()
            raise

    def run(self) -> ServingResult:
        try:
            return self.ingress.run()
        except KeyboardInterrupt:
            self.ingress.result()   # the totals so far, gathered while the engines are still there
            raise
        finally:
            self.ingress.close()

    def result(self) -> ServingResult:
        return self.ingress.result()

    def backend_info(self) -> dict:
        return self.ingress.backend_info()
