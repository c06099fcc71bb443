"""`rdu validate-cluster cluster.yaml`: check a Ray cluster-launcher config offline.

First what `ray up` itself would check (Ray's `prepare_config` + `validate_config`, i.e. the JSON
schema shipped inside Ray plus its extra rules; plain schema validation if those private helpers
move), then this project's rules: worker nodes advertise `rdu_socket` resources (on cloud node
types or on the `ray start --resources` lines of an on-premise cluster), every node the same
count (one emulated node per Ray node), and the project is installed on every node.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from node.ray_session import SOCKET_RESOURCE
from node.yaml_io import read_yaml

__all__ = ["validate_cluster", "ClusterReport"]

_RESOURCES_FLAG = re.compile(r"--resources[= ]+(['\"]?)(\{.*?\})\1")


@dataclass
class ClusterReport:
    path: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sockets_per_worker: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        if not self.sockets_per_worker:
            return "no worker advertises sockets"
        total = sum(self.sockets_per_worker)
        return (f"{len(self.sockets_per_worker)} worker node(s) with {self.sockets_per_worker} '{SOCKET_RESOURCE}' "
                f"resources: {len(self.sockets_per_worker)} emulated node(s), {total} sockets")

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "errors": self.errors, "warnings": self.warnings,
                "sockets_per_worker": self.sockets_per_worker, "summary": self.summary()}


def _schema_errors(config: dict, report: ClusterReport) -> None:
    """Ray's own validation, on a copy with Ray's defaults merged in (what `ray up` checks)."""
    import jsonschema

    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # the private helpers moved: fall back to the schema Ray ships
        schema = json.loads((resources.files("ray.autoscaler") / "ray-schema.json").read_text())
        prepare_config, validate_config = (lambda c: c), (lambda c: jsonschema.validate(c, schema))
    quiet = logging.getLogger("ray.autoscaler")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        message = exc.message
        if "is not of type 'string'" in message and isinstance(exc.instance, dict):
            message += (" -- an unquoted list item containing ': ' (such as --resources='{\"rdu_socket\": 8}') "
                        "is read by YAML as a mapping; quote the whole command or drop the space")
        report.errors.append(f"{report.path}: {where}: {message}")
    except KeyError as exc:
        report.errors.append(f"{report.path}: missing field {exc.args[0]!r} (Ray's cluster launcher needs it)")
    except (ValueError, RuntimeError, TypeError, AssertionError) as exc:
        report.errors.append(f"{report.path}: {exc}")
    except Exception as exc:  # noqa: BLE001 - Ray's provider code raises anything (e.g. a missing SDK)
        report.errors.append(f"{report.path}: Ray rejected the config: {type(exc).__name__}: {exc}")
    finally:
        quiet.setLevel(level)


def _sockets_in_command(command: Any) -> int | None:
    if not isinstance(command, str):
        return None
    match = _RESOURCES_FLAG.search(command)
    if not match:
        return None
    try:
        value = json.loads(match.group(2)).get(SOCKET_RESOURCE)
    except (json.JSONDecodeError, AttributeError):
        return -1
    return value if isinstance(value, int) else -1


def _project_rules(config: dict, report: ClusterReport) -> None:
    node_types = config.get("available_node_types")
    if isinstance(node_types, dict) and node_types:
        head = config.get("head_node_type")
        for name, node_type in node_types.items():
            count = (node_type or {}).get("resources", {}).get(SOCKET_RESOURCE)
            if name == head:
                if count:
                    report.warnings.append(f"{report.path}: available_node_types.{name}: the head node advertises "
                                           f"{count} sockets; the emulator expects sockets on workers only")
                continue
            if not isinstance(count, int) or count < 1:
                report.errors.append(f"{report.path}: available_node_types.{name}.resources: expected "
                                     f"'{SOCKET_RESOURCE}: <sockets per node>' (a whole number >= 1), got {count!r}")
                continue
            workers = node_type.get("max_workers", node_type.get("min_workers", 0)) or 0
            report.sockets_per_worker.extend([count] * int(workers))
    else:
        for command in config.get("worker_start_ray_commands", []) or []:
            count = _sockets_in_command(command)
            if count == -1:
                report.errors.append(f"{report.path}: worker_start_ray_commands: --resources is not JSON with a "
                                     f"whole-number '{SOCKET_RESOURCE}': {command!r}")
            elif count is not None:
                workers = len((config.get("provider") or {}).get("worker_ips", []) or []) or 1
                report.sockets_per_worker.extend([count] * workers)
        if not report.sockets_per_worker:
            report.errors.append(f"{report.path}: worker_start_ray_commands: no `ray start` line advertises "
                                 f"--resources='{{\"{SOCKET_RESOURCE}\":8}}'")
    if len(set(report.sockets_per_worker)) > 1:
        report.warnings.append(f"{report.path}: workers advertise different socket counts "
                               f"{sorted(set(report.sockets_per_worker))}; every emulated node has the same number")
    setup = " ".join(str(c) for c in (config.get("setup_commands") or []))
    if "pip install" not in setup or not re.search(r"rdu-emulator|-e\s+\.|install[^;&]*\s\.(\s|$)", setup):
        report.warnings.append(f"{report.path}: setup_commands do not seem to install this project "
                               f"(pip install -e . in the synced folder); socket actors import it on every node")


def validate_cluster(path: str | Path) -> ClusterReport:
    report = ClusterReport(path=str(path))
    config = read_yaml(path)
    if not isinstance(config, dict):
        report.errors.append(f"{path}: expected a mapping of cluster-launcher fields, got {type(config).__name__}")
        return report
    _schema_errors(config, report)
    _project_rules(config, report)   # the user's own fields: Ray rewrites on-premise configs
    return report
