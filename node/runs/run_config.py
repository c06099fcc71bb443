"""The configuration of a serving run: a YAML file, command-line flags on top (flags win), defaults
under both. Every field is validated with its name; the resolved result is written beside the
run's results as `config.resolved.yaml`."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rdu.base import Fields, UserError, deep_merge
from rdu.node.runs.config_fields import BACKENDS, EXECUTION, SCHEDULER, TOP
from rdu.node.cluster.layout import nodes_for_tp
from rdu.node.cluster.platform import Platform, load_platform
from rdu.yaml_io import read_yaml
from rdu.scheduler.faults import parse_faults
from rdu.scheduler.serving import ServingConfig
from rdu.scheduler.workloads import WORKLOAD, WorkloadSpec
from rdu.socket_actor.model_spec import ModelSpec, load_model

__all__ = ["RunConfig", "resolve_run_config", "config_hash", "default_name", "DEFAULTS", "BACKENDS",
           "HASH_EXCLUDED"]

# What the defaults tree starts from: every field with a plain default, from the field tables.
DEFAULTS: dict[str, Any] = {
    **TOP.defaults(),
    "workload": {"kind": WORKLOAD.field("kind").default},
    "scheduler": {key: list(v) if isinstance(v, tuple) else v for key, v in SCHEDULER.defaults().items()},
    "execution": {},
}

# Resolved fields that do not change what a run computes: where it is written and which Ray it
# uses, and the provenance notes of the platform's numbers.
HASH_EXCLUDED = ("name", "out", "address", "platform_sources")


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


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """The digest of a file's content (cached by path, size and time, since a sweep hashes many points)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _identity(resolved: dict) -> dict:
    """The resolved config as the hash sees it: without HASH_EXCLUDED, a trace file by its content
    (so the same trace in another clone hashes the same, and an edited one does not)."""
    tree = {key: value for key, value in resolved.items() if key not in HASH_EXCLUDED}
    workload = tree.get("workload")
    if isinstance(workload, dict) and isinstance(workload.get("trace"), str) and Path(workload["trace"]).is_file():
        stat = Path(workload["trace"]).stat()
        tree["workload"] = {**workload, "trace": {"sha256": _file_sha256(workload["trace"], stat.st_size,
                                                                           stat.st_mtime_ns)}}
    return tree


def config_hash(resolved: dict) -> str:
    """8 hex digits of the SHA-256 of the canonical JSON of a resolved config (`RunConfig.resolved`),
    without `name`, `out`, `address` and the platform's source notes: equal for two runs that compute
    the same thing, different when any field that changes the run differs (nodes, experts, limit, a
    fault, a platform number, ...). Sweeps key their points by it."""
    text = json.dumps(_identity(resolved), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def default_name(resolved: dict) -> str:
    """`<platform>-n<nodes>-tp<tp>-e<experts>-<workload>-<policy>-seed<seed>-<hash>`: readable at a
    glance in `runs/`, and unique per resolved config thanks to the hash."""
    platform = re.sub(r"\.ya?ml$", "", Path(str(resolved["platform"])).name)
    parts = [platform, f"n{resolved['nodes']}", f"tp{resolved['tp']}", f"e{resolved['experts']}",
             str(resolved["workload"]["kind"]), str(resolved["scheduler"]["policy"]), f"seed{resolved['seed']}",
             config_hash(resolved)]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts))


def _tree(path: str | None, overrides: dict[str, Any]) -> dict:
    """Defaults <- the YAML file <- overrides; a workload of another kind replaces the default one
    instead of merging with it (the trace's fields do not apply to a synthetic workload)."""
    tree: dict = dict(DEFAULTS)
    if path is not None:
        raw = read_yaml(path)
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a mapping of run fields, got {type(raw).__name__}")
        sections = ("workload", "scheduler", "execution", "platform_overrides")
        raw = {key: value for key, value in raw.items() if not (key in sections and value is None)}  # empty: defaults
        for section in sections:
            if section in raw and not isinstance(raw[section], dict):
                raise UserError(f"{path}: {section}: expected a mapping of fields, got {raw[section]!r}")
        tree = deep_merge(tree, raw)
        if "workload" in raw and isinstance(raw["workload"], dict) and "kind" in raw["workload"] \
                and raw["workload"]["kind"] != DEFAULTS["workload"]["kind"]:
            tree["workload"] = raw["workload"]
    if overrides.get("workload", {}).get("kind") not in (None, tree["workload"].get("kind")):
        tree["workload"] = {}
    return deep_merge(tree, overrides)


