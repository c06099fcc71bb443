"""`rdu plot RUN_DIR`: PNG plots of a run, from its requests.csv and events.msgpack.

    latency_cdf.png         TTFT, time per output token and end-to-end latency, as CDFs
    hbm_and_switches.png    HBM occupancy per socket over virtual time, and switches per interval
    socket_utilisation.png  what each socket spent virtual time on, and busy share over time

Figures are drawn in the shared style of `node.plot_style`: matplotlib's object API on the Agg canvas
(no pyplot, no global backend state), so plotting works without a display and does not disturb other
matplotlib users; latency axes that span a decade are log scale; legends sit outside the data.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from rdu.base import UserError
from rdu.node.observe.events_log import EVENTS_FILE, read_events
from rdu.node.observe.live_stats import Residency
from rdu.node.observe.plot_style import legend_outside, log_axis, new_figure, save_figure, spans_decades, style_axes
from rdu.scheduler.serving import ROUTER_ID

__all__ = ["write_plots", "run_figures", "PLOT_FILES"]

PLOT_FILES = ("latency_cdf.png", "hbm_and_switches.png", "socket_utilisation.png")
_GIB = float(1 << 30)
_ACTIVITIES = ("router", "expert prefill", "expert decode", "switch wait")
_COLOURS = {"router": "tab:purple", "expert prefill": "tab:blue", "expert decode": "tab:cyan",
            "switch wait": "tab:red"}
_MAX_SOCKET_BARS = 16   # more sockets than this: one bar per TP group
_MAX_GROUP_BARS = 16    # more TP groups than this: the mean, busiest and least busy group only
_MAX_GROUP_LINES = 10   # more TP groups than this: their mean and min-max band instead of one line each
# Group lines avoid red, the colour of fault markers (tab10 without tab:red).
_GROUP_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
                  "tab:olive", "tab:cyan", "navy")


@dataclass
class _RunData:
    """What the plots need, gathered in one pass over the events."""

    setup: dict
    hbm: dict[str, list[tuple[int, int]]] = field(default_factory=dict)            # group -> (t_ns, weight bytes)
    kv: dict[str, list[tuple[int, int]]] = field(default_factory=dict)             # group -> (t_ns, KV bytes)
    batch: dict[str, list[tuple[int, int]]] = field(default_factory=dict)          # group -> (t_ns, sequences)
    switches: list[tuple[int, bool, int]] = field(default_factory=list)            # (t_ns, prefetch, victims)
    evictions: list[tuple[int, int]] = field(default_factory=list)                 # (t_ns, models): switch or evict
    intervals: dict[str, dict[str, list[tuple[int, int]]]] = field(default_factory=dict)  # group -> kind -> spans
    latencies: dict[str, list[int]] = field(default_factory=lambda: {"ttft_ns": [], "tpot_ns": [], "e2e_ns": []})
    faults: list[tuple[int, str]] = field(default_factory=list)                   # (t_ns, "kill-node node1")
    end_ns: int = 0
    complete: bool = False


def _gather(events_path: Path) -> _RunData:
    """One pass over the event stream: residency, spans, switches, faults (a crashed run's stream too)."""
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
        if kind in ("switch", "evict"):
            residency[group].apply(event)
            data.hbm[group].append((event["t_ns"], residency[group].weights_bytes))
        if kind == "kv" or (kind == "run" and "kv_bytes" in event):   # the continuous engine's KV blocks
            data.kv.setdefault(group, []).append((event["t_ns"], int(event["kv_bytes"])))
            if kind == "run":
                data.batch.setdefault(group, []).append((event["t_ns"], len(event["requests"])))
        if kind == "evict":
            data.evictions.append((event["t_ns"], len(event["models"])))
        if kind == "switch":
            if event["victims"]:
                data.evictions.append((event["t_ns"], len(event["victims"])))
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
    """Latencies of a finished run from requests.csv (the per-request table the run wrote)."""
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


def _title(data: _RunData) -> str:
    """The run's identity, under every figure title, so a PNG read alone says what it shows."""
    s = data.setup
    partial = "" if data.complete else " [incomplete run]"
    return f"{s.get('name', '?')}: {s.get('experts', '?')} x {s.get('model', '?')} on {s.get('nodes', '?')} x " \
           f"{s.get('platform', '?')}, TP{s.get('tp', '?')}, {s.get('policy', '?')}{partial}"


_LATENCIES = (("ttft_ns", "time to first token"), ("tpot_ns", "time per output token"),
              ("e2e_ns", "end-to-end latency"))
_PERCENTILES = ((50, "--", "p50 (median)"), (99, ":", "p99"))


def _cdf_panel(axes: Axes, label: str, values_ms: np.ndarray) -> None:
    """One latency CDF with its p50 and p99 marked; log x when the latencies span a decade or more."""
    if len(values_ms) == 0:
        style_axes(axes, f"{label} (no requests)", f"{label} (ms)", "fraction of requests")
        axes.text(0.5, 0.5, "no requests", ha="center", va="center", transform=axes.transAxes)
        return
    fractions = np.arange(1, len(values_ms) + 1) / len(values_ms)
    axes.step(values_ms, fractions, where="post", color="tab:blue")
    quantiles = []
    for q, style, _name in _PERCENTILES:
        value = float(np.percentile(values_ms, q))
        axes.axvline(value, color="grey", linestyle=style)
        quantiles.append(f"p{q} {value:,.2f} ms")
    if spans_decades(values_ms):
        log_axis(axes, "x", float(values_ms[0]), float(values_ms[-1]))
    axes.set_ylim(0, 1.02)
    style_axes(axes, f"{label} ({len(values_ms):,} requests)\n{', '.join(quantiles)}", f"{label} (ms)",
               "fraction of requests")


def latency_figure(data: _RunData, latencies: dict[str, list[int]], source: str) -> Figure:
    """TTFT, TPOT and end-to-end CDFs side by side; one legend for the line styles, under the panels."""
    figure = new_figure(15, 5.2)
    figure.suptitle(f"Latency CDFs ({source})\n{_title(data)}")
    for axes, (key, label) in zip(figure.subplots(1, 3), _LATENCIES):
        _cdf_panel(axes, label, np.sort(np.asarray(latencies[key], dtype=float)) / 1e6)
    handles = [Line2D([], [], color="tab:blue", label="CDF")] + \
        [Line2D([], [], color="grey", linestyle=style, label=name) for _q, style, name in _PERCENTILES]
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small")
    return figure


def _hbm_panel(axes: Axes, data: _RunData) -> None:
    """HBM used by weights per socket of each TP group, as a step over virtual time."""
    end_s = max(data.end_ns, 1) / 1e9
    sizes = {g["name"]: len(g["members"]) for g in data.setup["groups"]}
    if len(data.hbm) > _MAX_GROUP_LINES:
        grid_s = np.linspace(0, end_s, 400)
        _band(axes, grid_s, [_step_at(points, grid_s) for points in data.hbm.values()], "TP groups", step=True)
    for i, (group, points) in enumerate(data.hbm.items() if len(data.hbm) <= _MAX_GROUP_LINES else ()):
        times_s = [t / 1e9 for t, _ in points] + [end_s]
        used_gib = [b / _GIB for _, b in points] + [points[-1][1] / _GIB]
        axes.step(times_s, used_gib, where="post", color=_GROUP_COLOURS[i % len(_GROUP_COLOURS)],
                  label=f"{group} (each of its {sizes.get(group, '?')} sockets)")
    capacity = data.setup.get("hbm_usable_bytes")
    if capacity:
        axes.axhline(capacity / _GIB, color="black", linestyle="--", label="usable HBM per socket")
    axes.set_ylim(bottom=0)
    _mark_faults(axes, data)
    style_axes(axes, "HBM occupancy per socket (members of a TP group hold the same shards)", "",
               "HBM used by model weights (GiB per socket)")
    legend_outside(axes)


def _switches_panel(axes: Axes, data: _RunData) -> None:
    """Demand switches and prefetches per time bin (stacked bars) and evictions (a step line)."""
    end_s = max(data.end_ns, 1) / 1e9
    bins = np.linspace(0, end_s, 61)
    times = np.asarray([t / 1e9 for t, _, _ in data.switches])
    prefetch = np.asarray([p for _, p, _ in data.switches], dtype=bool)
    demand_counts, _ = np.histogram(times[~prefetch] if len(times) else [], bins=bins)
    prefetch_counts, _ = np.histogram(times[prefetch] if len(times) else [], bins=bins)
    evicted_s = [t / 1e9 for t, _ in data.evictions]
    evictions, _ = np.histogram(evicted_s, bins=bins, weights=[n for _, n in data.evictions] or None)
    width = bins[1] - bins[0]
    axes.bar(bins[:-1], demand_counts, width=width, align="edge", label="switches on demand", color="tab:red")
    axes.bar(bins[:-1], prefetch_counts, width=width, align="edge", bottom=demand_counts,
             label="prefetches", color="tab:orange")
    axes.step(bins[:-1], evictions, where="post", color="black", label="evictions")
    axes.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # counts: 0, 2, 4, never 2.5
    _mark_faults(axes, data)
    style_axes(axes, f"DDR -> HBM expert switches ({len(data.switches):,} in total; evictions "
               f"{sum(n for _, n in data.evictions):,}, for switches or KV blocks)", "virtual time (s)",
               f"count per {width:,.2f} s")
    legend_outside(axes)


def _sample(points: list[tuple[int, int]], grid_s: np.ndarray) -> np.ndarray:
    """A (t_ns, value) step function sampled at `grid_s`, so many groups share one time grid."""
    times_s = np.asarray([t / 1e9 for t, _ in points])
    values = np.asarray([v for _, v in points], dtype=float)
    return values[np.clip(np.searchsorted(times_s, grid_s, side="right") - 1, 0, len(values) - 1)]


def _step_at(points: list[tuple[int, int]], grid_s: np.ndarray) -> np.ndarray:
    """GiB of a (t_ns, bytes) step function sampled at `grid_s`."""
    return _sample(points, grid_s) / _GIB


def _band(axes: Axes, x: np.ndarray, series: list[np.ndarray], what: str, step: bool = False) -> None:
    """Mean line and min-max band of many series: readable where one line per group is spaghetti."""
    stack = np.vstack(series)
    kwargs = {"step": "post"} if step else {}
    axes.fill_between(x, stack.min(axis=0), stack.max(axis=0), color="tab:blue", alpha=0.25,
                      label=f"min-max over {len(series)} {what}", **kwargs)
    draw = axes.step if step else axes.plot
    draw(x, stack.mean(axis=0), color="tab:blue", label=f"mean of {len(series)} {what}",
         **({"where": "post"} if step else {}))


def _kv_panel(axes: Axes, data: _RunData) -> None:
    """KV blocks held per socket of each TP group over virtual time (the continuous engine's
    paged KV, as the ledgers hold it), and, on the right axis, the sequences of each step."""
    end_s = max(data.end_ns, 1) / 1e9
    if not data.kv:
        axes.text(0.5, 0.5, "no KV blocks in the events (the static cycle reserves KV up front)", ha="center",
                  va="center", transform=axes.transAxes, fontsize="small")
        style_axes(axes, "KV cache per socket", "", "KV (GiB per socket)")
        return
    many = len(data.kv) > _MAX_GROUP_LINES
    grid_s = np.linspace(0, end_s, 400)
    if many:
        _band(axes, grid_s, [_step_at(points, grid_s) for points in data.kv.values()], "TP groups", step=True)
    for i, (group, points) in enumerate(sorted(data.kv.items()) if not many else ()):
        times_s = [t / 1e9 for t, _ in points] + [end_s]
        used_gib = [b / _GIB for _, b in points] + [points[-1][1] / _GIB]
        axes.step(times_s, used_gib, where="post", color=_GROUP_COLOURS[i % len(_GROUP_COLOURS)],
                  label=f"{group} KV")
    peak = max(b for points in data.kv.values() for _, b in points)
    axes.set_ylim(bottom=0)
    right = axes.twinx()
    batches = [_sample(points, grid_s) for points in data.batch.values()]
    if batches:   # the mean over groups of the sequences per step, sampled on the grid
        right.plot(grid_s, np.mean(batches, axis=0), color="black", linewidth=0.8, alpha=0.6,
                   label="sequences per step (mean over groups)")
        right.set_ylim(bottom=0)
        right.set_ylabel("sequences per step")
        right.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        right.grid(False)
    _mark_faults(axes, data)
    style_axes(axes, f"KV cache per socket (paged blocks; peak {peak / _GIB:,.2f} GiB) and batch size", "",
               "KV (GiB per socket)")
    handles, labels = axes.get_legend_handles_labels()
    more_handles, more_labels = right.get_legend_handles_labels()
    axes.legend(handles + more_handles, labels + more_labels, loc="upper left", bbox_to_anchor=(1.06, 1.0),
                fontsize="small", frameon=False)


def hbm_figure(data: _RunData) -> Figure:
    """HBM occupancy by weights, then KV and batch size, above the expert switches per interval,
    on one time axis."""
    figure = new_figure(13, 10)
    figure.suptitle(f"HBM occupancy, KV cache and expert switches over virtual time\n{_title(data)}")
    top, middle, bottom = figure.subplots(3, 1, sharex=True, height_ratios=(3, 2, 2))
    _hbm_panel(top, data)
    _kv_panel(middle, data)
    _switches_panel(bottom, data)
    return figure


_FAULT_STYLES = ("--", "-.", ":", (0, (5, 1, 1, 1)))


def _mark_faults(axes: Axes, data: _RunData) -> None:
    """A red vertical line at each injected fault, named in the legend (no text over the data)."""
    for i, (t_ns, label) in enumerate(data.faults):
        axes.axvline(t_ns / 1e9, color="red", linestyle=_FAULT_STYLES[i % len(_FAULT_STYLES)], linewidth=1.2,
                     label=f"fault at {t_ns / 1e9:,.2f} s: {label}")


def _busy_ns(spans: list[tuple[int, int]], edges_ns: np.ndarray) -> np.ndarray:
    """Busy time of `spans` in each interval between consecutive `edges_ns`."""
    if not spans:
        return np.zeros(len(edges_ns) - 1)
    array = np.asarray(spans, dtype=float)
    starts, ends = array[:, :1], array[:, 1:]
    overlap = np.minimum(ends, edges_ns[1:]) - np.maximum(starts, edges_ns[:-1])
    return np.clip(overlap, 0, None).sum(axis=0)


def _share_bars(axes: Axes, data: _RunData) -> None:
    """Stacked horizontal bars: the share of the run each socket (or TP group) spent on each activity."""
    total_ns = max(data.end_ns, 1)
    groups = data.setup["groups"]
    per_socket = sum(len(g["members"]) for g in groups) <= _MAX_SOCKET_BARS
    labels, shares = [], {a: [] for a in _ACTIVITIES}
    for group in groups:
        rows = group["members"] if per_socket else [f"{group['name']} ({len(group['members'])} sockets)"]
        for row in rows:
            labels.append(f"{row} ({group['name']})" if per_socket else row)
            for activity in _ACTIVITIES:
                busy = sum(end - start for start, end in data.intervals[group["name"]][activity])
                shares[activity].append(100.0 * busy / total_ns)
    if len(labels) > _MAX_GROUP_BARS:
        labels, shares = _summary_rows(labels, shares)
    positions = np.arange(len(labels))
    left = np.zeros(len(labels))
    for activity in _ACTIVITIES:
        axes.barh(positions, shares[activity], left=left, label=activity, color=_COLOURS[activity])
        left += np.asarray(shares[activity])
    for position, total in zip(positions, left):  # the busy total at each bar's end: no need to add segments
        axes.annotate(f"{total:.1f} %", (total, position), xytext=(3, 0), textcoords="offset points",
                      va="center", fontsize="x-small")
    axes.set_yticks(positions, labels, fontsize="small" if len(labels) > 12 else "medium")
    axes.invert_yaxis()
    axes.set_xlim(0, min(100.0, max(10.0, 1.15 * float(left.max(initial=0.0)))))
    style_axes(axes, "what each socket spent its time on" + ("" if per_socket else
               f" (one bar per TP group of {len(groups)})" if len(groups) <= _MAX_GROUP_BARS else
               f" (summary of {len(groups)} TP groups)"),
               f"share of the run's virtual time, {total_ns / 1e9:,.2f} s (%)", "")
    axes.grid(False, axis="y")
    legend_outside(axes)


def _summary_rows(labels: list[str], shares: dict[str, list[float]]) -> tuple[list[str], dict[str, list[float]]]:
    """Mean, busiest and least busy TP group: three readable bars instead of hundreds of thin ones."""
    busy = np.sum([shares[a] for a in _ACTIVITIES], axis=0)
    high, low = int(np.argmax(busy)), int(np.argmin(busy))
    rows = [f"mean of {len(labels)} TP groups", f"busiest: {labels[high]}", f"least busy: {labels[low]}"]
    return rows, {a: [float(np.mean(v)), v[high], v[low]] for a, v in shares.items()}


def _busy_lines(axes: Axes, data: _RunData) -> None:
    """Busy share of each TP group per time interval: when the sockets worked, not only how much."""
    edges_ns = np.linspace(0, max(data.end_ns, 1), 61)
    centres_s = (edges_ns[:-1] + edges_ns[1:]) / 2 / 1e9
    groups = data.setup["groups"]
    busy = [_busy_ns([span for activity in ("router", "expert prefill", "expert decode")
                      for span in data.intervals[group["name"]][activity]], edges_ns) / np.diff(edges_ns) * 100
            for group in groups]
    if len(groups) > _MAX_GROUP_LINES:
        _band(axes, centres_s, busy, "TP groups")
    for i, group in enumerate(groups if len(groups) <= _MAX_GROUP_LINES else ()):
        axes.plot(centres_s, busy[i], color=_GROUP_COLOURS[i % len(_GROUP_COLOURS)],
                  label=f"{group['name']} ({len(group['members'])} sockets)")
    _mark_faults(axes, data)
    axes.set_ylim(0, 105)
    style_axes(axes, f"busy share per TP group over time ({(edges_ns[1] - edges_ns[0]) / 1e9:,.2f} s intervals)",
               "virtual time (s)", "busy computing (% of interval)")
    legend_outside(axes)


def utilisation_figure(data: _RunData) -> Figure:
    """Per-socket activity shares above the busy share of each TP group over virtual time."""
    figure = new_figure(13, 8.5)
    figure.suptitle(f"Socket utilisation over virtual time\n{_title(data)}")
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 2))
    _share_bars(top, data)
    _busy_lines(bottom, data)
    return figure


def run_figures(run_dir: str | Path) -> dict[str, Figure]:
    """The figures of `run_dir` by file name, unsaved (tests and notebooks inspect their axes)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    data = _gather(run_dir / EVENTS_FILE)
    requests_csv = run_dir / "requests.csv"
    if requests_csv.is_file():
        latencies, source = _latencies_from_csv(requests_csv), "requests.csv"
    else:
        latencies, source = data.latencies, "done events: the run has no requests.csv"
    return {PLOT_FILES[0]: latency_figure(data, latencies, source), PLOT_FILES[1]: hbm_figure(data),
            PLOT_FILES[2]: utilisation_figure(data)}


def write_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs of `run_dir` into `out_dir` (default run_dir/plots); returns their paths."""
    figures = run_figures(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    return [save_figure(figure, out / name) for name, figure in figures.items()]
