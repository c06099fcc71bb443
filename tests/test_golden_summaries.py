"""Behaviour pinned: a few runs' `summary.json` compared byte for byte with files written by an
earlier version (tests/golden/). A refactoring must leave them as they are; a change of the model
or the algorithm that moves them regenerates them on purpose (`REGENERATE_GOLDEN=1 pytest
tests/test_golden_summaries.py`) and says why in its commit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rdu.node.cli.main import main

GOLDEN = Path(__file__).parent / "golden"

# name -> `rdu run` flags (inline: the golden files hold emulated results only, the same on every backend)
RUNS = {
    "coe-trace-continuous": ["--experts", "150", "--limit", "300"],
    "dgx-h100-one-model": ["--platform", "dgx-h100", "--experts", "1", "--limit", "400", "--time-scale", "0.25"],
    "paper-coe-static-a100": ["--workload", "paper-coe", "--batch", "8", "--platform", "dgx-a100", "--experts", "40"],
    # a 1 us load-report window: the ingress routes on exact loads, as the single engine before it did
    "two-nodes-tp4-prefetch": ["{window}", "--nodes", "2", "--tp", "4", "--policy", "prefetch", "--experts", "60",
                               "--limit", "300", "--time-scale", "0.2"],
    "static-kill-socket": ["--scheduler", "static", "--experts", "20", "--limit", "120",
                           "--fault", "kill-socket:node0/socket3@request=40"],
    "synthetic-zipf-dgx": ["--workload", "synthetic", "--requests", "300", "--rate", "8", "--zipf", "1.2",
                              "--experts", "30", "--platform", "dgx-h100"],
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_summary_is_unchanged(name, tmp_path, capsys):
    out = tmp_path / "run"
    window = tmp_path / "window.yaml"
    window.write_text("scheduler: {dispatch_window_ms: 0.001}\n", encoding="utf-8")
    args = [str(window) if arg == "{window}" else arg for arg in RUNS[name]]
    code = main(["run", "--backend", "inline", "--json", "--out", str(out), *args])
    capsys.readouterr()
    assert code == 0
    got = (out / "summary.json").read_bytes()
    path = GOLDEN / f"{name}.summary.json"
    if os.environ.get("REGENERATE_GOLDEN"):
        path.write_bytes(got)
    assert got == path.read_bytes(), f"{name}: summary.json differs from {path}"
