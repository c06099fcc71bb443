"""Subcommands that run studies: `rdu reproduce` (the paper's claims) and `rdu sweep`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rdu.base import UserError

__all__ = ["add_commands"]


def cmd_reproduce(args: argparse.Namespace, console: Console) -> int:
    from rdu.node.studies.reproduce import check_target, reproduce_sn40l, write_report

    check_target(args.target)
    reproduction = reproduce_sn40l()
    files = write_report(reproduction, Path(args.out)) if args.out else []
    if args.json:
        print(json.dumps({"claims": [c.to_dict() for c in reproduction.claims], "all_ok": reproduction.all_ok,
                          "files": [str(f) for f in files]}, sort_keys=True))
    else:
        from rich import box

        table = Table(title="SN40L paper (MICRO 2024) vs the emulator, one set of presets", box=box.SIMPLE_HEAD)
        table.add_column("claim", ratio=1, min_width=22)
        for column in ("paper", "emulator", "error", "role", "LOO err", "ok"):
            table.add_column(column, justify="right", no_wrap=True)
        for c in reproduction.claims:
            paper = f"{c.paper[0]:g}-{c.paper[1]:g}" if isinstance(c.paper, tuple) else f"{c.paper:g}" \
                if isinstance(c.paper, float) else str(c.paper)
            value = f"{c.emulator:.3g}" if isinstance(c.emulator, float) else str(c.emulator)
            err = "" if c.rel_err is None else f"{c.rel_err:.1%}"
            loo = "" if c.loo_rel_err is None else f"{c.loo_rel_err:.1%}"
            unit = f" ({c.unit})" if c.unit and c.unit != "x" else ""
            table.add_row(c.description + unit, paper, value, err, c.role, loo, "yes" if c.ok else "[red]NO[/red]")
        console.print(table)
        console.print("role: fitted = a preset value was fitted to this claim (rdu calibrate), predicted = it was "
                      "not; LOO error = the error when the calibration is refitted without this claim",
                      highlight=False)
        for f in files:
            console.print(f"wrote {f}")
    return 0 if reproduction.all_ok else 1


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    """Run a study. Progress goes where the user looks: a bar at a terminal, plain periodic lines
    in a pipe or log, and on stderr with --json (stdout then holds exactly one JSON document).
    Exit 1 when a point failed (it reruns next time), 0 otherwise."""
    from rdu.node.studies.sweep import PlainProgress, RichProgress, load_study, run_study

    if ".." in Path(args.out or ".").parts:
        raise UserError(f"--out: {args.out!r}: a sweep folder must not contain '..'")
    if not args.progress_every >= 0:
        raise UserError(f"--progress-every: expected a number of seconds >= 0, got {args.progress_every}")
    study = load_study(args.study, fast=args.fast, backend=args.backend)
    shown = Console(stderr=True) if args.json else console
    if shown.is_terminal:
        progress = RichProgress(shown)
    else:
        progress = PlainProgress(lambda line: shown.print(line, highlight=False, markup=False, soft_wrap=True),
                                 interval_s=args.progress_every)
    outcome = run_study(study, Path(args.out) if args.out else None, jobs=args.jobs, address=args.address,
                        progress=progress)
    if args.json:
        print(json.dumps(outcome.to_dict(), sort_keys=True))
    else:
        changed = f" ({outcome.changed} of them changed or stale)" if outcome.changed else ""
        console.print(f"{outcome.ran} point(s) run{changed}, {outcome.reused} reused from an earlier run, "
                      f"{outcome.skipped} skipped (invalid config), {outcome.failed} failed", highlight=False,
                      soft_wrap=True)
        for row in outcome.rows:
            if row["status"] == "failed":
                console.print(f"  failed: {row['point']}: {row['error']}", highlight=False, markup=False)
        for path in outcome.files:
            console.print(f"wrote {path}", highlight=False)
    return 1 if outcome.failed else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="reproduce a paper's headline claims and compare")
    p.add_argument("target", help="what to reproduce: sn40l")
    p.add_argument("--out", help="write REPORT.md, claims.json and PNG plots into this directory")
    p.add_argument("--json", action="store_true", help="print one JSON object with the list of claims")
    p.set_defaults(handler=cmd_reproduce)

    p = sub.add_parser("sweep", help="run a study: a base config and axes to sweep (experiments/*.yaml)")
    p.add_argument("study", help="study YAML, e.g. experiments/scale-up.yaml")
    p.add_argument("--fast", action="store_true", help="the study's small variant (seconds)")
    p.add_argument("--backend", choices=("inline", "ray"), help="backend of every point (default: the study's)")
    p.add_argument("--out", help="study directory (default sweeps/<name>)")
    p.add_argument("--jobs", type=int, help="points run at once as Ray tasks (default: CPU count)")
    p.add_argument("--address", default="local", help="Ray: local (default), auto or host:port")
    p.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                   help="when not at a terminal: seconds between progress lines (default 10)")
    p.add_argument("--json", action="store_true", help="print the outcome as one JSON object (progress on stderr)")
    p.set_defaults(handler=cmd_sweep)
