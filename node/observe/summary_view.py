"""The end-of-run summary printed by `rdu run` (a rich table, plus where the files are)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

__all__ = ["render_summary", "summary_table"]


def _ms(ns: float) -> str:
    return f"{ns / 1e6:,.1f} ms"


def summary_table(summary: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    for column in ("p50", "p90", "p99", "mean"):
        table.add_column(column, justify="right")
    for key, label in (("ttft_ns", "TTFT"), ("tpot_ns", "time per output token"), ("e2e_ns", "end-to-end"),
                       ("switch_wait_ns", "switch wait")):
        table.add_row(label, *(_ms(summary[key][q]) for q in ("p50", "p90", "p99", "mean")))
    return table


def render_summary(console: Console, output) -> None:
    s, info = output.result.summary, output.run_info
    config = output.config
    console.print(summary_table(s, f"{config.name}: {config.experts} x {config.model.name} on {config.nodes} x "
                                   f"{config.platform.spec.name}, TP{config.tp}, {config.serving.policy}"))
    totals = Table(show_header=False)
    totals.add_column("")
    totals.add_column("", justify="right")
    breakdown = s["time_breakdown_ns"]
    for label, value in (
        ("requests completed / in", f"{s['requests_completed']:,} / {s['requests_in']:,}"),
        ("throughput", f"{s['throughput_tokens_per_s']:,.1f} tokens/s"),
        ("expert switches (prefetched)", f"{s['switches']:,} ({s['prefetches']:,})"),
        ("HBM hit rate (expert runs)", f"{s['hbm_hit_rate']:.1%}"),
        ("time stalled on switching", f"{s['switch_time_share']:.1%}"),
        ("router / switching / experts", f"{_ms(breakdown['router'])} / {_ms(breakdown['switching_stall'])} / "
                                         f"{_ms(breakdown['expert'])}"),
        ("virtual time", f"{s['virtual_ns'] / 1e9:,.3f} s"),
        ("wall time", f"{info['wall_s']:,.2f} s ({info['backend']} backend)"),
    ):
        totals.add_row(label, value)
    console.print(totals)
    files = ", ".join(sorted(p.name for p in output.out_dir.iterdir() if p.is_file()))
    console.print(f"run directory: {output.out_dir}/ ({files})")
