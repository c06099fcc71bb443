"""The scale-out benchmark of a partitioned run: 8 emulated SN40L nodes (64 sockets) serving
150 experts under the conversation-shaped load at 8 times the rate, in one process (`inline`)
and partitioned across node runtime actors on this machine's Ray (`ray`): same `summary.json`,
and how much faster the partitioned run serves.

The per-window synchronisation cost is what a round costs the driver beyond the busiest
runtime's time in it: (wall the driver waited for rounds - busiest runtime's wall in rounds) /
rounds — the actor calls, the answers' transfer, and the wait for the slower runtime.

What this machine can give a partitioned run at all is measured too: the run's Ray layout (64
socket actors, 8 model stores, the registry, Ray's own daemons) is started and left idle, and the
CPU its processes take is what the node runtimes cannot have. The inline run uses one core, so
(cores - that idle CPU) is the speed-up a partitioned run could reach here with no
synchronisation cost and perfect balance."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench.report import Row

NODES = 8
REQUESTS = 20_000
LOAD = {"kind": "synthetic", "requests": REQUESTS, "rate_per_s": 5.5 * NODES,
        "prompt_tokens": {"kind": "lognormal", "median": 750, "sigma": 0.9, "max": 14000},
        "output_tokens": {"kind": "lognormal", "median": 150, "sigma": 0.8, "max": 1000}}


IDLE_MEASURE_S = 10.0


def _descendants_cpu_s() -> tuple[float, int]:
    """CPU seconds (user + system) used so far by the live processes descended from this one (a
    local Ray session's daemons and workers are), and how many there are. Linux /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue   # gone meanwhile
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return sum(cpu[p] for p in found), len(found)


def idle_layout_cores(nodes: int = NODES, measure_s: float = IDLE_MEASURE_S) -> tuple[float, int]:
    """The cores the scale-out run's Ray layout takes while doing nothing, and its processes:
    every socket actor, model store and Ray daemon is started as `rdu run` starts them, left
    idle a few seconds, then measured over `measure_s`."""
    from rdu.node.cluster.platform import load_platform
    from rdu.node.cluster.ray_backend import RayCluster
    from rdu.node.cluster.ray_session import ray_session

    spec = load_platform("sn40l-node").spec
    with ray_session(None, nodes * spec.sockets_per_node):
        cluster = RayCluster(spec, nodes, spec.sockets_per_node)
        try:
            cluster.launch()
            time.sleep(3.0)
            before, _ = _descendants_cpu_s()
            started = time.perf_counter()
            time.sleep(measure_s)
            after, processes = _descendants_cpu_s()
            return (after - before) / (time.perf_counter() - started), processes
        finally:
            cluster.shutdown()


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
    idle_cores, processes = idle_layout_cores()
    cores = os.cpu_count() or 1
    ray = info["ray"]
    rounds = ray.get("rounds", 0)
    runtimes_cpu = ray.get("runtime_cpu_max_s", 0.0)
    runtime_wall = ray.get("runtime_wall_max_s", 0.0)
    rounds_wall = ray.get("rounds_wall_s", 0.0)
    rows += [
        Row("scaleout", "partitioned (ray) vs inline, serving: speed-up", speedup, "x", ">= 1.6", speedup >= 1.6),
        Row("scaleout", f"Ray layout left idle: CPU of its {processes} processes", idle_cores, "cores"),
        Row("scaleout", "... per process (Ray's worker loop wakes 100 times a second)", idle_cores / processes * 1e3,
            "ms/s"),
        Row("scaleout", f"speed-up ceiling here: ({cores} cores - idle layout) / the 1 core inline uses",
            cores - idle_cores, "x"),
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
