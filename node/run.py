"""`rdu run`: serve a workload on an emulated cluster and write the run directory.

    runs/<name>/config.resolved.yaml   what ran (every default and preset value filled in)
    runs/<name>/events.msgpack         the raw event stream, written while the run goes
    runs/<name>/requests.csv           one row per request (in the order served), times in ns
    runs/<name>/summary.json           emulated results only: byte-identical across runs, backends, layouts
    runs/<name>/run.json               the emulator's own measurements (wall time, backend, host)
    runs/<name>/trace.json             Chrome/Perfetto trace built from the events

The directory is built under a hidden temporary name and renamed only when complete, so a
failed run never leaves a directory that looks finished. A bad input found before serving
starts removes it; a crash keeps it (with the events up to the crash) for `rdu trace`.
"""

from __future__ import annotations

import json
import os
import platform as host_platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from interconnect.spec_fields import UserError
from node.events_log import EVENTS_FILE, EventsWriter
from node.inline_backend import InlineBackend
from node.run_config import RunConfig
from node.trace_export import write_trace
from node.yaml_io import dump_yaml
from scheduler.metrics import RecordsCsvWriter
from scheduler.serving import CoEServer, ServingResult, ServingStopped
from scheduler.workloads import build_workload
from socket_actor.operators import shard_weight_bytes

__all__ = ["execute_run", "RunOutput", "RunStopped", "RunInterrupted", "write_json", "setup_event"]

EventSink = Callable[[dict], None]


@dataclass
class RunOutput:
    config: RunConfig
    result: ServingResult
    run_info: dict
    out_dir: Path


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def setup_event(config: RunConfig, backend, requests: int, placement: dict[str, list[int]]) -> dict:
    """The first event of a run: everything a viewer needs to lay out nodes, sockets and links."""
    spec = config.platform.spec
    groups = backend.groups()
    router_bytes = config.router_model.weight_bytes()
    return {
        "type": "setup", "t_ns": 0, "name": config.name, "platform": spec.name, "nodes": config.nodes,
        "sockets_per_node": spec.sockets_per_node, "tp": config.tp, "experts": config.experts,
        "model": config.model.name, "router_model": config.router_model.name, "policy": config.serving.policy,
        "requests": requests,
        "groups": [{"name": g.name, "node": g.node, "members": list(g.members)} for g in groups],
        "hbm_usable_bytes": spec.socket.hbm_usable_bytes, "sram_bytes": spec.socket.sram.capacity_bytes,
        "ddr_bytes": spec.ddr_capacity_bytes, "ddr_tier": spec.ddr_tier_name,
        "expert_shard_bytes": shard_weight_bytes(config.model, config.tp),
        "router_shard_bytes": shard_weight_bytes(config.router_model, config.tp),
        "p2p_topology": spec.links.p2p_kind, "host_link": spec.links.host_shared is not None,
        "ddr_used_bytes": [len(placement[f"node{n}"]) * config.model.weight_bytes() + router_bytes
                           for n in range(config.nodes)],
    }


class _RunDirectory:
    """The hidden directory a run writes into, renamed to its final name when complete."""

    def __init__(self, out: str) -> None:
        self.final = Path(out)
        self.partial = self.final.with_name(f".{self.final.name}.partial-{os.getpid()}")
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)

    def complete(self) -> Path:
        if self.final.exists():
            shutil.rmtree(self.final)
        self.partial.rename(self.final)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


class RunStopped(RuntimeError):
    """The emulated cluster could not go on (a link down, no node left); results so far, if any,
    are in `out_dir`."""

    def __init__(self, reason: str, out_dir: Path | None = None) -> None:
        where = f"; results so far in {out_dir}/" if out_dir is not None else ""
        super().__init__(f"run stopped: {reason}{where}")
        self.out_dir = out_dir


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C: the results so far are written and the run is marked interrupted."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__(f"interrupted; results so far in {out_dir}/")
        self.out_dir = out_dir


def _make_server(config: RunConfig, backend, sinks: Sequence[EventSink], records: RecordsCsvWriter) -> CoEServer:
    workload = build_workload(config.workload, config.experts, config.seed)

    def emit(event: dict) -> None:
        for sink in sinks:
            sink(event)

    server = CoEServer(backend, config.model, config.experts, config.router_model, workload, config.serving, emit,
                       on_record=records, keep_records=False)
    emit(setup_event(config, backend, len(workload.requests), server.placement))
    for sink in sinks:
        if hasattr(sink, "attach"):
            sink.attach(backend)
    return server


