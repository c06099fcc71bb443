"""PNG plots of a study's results: one line (or bar group) per series value, failed points marked.

Drawn in the shared style of `node.plot_style` (object API on the Agg canvas, no pyplot): count axes
such as TP degree, nodes or experts get integer ticks on the measured values, a y axis whose values
span a decade or more is drawn in log scale unless the study's plot spec says `logy: false`, legends
sit outside the data, and failures are explained in a wrapped footnote instead of a cut annotation.
"""

from __future__ import annotations

import re
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from node.plot_style import (count_axis, footnote, legend_outside, log_axis, new_figure, plain_number, save_figure,
                             spans_decades, style_axes)

__all__ = ["plot_study", "build_study_figure"]

_FAILED_COLOUR = "tab:red"
_ERROR_CHARS = 220


def _series_groups(rows: list[dict], series: str | None) -> dict:
    """Rows grouped by the value of the series field, in first-seen order (the study's axis order)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row.get(series) if series else "", []).append(row)
    return groups


def _ok(members: list[dict], y_name: str) -> list[dict]:
    """The rows of a series that produced a y value."""
    return [r for r in members if r.get("status") == "ok" and r.get(y_name) is not None]


def _label(spec: dict, value) -> str:
    """Legend text of one series: its value under a legend titled by the series field."""
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


def _lines(axes: Axes, spec: dict, groups: dict, scale: float) -> list[float]:
    """Numeric x: one line per series, failed x values marked by dotted red lines; returns the y values."""
    x_name, y_name = spec["x"], spec["y"]
    ys_all: list[float] = []
    for value, members in groups.items():
        ok = sorted(_ok(members, y_name), key=lambda r: r[x_name])
        if ok:
            ys = [r[y_name] * scale for r in ok]
            axes.plot([r[x_name] for r in ok], ys, marker="o", label=_label(spec, value))
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
    ys = _bars(axes, spec, groups, scale) if categorical else _lines(axes, spec, groups, scale)
    _mark_failures(axes, spec, groups, categorical)
    if not categorical:
        _x_axis(axes, spec, rows)
    _y_axis(axes, spec, ys, categorical)
    style_axes(axes, spec.get("title", f"{study_name}: {spec['y']} vs {spec['x']}"),
               spec.get("xlabel", spec["x"]), spec.get("ylabel", spec["y"]))
    if categorical:
        axes.grid(False, axis="x")
    legend_outside(axes, title=spec.get("series"))
    return figure


def plot_study(study, rows: list[dict], out_dir: Path) -> list[Path]:
    """Write one PNG per plot spec of `study` into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in study.plots:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.get("file", f"{spec['y']}-vs-{spec['x']}"))
        paths.append(save_figure(build_study_figure(spec, rows, study.name), out_dir / f"{stem}.png"))
    return paths
