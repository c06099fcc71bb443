"""Subcommands that look at runs: `rdu trace`, `rdu plot`, `rdu dash`.

Each takes a run directory (a finished `runs/<name>/`, or the hidden `.<name>.partial-<pid>/`
a crashed run leaves) and reads its `events.msgpack`; a missing directory or a corrupt events
file is a one-line user error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from rdu.base import UserError

__all__ = ["add_commands"]


def _run_dir(text: str) -> Path:
    """A run directory, or the events.msgpack inside one."""
    from rdu.node.observe.events_log import EVENTS_FILE

    path = Path(text)
    if path.is_file() and path.name == EVENTS_FILE:
        path = path.parent
    if not path.is_dir():
        raise UserError(f"{text}: no such run directory")
    if not (path / EVENTS_FILE).is_file():
        raise UserError(f"{text}: not a run directory (no {EVENTS_FILE})")
    return path


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def cmd_trace(args: argparse.Namespace, console: Console) -> int:
    from rdu.node.observe.trace_export import write_trace

    path = write_trace(_run_dir(args.run_dir))
    console.print(f"trace: {path} ({path.stat().st_size / 1e6:,.1f} MB): open it in https://ui.perfetto.dev "
                  "or chrome://tracing", highlight=False, soft_wrap=True)
    return 0


def cmd_plot(args: argparse.Namespace, console: Console) -> int:
    from rdu.node.observe.plots import write_plots

    for path in write_plots(_run_dir(args.run_dir), args.out):
        console.print(f"plot: {path}", highlight=False, soft_wrap=True)
    return 0


def cmd_dash(args: argparse.Namespace, console: Console) -> int:
    from rdu.node.observe.dashboard import LiveDashboard, load_events, replay
    from rdu.node.observe.events_log import EVENTS_FILE
    from rdu.node.observe.summary_view import summary_table

    run_dir = _run_dir(args.run_dir)
    events = load_events(run_dir / EVENTS_FILE)
    with LiveDashboard(console) as dashboard:
        summary = replay(events, dashboard, speed=args.speed)
    setup = events[0]   # load_events puts the run's setup first
    if summary is None:
        console.print(f"{run_dir}: the run has no end event (it crashed or was stopped); replayed what it recorded",
                      highlight=False, soft_wrap=True)
        return 0
    try:
        table = summary_table(summary, f"{setup.name}: {setup.experts} x {setup.model} on {setup.nodes} x "
                                       f"{setup.platform}, TP{setup.tp}, {setup.policy}")
        totals = (f"requests completed {summary['requests_completed']:,} / {summary['requests_in']:,}, "
                  f"{summary['throughput_tokens_per_s']:,.1f} tokens/s, {summary['switches']:,} switches, HBM hit "
                  f"rate {summary['hbm_hit_rate']:.1%}, virtual time {summary['virtual_ns'] / 1e9:,.3f} s")
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{run_dir / EVENTS_FILE}: the end event's summary is not a run's summary "
                        f"({type(exc).__name__}: {exc})") from None
    console.print(table)
    console.print(totals, highlight=False, soft_wrap=True)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this module's subcommands on the `rdu` parser."""
    p = sub.add_parser("trace", help="write RUN_DIR/trace.json (Perfetto / chrome://tracing) from its events")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (a crashed run's hidden partial one works too)")
    p.set_defaults(handler=cmd_trace)

    p = sub.add_parser("plot", help="write PNG plots of a run: latency CDFs, HBM and switches, socket utilisation")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory")
    p.add_argument("--out", help="directory for the PNGs (default RUN_DIR/plots)")
    p.set_defaults(handler=cmd_plot)

    p = sub.add_parser("dash", help="replay a recorded run through the live dashboard")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (finished or crashed)")
    p.add_argument("--speed", type=_positive_float,
                   help="virtual seconds per wall second (default: the whole run in about 3 s)")
    p.set_defaults(handler=cmd_dash)
