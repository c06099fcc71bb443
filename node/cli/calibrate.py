"""`rdu calibrate`: fit the presets' `fitted` values to the declared observations (node/calibrate.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

__all__ = ["add_commands"]


def cmd_calibrate(args: argparse.Namespace, console: Console) -> int:
    from rdu.node.studies.calibrate import calibrate, fitted_overlay, load_observations, write_calibration

    observations = load_observations(args.observations)
    progress = None if args.json else (lambda message: console.print(f"[dim]{message}[/dim]"))
    cal = calibrate(loo=not args.no_loo, observations=observations, progress=progress)
    files = write_calibration(cal, Path(args.out)) if args.out else []
    if args.json:
        print(json.dumps({**cal.to_dict(), "overlay": fitted_overlay(cal), "files": [str(f) for f in files]},
                         sort_keys=True))
        return 0
    table = Table(title="fitted preset values (within their bounds)")
    for column in ("preset", "field", "fitted", "preset value", "bounds"):
        table.add_column(column, justify="left" if column in ("preset", "field") else "right")
    for p in cal.parameters:
        table.add_row(p.origin, p.path, f"{cal.fitted[p.key]:.4g}", f"{p.preset_value:.4g}", f"{p.low:g}-{p.high:g}")
    console.print(table)
    table = Table(title="observations: in-sample and leave-one-out error")
    for column in ("observation", "target", "emulator", "role", "error", "leave-one-out"):
        table.add_column(column, justify="left" if column == "observation" else "right")
    for o in cal.observations:
        loo = cal.loo.get(o.id)
        table.add_row(o.id, o.target, f"{cal.values[o.id]:.4g}", cal.role(o.id), f"{cal.errors[o.id]:+.1%}",
                      "" if loo is None else f"{loo:+.1%}")
    console.print(table)
    for f in files:
        console.print(f"wrote {f}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit the presets' fitted values to public observations (least squares)")
    p.add_argument("--observations", help="observations YAML (default: node/cluster/presets/observations.yaml)")
    p.add_argument("--out", help="write calibration.json and CALIBRATION.md into this directory")
    p.add_argument("--no-loo", action="store_true", help="skip the leave-one-out refits")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_calibrate)
