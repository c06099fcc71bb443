"""`rdu plot RUN_DIR`: PNG plots of a run, from its requests.csv and events.msgpack.

    latency_cdf.png         TTFT, time per output token and end-to-end latency, as CDFs
    hbm_and_switches.png    HBM occupancy per socket over virtual time, and switches per interval
    socket_utilisation.png  what each socket spent virtual time on, and busy share over time

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend
state), so plotting works without a display and does not disturb other matplotlib users.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from interconnect.spec_fields import UserError
from node.events_log import EVENTS_FILE, read_events
from node.live_stats import Residency
from scheduler.serving import ROUTER_ID

__all__ = ["write_plots", "PLOT_FILES"]

PLOT_FILES = ("latency_cdf.png", "hbm_and_switches.png", "socket_utilisation.png")
_GIB = float(1 << 30)
_ACTIVITIES = ("router", "expert prefill", "expert decode", "switch wait")
_COLOURS = {"router": "tab:purple", "expert prefill": "tab:blue", "expert decode": "tab:cyan",
            "switch wait": "tab:red"}
_MAX_SOCKET_BARS = 32


@dataclass
class _RunData:
    """What the plots need, gathered in one pass over the events."""

    setup: dict
    hbm: dict[str, list[tuple[int, int]]] = field(default_factory=dict)            # group -> (t_ns, bytes)
    switches: list[tuple[int, bool, int]] = field(default_factory=list)            # (t_ns, prefetch, victims)
    intervals: dict[str, dict[str, list[tuple[int, int]]]] = field(default_factory=dict)  # group -> kind -> spans
    latencies: dict[str, list[int]] = field(default_factory=lambda: {"ttft_ns": [], "tpot_ns": [], "e2e_ns": []})
    faults: list[tuple[int, str]] = field(default_factory=list)                   # (t_ns, "kill-node node1")
    end_ns: int = 0
    complete: bool = False


def _gather(events_path: Path) -> _RunData:
    data: _RunData | None = None
    residency: dict[str, Residency] = {}
    latest_run: dict[str, list[tuple[str, int]]] = {}   # group -> (activity, index) of its latest run's spans
    for event in read_events(events_path):
        kind = event["type"]
        if kind == "setup":
            data = _RunData(setup=event)
            for group in event["groups"]:
                residency[group["name"]] = Residency()
                data.hbm[group["name"]] = [(0, 0)]
                data.intervals[group["name"]] = {activity: [] for activity in _ACTIVITIES}
            continue
        if data is None:
            raise UserError(f"{events_path}: the stream does not start with a setup event")
        group = event.get("group")
        if group is not None and group not in residency:
            continue
        if kind == "switch":
            residency[group].apply_switch(event)
            data.hbm[group].append((event["t_ns"], residency[group].used_bytes))
            if event["model"] != ROUTER_ID:
                data.switches.append((event["t_ns"], bool(event["prefetch"]), len(event["victims"])))
        elif kind in ("router", "run"):
            start, end = event["t_ns"], event["end_ns"]
            first_token = min(end, start + event["ttft_ns"])
            spans = data.intervals[group]
            added = [("router", (start, end))] if kind == "router" else \
                [("expert prefill", (start, first_token)), ("expert decode", (first_token, end))]
            if event.get("stall_ns", 0) > 0:
                added.append(("switch wait", (start - event["stall_ns"], start)))
            latest_run[group] = []
            for activity, span in added:
                latest_run[group].append((activity, len(spans[activity])))
                spans[activity].append(span)
            data.end_ns = max(data.end_ns, end)
        elif kind == "fault":  # the runs it interrupted end there
            t_ns = event["t_ns"]
            data.faults.append((t_ns, f"{event.get('kind', 'fault')} {event.get('target', '')}".strip()))
            for hit in [*event.get("groups", ()), *([group] if group else [])]:
                for activity, index in latest_run.pop(hit, []):
                    start, end = data.intervals[hit][activity][index]
                    data.intervals[hit][activity][index] = (start, max(start, min(end, t_ns)))
        elif kind == "done":
            data.latencies["ttft_ns"].append(event["ttft_ns"])
            data.latencies["e2e_ns"].append(event["e2e_ns"])
            if event["output_tokens"] > 1:
                data.latencies["tpot_ns"].append(event["tpot_ns"])
            data.end_ns = max(data.end_ns, event["t_ns"])
        elif kind == "end":
            data.complete = True
            data.end_ns = max(data.end_ns, event["t_ns"])
    if data is None:
        raise UserError(f"{events_path}: no events (the run stopped before it started)")
    return data


def _latencies_from_csv(path: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"ttft_ns": [], "tpot_ns": [], "e2e_ns": []}
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                out["ttft_ns"].append(int(row["ttft_ns"]))
                out["e2e_ns"].append(int(row["e2e_ns"]))
                if int(row["output_tokens"]) > 1:
                    out["tpot_ns"].append(int(row["tpot_ns"]))
    except (KeyError, ValueError) as exc:
        raise UserError(f"{path}: not a requests table ({exc})") from None
    return out


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110)
    return path


def _title(data: _RunData) -> str:
    s = data.setup
    partial = "" if data.complete else " [incomplete run]"
    return f"{s.get('name', '?')}: {s.get('experts', '?')} x {s.get('model', '?')} on {s.get('nodes', '?')} x " \
           f"{s.get('platform', '?')}, TP{s.get('tp', '?')}, {s.get('policy', '?')}{partial}"


def _latency_cdf(data: _RunData, latencies: dict[str, list[int]], source: str, path: Path) -> Path:
    figure = Figure(figsize=(15, 4.8), layout="constrained")
    figure.suptitle(f"Latency CDFs ({source})\n{_title(data)}")
    for axes, (key, label) in zip(figure.subplots(1, 3),
                                  (("ttft_ns", "time to first token"), ("tpot_ns", "time per output token"),
                                   ("e2e_ns", "end-to-end latency"))):
        values_ms = np.sort(np.asarray(latencies[key], dtype=float)) / 1e6
        axes.set_title(f"{label} ({len(values_ms):,} requests)")
        axes.set_xlabel(f"{label} (ms)")
        axes.set_ylabel("fraction of requests")
        axes.grid(True, alpha=0.3)
        if len(values_ms) == 0:
            axes.text(0.5, 0.5, "no requests", ha="center", va="center", transform=axes.transAxes)
            continue
        fractions = np.arange(1, len(values_ms) + 1) / len(values_ms)
        axes.step(values_ms, fractions, where="post", label="CDF")
        for q, style in ((50, "--"), (99, ":")):
            value = float(np.percentile(values_ms, q))
            axes.axvline(value, color="grey", linestyle=style, label=f"p{q} = {value:,.2f} ms")
        if values_ms[0] > 0 and values_ms[-1] / values_ms[0] > 100:
            axes.set_xscale("log")
        axes.set_ylim(0, 1.02)
        axes.legend(loc="lower right")
    return _save(figure, path)


def _hbm_and_switches(data: _RunData, path: Path) -> Path:
    figure = Figure(figsize=(12, 7.5), layout="constrained")
    figure.suptitle(f"HBM occupancy and expert switches over virtual time\n{_title(data)}")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    end_s = max(data.end_ns, 1) / 1e9
    sizes = {g["name"]: len(g["members"]) for g in data.setup["groups"]}
    for group, points in data.hbm.items():
        times_s = [t / 1e9 for t, _ in points] + [end_s]
        used_gib = [b / _GIB for _, b in points] + [points[-1][1] / _GIB]
        top.step(times_s, used_gib, where="post", label=f"{group} (each of its {sizes.get(group, '?')} sockets)")
    capacity = data.setup.get("hbm_usable_bytes")
    if capacity:
        top.axhline(capacity / _GIB, color="black", linestyle="--", label="usable HBM per socket")
    _mark_faults(top, data)
    _mark_faults(bottom, data)
    top.set_ylabel("HBM used by model weights (GiB per socket)")
    top.set_title("HBM occupancy per socket (members of a TP group hold the same shards)")
    top.grid(True, alpha=0.3)
    top.legend(loc="lower right", fontsize="small")
    bins = np.linspace(0, end_s, 61)
    times = np.asarray([t / 1e9 for t, _, _ in data.switches])
    prefetch = np.asarray([p for _, p, _ in data.switches], dtype=bool)
    demand_counts, _ = np.histogram(times[~prefetch] if len(times) else [], bins=bins)
    prefetch_counts, _ = np.histogram(times[prefetch] if len(times) else [], bins=bins)
    evictions, _ = np.histogram(times if len(times) else [], bins=bins,
                                weights=[v for _, _, v in data.switches] if len(times) else None)
    width = bins[1] - bins[0]
    bottom.bar(bins[:-1], demand_counts, width=width, align="edge", label="switches on demand", color="tab:red")
    bottom.bar(bins[:-1], prefetch_counts, width=width, align="edge", bottom=demand_counts,
               label="prefetches", color="tab:orange")
    bottom.step(bins[:-1], evictions, where="post", color="black", label="evictions")
    bottom.set_xlabel("virtual time (s)")
    bottom.set_ylabel(f"count per {width:,.2f} s")
    bottom.set_title(f"DDR -> HBM expert switches ({len(data.switches):,} in total)")
    bottom.grid(True, alpha=0.3)
    bottom.legend(loc="upper right", fontsize="small")
    return _save(figure, path)


def _mark_faults(axes, data: _RunData) -> None:
    """A vertical line at each injected fault, in a time axis of seconds."""
    for i, (t_ns, label) in enumerate(data.faults):
        axes.axvline(t_ns / 1e9, color="red", linestyle="--", linewidth=1,
                     label="faults" if i == 0 else None)
        axes.annotate(label, (t_ns / 1e9, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top",
                      ha="right", fontsize="x-small", color="red")


def _busy_ns(spans: list[tuple[int, int]], edges_ns: np.ndarray) -> np.ndarray:
    """Busy time of `spans` in each interval between consecutive `edges_ns`."""
    if not spans:
        return np.zeros(len(edges_ns) - 1)
    array = np.asarray(spans, dtype=float)
    starts, ends = array[:, :1], array[:, 1:]
    overlap = np.minimum(ends, edges_ns[1:]) - np.maximum(starts, edges_ns[:-1])
    return np.clip(overlap, 0, None).sum(axis=0)


def _socket_utilisation(data: _RunData, path: Path) -> Path:
    figure = Figure(figsize=(12, 8.5), layout="constrained")
    figure.suptitle(f"Socket utilisation over virtual time\n{_title(data)}")
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 2))
    total_ns = max(data.end_ns, 1)
    groups = data.setup["groups"]
    members = sum(len(g["members"]) for g in groups)
    per_socket = members <= _MAX_SOCKET_BARS
    labels, shares = [], {a: [] for a in _ACTIVITIES}
    for group in groups:
        rows = group["members"] if per_socket else [f"{group['name']} ({len(group['members'])} sockets)"]
        for row in rows:
            labels.append(f"{row} ({group['name']})" if per_socket else row)
            for activity in _ACTIVITIES:
                busy = sum(end - start for start, end in data.intervals[group["name"]][activity])
                shares[activity].append(100.0 * busy / total_ns)
    positions = np.arange(len(labels))
    left = np.zeros(len(labels))
    for activity in _ACTIVITIES:
        top.barh(positions, shares[activity], left=left, label=activity, color=_COLOURS[activity])
        left += np.asarray(shares[activity])
    top.set_yticks(positions, labels, fontsize="small" if len(labels) > 12 else "medium")
    top.invert_yaxis()
    top.set_xlim(0, min(100.0, max(10.0, 1.15 * float(left.max(initial=0.0)))))
    top.set_xlabel(f"share of the run's virtual time, {total_ns / 1e9:,.2f} s (%)")
    top.set_title("what each socket spent its time on" + ("" if per_socket else " (one bar per TP group)"))
    top.grid(True, axis="x", alpha=0.3)
    top.legend(loc="lower right", fontsize="small")
    edges_ns = np.linspace(0, total_ns, 61)
    centres_s = (edges_ns[:-1] + edges_ns[1:]) / 2 / 1e9
    for group in groups:
        spans = [span for activity in ("router", "expert prefill", "expert decode")
                 for span in data.intervals[group["name"]][activity]]
        busy = _busy_ns(spans, edges_ns) / np.diff(edges_ns) * 100
        bottom.plot(centres_s, busy, label=f"{group['name']} ({len(group['members'])} sockets)")
    _mark_faults(bottom, data)
    bottom.set_ylim(0, 105)
    bottom.set_xlabel("virtual time (s)")
    bottom.set_ylabel("busy computing (% of interval)")
    bottom.set_title(f"busy share per TP group over time ({(edges_ns[1] - edges_ns[0]) / 1e9:,.2f} s intervals)")
    bottom.grid(True, alpha=0.3)
    bottom.legend(loc="best", fontsize="small")
    return _save(figure, path)


def write_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs of `run_dir` into `out_dir` (default run_dir/plots); returns their paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    data = _gather(run_dir / EVENTS_FILE)
    requests_csv = run_dir / "requests.csv"
    if requests_csv.is_file():
        latencies, source = _latencies_from_csv(requests_csv), "requests.csv"
    else:
        latencies, source = data.latencies, "done events: the run has no requests.csv"
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    return [_latency_cdf(data, latencies, source, out / PLOT_FILES[0]), _hbm_and_switches(data, out / PLOT_FILES[1]),
            _socket_utilisation(data, out / PLOT_FILES[2])]
