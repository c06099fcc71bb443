"""`rdu plot RUN_DIR`: PNG plots of a run, from its requests.csv and events.msgpack.

    latency_cdf.png         TTFT, time per output token and end-to-end latency, as CDFs
    hbm_and_switches.png    HBM occupancy per socket over virtual time, KV and batch, switches per interval
    socket_utilisation.png  what each socket spent virtual time on, busy share over time, and the
                            busy share of the DDR -> HBM copy links

What they show is gathered in one pass, in bounded memory (`plot_data`), from the reducer the
dashboard and the trace use. Figures are drawn in the shared style of `plot_style`: matplotlib's
object API on the Agg canvas (no pyplot, no global backend state), so plotting works without a
display and does not disturb other matplotlib users; latency axes that span a decade are log
scale; legends sit outside the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from rdu.base import UserError
from rdu.node.observe.events_log import EVENTS_FILE
from rdu.node.observe.plot_data import ACTIVITIES, RunData, gather, latencies_from_csv
from rdu.node.observe.plot_style import legend_outside, log_axis, new_figure, save_figure, spans_decades, style_axes
from rdu.node.observe.time_bins import StepSeries

__all__ = ["write_plots", "run_figures", "latency_figure", "hbm_figure", "utilisation_figure", "PLOT_FILES"]

PLOT_FILES = ("latency_cdf.png", "hbm_and_switches.png", "socket_utilisation.png")
_GIB = float(1 << 30)
_CDF_POINTS = 4000      # a CDF of more requests is drawn through this many of its order statistics
_COLOURS = {"router": "tab:purple", "expert prefill": "tab:blue", "expert decode": "tab:cyan",
            "switch wait": "tab:red"}
_MAX_SOCKET_BARS = 16   # more sockets than this: one bar per TP group
_MAX_GROUP_BARS = 16    # more TP groups than this: the mean, busiest and least busy group only
_MAX_GROUP_LINES = 10   # more TP groups than this: their mean and min-max band instead of one line each
# Group lines avoid red, the colour of fault markers (tab10 without tab:red).
_GROUP_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
                  "tab:olive", "tab:cyan", "navy")


def _title(data: RunData) -> str:
    """The run's identity, under every figure title, so a PNG read alone says what it shows."""
    s = data.setup
    partial = "" if data.complete else " [incomplete run]"
    return f"{s.name}: {s.experts} x {s.model} on {s.nodes} x {s.platform}, TP{s.tp}, {s.policy}{partial}"


_LATENCIES = (("ttft_ns", "time to first token"), ("tpot_ns", "time per output token"),
              ("e2e_ns", "end-to-end latency"))
_PERCENTILES = ((50, "--", "p50 (median)"), (99, ":", "p99"))


def _cdf_panel(axes: Axes, label: str, values_ms: np.ndarray) -> None:
    """One latency CDF with its p50 and p99 marked; log x when the latencies span a decade or more."""
    if len(values_ms) == 0:
        style_axes(axes, f"{label} (no requests)", f"{label} (ms)", "fraction of requests")
        axes.text(0.5, 0.5, "no requests", ha="center", va="center", transform=axes.transAxes)
        return
    ranks = np.arange(1, len(values_ms) + 1)
    if len(values_ms) > _CDF_POINTS:   # what a reader can see of the curve; the percentiles use every request
        ranks = np.unique(np.linspace(1, len(values_ms), _CDF_POINTS).round().astype(np.int64))
    axes.step(values_ms[ranks - 1], ranks / len(values_ms), where="post", color="tab:blue")
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


