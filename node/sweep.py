"""`rdu sweep experiments/NAME.yaml`: a study is a base run config and axes to sweep.

    name: scale-up
    base: {platform: sn40l-node, nodes: auto, workload: {...}, backend: inline}
    axes:
      - {field: tp, values: [1, 2, 4, 8, 16]}
      - {field: platform_overrides.sockets_per_node, name: sockets_per_node, values: [4, 8, 16]}
      - name: load                      # named variants; `scale_by` multiplies their numbers by an axis value
        variants:
          fixed: {workload: {rate_per_s: 20}}
          growing: {scale_by: nodes, workload: {rate_per_s: 20}}
    fast: {base: {workload: {requests: 100}}, axes: {tp: [1, 8]}}
    plots: [{x: tp, y: e2e_ns.p50, series: sockets_per_node, scale: 1.0e-6, ylabel: ..., logx: true}]

Every combination of axis values is a point, run as an independent Ray task in its own run
directory (`<out>/points/<point>/`). A point whose directory already holds a summary (or a record
that its configuration is invalid) is not run again, so an interrupted sweep resumes where it
stopped. Results gather into `<out>/results.csv`, plots into `<out>/plots/`.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interconnect.spec_fields import Fields, UserError, deep_merge
from node.yaml_io import read_yaml

__all__ = ["Study", "Axis", "Point", "load_study", "study_points", "run_study", "SweepOutcome", "METRICS"]

METRICS = ("requests_in", "requests_completed", "throughput_tokens_per_s", "ttft_ns.p50", "ttft_ns.p99",
           "tpot_ns.p50", "tpot_ns.p99", "e2e_ns.p50", "e2e_ns.p90", "e2e_ns.p99", "switches", "hbm_hit_rate",
           "switch_time_share", "collective_time_share", "inter_node_bytes", "virtual_ns", "switches_per_node",
           "nodes", "sockets")
_INVALID = "invalid.txt"


@dataclass(frozen=True)
class Axis:
    name: str
    field: str | None                    # dotted run-config field, or None for named variants
    values: tuple                        # field values, or variant names
    variants: dict[str, dict] | None = None


@dataclass(frozen=True)
class Point:
    id: str
    labels: dict[str, Any]
    overrides: dict


@dataclass
class Study:
    name: str
    description: str
    base: dict
    axes: list[Axis]
    plots: list[dict]
    origin: str


@dataclass
class SweepOutcome:
    out_dir: Path
    ran: int = 0
    reused: int = 0
    skipped: int = 0
    failed: int = 0
    files: list[Path] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"out": str(self.out_dir), "ran": self.ran, "reused": self.reused, "skipped": self.skipped,
                "failed": self.failed, "files": [str(f) for f in self.files], "rows": self.rows}


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    if dotted.startswith("platform_overrides."):  # platform fields are themselves dotted paths
        tree.setdefault("platform_overrides", {})[dotted.removeprefix("platform_overrides.")] = value
        return
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _axis(raw: Any, where: Fields, index: int) -> Axis:
    fields = Fields(raw, where.origin, f"axes[{index}]")
    fields.check_known({"field", "name", "values", "variants"})
    if fields.has("variants"):
        variants = fields.data["variants"]
        if not isinstance(variants, dict) or not variants:
            fields.fail("expected a mapping of variant name -> run-config overrides", "variants")
        for key, value in variants.items():
            if not isinstance(value, dict):
                fields.fail(f"expected a mapping of overrides, got {value!r}", f"variants.{key}")
        return Axis(name=fields.string("name"), field=None, values=tuple(variants), variants=dict(variants))
    dotted = fields.string("field")
    values = fields.data.get("values")
    if not isinstance(values, list) or not values:
        fields.fail("expected a non-empty list of values", "values")
    return Axis(name=fields.string("name", dotted.split(".")[-1]), field=dotted, values=tuple(values))


def load_study(path: str, fast: bool = False, backend: str | None = None) -> Study:
    raw = read_yaml(path)
    fields = Fields(raw, str(path))
    fields.check_known({"name", "description", "base", "axes", "fast", "plots"})
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        fields.fail("expected a run config mapping", "base")
    axes_raw = raw.get("axes")
    if not isinstance(axes_raw, list) or not axes_raw:
        fields.fail("expected a non-empty list of axes", "axes")
    axes = [_axis(a, fields, i) for i, a in enumerate(axes_raw)]
    if len({a.name for a in axes}) != len(axes):
        fields.fail("two axes have the same name", "axes")
    if fast and fields.has("fast"):
        quick = fields.sub("fast")
        quick.check_known({"base", "axes"})
        base = deep_merge(base, quick.data.get("base") or {})
        for name, values in (quick.data.get("axes") or {}).items():
            match = [a for a in axes if a.name == name]
            if not match or not isinstance(values, list):
                quick.fail(f"no axis named {name!r} (or its values are not a list)", f"axes.{name}")
            axis = match[0]
            axes[axes.index(axis)] = Axis(axis.name, axis.field, tuple(values), axis.variants)
    if backend:
        base = {**base, "backend": backend}
    plots = raw.get("plots") or []
    if not isinstance(plots, list) or not all(isinstance(p, dict) and "x" in p and "y" in p for p in plots):
        fields.fail("expected a list of plots, each with at least x and y", "plots")
    name = fields.string("name", Path(path).stem) + ("-fast" if fast else "")
    return Study(name=name, description=fields.string("description", ""), base=base, axes=axes, plots=plots,
                 origin=str(path))


def _scaled(overrides: dict, factor: float) -> dict:
    def scale(value):
        if isinstance(value, dict):
            return {k: scale(v) for k, v in value.items()}
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        return type(value)(value * factor) if isinstance(value, int) else value * factor

    return scale(overrides)


def study_points(study: Study) -> list[Point]:
    points = []
    for combination in itertools.product(*(axis.values for axis in study.axes)):
        labels = {axis.name: value for axis, value in zip(study.axes, combination)}
        overrides: dict = {}
        for axis, value in zip(study.axes, combination):
            if axis.field is not None:
                _set_dotted(overrides, axis.field, value)
        for axis, value in zip(study.axes, combination):
            if axis.variants is not None:
                variant = dict(axis.variants[value])
                scale_by = variant.pop("scale_by", None)
                if scale_by is not None:
                    if scale_by not in labels or not isinstance(labels[scale_by], (int, float)):
                        raise UserError(f"{study.origin}: variant {value!r} scales by {scale_by!r}, which is not a "
                                        f"numeric axis")
                    variant = _scaled(variant, labels[scale_by])
                overrides = deep_merge(overrides, variant)
        point_id = re.sub(r"[^A-Za-z0-9_.=-]+", "-", ",".join(f"{k}={v}" for k, v in labels.items()))
        points.append(Point(id=point_id, labels=labels, overrides=overrides))
    return points


def run_point(base: dict, overrides: dict, out: str) -> dict:
    """One point (in a Ray task or in-process): the run directory, or why the config is invalid."""
    from node.run import execute_run
    from node.run_config import resolve_run_config

    tree = deep_merge(deep_merge(base, overrides), {"out": out, "name": Path(out).name})
    try:
        config = resolve_run_config(None, tree)
        output = execute_run(config)
    except UserError as exc:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / _INVALID).write_text(str(exc) + "\n")
        return {"status": "invalid", "error": str(exc)}
    return {"status": "ok", "summary": output.result.summary, "wall_s": output.run_info["wall_s"],
            "nodes": config.nodes, "sockets": config.sockets}


def _previous(out: Path) -> dict | None:
    import json

    if (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
        run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
        nodes = len({g["node"] for g in summary.get("groups", [])}) or 1
        return {"status": "ok", "summary": summary, "wall_s": run.get("wall_s"), "nodes": nodes,
                "sockets": None, "reused": True}
    if (out / _INVALID).is_file():
        return {"status": "invalid", "error": (out / _INVALID).read_text().strip(), "reused": True}
    return None


def _metric(summary: dict, dotted: str) -> Any:
    value: Any = summary
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _row(point: Point, result: dict) -> dict:
    row = {"point": point.id, **point.labels, "status": result["status"], "error": result.get("error", "")}
    summary = result.get("summary") or {}
    for name in METRICS:
        if name == "switches_per_node":
            nodes = result.get("nodes") or 1
            row[name] = summary["switches"] / nodes if summary else None
        elif name in ("nodes", "sockets"):
            row[name] = result.get(name)
        else:
            row[name] = _metric(summary, name)
    row["wall_s"] = result.get("wall_s")
    return row


def run_study(study: Study, out_dir: Path | None = None, jobs: int | None = None, address: str = "local",
              progress: Callable[[str], None] | None = None) -> SweepOutcome:
    out_dir = out_dir or Path("sweeps") / study.name
    (out_dir / "points").mkdir(parents=True, exist_ok=True)
    outcome = SweepOutcome(out_dir=out_dir)
    points = study_points(study)
    results: dict[str, dict] = {}
    todo = []
    for point in points:
        previous = _previous(out_dir / "points" / point.id)
        if previous is not None:
            results[point.id] = previous
            outcome.reused += 1
        else:
            todo.append(point)
    say = progress or (lambda message: None)
    say(f"{study.name}: {len(points)} point(s), {len(todo)} to run, {outcome.reused} already done")
    if todo:
        results.update(_run_points(study, todo, out_dir, jobs, address, say))
        outcome.ran = len(todo)
    for point in points:
        row = _row(point, results[point.id])
        outcome.rows.append(row)
        outcome.skipped += row["status"] == "invalid"
    outcome.failed = sum(r["status"] not in ("ok", "invalid") for r in outcome.rows)
    csv_path = out_dir / "results.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(outcome.rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(outcome.rows)
    outcome.files.append(csv_path)
    from node.sweep_plots import plot_study

    outcome.files += plot_study(study, outcome.rows, out_dir / "plots")
    return outcome


def _run_points(study: Study, todo: list[Point], out_dir: Path, jobs: int | None, address: str,
                say: Callable[[str], None]) -> dict[str, dict]:
    """Points as Ray tasks (`jobs` at a time); points that use socket actors run one by one."""
    import ray

    from node.ray_session import ray_session

    results: dict[str, dict] = {}
    outs = {p.id: str(out_dir / "points" / p.id) for p in todo}
    with_actors = [p for p in todo if deep_merge(study.base, p.overrides).get("backend", "ray") == "ray"]
    in_tasks = [p for p in todo if p not in with_actors]
    needed = max([_sockets_hint(study, p) for p in with_actors], default=1)
    with ray_session(address, needed):
        if in_tasks:
            task = ray.remote(num_cpus=1)(run_point)
            limit = max(1, jobs or os.cpu_count() or 1)
            pending: dict = {}
            queue = list(in_tasks)
            while queue or pending:
                while queue and len(pending) < limit:
                    point = queue.pop(0)
                    pending[task.remote(study.base, point.overrides, outs[point.id])] = point
                done, _ = ray.wait(list(pending), num_returns=1)
                point = pending.pop(done[0])
                results[point.id] = ray.get(done[0])
                say(f"  {point.id}: {results[point.id]['status']}")
        for point in with_actors:
            results[point.id] = run_point(study.base, point.overrides, outs[point.id])
            say(f"  {point.id}: {results[point.id]['status']}")
    return results


def _sockets_hint(study: Study, point: Point) -> int:
    """Socket actors a point needs (to size a local Ray); a rough upper bound is enough."""
    tree = deep_merge(study.base, point.overrides)
    per_node = (tree.get("platform_overrides") or {}).get("sockets_per_node", 16)
    nodes = tree.get("nodes", 1)
    if nodes == "auto":
        nodes = math.ceil(int(tree.get("tp", 8)) / int(per_node))
    return int(nodes) * int(per_node)
