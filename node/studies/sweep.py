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
directory `<out>/points/<point>/`, beside a record `<out>/points/<point>.point.json` that holds
the content hash of the point's resolved run config (`point_key`). On a second run a point is
reused only when its record holds the same hash (and its results read back); a point whose
config changed since (an edited study, another trace file), whose record or summary is corrupt,
or that failed last time runs again, and the command says how many and why. Every point
config is resolved before anything runs, so a misspelt field is one error, not N skipped
points. The tool removes only directories it made (a run directory of this tool, or an older
sweep's `invalid.txt` folder); anything else in its way is refused. Results gather into
`<out>/results.csv` in the study's point order, plots into `<out>/plots/`.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rdu.base import Fields, UserError, deep_merge
from rdu.yaml_io import read_yaml

if TYPE_CHECKING:
    from rich.console import Console

    from rdu.node.runs.run_config import RunConfig

__all__ = ["Study", "Axis", "Point", "load_study", "study_points", "run_study", "SweepOutcome", "METRICS",
           "point_key", "point_id", "SweepProgress", "PlainProgress", "RichProgress", "POINT_RECORD_SUFFIX",
           "SWEEP_RECORD"]

METRICS = ("requests_in", "requests_completed", "throughput_tokens_per_s", "ttft_ns.p50", "ttft_ns.p99",
           "tpot_ns.p50", "tpot_ns.p99", "e2e_ns.p50", "e2e_ns.p90", "e2e_ns.p99", "switches", "hbm_hit_rate",
           "throughput_requests_per_s",
           "switch_time_share", "collective_time_share", "inter_node_bytes", "virtual_ns", "switches_per_node",
           "nodes", "sockets")
POINT_RECORD_SUFFIX = ".point.json"
SWEEP_RECORD = "sweep.json"
_LEGACY_INVALID = "invalid.txt"          # what sweeps before point records wrote for an invalid point
_MAX_ID_BYTES = 160                      # a point id is one path component: stay well under 255 bytes
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


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
    ran: int = 0          # points executed by this command (including ones found invalid while running)
    reused: int = 0       # points whose record matched their config: results read back, not run
    changed: int = 0      # of `ran`: points that had results from a different config (or none recorded)
    skipped: int = 0      # rows with status invalid (the config cannot run on its platform)
    failed: int = 0       # rows with status failed (the run crashed or stopped); they rerun next time
    files: list[Path] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"out": str(self.out_dir), "ran": self.ran, "reused": self.reused, "changed": self.changed,
                "skipped": self.skipped, "failed": self.failed, "files": [str(f) for f in self.files],
                "rows": self.rows, "warnings": self.warnings}


# -- study files -------------------------------------------------------------------------------------

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


def _check_plots(plots: list[dict], axes: list["Axis"], fields: Fields) -> None:
    """A plot names columns of results.csv: x and series an axis or a metric, y a metric; a typo
    is a one-line error before any point runs, not a KeyError after all of them."""
    from rdu.node.studies.sweep_plots import check_knee

    columns = {a.name for a in axes} | set(METRICS)
    for i, plot in enumerate(plots):
        series = plot.get("series")
        named = [("x", plot["x"]), *(("series", s) for s in (series if isinstance(series, list) else
                                                             [series] if series is not None else []))]
        for key, column in named:
            if column not in columns:
                fields.fail(f"{column!r} is neither an axis ({', '.join(a.name for a in axes)}) nor a metric "
                            f"({', '.join(METRICS)})", f"plots[{i}].{key}")
        if plot["y"] not in METRICS:
            fields.fail(f"{plot['y']!r} is not a metric ({', '.join(METRICS)})", f"plots[{i}].y")
        check_knee(plot)


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
    _check_plots(plots, axes, fields)
    name = fields.string("name", Path(path).stem) + ("-fast" if fast else "")
    return Study(name=name, description=fields.string("description", ""), base=base, axes=axes, plots=plots,
                 origin=str(path))


# -- points ------------------------------------------------------------------------------------------

def _scaled(overrides: dict, factor: float) -> dict:
    def scale(value):
        if isinstance(value, dict):
            return {k: scale(v) for k, v in value.items()}
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        return type(value)(value * factor) if isinstance(value, int) else value * factor

    return scale(overrides)


