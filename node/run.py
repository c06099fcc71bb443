"""`rdu run`: serve a workload on an emulated cluster and write the run directory.

    runs/<name>/config.resolved.yaml   what ran (every default and preset value filled in)
    runs/<name>/requests.csv           one row per request, times in ns
    runs/<name>/summary.json           emulated results only: byte-identical across runs, backends, layouts
    runs/<name>/run.json               the emulator's own measurements (wall time, backend, host)

The directory is built under a temporary name and renamed only when complete, so a failed run
never leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import os
import platform as host_platform
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from node.inline_backend import InlineBackend
from node.run_config import RunConfig
from node.yaml_io import dump_yaml
from scheduler.metrics import records_csv
from scheduler.serving import CoEServer, ServingResult
from scheduler.workloads import build_workload

__all__ = ["execute_run", "RunOutput", "write_json"]


@dataclass
class RunOutput:
    config: RunConfig
    result: ServingResult
    run_info: dict
    out_dir: Path


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _serve(config: RunConfig, backend) -> ServingResult:
    workload = build_workload(config.workload, config.experts, config.seed)
    server = CoEServer(backend, config.model, config.experts, config.router_model, workload, config.serving)
    return server.run()


def execute_run(config: RunConfig) -> RunOutput:
    """Run the emulation on the configured backend and write the run directory."""
    started_at = time.time()
    wall_start = time.perf_counter()
    spec = config.platform.spec
    if config.backend == "inline":
        backend = InlineBackend(spec, config.nodes, config.tp)
        result = _serve(config, backend)
        backend_info = backend.finish()
        ray_info = {}
    else:
        from node.ray_backend import RayBackend
        from node.ray_session import ray_session

        with ray_session(config.address, config.sockets) as session:
            backend = RayBackend(spec, config.nodes, config.tp,
                                 run_token=secrets.token_hex(16) if session.multi_host else "",
                                 bind_host="node-ip" if session.multi_host else "127.0.0.1")
            try:
                backend.start()
                serve_start = time.perf_counter()
                result = _serve(config, backend)
                backend_info = backend.finish()
                serve_s = time.perf_counter() - serve_start
            finally:
                backend.shutdown()
            ray_info = {"ray_nodes": session.ray_nodes, "ray_session": "started here" if session.started_here
                        else f"joined {session.address}", "serve_wall_s": round(serve_s, 3),
                        "setup_and_teardown_wall_s": None}
    wall_s = time.perf_counter() - wall_start
    if ray_info:
        ray_info["setup_and_teardown_wall_s"] = round(wall_s - ray_info["serve_wall_s"], 3)
    completed = result.summary["requests_completed"]
    run_info = {
        "name": config.name, "backend": config.backend, "wall_s": round(wall_s, 3),
        "emulated_requests_per_wall_s": round(completed / wall_s, 2) if wall_s > 0 else None,
        "virtual_to_wall": round(result.summary["virtual_ns"] / 1e9 / wall_s, 2) if wall_s > 0 else None,
        "started_at_unix_s": round(started_at, 3), "host": host_platform.node(), "cpus": os.cpu_count(),
        "python": host_platform.python_version(), **ray_info, "backend_checks": backend_info,
    }
    out_dir = _write_outputs(config, result, run_info)
    return RunOutput(config=config, result=result, run_info=run_info, out_dir=out_dir)


def _write_outputs(config: RunConfig, result: ServingResult, run_info: dict) -> Path:
    out_dir = Path(config.out)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        (partial / "config.resolved.yaml").write_text(dump_yaml(config.resolved), encoding="utf-8")
        (partial / "requests.csv").write_text(records_csv(result.records), encoding="utf-8")
        write_json(partial / "summary.json", result.summary)
        write_json(partial / "run.json", run_info)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir
