"""PNG plots of a study's results: one line (or bar group) per series value, failed points marked.

Drawn in the shared style of `node.plot_style` (object API on the Agg canvas, no pyplot): count axes
such as TP degree, nodes or experts get integer ticks on the measured values, a y axis whose values
span a decade or more is drawn in log scale unless the study's plot spec says `logy: false`, legends
sit outside the data, and failures are explained in a wrapped footnote instead of a cut annotation.

Two options for load studies: `series` may be a list of fields (one line per combination, e.g.
`[platform, experts]`), and `knee` marks where each line saturates, the first offered load at which
served throughput falls below `ratio` (default 0.95) of what was offered, or the latency field goes
over its SLO:

    knee: {offered: rate, served: throughput_requests_per_s, ratio: 0.95,
           latency: ttft_ns.p99, slo_ns: 2.0e9}

`diagonal: true` adds the served = offered line.
"""

from __future__ import annotations

import re
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from rdu.base import UserError
from rdu.node.observe.plot_style import (count_axis, footnote, legend_outside, log_axis, new_figure, plain_number, save_figure,
                             spans_decades, style_axes)

__all__ = ["plot_study", "build_study_figure", "check_knee", "find_knees"]

_KNEE_KEYS = {"offered", "served", "ratio", "latency", "slo_ns"}

_FAILED_COLOUR = "tab:red"
_ERROR_CHARS = 220


def _series_key(row: dict, series):
    """The series value of a row: one field's value, or the tuple of several fields' values."""
    if not series:
        return ""
    if isinstance(series, (list, tuple)):
        return tuple(row.get(name) for name in series)
    return row.get(series)


def _series_groups(rows: list[dict], series) -> dict:
    """Rows grouped by the value of the series field(s), in first-seen order (the study's axis order)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(_series_key(row, series), []).append(row)
    return groups


def _series_title(series) -> str | None:
    return ", ".join(series) if isinstance(series, (list, tuple)) else series


def check_knee(spec: dict) -> dict | None:
    """The plot's `knee` option with its defaults, or None; a malformed one is a one-line UserError
    (a study should call this when it loads, before hours of points)."""
    knee = spec.get("knee")
    if knee is None:
        return None
    where = f"plot {spec.get('y')!r} vs {spec.get('x')!r}: knee"
    if not isinstance(knee, dict) or "served" not in knee:
        raise UserError(f"{where}: expected a mapping with at least `served` (the served-throughput field)")
    unknown = set(knee) - _KNEE_KEYS
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                        f"(known: {', '.join(sorted(_KNEE_KEYS))})")
    ratio = knee.get("ratio", 0.95)
    if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise UserError(f"{where}: ratio must be a number in (0, 1], got {ratio!r}")
    if ("latency" in knee) != ("slo_ns" in knee):
        raise UserError(f"{where}: `latency` and `slo_ns` go together (the field and its SLO in ns)")
    return {"offered": knee.get("offered", spec["x"]), "served": knee["served"], "ratio": float(ratio),
            "latency": knee.get("latency"), "slo_ns": float(knee["slo_ns"]) if "slo_ns" in knee else None}


def _knee_of(members: list[dict], knee: dict) -> tuple[float, str] | None:
    """(offered load, why) of the first saturated point of one series, in offered order; None if
    every measured point keeps up."""
    ok = sorted((r for r in members if r.get("status") == "ok" and r.get(knee["served"]) is not None
                 and r.get(knee["offered"]) is not None), key=lambda r: r[knee["offered"]])
    for r in ok:
        offered, served = float(r[knee["offered"]]), float(r[knee["served"]])
        if served < knee["ratio"] * offered:
            return offered, f"served {served:.3g} < {knee['ratio']:.0%} of offered"
        latency = r.get(knee["latency"]) if knee["latency"] else None
        if latency is not None and float(latency) > knee["slo_ns"]:
            return offered, f"{knee['latency']} {float(latency) / 1e9:.3g} s > SLO {knee['slo_ns'] / 1e9:.3g} s"
    return None


def find_knees(spec: dict, rows: list[dict]) -> dict:
    """Series value -> (offered load, why) of its knee, or None, for a plot spec with `knee`."""
    knee = check_knee(spec)
    if knee is None:
        return {}
    return {value: _knee_of(members, knee) for value, members in _series_groups(rows, spec.get("series")).items()}


_KNEE_DASHES = ((0, (5, 3)), (0, (2, 2)), (0, (8, 2, 2, 2)), (0, (1, 3)))


def _mark_knees(axes: Axes, spec: dict, rows: list[dict], colours: dict, scale: float) -> None:
    """At each knee: a vertical line in the series' colour (its own dash pattern, so knees at the
    same load stay apart) and a hollow ring on the series' point there, named in the legend. A
    knee at the lowest measured load reads "<=": the machine saturates there or earlier."""
    for i, (value, found) in enumerate(find_knees(spec, rows).items()):
        name = _label(spec, value)
        colour = colours.get(value, "black")
        if found is None:
            axes.plot([], [], linestyle="none", label=f"{name}: no knee up to the highest load")
            continue
        members = _series_groups(rows, spec.get("series"))[value]
        offered = [float(r[spec["x"]]) for r in _ok(members, spec["y"])]
        at_lowest = bool(offered) and found[0] <= min(offered)
        axes.axvline(found[0], linestyle=_KNEE_DASHES[i % len(_KNEE_DASHES)], color=colour, alpha=0.9,
                     linewidth=1.3, label=f"{name}: knee at {'<= ' if at_lowest else ''}{plain_number(found[0])}")
        point = [r for r in _ok(members, spec["y"]) if float(r[spec["x"]]) == found[0]]
        if point:
            axes.plot([found[0]], [point[0][spec["y"]] * scale], marker="o", markersize=13, fillstyle="none",
                      markeredgewidth=1.6, color=colour, linestyle="none")


def _ok(members: list[dict], y_name: str) -> list[dict]:
    """The rows of a series that produced a y value."""
    return [r for r in members if r.get("status") == "ok" and r.get(y_name) is not None]


def _label(spec: dict, value) -> str:
    """Legend text of one series: its value under a legend titled by the series field."""
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return str(value) if spec.get("series") else spec["y"]


def _bars(axes: Axes, spec: dict, groups: dict, scale: float) -> list[float]:
    """Categorical x: one group of bars per x value, one bar per series; returns the bar heights."""
    x_name, y_name = spec["x"], spec["y"]
    categories = list(dict.fromkeys(r[x_name] for members in groups.values() for r in members))
    width = 0.8 / max(1, len(groups))
    heights: list[float] = []
    for i, (value, members) in enumerate(groups.items()):
        by_x = {r[x_name]: r for r in _ok(members, y_name)}
        xs = [c for c in range(len(categories)) if categories[c] in by_x]
        ys = [by_x[categories[x]][y_name] * scale for x in xs]
        bars = axes.bar([x + i * width for x in xs], ys, width=width, label=_label(spec, value))
        axes.bar_label(bars, labels=[plain_number(float(f"{y:.3g}")) for y in ys], fontsize="x-small", padding=2)
        heights += ys
    axes.set_xticks([c + width * (len(groups) - 1) / 2 for c in range(len(categories))],
                    [str(c) for c in categories])
    axes.margins(y=0.12)  # room for the value labels above the tallest bar
    return heights


def _lines(axes: Axes, spec: dict, groups: dict, scale: float, colours: dict | None = None) -> list[float]:
    """Numeric x: one line per series, failed x values marked by dotted red lines; returns the y
    values (and fills `colours`, series value -> line colour)."""
    x_name, y_name = spec["x"], spec["y"]
    ys_all: list[float] = []
    for value, members in groups.items():
        ok = sorted(_ok(members, y_name), key=lambda r: r[x_name])
        if ok:
            ys = [r[y_name] * scale for r in ok]
            line, = axes.plot([r[x_name] for r in ok], ys, marker="o", label=_label(spec, value))
            if colours is not None:
                colours[value] = line.get_color()
            ys_all += ys
    return ys_all


def _mark_failures(axes: Axes, spec: dict, groups: dict, categorical: bool) -> None:
    """Dotted red lines at failed points and a footnote with the first error of each failing series."""
    x_name, series = spec["x"], spec.get("series")
    notes, marked = [], False
    for value, members in groups.items():
        failed = [r for r in members if r.get("status") != "ok"]
        if not failed:
            continue
        if not categorical:
            for r in failed:
                axes.axvline(r[x_name], linestyle=":", color=_FAILED_COLOUR, alpha=0.8,
                             label="failed point" if not marked else None)
                marked = True
        where = ", ".join(str(r[x_name]) for r in failed)
        who = f"{series} = {value}" if series else spec["y"]
        status = "invalid" if all(r.get("status") == "invalid" for r in failed) else "failed"
        error = str(failed[0].get("error") or "no error recorded")
        error = error if len(error) <= _ERROR_CHARS else error[: _ERROR_CHARS - 3] + "..."
        notes.append(f"{who}: {status} at {x_name} = {where}: {error}")
    if notes:
        footnote(axes, "\n".join(notes), colour=_FAILED_COLOUR)


def _is_count(values: list) -> bool:
    """Integer-valued x (TP degree, nodes, sockets, experts): ticks must read 1, 2, 4, never 1.0."""
    return bool(values) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _x_axis(axes: Axes, spec: dict, rows: list[dict]) -> None:
    """Count axes get integer ticks on the measured values (log2 when the spec says logx)."""
    xs = [r[spec["x"]] for r in rows if r.get(spec["x"]) is not None]
    if _is_count(xs):
        count_axis(axes, "x", xs, log2=bool(spec.get("logx")) and min(xs) > 0)
    elif spec.get("logx") and xs and all(isinstance(v, (int, float)) for v in xs):
        log_axis(axes, "x", float(min(xs)), float(max(xs)))


def _y_axis(axes: Axes, spec: dict, ys: list[float], categorical: bool) -> None:
    """Log y when the spec asks, or (lines only) when the values span a decade and the spec is silent."""
    wants_log = spec["logy"] if "logy" in spec else (not categorical and spans_decades(ys))
    if wants_log and ys and min(ys) > 0:
        log_axis(axes, "y", min(ys), max(ys))


def build_study_figure(spec: dict, rows: list[dict], study_name: str) -> Figure:
    """The figure of one plot spec of a study (returned, so tests can inspect its axes)."""
    scale = float(spec.get("scale", 1.0))
    figure = new_figure(8.0, 4.6)
    axes = figure.subplots()
    groups = _series_groups(rows, spec.get("series"))
    categorical = spec.get("kind") == "bar"
    colours: dict = {}
    ys = _bars(axes, spec, groups, scale) if categorical else _lines(axes, spec, groups, scale, colours)
    if spec.get("diagonal") and not categorical:   # y = x: where served equals offered
        xs = [r[spec["x"]] for r in rows if isinstance(r.get(spec["x"]), (int, float))]
        if xs:
            axes.plot([min(xs), max(xs)], [min(xs) * scale, max(xs) * scale], color="grey", linestyle=":",
                      linewidth=1, label="served = offered")
    if not categorical:
        _mark_knees(axes, spec, rows, colours, scale)
    _mark_failures(axes, spec, groups, categorical)
    if not categorical:
        _x_axis(axes, spec, rows)
    _y_axis(axes, spec, ys, categorical)
    style_axes(axes, spec.get("title", f"{study_name}: {spec['y']} vs {spec['x']}"),
               spec.get("xlabel", spec["x"]), spec.get("ylabel", spec["y"]))
    if categorical:
        axes.grid(False, axis="x")
    legend_outside(axes, title=_series_title(spec.get("series")))
    return figure


def plot_study(study, rows: list[dict], out_dir: Path) -> list[Path]:
    """Write one PNG per plot spec of `study` into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in study.plots:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.get("file", f"{spec['y']}-vs-{spec['x']}"))
        paths.append(save_figure(build_study_figure(spec, rows, study.name), out_dir / f"{stem}.png"))
    return paths
