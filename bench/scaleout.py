"""The scale-out benchmark of a partitioned run: 8 emulated SN40L nodes (64 sockets) serving
150 experts under the conversation-shaped load at 8 times the rate, in one process (`inline`)
and partitioned across node runtime actors on this machine's Ray (`ray`): same `summary.json`,
and how much faster the partitioned run serves.

The per-window synchronisation cost is what a round costs the driver beyond the busiest
runtime's time in it: (wall the driver waited for rounds - busiest runtime's wall in rounds) /
rounds — the actor calls, the answers' transfer, and the wait for the slower runtime."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.report import Row

NODES = 8
REQUESTS = 20_000
LOAD = {"kind": "synthetic", "requests": REQUESTS, "rate_per_s": 5.5 * NODES,
        "prompt_tokens": {"kind": "lognormal", "median": 750, "sigma": 0.9, "max": 14000},
        "output_tokens": {"kind": "lognormal", "median": 150, "sigma": 0.8, "max": 1000}}


def _serving_wall_s(run_info: dict) -> float:
    return (run_info.get("phases_wall_s") or {}).get("serving", run_info["wall_s"])


def bench_scaleout(requests: int = REQUESTS) -> list[Row]:
    from rdu.node.runs.run import execute_run
    from rdu.node.runs.run_config import resolve_run_config

    rows, serve, wall, info = [], {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("inline", "ray"):
            config = resolve_run_config(None, {"backend": backend, "out": f"{tmp}/{backend}", "nodes": NODES,
                                               "experts": 150, "workload": {**LOAD, "requests": requests}})
            started = time.perf_counter()
            output = execute_run(config)
            wall[backend] = time.perf_counter() - started
            serve[backend] = _serving_wall_s(output.run_info)
            info[backend] = output.run_info.get("backend_checks", {})
            rows.append(Row("scaleout", f"{NODES} nodes x 8 sockets, {requests:,} requests, {backend}: serving wall",
                            serve[backend], "s"))
        same = (Path(tmp) / "inline" / "summary.json").read_bytes() == (Path(tmp) / "ray" / "summary.json").read_bytes()
    speedup = serve["inline"] / serve["ray"]
    ray = info["ray"]
    rounds = ray.get("rounds", 0)
    runtimes_cpu = ray.get("runtime_cpu_max_s", 0.0)
    runtime_wall = ray.get("runtime_wall_max_s", 0.0)
    rounds_wall = ray.get("rounds_wall_s", 0.0)
    rows += [
        Row("scaleout", "partitioned (ray) vs inline, serving: speed-up", speedup, "x", ">= 1.6", speedup >= 1.6),
        Row("scaleout", "ray whole command (Ray start, 64 socket actors, stop)", wall["ray"], "s"),
        Row("scaleout", "summary.json identical across backends", float(same), "bool", "yes", same),
        Row("scaleout", "rounds (load-report windows with a decision, and progress)", rounds, "rounds"),
        Row("scaleout", "ray: driver's wall waiting for rounds", rounds_wall, "s"),
        Row("scaleout", "ray: driver's own wall while serving (routing, gathering)", serve["ray"] - rounds_wall, "s"),
        Row("scaleout", "ray: busiest node runtime's wall in rounds", runtime_wall, "s"),
        Row("scaleout", "ray: busiest node runtime's CPU in rounds", runtimes_cpu, "s"),
        Row("scaleout", "per-window synchronisation cost", (rounds_wall - runtime_wall) / rounds * 1e3 if rounds
            else float("nan"), "ms"),
    ]
    return rows