def latency_figure(data: RunData, latencies: dict[str, Sequence[int]], source: str) -> Figure:
    """TTFT, TPOT and end-to-end CDFs side by side; one legend for the line styles, under the panels."""
    figure = new_figure(15, 5.2)
    figure.suptitle(f"Latency CDFs ({source})\n{_title(data)}")
    for axes, (key, label) in zip(figure.subplots(1, 3), _LATENCIES):
        _cdf_panel(axes, label, np.sort(np.asarray(latencies[key], dtype=np.int64)) / 1e6)
    handles = [Line2D([], [], color="tab:blue", label="CDF")] + \
        [Line2D([], [], color="grey", linestyle=style, label=name) for _q, style, name in _PERCENTILES]
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small")
    return figure


def _steps(data: RunData, series: StepSeries, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(seconds, values) of a step series as a line: the peak of each bin, held to the run's end."""
    grid = data.grid
    edges_s = grid.fine_edges_ns()[:-1] / 1e9
    peaks = series.peaks(grid.used) / scale
    return np.append(edges_s, max(data.end_ns, 1) / 1e9), np.append(peaks, peaks[-1])


def _step_lines(axes: Axes, data: RunData, series: dict[str, StepSeries], label: str) -> None:
    """One step line per TP group (`label` formats its legend entry), or their band when many."""
    if len(series) > _MAX_GROUP_LINES:
        lines = [_steps(data, s, _GIB) for s in series.values()]
        _band(axes, lines[0][0], [y for _, y in lines], "TP groups", step=True)
        return
    sockets = {g.name: len(g.members) for g in data.setup.groups}
    for i, (group, s) in enumerate(series.items()):
        times_s, values = _steps(data, s, _GIB)
        axes.step(times_s, values, where="post", color=_GROUP_COLOURS[i % len(_GROUP_COLOURS)],
                  label=label.format(group=group, sockets=sockets[group]))


def _hbm_panel(axes: Axes, data: RunData) -> None:
    """HBM used by weights per socket of each TP group, as a step over virtual time."""
    _step_lines(axes, data, {name: g.weights_bytes for name, g in data.groups.items()},
                "{group} (each of its {sockets} sockets)")
    axes.axhline(data.setup.hbm_usable_bytes / _GIB, color="black", linestyle="--", label="usable HBM per socket")
    axes.set_ylim(bottom=0)
    _mark_faults(axes, data)
    style_axes(axes, "HBM occupancy per socket (members of a TP group hold the same shards; the peak of each "
               f"{data.grid.width_ns / 1e9:,.3g} s interval)", "", "HBM used by model weights (GiB per socket)")
    legend_outside(axes)


def _switches_panel(axes: Axes, data: RunData) -> None:
    """Demand switches and prefetches per time bin (stacked bars) and evictions (a step line)."""
    edges, demand_counts = data.grid.coarse(data.demand_switches)
    _, prefetch_counts = data.grid.coarse(data.prefetches)
    _, evictions = data.grid.coarse(data.evictions)
    bins = edges / 1e9
    width = bins[1] - bins[0]
    axes.bar(bins[:-1], demand_counts, width=width, align="edge", label="switches on demand", color="tab:red")
    axes.bar(bins[:-1], prefetch_counts, width=width, align="edge", bottom=demand_counts,
             label="prefetches", color="tab:orange")
    axes.step(bins[:-1], evictions, where="post", color="black", label="evictions")
    axes.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # counts: 0, 2, 4, never 2.5
    _mark_faults(axes, data)
    style_axes(axes, f"DDR -> HBM expert switches ({data.switches_total:,} in total; evictions "
               f"{data.evictions_total:,}, for switches or KV blocks)", "virtual time (s)",
               f"count per {width:,.2f} s")
    legend_outside(axes)


def _band(axes: Axes, x: np.ndarray, series: list[np.ndarray], what: str, step: bool = False) -> None:
    """Mean line and min-max band of many series: readable where one line per group is spaghetti."""
    stack = np.vstack(series)
    kwargs = {"step": "post"} if step else {}
    axes.fill_between(x, stack.min(axis=0), stack.max(axis=0), color="tab:blue", alpha=0.25,
                      label=f"min-max over {len(series)} {what}", **kwargs)
    draw = axes.step if step else axes.plot
    draw(x, stack.mean(axis=0), color="tab:blue", label=f"mean of {len(series)} {what}",
         **({"where": "post"} if step else {}))


def _kv_panel(axes: Axes, data: RunData) -> None:
    """KV held per socket of each TP group over virtual time (as the ledgers hold it: the
    continuous engine's paged blocks, a static batch's cache), and, on the right axis, the
    sequences of each step."""
    if not data.kv_seen:
        axes.text(0.5, 0.5, "no KV cache in the events", ha="center", va="center", transform=axes.transAxes,
                  fontsize="small")
        style_axes(axes, "KV cache per socket", "", "KV (GiB per socket)")
        return
    _step_lines(axes, data, {name: g.kv_bytes for name, g in data.groups.items()}, "{group} KV")
    peak = max(g.kv_bytes.maximum() for g in data.groups.values())
    axes.set_ylim(bottom=0)
    right = axes.twinx()
    grid = data.grid
    centres_s = (grid.fine_edges_ns()[:-1] + grid.width_ns / 2) / 1e9
    batches = [g.batch_sequences.at_bin_ends(grid.used) for g in data.groups.values()]
    right.plot(centres_s, np.mean(batches, axis=0), color="black", linewidth=0.8, alpha=0.6,
               label="sequences per step (mean over groups)")
    right.set_ylim(bottom=0)
    right.set_ylabel("sequences per step")
    right.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    right.grid(False)
    _mark_faults(axes, data)
    style_axes(axes, f"KV cache per socket (peak {peak / _GIB:,.2f} GiB) and batch size", "", "KV (GiB per socket)")
    handles, labels = axes.get_legend_handles_labels()
    more_handles, more_labels = right.get_legend_handles_labels()
    axes.legend(handles + more_handles, labels + more_labels, loc="upper left", bbox_to_anchor=(1.06, 1.0),
                fontsize="small", frameon=False)


def hbm_figure(data: RunData) -> Figure:
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


def _mark_faults(axes: Axes, data: RunData) -> None:
    """A red vertical line at each injected fault, named in the legend (no text over the data)."""
    for i, (t_ns, label) in enumerate(data.faults):
        axes.axvline(t_ns / 1e9, color="red", linestyle=_FAULT_STYLES[i % len(_FAULT_STYLES)], linewidth=1.2,
                     label=f"fault at {t_ns / 1e9:,.2f} s: {label}")


def _share_bars(axes: Axes, data: RunData) -> None:
    """Stacked horizontal bars: the share of the run each socket (or TP group) spent on each activity."""
    total_ns = max(data.end_ns, 1)
    groups = data.setup.groups
    per_socket = sum(len(g.members) for g in groups) <= _MAX_SOCKET_BARS
    labels, shares = [], {a: [] for a in ACTIVITIES}
    for group in groups:
        rows = group.members if per_socket else [f"{group.name} ({len(group.members)} sockets)"]
        totals = data.groups[group.name].busy_total_ns
        for row in rows:
            labels.append(f"{row} ({group.name})" if per_socket else row)
            for activity in ACTIVITIES:
                shares[activity].append(100.0 * totals[activity] / total_ns)
    if len(labels) > _MAX_GROUP_BARS:
        labels, shares = _summary_rows(labels, shares)
    positions = np.arange(len(labels))
    left = np.zeros(len(labels))
    for activity in ACTIVITIES:
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
    busy = np.sum([shares[a] for a in ACTIVITIES], axis=0)
    high, low = int(np.argmax(busy)), int(np.argmin(busy))
    rows = [f"mean of {len(labels)} TP groups", f"busiest: {labels[high]}", f"least busy: {labels[low]}"]
    return rows, {a: [float(np.mean(v)), v[high], v[low]] for a, v in shares.items()}


def _share_lines(axes: Axes, data: RunData, series: dict[str, np.ndarray], what: str) -> tuple[float, float]:
    """Busy share (%) per coarse interval of each series, or the band of many; returns the
    interval in seconds and the highest share drawn."""
    edges, lines = None, {}
    for name, busy in series.items():
        edges, share = data.grid.coarse_share(busy)
        lines[name] = 100 * share
    if edges is None:
        return 0.0, 0.0
    centres_s = (edges[:-1] + edges[1:]) / 2 / 1e9
    if len(lines) > _MAX_GROUP_LINES:
        _band(axes, centres_s, list(lines.values()), what)
    for i, (name, share) in enumerate(lines.items() if len(lines) <= _MAX_GROUP_LINES else ()):
        axes.plot(centres_s, share, color=_GROUP_COLOURS[i % len(_GROUP_COLOURS)], label=name)
    return (edges[1] - edges[0]) / 1e9, max(float(line.max()) for line in lines.values())


def _busy_lines(axes: Axes, data: RunData) -> None:
    """Busy share of each TP group per time interval: when the sockets worked, not only how much."""
    busy = {f"{g.name} ({len(g.members)} sockets)": sum(data.groups[g.name].busy_ns[a] for a in ACTIVITIES[:3])
            for g in data.setup.groups}
    interval_s, _ = _share_lines(axes, data, busy, "TP groups")
    _mark_faults(axes, data)
    axes.set_ylim(0, 105)
    style_axes(axes, f"busy share per TP group over time ({interval_s:,.2f} s intervals)", "",
               "busy computing (% of interval)")
    legend_outside(axes)


def _copy_lines(axes: Axes, data: RunData) -> None:
    """Busy share of the DDR -> HBM copy links: each group's sockets' own lanes (their mean) and
    the lanes the sockets of a node share, per time interval."""
    lanes = {f"{g.name} own copy links (mean of {len(g.members)})": data.groups[g.name].copies_ns
             for g in data.setup.groups}
    lanes.update(data.shared_lanes_ns)
    interval_s, highest = _share_lines(axes, data, lanes, "copy lanes")
    _mark_faults(axes, data)
    axes.set_ylim(0, min(105.0, max(5.0, 1.15 * highest)))   # copies are brief: a full scale would flatten them
    style_axes(axes, f"DDR -> HBM copy links: busy share over time ({interval_s:,.2f} s intervals)",
               "virtual time (s)", "busy copying (% of interval)")
    legend_outside(axes)


def utilisation_figure(data: RunData) -> Figure:
    """Per-socket activity shares above the busy share of each TP group and of the copy links
    over virtual time."""
    figure = new_figure(13, 11)
    figure.suptitle(f"Socket and copy-link utilisation over virtual time\n{_title(data)}")
    top, middle, bottom = figure.subplots(3, 1, height_ratios=(3, 2, 2))
    _share_bars(top, data)
    _busy_lines(middle, data)
    bottom.sharex(middle)
    _copy_lines(bottom, data)
    return figure


def run_figures(run_dir: str | Path) -> dict[str, Figure]:
    """The figures of `run_dir` by file name, unsaved (tests and notebooks inspect their axes)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    requests_csv = run_dir / "requests.csv"
    has_csv = requests_csv.is_file()
    data = gather(run_dir / EVENTS_FILE, latencies=not has_csv)
    if has_csv:
        latencies, source = latencies_from_csv(requests_csv), "requests.csv"
    else:
        latencies, source = data.latencies, "done events: the run has no requests.csv"
    return {PLOT_FILES[0]: latency_figure(data, latencies, source), PLOT_FILES[1]: hbm_figure(data),
            PLOT_FILES[2]: utilisation_figure(data)}


def write_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs of `run_dir` into `out_dir` (default run_dir/plots); returns their paths
    (a figure is let go once saved: one drawn canvas in memory at a time)."""
    figures = run_figures(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    return [save_figure(figures.pop(name), out / name) for name in list(figures)]
