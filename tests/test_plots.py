"""Plots: the PNGs of a finished and a crashed run, and readability rules checked on the Axes themselves.

The readability tests draw each figure (without saving it) and inspect what a reader would see: tick
texts, axis scales, where legends sit relative to every data area, and whether anything drawn falls
outside the figure.
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from rdu.base import UserError
from rdu.node.cli.main import main
from rdu.node.observe.events_log import EventsWriter, read_events
from rdu.node.observe.plot_data import RunData, gather
from rdu.node.observe.plot_style import count_axis, new_figure, plain_number, spans_decades
from rdu.node.observe.plots import PLOT_FILES, latency_figure, run_figures, utilisation_figure, write_plots
from rdu.node.studies.reproduce import Claim, Reproduction
from rdu.node.studies.reproduce_plots import coe_figure, fusion_figure, headline_figure
from rdu.node.runs.run import execute_run
from rdu.node.runs.run_config import resolve_run_config
from rdu.node.studies.sweep_plots import build_study_figure
from rdu.scheduler.timeline import End, Evict, GroupLayout, KvResize, Run, Setup, Switch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    config = resolve_run_config(None, {"backend": "inline", "nodes": 2, "tp": 4, "scheduler": {"policy": "prefetch"},
                                       "out": str(tmp_path_factory.mktemp("plots") / "r"),
                                       "faults": ["kill-node:node1@virtual_ms=20000"],
                                       "workload": {"limit": 200}})
    return execute_run(config).out_dir


def assert_pngs(paths):
    assert sorted(p.name for p in paths) == sorted(PLOT_FILES)
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000, path


def drawn(figure: Figure):
    """Lay out and draw the figure in memory; returns the renderer for extent queries."""
    figure.canvas.draw()
    return figure.canvas.get_renderer()


def tick_texts(axis) -> list[str]:
    """The tick labels a reader sees: only the ticks inside the view limits."""
    low, high = sorted(axis.get_view_interval())
    return [t.label1.get_text() for t in axis.get_major_ticks()
            if t.label1.get_visible() and low <= t.get_loc() <= high]


def assert_readable(figure: Figure) -> None:
    """No legend over any data area, and nothing drawn outside the figure (nothing cut when saved)."""
    renderer = drawn(figure)
    legends = [a.get_legend() for a in figure.axes if a.get_legend() is not None] + list(figure.legends)
    for legend in legends:
        box = legend.get_window_extent(renderer).shrunk(0.99, 0.99)
        for axes in figure.axes:
            assert not box.overlaps(axes.bbox), f"legend {[t.get_text() for t in legend.texts]} over {axes.get_title()!r}"
    tight = figure.get_tightbbox(renderer)  # inches
    assert tight.x0 >= -0.01 and tight.y0 >= -0.01, tight
    assert tight.x1 <= figure.get_figwidth() + 0.01 and tight.y1 <= figure.get_figheight() + 0.01, tight


# --- rdu plot on a real run ------------------------------------------------------------------------------

def test_rdu_plot_writes_every_png_into_run_dir_plots(run_dir, capsys):
    assert main(["plot", str(run_dir)]) == 0
    out = capsys.readouterr().out
    paths = [run_dir / "plots" / name for name in PLOT_FILES]
    assert all(str(p) in out for p in paths)
    assert_pngs(paths)


def test_run_figures_have_legends_off_the_data_and_nothing_cut(run_dir):
    figures = run_figures(run_dir)
    assert sorted(figures) == sorted(PLOT_FILES)
    for figure in figures.values():
        assert_readable(figure)


def test_faults_are_named_in_the_legend_not_written_over_the_data(run_dir):
    hbm = run_figures(run_dir)["hbm_and_switches.png"]
    top = hbm.axes[0]
    assert any(re.fullmatch(r"fault at 20\.\d\d s: kill-node node1", t.get_text()) for t in top.get_legend().texts)
    assert not top.texts  # no rotated labels inside the data area


@pytest.fixture(scope="module")
def continuous_run_dir(tmp_path_factory):
    """A CoE run of the continuous engine: KV blocks come and go, idle experts make room for them."""
    config = resolve_run_config(None, {"backend": "inline", "nodes": 2, "tp": 4,
                                       "out": str(tmp_path_factory.mktemp("plots") / "c"), "workload": {"limit": 300}})
    return execute_run(config).out_dir


def test_the_kv_panel_follows_the_kv_blocks_and_the_batch(continuous_run_dir):
    events = list(read_events(continuous_run_dir / "events.msgpack"))
    data = gather(continuous_run_dir / "events.msgpack")
    runs = [e for e in events if isinstance(e, Run)]
    peak = max(e.kv_bytes for e in runs)
    assert peak > 0 and max(g.kv_bytes.maximum() for g in data.groups.values()) == peak
    # the blocks all come back
    assert all(g.kv_bytes.at_bin_ends(data.grid.used)[-1] == 0 for g in data.groups.values())
    summary = json.loads((continuous_run_dir / "summary.json").read_text())
    assert data.evictions_total == summary["evictions"] == data.evictions.sum()   # evictions for KV included
    figure = run_figures(continuous_run_dir)["hbm_and_switches.png"]
    assert_readable(figure)
    kv = next(a for a in figure.axes if a.get_title().startswith("KV cache per socket"))
    assert f"peak {peak / 2**30:,.2f} GiB" in kv.get_title()
    assert max(max(line.get_ydata()) for line in kv.get_lines()) == pytest.approx(peak / 2**30)
    assert any(a.get_ylabel() == "sequences per step" for a in figure.axes)


def test_a_static_run_shows_the_kv_cache_of_its_batches(run_dir):
    peak = max(e.kv_bytes for e in read_events(run_dir / "events.msgpack") if isinstance(e, Run))
    figure = run_figures(run_dir)["hbm_and_switches.png"]
    kv = next(a for a in figure.axes if a.get_title().startswith("KV cache per socket"))
    assert not kv.texts and f"peak {peak / 2**30:,.2f} GiB" in kv.get_title()


def test_a_crashed_run_is_plotted_from_its_events(run_dir, tmp_path):
    crashed = tmp_path / ".r.partial-99"
    crashed.mkdir()
    data = (run_dir / "events.msgpack").read_bytes()
    (crashed / "events.msgpack").write_bytes(data[: len(data) * 2 // 3])  # no requests.csv, truncated tail
    assert_pngs(write_plots(crashed, tmp_path / "elsewhere"))
    assert not (crashed / "plots").exists()


def test_missing_run_directory(tmp_path, capsys):
    with pytest.raises(UserError, match="no such run directory"):
        write_plots(tmp_path / "missing")
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --- latency CDFs ------------------------------------------------------------------------------------------

def _event_log(path, groups: int = 1, sockets: int = 8):
    """A short log of `groups` TP groups (one per node): each loads a model whose size grows with
    its index, runs the router on it, and evicts it; the last also holds KV for a while."""
    layouts = [GroupLayout(f"group{g}", g, [f"node{g}/socket{s}" for s in range(sockets)]) for g in range(groups)]
    writer = EventsWriter(path)
    writer(Setup(t_ns=0, name="t", platform="sn40l-node", nodes=groups, sockets_per_node=sockets, tp=sockets,
                 experts=4, model="llama-2-7b", router_model="llama-2-7b", policy="lru", scheduler="continuous",
                 requests=groups, groups=layouts, hbm_usable_bytes=64 << 30, sram_bytes=0,
                 capacity_tier_bytes=1 << 40, capacity_tier_name="ddr", capacity_tier_used_bytes=[0] * groups,
                 expert_shard_bytes=1 << 30, router_shard_bytes=1 << 30, p2p_topology="ring", host_link=False))
    for g, layout in enumerate(layouts):
        writer(Switch(t_ns=0, group=layout.name, model="router", ready_ns=10**8, victims=[], prefetch=False,
                      arrivals={m: 10**8 for m in layout.members}, shard_bytes=(g + 1) << 30, kv_bytes=0))
        writer(Run(t_ns=10**8, group=layout.name, model="router", end_ns=10**8 * (g + 2), first_step_ns=10**7,
                   collective_ns=0, requests=[g], iterations=2, prefill_tokens=100, decodes=0, accesses=0, hits=0,
                   stall_ns=0, kv_bytes=(g + 1) << 20, queued=0))
        writer(KvResize(t_ns=10**9, group=layout.name, kv_bytes=0))
        writer(Evict(t_ns=5 * 10**9, group=layout.name, models=["router"], reason="test", kv_bytes_needed=0))
    writer(End(t_ns=10**10, interrupted=False, stopped="", summary={}))
    writer.close()
    return path


def _run_data(groups: int = 1, sockets: int = 8) -> RunData:
    with tempfile.TemporaryDirectory() as folder:
        return gather(_event_log(Path(folder) / "events.msgpack", groups, sockets))


def test_gathered_series_follow_the_events(tmp_path):
    """The bins the plots draw from: busy time and the copy links per group, HBM and KV steps."""
    data = gather(_event_log(tmp_path / "events.msgpack", groups=3, sockets=2))
    assert data.end_ns == 10**10 and data.complete and data.evictions_total == 3
    for g in range(3):
        series = data.groups[f"group{g}"]
        assert series.busy_total_ns["router"] == 10**8 * (g + 1) == series.busy_ns["router"].sum()
        assert series.copy_total_ns == 10**8 == series.copies_ns.sum()       # the mean of its sockets' copy lanes
        assert series.weights_bytes.maximum() == (g + 1) << 30 and series.kv_bytes.maximum() == (g + 1) << 20
        used = data.grid.used
        assert series.weights_bytes.at_bin_ends(used)[-1] == 0 == series.kv_bytes.at_bin_ends(used)[-1]
    assert data.grid.used * data.grid.width_ns > data.end_ns >= (data.grid.used - 1) * data.grid.width_ns


def test_latency_axes_spanning_decades_are_log_and_narrow_ones_linear():
    rng = np.random.default_rng(0)
    latencies = {"ttft_ns": list(rng.uniform(1e6, 1e9, 500).astype(int)),     # 1 ms .. 1 s: 3 decades
                 "tpot_ns": list(rng.uniform(3.2e6, 4.0e6, 500).astype(int)),  # 3.2 .. 4 ms
                 "e2e_ns": list(rng.lognormal(np.log(5e8), 1.5, 500).astype(int))}
    figure = latency_figure(_run_data(), latencies, "test")
    ttft, tpot, e2e = figure.axes
    assert (ttft.get_xscale(), tpot.get_xscale(), e2e.get_xscale()) == ("log", "linear", "log")
    drawn(figure)
    assert all("e" not in text and "^" not in text for text in tick_texts(ttft.xaxis)), tick_texts(ttft.xaxis)
    assert "1,000" in tick_texts(e2e.xaxis) or "10,000" in tick_texts(e2e.xaxis)
    assert "p50" in ttft.get_title() and "p99" in ttft.get_title()
    assert_readable(figure)


def test_many_tp_groups_become_a_band_and_a_summary_not_hundreds_of_entries():
    figure = utilisation_figure(_run_data(groups=40, sockets=4))
    bars, lines, copies = figure.axes
    assert [t.get_text() for t in bars.get_yticklabels()][0] == "mean of 40 TP groups"
    assert len(bars.get_yticklabels()) == 3
    assert len(lines.get_legend().texts) == len(copies.get_legend().texts) == 2
    assert_readable(figure)


# --- study plots -------------------------------------------------------------------------------------------

def _rows(x_name: str, xs, y_of, series=("a",), failed=()):
    return [{x_name: x, "s": s, "status": "invalid" if (s, x) in failed else "ok",
             "error": "does not fit in the host_dram of 1 node(s) " * 5 if (s, x) in failed else "",
             "y": None if (s, x) in failed else y_of(x, s)} for s in series for x in xs]


def test_tp_axis_ticks_are_integers_on_powers_of_two():
    rows = _rows("tp", [1, 2, 4, 8, 16], lambda x, s: 100.0 + x)
    figure = build_study_figure({"x": "tp", "y": "y", "series": "s", "logx": True}, rows, "scale-up")
    axes = figure.axes[0]
    drawn(figure)
    assert axes.get_xscale() == "log"
    assert tick_texts(axes.xaxis) == ["1", "2", "4", "8", "16"]
    assert_readable(figure)


def test_expert_axis_ticks_sit_on_the_measured_counts_and_failures_are_explained_whole():
    rows = _rows("experts", [10, 60, 150], lambda x, s: float(x), series=("sn40l", "dgx"), failed={("dgx", 150)})
    figure = build_study_figure({"x": "experts", "y": "y", "series": "s", "logx": True}, rows, "expert-count")
    axes = figure.axes[0]
    drawn(figure)
    assert tick_texts(axes.xaxis) == ["10", "60", "150"]
    notes = " ".join(t.get_text() for t in axes.texts).replace("\n", " ")
    assert "s = dgx: invalid at experts = 150" in notes and notes.count("host_dram") >= 3  # not cut at 48 chars
    assert_readable(figure)


def test_study_y_axis_goes_log_when_values_span_decades_unless_the_spec_says_no():
    wide = _rows("nodes", [1, 2, 4, 8], lambda x, s: 10.0 ** x)  # 10 .. 1e8
    narrow = _rows("nodes", [1, 2, 4, 8], lambda x, s: 100.0 + x)
    assert build_study_figure({"x": "nodes", "y": "y"}, wide, "t").axes[0].get_yscale() == "log"
    assert build_study_figure({"x": "nodes", "y": "y", "logy": False}, wide, "t").axes[0].get_yscale() == "linear"
    assert build_study_figure({"x": "nodes", "y": "y"}, narrow, "t").axes[0].get_yscale() == "linear"
    figure = build_study_figure({"x": "nodes", "y": "y"}, wide, "t")
    drawn(figure)
    texts = tick_texts(figure.axes[0].yaxis)
    assert texts and all("e" not in t and "^" not in t for t in texts), texts
    assert tick_texts(figure.axes[0].xaxis) == ["1", "2", "4", "8"]  # integer ticks without logx too


def test_bar_study_keeps_a_linear_axis_and_labels_every_bar():
    rows = _rows("policy", ["lru", "lfu", "belady"], lambda x, s: {"lru": 0.01, "lfu": 0.5, "belady": 0.9}[x])
    figure = build_study_figure({"x": "policy", "y": "y", "series": "s", "kind": "bar"}, rows, "policies")
    axes = figure.axes[0]
    assert axes.get_yscale() == "linear"  # bar lengths encode values; never log by default
    drawn(figure)
    assert [t.get_text() for t in axes.get_xticklabels()] == ["lru", "lfu", "belady"]
    assert sorted(t.get_text() for t in axes.texts) == ["0.01", "0.5", "0.9"]
    assert_readable(figure)


# --- reproduction plots ------------------------------------------------------------------------------------

def _reproduction() -> Reproduction:
    claims = [Claim("switching_vs_dgx_a100", "switch", 31.0, 31.2), Claim("expert_only_vs_dgx_h100", "exp", 1.5, 1.55),
              Claim("coe_bs8_vs_dgx_a100", "coe", 6.6, 6.3)]
    fusion = {name: {"fusion_decode": 5.0 + i, "fusion_prefill": 2.0, "orchestration_decode": 0.9 + i,
                     "orchestration_prefill": 1.02} for i, name in enumerate(("llama-2-7b@4K", "mistral-7b@2K"))}
    coe = {label: {"router": 7e7, "switching_stall": s, "expert": 5e8, "virtual_ns": 0}
           for label, s in (("sn40l-node/bs8", 1e8), ("dgx-a100/bs8", 3.4e9))}
    return Reproduction(claims=claims, details={"fusion": fusion, "coe": coe})


def test_reproduction_figures_are_readable_and_plain_numbered():
    reproduction = _reproduction()
    headline = headline_figure(reproduction)
    assert headline.axes[0].get_yscale() == "log"  # 1.5x .. 31x
    drawn(headline)
    texts = tick_texts(headline.axes[0].yaxis)
    assert texts and all("^" not in t and "times" not in t for t in texts), texts
    fusion = fusion_figure(reproduction)
    bars = fusion.axes[2].containers[0]  # orchestration decode: 0.9x (outside the paper's 1.4-8) and 1.9x
    assert [round(b.get_height(), 2) for b in bars] == [0.9, 1.9]
    assert [b.get_facecolor() for b in bars] == [to_rgba("tab:orange"), to_rgba("tab:blue")]
    coe = coe_figure(reproduction)
    assert sorted(t.get_text() for t in coe.axes[0].texts) == ["3,970 ms", "670 ms"]
    for figure in (headline, fusion, coe):
        assert_readable(figure)


# --- the shared style ----------------------------------------------------------------------------------------

def test_style_helpers():
    assert spans_decades([1, 10]) and not spans_decades([1, 9.9]) and not spans_decades([0, 100])
    assert [plain_number(v) for v in (1, 16, 1000, 0.05, 2.5, 1e7)] == ["1", "16", "1,000", "0.05", "2.5", "10,000,000"]
    axes = new_figure(4, 3).subplots()
    axes.plot([3, 5, 9], [1, 2, 3])
    assert count_axis(axes, "x", [3, 5, 9], log2=True) == [3, 5, 9]  # not powers of two: the values themselves
    assert count_axis(axes, "x", [2, 16], log2=True) == [2, 4, 8, 16]


def test_plotting_never_imports_pyplot():
    code = ("import sys; from rdu.node.observe import plots, plot_style; from rdu.node.studies import sweep_plots, reproduce_plots; "
            "from tests.test_plots import _run_data; plots.utilisation_figure(_run_data()).canvas.draw(); "
            "print('matplotlib.pyplot' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", result.stderr


# --- memory: the plots of a long run cost what those of a short one cost ---------------------------------

_PEAK_RSS = """
import resource, sys
from rdu.node.observe.plot_data import gather
data = gather(sys.argv[1])
print(data.end_ns, sum(len(v) for v in data.latencies.values()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _gathered(events_path):
    """(end_ns, latencies kept, peak RSS in KiB) of a fresh process that gathers a run's plot data."""
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(events_path)], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])
    return tuple(int(v) for v in done.stdout.split())


def test_plot_data_memory_does_not_grow_with_the_run(continuous_run_dir, tmp_path):
    """The same cluster for 4 and for 40 times as long (a run's events replayed back to back):
    every series is binned while the events are read, so memory grows only by the 8-byte
    latencies of each request, not by the events (the old lists per request and per run did)."""
    from tests.test_trace_export import _repeat_events

    events = list(read_events(continuous_run_dir / "events.msgpack"))
    short, long = (_repeat_events(events, times, tmp_path / f"{times}.msgpack") for times in (4, 40))
    (short_end, short_kept, short_kib), (long_end, long_kept, long_kib) = _gathered(short), _gathered(long)
    assert long_end > 9 * short_end and long_kept == 10 * short_kept > 0
    grown_bytes = long.stat().st_size - short.stat().st_size
    assert (long_kib - short_kib) * 1024 < max(grown_bytes / 20, 2 << 20), (short_kib, long_kib, grown_bytes)
