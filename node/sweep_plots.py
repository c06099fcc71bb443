"""PNG plots of a study's results: one line per series value, failed points marked."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

__all__ = ["plot_study"]


def _bars(ax, spec: dict, groups: dict, scale: float) -> None:
    """Categorical x: one group of bars per x value, one bar per series."""
    x_name, y_name = spec["x"], spec["y"]
    categories = list(dict.fromkeys(r[x_name] for members in groups.values() for r in members))
    width = 0.8 / max(1, len(groups))
    for i, (label, members) in enumerate(groups.items()):
        by_x = {r[x_name]: r for r in members if r["status"] == "ok" and r.get(y_name) is not None}
        xs = [c for c in range(len(categories)) if categories[c] in by_x]
        ax.bar([x + i * width for x in xs], [by_x[categories[x]][y_name] * scale for x in xs], width=width,
               label=f"{spec.get('series')}={label}" if spec.get("series") else y_name)
    ax.set_xticks([c + width * (len(groups) - 1) / 2 for c in range(len(categories))], [str(c) for c in categories])


def _plot(spec: dict, rows: list[dict], path: Path, study_name: str) -> None:
    x_name, y_name, series = spec["x"], spec["y"], spec.get("series")
    scale = float(spec.get("scale", 1.0))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    groups: dict = {}
    for row in rows:
        groups.setdefault(row.get(series) if series else "", []).append(row)
    if spec.get("kind") == "bar":
        _bars(ax, spec, groups, scale)
        groups = {}
    for label, members in groups.items():
        ok = sorted((r for r in members if r["status"] == "ok" and r.get(y_name) is not None),
                    key=lambda r: r[x_name])
        name = f"{series}={label}" if series else y_name
        if ok:
            ax.plot([r[x_name] for r in ok], [r[y_name] * scale for r in ok], marker="o", label=name)
        failed = [r for r in members if r["status"] != "ok"]
        for r in failed:
            ax.axvline(r[x_name], linestyle=":", color="tab:red", alpha=0.6)
        if failed:
            first = min(r[x_name] for r in failed)
            ax.annotate(f"{name}: fails from {first}\n{failed[0]['error'][:48]}...", xy=(first, 0.95),
                        xycoords=("data", "axes fraction"), fontsize=7, color="tab:red", va="top")
    if spec.get("logx"):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    if spec.get("logy"):
        ax.set_yscale("log")
    ax.set_xlabel(spec.get("xlabel", x_name))
    ax.set_ylabel(spec.get("ylabel", y_name))
    ax.set_title(spec.get("title", f"{study_name}: {y_name} vs {x_name}"))
    ax.grid(True, alpha=0.3)
    if any(ax.get_legend_handles_labels()):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_study(study, rows: list[dict], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in study.plots:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.get("file", f"{spec['y']}-vs-{spec['x']}"))
        path = out_dir / f"{stem}.png"
        _plot(spec, rows, path, study.name)
        paths.append(path)
    return paths
