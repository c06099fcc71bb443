"""The configuration of a serving run: a YAML file, command-line flags on top (flags win), defaults
under both. Every field is validated with its name; the resolved result is written beside the
run's results as `config.resolved.yaml`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from interconnect.spec_fields import Fields, UserError, deep_merge
from node.layout import nodes_for_tp
from node.platform import Platform, load_platform
from node.yaml_io import read_yaml
from scheduler.faults import parse_faults
from scheduler.policies import POLICIES
from scheduler.serving import DISPATCH, ServingConfig
from scheduler.workloads import WorkloadSpec
from socket_actor.model_spec import ModelSpec, load_model
from socket_actor.spec import MODES, ORCHESTRATIONS

__all__ = ["RunConfig", "resolve_run_config", "DEFAULTS", "BACKENDS"]

BACKENDS = ("ray", "inline")
_TOP = {"name", "platform", "platform_overrides", "nodes", "tp", "model", "router_model", "experts", "workload",
        "scheduler", "execution", "seed", "backend", "out", "address", "faults", "functional"}

DEFAULTS: dict[str, Any] = {
    "platform": "sn40l-node",
    "nodes": 1,
    "tp": 8,
    "model": "llama-2-7b",
    "experts": 150,
    "workload": {"kind": "trace"},
    "scheduler": {"policy": "lru", "max_batch": 8, "dispatch": "expert-affinity", "pinned_experts": []},
    "execution": {},
    "seed": 0,
    "backend": "ray",
    "address": "local",
}


@dataclass
class RunConfig:
    name: str
    platform: Platform
    nodes: int
    tp: int
    model: ModelSpec
    router_model: ModelSpec
    experts: int
    workload: WorkloadSpec
    serving: ServingConfig
    seed: int
    backend: str
    address: str
    out: str
    resolved: dict
    functional: bool = False

    @property
    def sockets(self) -> int:
        return self.nodes * self.platform.spec.sockets_per_node


def _default_name(tree: dict) -> str:
    workload = tree.get("workload", {}) or {}
    parts = [str(tree.get("platform", "platform")).split("/")[-1].removesuffix(".yaml"), str(workload.get("kind")),
             str((tree.get("scheduler") or {}).get("policy", "lru")), f"seed{tree.get('seed', 0)}"]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts))


def resolve_run_config(path: str | None, overrides: dict[str, Any]) -> RunConfig:
    """Defaults <- the YAML file at `path` <- `overrides` (nested like the file)."""
    origin = path or "command line"
    tree: dict = dict(DEFAULTS)
    if path is not None:
        raw = read_yaml(path)
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a mapping of run fields, got {type(raw).__name__}")
        tree = deep_merge(tree, raw)
        if "workload" in raw and isinstance(raw["workload"], dict) and "kind" in raw["workload"] \
                and raw["workload"]["kind"] != DEFAULTS["workload"]["kind"]:
            tree["workload"] = raw["workload"]  # another kind: the default trace fields do not apply
    if overrides.get("workload", {}).get("kind") not in (None, tree["workload"].get("kind")):
        tree["workload"] = {}
    tree = deep_merge(tree, overrides)
    fields = Fields(tree, origin)
    fields.check_known(_TOP)
    platform_name = fields.string("platform")
    platform_overrides = tree.get("platform_overrides") or {}
    if not isinstance(platform_overrides, dict):
        fields.fail("expected a mapping of dotted platform fields to values", "platform_overrides")
    platform = load_platform(platform_name, platform_overrides, f"{origin}: platform_overrides")
    model = load_model(fields.string("model"))
    router = load_model(fields.string("router_model")) if fields.has("router_model") else model
    scheduler = fields.sub("scheduler")
    scheduler.check_known({"policy", "max_batch", "dispatch", "pinned_experts"})
    policy = scheduler.string("policy", choices=tuple(POLICIES))
    pinned = scheduler.data.get("pinned_experts") or []
    if not isinstance(pinned, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in pinned):
        scheduler.fail(f"expected a list of expert numbers, got {pinned!r}", "pinned_experts")
    execution = fields.sub("execution")
    execution.check_known({"mode", "orchestration"})
    faults = parse_faults(tree.get("faults"), f"{origin}: faults")
    serving = ServingConfig(
        faults=faults,
        policy=policy,
        max_batch=scheduler.integer("max_batch"),
        dispatch=scheduler.string("dispatch", choices=DISPATCH),
        pinned_experts=tuple(pinned),
        mode=execution.string("mode", choices=MODES) if execution.has("mode") else None,
        orchestration=execution.string("orchestration", choices=ORCHESTRATIONS) if execution.has("orchestration")
        else None,
    )
    workload = WorkloadSpec.from_fields(fields.sub("workload"))
    tp = fields.integer("tp")
    if tree.get("nodes") == "auto":  # as many nodes as one tensor-parallel group needs
        nodes = nodes_for_tp(platform.spec, tp)
    else:
        nodes = fields.integer("nodes")
    name = fields.string("name") if fields.has("name") else _default_name(tree)
    backend = fields.string("backend", choices=BACKENDS)
    config = RunConfig(
        name=name, platform=platform, nodes=nodes, tp=tp, model=model,
        router_model=router, experts=fields.integer("experts"), workload=workload, serving=serving,
        seed=fields.integer("seed", minimum=0), backend=backend, address=fields.string("address"),
        out=fields.string("out") if fields.has("out") else f"runs/{name}", resolved={},
        functional=fields.boolean("functional", False))
    config.resolved = {
        "name": config.name, "platform": platform_name, "platform_overrides": platform_overrides,
        "nodes": config.nodes, "tp": config.tp, "model": model.name, "router_model": router.name,
        "experts": config.experts, "workload": workload.to_dict(),
        "scheduler": {"policy": policy, "max_batch": serving.max_batch, "dispatch": serving.dispatch,
                      "pinned_experts": list(serving.pinned_experts)},
        "execution": {"mode": serving.mode, "orchestration": serving.orchestration},
        "faults": [f.text for f in faults],
        "seed": config.seed, "backend": backend, "functional": config.functional, "address": config.address, "out": config.out,
        "platform_resolved": platform.values,
        "platform_sources": platform.sources,
    }
    return config