def execute_run(config: RunConfig, sinks: Sequence[EventSink] = (), ray_options: dict | None = None) -> RunOutput:
    """Run the emulation on the configured backend and write the run directory. Every event
    also goes to each of `sinks` (a live dashboard, say). A run that the emulated cluster cannot
    finish raises `RunStopped`, Ctrl-C `RunInterrupted`; both after writing the results so far."""
    started_at = time.time()
    wall_start = time.perf_counter()
    spec = config.platform.spec
    directory = _RunDirectory(config.out)
    events = EventsWriter(directory.partial / EVENTS_FILE)
    records = RecordsCsvWriter(directory.partial / "requests.csv")
    sinks = [events, *sinks]
    server: CoEServer | None = None
    result: ServingResult | None = None
    backend_info: dict = {}
    ray_info: dict = {}
    stopped = ""
    interrupted = False
    try:
        (directory.partial / "config.resolved.yaml").write_text(dump_yaml(config.resolved), encoding="utf-8")
        if config.backend == "inline":
            backend = InlineBackend(spec, config.nodes, config.tp, functional=config.functional)
            server = _make_server(config, backend, sinks, records)
            result = server.run()
            backend_info = backend.finish()
        else:
            from node.ray_backend import RayBackend
            from node.ray_session import ray_session

            with ray_session(config.address, config.sockets) as session:
                restarts = 4 if any(f.kind == "kill-socket" for f in config.serving.faults) else 0
                backend = RayBackend(spec, config.nodes, config.tp, run_token=session.run_token(),
                                     bind_host=session.bind_host, max_restarts=restarts, functional=config.functional,
                                     **(ray_options or {}))
                try:
                    backend.start()
                    serve_start = time.perf_counter()
                    server = _make_server(config, backend, sinks, records)
                    result = server.run()
                    backend_info = backend.finish()
                    ray_info["serve_wall_s"] = round(time.perf_counter() - serve_start, 3)
                finally:
                    backend.shutdown()
                ray_info.update(ray_nodes=session.ray_nodes, ray_session="started here" if session.started_here
                                else f"joined {session.address}", interconnect_token=session.ray_nodes > 1,
                                grpc_bind=session.bind_host)
    except UserError:
        events.close()
        records.close()
        directory.discard()
        raise
    except ServingStopped as exc:
        result, stopped = exc.result, str(exc)
    except KeyboardInterrupt:
        if server is None:
            events.close()
            records.close()
            directory.discard()
            raise
        result, interrupted = server.result(), True
    except Exception:
        events.close()
        try:  # a crashed run keeps its hidden directory: make its trace too
            write_trace(directory.partial)
        except UserError:
            pass  # nothing traceable yet; keep the original error
        raise
    finally:
        if result is not None:
            end = {"type": "end", "t_ns": result.summary["virtual_ns"] + result.summary["setup_ns"],
                   "interrupted": interrupted, "stopped": stopped, "summary": result.summary}
            for sink in sinks:
                sink(end)
        events.close()
        records.close()
    summary = dict(result.summary)
    if stopped or interrupted:
        summary.update(stopped=stopped, interrupted=interrupted)
    wall_s = time.perf_counter() - wall_start
    if "serve_wall_s" in ray_info:
        ray_info["setup_and_teardown_wall_s"] = round(wall_s - ray_info["serve_wall_s"], 3)
    completed = summary["requests_completed"]
    run_info = {
        "name": config.name, "backend": config.backend, "wall_s": round(wall_s, 3),
        "emulated_requests_per_wall_s": round(completed / wall_s, 2) if wall_s > 0 else None,
        "virtual_to_wall": round(summary["virtual_ns"] / 1e9 / wall_s, 2) if wall_s > 0 else None,
        "started_at_unix_s": round(started_at, 3), "host": host_platform.node(), "cpus": os.cpu_count(),
        "python": host_platform.python_version(), "events": events.count, "interrupted": interrupted,
        "stopped": stopped, **ray_info, "backend_checks": backend_info,
    }
    write_json(directory.partial / "summary.json", summary)
    write_json(directory.partial / "run.json", run_info)
    write_trace(directory.partial)
    out_dir = directory.complete()
    if stopped:
        raise RunStopped(stopped, out_dir)
    if interrupted:
        raise RunInterrupted(out_dir)
    result.summary = summary
    return RunOutput(config=config, result=result, run_info=run_info, out_dir=out_dir)