def _escape(text: str) -> str:
    """Keep [A-Za-z0-9_.-], percent-encode every other byte (and a leading dot): one-to-one, so
    two different labels can never share a directory ('p a.yaml' -> 'p%20a.yaml', 'p-a.yaml' stays)."""
    out = "".join(ch if ch in _SAFE else "".join(f"%{b:02X}" for b in ch.encode("utf-8")) for ch in text)
    return "%2E" + out[1:] if out.startswith(".") else out


def point_id(labels: dict[str, Any]) -> str:
    """The directory name of a point: `name=value` per axis joined by '-', in axis order. Names and
    values are escaped so that '=' only separates them, which makes the id one-to-one with the
    labels (axis names are known); an over-long id is cut and completed by a hash of the whole."""
    text = "-".join(f"{_escape(str(k))}={_escape(str(v))}" for k, v in labels.items())
    if len(text.encode()) > _MAX_ID_BYTES:
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        text = f"{text[:_MAX_ID_BYTES - 13]}~{digest}"
    return text


def _variant_overrides(study: Study, axis: Axis, value: str, labels: dict) -> dict:
    variant = dict(axis.variants[value])
    scale_by = variant.pop("scale_by", None)
    if scale_by is None:
        return variant
    if scale_by not in labels or not isinstance(labels[scale_by], (int, float)) or isinstance(labels[scale_by], bool):
        raise UserError(f"{study.origin}: variant {value!r} scales by {scale_by!r}, which is not a numeric axis")
    return _scaled(variant, labels[scale_by])


def study_points(study: Study) -> list[Point]:
    """Every combination of axis values, in axis order; two combinations whose values print alike
    (1 and '1', or a value listed twice) are one error, since they would share a directory."""
    points = []
    seen: dict[str, dict] = {}
    for combination in itertools.product(*(axis.values for axis in study.axes)):
        labels = {axis.name: value for axis, value in zip(study.axes, combination)}
        overrides: dict = {}
        for axis, value in zip(study.axes, combination):
            if axis.field is not None:
                _set_dotted(overrides, axis.field, value)
        for axis, value in zip(study.axes, combination):
            if axis.variants is not None:
                overrides = deep_merge(overrides, _variant_overrides(study, axis, value, labels))
        pid = point_id(labels)
        if pid in seen:
            raise UserError(f"{study.origin}: points {seen[pid]} and {labels} would share the directory "
                            f"{pid!r}; make the axis values distinct")
        seen[pid] = labels
        points.append(Point(id=pid, labels=labels, overrides=overrides))
    return points


# -- content keys ------------------------------------------------------------------------------------

def point_key(config: RunConfig) -> str:
    """The content hash a point's results belong to: `config_hash` of its resolved run config
    (without name, out, address; a trace by its content), plus the architecture numbers of the
    model and router, which the resolved config names but does not hold, so that an edited model
    file reruns the points that use it."""
    from rdu.node.runs.run_config import config_hash

    return config_hash({**config.resolved, "model_spec": asdict(config.model),
                        "router_model_spec": asdict(config.router_model)})


def _is_study_mistake(message: str) -> bool:
    """A field name no run config knows is a typo in the study, whatever the point."""
    return ": unknown field" in message or ": no such platform field" in message \
        or ": no such platform section" in message


# -- planning: what to run, what to reuse --------------------------------------------------------------

@dataclass
class _Planned:
    point: Point
    out: Path
    tree: dict
    key: str = ""
    sockets: int = 1
    uses_actors: bool = False
    result: dict | None = None    # known without running (reused, or invalid at resolve time)
    reason: str = ""              # why it runs: new, changed, unrecorded, corrupt, failed


def _record_path(points_dir: Path, pid: str) -> Path:
    return points_dir / f"{pid}{POINT_RECORD_SUFFIX}"


def _ours(directory: Path) -> bool:
    """A point folder this tool made: a complete run directory, or an older sweep's invalid marker."""
    from rdu.node.runs.run_directory import is_run_directory

    if is_run_directory(directory):
        return True
    entries = list(directory.iterdir())
    return not entries or [e.name for e in entries] == [_LEGACY_INVALID]