def _serving(fields: Fields, faults: tuple) -> ServingConfig:
    """The `scheduler` and `execution` sections, read through their field tables."""
    scheduler = fields.sub("scheduler")
    SCHEDULER.check(scheduler)
    execution = fields.sub("execution")
    EXECUTION.check(execution)
    slo = SCHEDULER.read(scheduler, "slo") or {}
    slo_fields = scheduler.sub("slo") if slo else None
    if slo_fields is not None:
        slo_fields.check_known({"ttft_ms", "tpot_ms"})
    slo_value = {key: (slo_fields.number(key) if slo_fields is not None and slo.get(key) is not None else None)
                 for key in ("ttft_ms", "tpot_ms")}
    return ServingConfig(
        faults=faults,
        kind=SCHEDULER.read(scheduler, "kind"),
        max_num_batched_tokens=SCHEDULER.read(scheduler, "max_num_batched_tokens"),
        max_num_seqs=SCHEDULER.read(scheduler, "max_num_seqs"),
        block_size=SCHEDULER.read(scheduler, "block_size"),
        preemption=SCHEDULER.read(scheduler, "preemption"),
        model_selection=SCHEDULER.read(scheduler, "model_selection"),
        placement=SCHEDULER.read(scheduler, "placement"),
        slo_ttft_ms=slo_value["ttft_ms"], slo_tpot_ms=slo_value["tpot_ms"],
        policy=SCHEDULER.read(scheduler, "policy"),
        max_batch=SCHEDULER.read(scheduler, "max_batch"),
        dispatch=SCHEDULER.read(scheduler, "dispatch"),
        dispatch_window_ms=SCHEDULER.read(scheduler, "dispatch_window_ms"),
        pinned_experts=tuple(SCHEDULER.read(scheduler, "pinned_experts")),
        mode=EXECUTION.read(execution, "mode"),
        orchestration=EXECUTION.read(execution, "orchestration"),
    )


def resolve_run_config(path: str | None, overrides: dict[str, Any]) -> RunConfig:
    """Defaults <- the YAML file at `path` <- `overrides` (nested like the file), every field read
    through the tables of node.config_fields and scheduler.workloads."""
    origin = path or "command line"
    tree = _tree(path, overrides)
    fields = Fields(tree, origin)
    TOP.check(fields)

    def top(key: str) -> Any:
        return TOP.read(fields, key)

    platform_name = top("platform")
    platform_overrides = top("platform_overrides") or {}
    platform = load_platform(platform_name, platform_overrides, f"{origin}: platform_overrides")
    model = load_model(top("model"))
    router_name = top("router_model")
    router = load_model(router_name) if router_name is not None else model
    faults = parse_faults(tree.get("faults"), f"{origin}: faults")
    serving = _serving(fields, faults)
    workload = WorkloadSpec.from_fields(fields.sub("workload"))
    tp = top("tp")
    nodes = top("nodes")
    if nodes == "auto":  # as many nodes as one tensor-parallel group needs
        nodes = nodes_for_tp(platform.spec, tp)
    given_name, given_out = top("name"), top("out")
    config = RunConfig(
        name="", platform=platform, nodes=nodes, tp=tp, model=model, router_model=router,
        experts=top("experts"), workload=workload, serving=serving, seed=top("seed"), backend=top("backend"),
        address=top("address"), out="", resolved={}, functional=top("functional"))
    resolved = {
        "platform": platform_name, "platform_overrides": platform_overrides,
        "nodes": config.nodes, "tp": config.tp, "model": model.name, "router_model": router.name,
        "experts": config.experts, "workload": workload.to_dict(),
        "scheduler": {"kind": serving.kind, "policy": serving.policy, "max_batch": serving.max_batch,
                      "dispatch": serving.dispatch, "pinned_experts": list(serving.pinned_experts),
                      "max_num_batched_tokens": serving.max_num_batched_tokens, "max_num_seqs": serving.max_num_seqs,
                      "block_size": serving.block_size, "preemption": serving.preemption,
                      "model_selection": serving.model_selection, "placement": serving.placement,
                      "dispatch_window_ms": serving.dispatch_window_ms,
                      "slo": {"ttft_ms": serving.slo_ttft_ms, "tpot_ms": serving.slo_tpot_ms}},
        "execution": {"mode": serving.mode, "orchestration": serving.orchestration},
        "faults": [f.text for f in faults],
        "seed": config.seed, "backend": config.backend, "functional": config.functional,
        "address": config.address,
    }
    platform_part = {"platform_resolved": platform.values, "platform_sources": platform.sources}
    config.name = given_name if given_name is not None else default_name({**resolved, **platform_part})
    config.out = given_out if given_out is not None else f"runs/{config.name}"
    config.resolved = {"name": config.name, **resolved, "out": config.out, **platform_part}
    return config