def _read_json(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _reuse(plan: _Planned, record: dict, warn: Callable[[str], None]) -> dict | None:
    """The stored result of a point whose record matches, or None (and why, in `plan.reason`)."""
    if record.get("config_sha256") != plan.key:
        plan.reason = "changed"
        return None
    status = record.get("status")
    if status == "invalid":
        return {"status": "invalid", "error": str(record.get("error", "")), "reused": True}
    if status != "ok":
        plan.reason = "failed"
        return None
    try:
        summary = _read_json(plan.out / "summary.json")
    except (OSError, ValueError) as exc:
        warn(f"warning: {plan.out / 'summary.json'} cannot be read ({str(exc).splitlines()[0]}): running that "
             f"point again")
        plan.reason = "corrupt"
        return None
    return {"status": "ok", "summary": summary, "wall_s": record.get("wall_s"), "nodes": record.get("nodes"),
            "sockets": record.get("sockets"), "reused": True}


def _plan_one(study: Study, point: Point, points_dir: Path, warn: Callable[[str], None]) -> _Planned:
    from rdu.node.runs.run_config import resolve_run_config

    out = points_dir / point.id
    tree = deep_merge(deep_merge(study.base, point.overrides), {"out": str(out)})
    plan = _Planned(point=point, out=out, tree=tree)
    try:
        config = resolve_run_config(None, tree)
    except UserError as exc:
        message = str(exc).removeprefix("command line: ")
        if _is_study_mistake(message):
            raise UserError(f"{study.origin}: {message} (point {point.id}; nothing was run)") from None
        plan.result = {"status": "invalid", "error": message}
        return plan
    plan.key, plan.sockets, plan.uses_actors = point_key(config), config.sockets, config.backend == "ray"
    record_path = _record_path(points_dir, point.id)
    if out.is_symlink() or (out.exists() and not out.is_dir()) or (out.is_dir() and not _ours(out)):
        raise UserError(f"{out}: is in the way of a sweep point and was not made by this tool; move it away or "
                        f"choose another --out (nothing was run)")
    if not record_path.exists():
        plan.reason = "unrecorded" if out.is_dir() and any(out.iterdir()) else "new"
        return plan
    try:
        record = _read_json(record_path)
    except (OSError, ValueError) as exc:
        warn(f"warning: {record_path} cannot be read ({str(exc).splitlines()[0]}): running that point again")
        plan.reason = "corrupt"
        return plan
    plan.result = _reuse(plan, record, warn)
    return plan


_REASONS = {"changed": "changed since the last run", "unrecorded": "without a record of their config (an older or "
            "interrupted sweep)", "failed": "failed last time", "corrupt": "with unreadable results"}


def _plan(study: Study, points_dir: Path, warn: Callable[[str], None]) -> list[_Planned]:
    """Resolve every point before anything runs; say which stored points are rerun and why."""
    plans = [_plan_one(study, point, points_dir, warn) for point in study_points(study)]
    for reason, text in _REASONS.items():
        count = sum(p.result is None and p.reason == reason for p in plans)
        if count:
            warn(f"{count} point(s) {text}: rerun")
    return plans


def _claim(out_dir: Path) -> Path:
    """The study folder, refused (one line) when it is something this tool did not make."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise UserError(f"{out_dir}: exists and is not a folder; choose another --out")
    points_dir = out_dir / "points"
    if out_dir.is_dir() and any(out_dir.iterdir()):
        legacy = points_dir.is_dir() and (out_dir / "results.csv").is_file()
        if not (out_dir / SWEEP_RECORD).is_file() and not legacy:
            raise UserError(f"{out_dir}: exists and is not a sweep folder of this tool; choose another --out "
                            "(nothing was changed)")
    if points_dir.exists() and not points_dir.is_dir():
        raise UserError(f"{points_dir}: exists and is not a folder; choose another --out")
    return points_dir


def _write_json_atomic(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    temporary.replace(path)


# -- running -----------------------------------------------------------------------------------------

def run_point(tree: dict) -> dict:
    """One point (in a Ray task or in-process): its results, why its config is invalid, or how it failed.
    A crash is a `failed` result, not an exception, so that one bad point does not lose the others."""
    from rdu.node.runs.run import RunStopped, execute_run
    from rdu.node.runs.run_config import resolve_run_config

    try:
        config = resolve_run_config(None, tree)
        output = execute_run(config)
    except UserError as exc:
        return {"status": "invalid", "error": str(exc).removeprefix("command line: ")}
    except RunStopped as exc:
        return {"status": "failed", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - reported in the row and the record; the point reruns next time
        return {"status": "failed", "error": _one_line(exc)}
    return {"status": "ok", "summary": output.result.summary, "wall_s": output.run_info["wall_s"],
            "nodes": config.nodes, "sockets": config.sockets}


def _one_line(exc: BaseException) -> str:
    """An exception as one line for a results row: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _record(points_dir: Path, plan: _Planned, result: dict) -> None:
    """Write the point's record: the config hash its directory's results belong to."""
    record = {"point": plan.point.id, "labels": plan.point.labels, "config_sha256": plan.key,
              "status": result["status"], "error": result.get("error", ""), "wall_s": result.get("wall_s"),
              "nodes": result.get("nodes"), "sockets": result.get("sockets")}
    _write_json_atomic(_record_path(points_dir, plan.point.id), record)


def _clear(plan: _Planned) -> None:
    """Remove a stale point folder before its rerun: checked to be ours when planned."""
    if plan.out.is_dir():
        shutil.rmtree(plan.out)


class SweepProgress:
    """What a sweep tells its user while it goes. This base class says nothing."""

    def start(self, study: str, total: int, to_run: int) -> None:
        """The sweep begins: `total` points, of which `to_run` will run (the rest are reused)."""

    def note(self, message: str) -> None:
        """A one-line notice or warning."""

    def point_done(self, point_id: str, result: dict) -> None:
        """A point finished (in whatever order the tasks end)."""

    def tick(self) -> None:
        """Called while waiting for points, so that a long point still shows signs of life."""

    def stop(self) -> None:
        """The sweep is over (or interrupted)."""


class PlainProgress(SweepProgress):
    """Plain lines for pipes and logs: a line at most every `interval_s` (and at the end) with k/N
    points, elapsed time and an estimate of the time left; one line per point that did not run ok."""

    def __init__(self, write: Callable[[str], None], interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.write, self.interval_s, self.clock = write, interval_s, clock
        self.study, self.total, self.to_run, self.done = "", 0, 0, 0
        self._started = self._last = 0.0

    def start(self, study: str, total: int, to_run: int) -> None:
        self.study, self.total, self.to_run, self.done = study, total, to_run, 0
        self._started = self._last = self.clock()
        self.write(f"sweep {study}: {total} point(s), {to_run} to run, {total - to_run} reused")

    def note(self, message: str) -> None:
        self.write(message)

    def point_done(self, point_id: str, result: dict) -> None:
        self.done += 1
        if result["status"] != "ok":
            self.write(f"  {point_id}: {result['status']}: {result.get('error', '')}")
        if self.done == self.to_run or self.clock() - self._last >= self.interval_s:
            self._line()

    def tick(self) -> None:
        if self.clock() - self._last >= self.interval_s:
            self._line()

    def _line(self) -> None:
        now = self._last = self.clock()
        elapsed_s = now - self._started
        left = self.to_run - self.done
        eta = f", ~{elapsed_s * left / self.done:.0f} s left" if self.done and left else ""
        finished = self.total - self.to_run + self.done
        self.write(f"sweep {self.study}: {finished}/{self.total} points done, {elapsed_s:.0f} s elapsed{eta}")


class RichProgress(SweepProgress):
    """At a terminal: a `rich.progress` bar over k/N points with elapsed time and ETA; notices and
    points that did not run ok are printed above it."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress = None
        self._task = None

    def start(self, study: str, total: int, to_run: int) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.console.print(f"sweep {study}: {total} point(s), {to_run} to run, {total - to_run} reused",
                           highlight=False)
        self._progress = Progress(TextColumn("[bold]sweep {task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("points"), TimeElapsedColumn(), TextColumn("left"),
                                  TimeRemainingColumn(), console=self.console, refresh_per_second=4)
        self._progress.start()
        self._task = self._progress.add_task(study, total=total, completed=total - to_run)

    def note(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False)

    def point_done(self, point_id: str, result: dict) -> None:
        if result["status"] != "ok":
            self.console.print(f"  {point_id}: {result['status']}: {result.get('error', '')}", highlight=False,
                               markup=False)
        if self._progress is not None:
            self._progress.advance(self._task)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


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
            row[name] = summary["switches"] / nodes if "switches" in summary else None
        elif name in ("nodes", "sockets"):
            row[name] = result.get(name)
        else:
            row[name] = _metric(summary, name)
    row["wall_s"] = result.get("wall_s")
    return row


def run_study(study: Study, out_dir: Path | None = None, jobs: int | None = None, address: str = "local",
              progress: SweepProgress | None = None) -> SweepOutcome:
    """Plan every point (one error for a study mistake, before anything runs), run what is new or
    changed, write `results.csv` in the study's point order and the plots."""
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs: expected a number of points >= 1, got {jobs}")
    out_dir = out_dir or Path("sweeps") / study.name
    say = progress or SweepProgress()
    outcome = SweepOutcome(out_dir=out_dir)

    def warn(message: str) -> None:
        outcome.warnings.append(message)
        say.note(message)

    points_dir = _claim(out_dir)
    plans = _plan(study, points_dir, warn)
    points_dir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out_dir / SWEEP_RECORD, {"tool": "rdu sweep", "study": study.name, "origin": study.origin})
    todo = [p for p in plans if p.result is None]
    outcome.reused = sum(bool(p.result and p.result.get("reused")) for p in plans)
    outcome.changed = sum(p.reason != "new" for p in todo)
    say.start(study.name, len(plans), len(todo))
    try:
        if todo:
            _run_points(todo, points_dir, jobs, address, say)
    finally:
        say.stop()
    outcome.ran = len(todo)
    for plan in plans:
        row = _row(plan.point, plan.result)
        outcome.rows.append(row)
        outcome.skipped += row["status"] == "invalid"
        outcome.failed += row["status"] == "failed"
    csv_path = out_dir / "results.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(outcome.rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(outcome.rows)
    outcome.files.append(csv_path)
    from rdu.node.studies.sweep_plots import plot_study

    outcome.files += plot_study(study, outcome.rows, out_dir / "plots")
    return outcome


def _finished(points_dir: Path, plan: _Planned, result: dict, say: SweepProgress) -> None:
    plan.result = result
    _record(points_dir, plan, result)
    say.point_done(plan.point.id, result)


def _run_points(todo: list[_Planned], points_dir: Path, jobs: int | None, address: str, say: SweepProgress,
                tick_s: float = 1.0) -> None:
    """Points as Ray tasks (`jobs` at a time); points that use socket actors run one by one.
    Each point's record is written as soon as it ends, so an interrupted sweep keeps what finished."""
    import ray

    from rdu.node.cluster.ray_session import ray_session

    for plan in todo:
        _clear(plan)
    with_actors = [p for p in todo if p.uses_actors]
    in_tasks = [p for p in todo if not p.uses_actors]
    needed = max([p.sockets for p in with_actors], default=1)
    with ray_session(address, needed):
        if in_tasks:
            task = ray.remote(num_cpus=1)(run_point)
            limit = max(1, jobs or os.cpu_count() or 1)
            pending: dict = {}
            queue = list(in_tasks)
            while queue or pending:
                while queue and len(pending) < limit:
                    plan = queue.pop(0)
                    pending[task.remote(plan.tree)] = plan
                done, _ = ray.wait(list(pending), num_returns=1, timeout=tick_s)
                if not done:
                    say.tick()
                    continue
                plan = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayError as exc:  # the worker died: this point failed, the others go on
                    result = {"status": "failed", "error": _one_line(exc)}
                _finished(points_dir, plan, result, say)
        for plan in with_actors:
            _finished(points_dir, plan, run_point(plan.tree), say)
