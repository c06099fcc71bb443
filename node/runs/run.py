"""`rdu run`: serve a workload on an emulated cluster and write the run directory.

    runs/<name>/config.resolved.yaml   what ran (every default and preset value filled in)
    runs/<name>/events.msgpack         the raw event stream, written while the run goes
    runs/<name>/requests.csv           one row per request (in the order served), times in ns
    runs/<name>/summary.json           emulated results only: byte-identical across runs, backends, layouts
    runs/<name>/run.json               the emulator's own measurements (wall time, backend, host)
    runs/<name>/trace.json             Chrome/Perfetto trace, only when asked (`--perfetto`, or `rdu trace` later)
    runs/<name>/ray.log                what Ray's processes printed (Ray backend, from the CLI)

The directory is built under a hidden temporary name and renamed only when complete, so a
failed run never leaves a directory that looks finished, and it never replaces anything it did
not make (node/run_directory.py). A bad input found before serving starts removes it; a crash
keeps it (with the events up to the crash) for `rdu trace`.
"""

from __future__ import annotations

import json
import os
import platform as host_platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rdu.base import UserError
from rdu.node.observe.events_log import EVENTS_FILE, EventsWriter
from rdu.node.cluster.inline_backend import InlineCluster
from rdu.node.runs.provenance import git_commit, tool_version
from rdu.node.runs.run_config import RunConfig
from rdu.node.runs.run_directory import TOOL_NAME, RunDirectory
from rdu.node.runs.signals import deferred_interrupts, stop_as_flag
from rdu.node.runs.std_streams import native_output_to
from rdu.node.observe.trace_export import write_trace
from rdu.yaml_io import dump_yaml
from rdu.scheduler.metrics import RecordsCsvWriter
from rdu.scheduler.serving import CoEServer, ServingResult, ServingStopped
from rdu.scheduler.timeline import End, Event, GroupLayout, Setup
from rdu.scheduler.workloads import build_workload
from rdu.socket_actor.operators import shard_weight_bytes

__all__ = ["execute_run", "RunOutput", "RunStopped", "RunInterrupted", "write_json", "setup_event"]

EventSink = Callable[[Event], None]


@dataclass
class RunOutput:
    config: RunConfig
    result: ServingResult
    run_info: dict
    out_dir: Path


def write_json(path: Path, data: dict) -> None:
    """Write `data` atomically: a reader (or a Ctrl-C) never sees half a file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    partial.replace(path)


def setup_event(config: RunConfig, backend, requests: int, placement: dict[str, list[int]], scheduler: str) -> Setup:
    """The first event of a run: everything a viewer needs to lay out nodes, sockets and links."""
    spec = config.platform.spec
    router_bytes = config.router_model.weight_bytes()
    return Setup(
        t_ns=0, name=config.name, platform=spec.name, nodes=config.nodes, sockets_per_node=spec.sockets_per_node,
        tp=config.tp, experts=config.experts, model=config.model.name, router_model=config.router_model.name,
        policy=config.serving.policy, scheduler=scheduler, requests=requests,
        groups=[GroupLayout(g.name, g.node, list(g.members)) for g in backend.groups()],
        hbm_usable_bytes=spec.socket.hbm_usable_bytes, sram_bytes=spec.socket.sram.capacity_bytes,
        capacity_tier_bytes=spec.capacity_tier_bytes, capacity_tier_name=spec.capacity_tier_name,
        capacity_tier_used_bytes=[len(placement[f"node{n}"]) * config.model.weight_bytes() + router_bytes
                                  for n in range(config.nodes)],
        expert_shard_bytes=shard_weight_bytes(config.model, config.tp),
        router_shard_bytes=shard_weight_bytes(config.router_model, config.tp),
        p2p_topology=spec.links.p2p_kind, host_link=spec.links.host_shared is not None)


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


def _make_server(config: RunConfig, cluster, events: EventsWriter, sinks: Sequence[EventSink],
                 records: RecordsCsvWriter, stop_requested) -> CoEServer:
    """The server of a run, wired to its observers: the event log takes the packed timeline as
    it comes; a sink gets every typed event unless it names the few it wants (`event_types`);
    a sink with `on_record` gets every completed request."""
    workload = build_workload(config.workload, config.experts, config.seed)
    every_event = [s for s in sinks if getattr(s, "event_types", None) is None]
    record_sinks = [records] + [s.on_record for s in sinks if hasattr(s, "on_record")]

    def on_event(event: Event) -> None:
        for sink in every_event:
            sink(event)

    def on_record(record) -> None:
        for sink in record_sinks:
            sink(record)

    server = CoEServer(cluster, config.model, config.experts, config.router_model, workload, config.serving,
                       on_event if every_event else None, on_record=on_record, keep_records=False,
                       on_timeline=events.write_packed, stop_requested=stop_requested)
    _announce(setup_event(config, cluster, len(workload.requests), server.placement, server.kind), events, sinks)
    for sink in sinks:
        if hasattr(sink, "attach"):
            sink.attach(cluster)
    return server


def _announce(event: Event, events: EventsWriter, sinks: Sequence[EventSink]) -> None:
    """An event of the run itself (its setup, its end): to the log and to every observer."""
    events(event)
    for sink in sinks:
        sink(event)


def _detach(sinks: Sequence[EventSink]) -> None:
    """Tell every observer that the backend is about to go: after this it must not be touched."""
    for sink in sinks:
        if hasattr(sink, "detach"):
            sink.detach()


class _Phases:
    """Wall-clock time of each phase of a run, in seconds (the emulator's own measurement)."""

    def __init__(self) -> None:
        self._start = self._mark = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def end(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._mark, 3)
        self._mark = now

    def total_s(self) -> float:
        return time.perf_counter() - self._start


def _serve(config: RunConfig, cluster, events: EventsWriter, sinks, records, phases: _Phases, state: dict) -> None:
    """Serve the workload on `cluster`; Ctrl-C / SIGTERM stop it between two rounds, never in
    the middle of recording a request."""
    with stop_as_flag() as stop_requested:
        state["server"] = server = _make_server(config, cluster, events, sinks, records, stop_requested)
        server.prepare()
        phases.end("setup")
        try:
            state["result"] = server.run()
        except (ServingStopped, KeyboardInterrupt):
            state["backend_info"] = _checks_so_far(server)   # while the cluster is still up
            raise
        state["backend_info"] = server.backend_info()
        phases.end("serving")


def _checks_so_far(server) -> dict:
    """The backend's counters of a run that stopped or was interrupted (a cluster too broken to
    answer has none to give: the run's results are written without them)."""
    try:
        return server.backend_info()
    except Exception:
        return {}


def _serve_inline(config: RunConfig, events: EventsWriter, sinks, records, phases: _Phases, state: dict) -> None:
    cluster = InlineCluster(config.platform.spec, config.nodes, config.tp, functional=config.functional)
    try:
        _serve(config, cluster, events, sinks, records, phases, state)
    finally:
        _detach(sinks)


def _serve_ray(config: RunConfig, events: EventsWriter, sinks, records, phases: _Phases, state: dict,
               log_path: Path, ray_options: dict | None) -> None:
    from rdu.node.cluster.ray_backend import RayCluster
    from rdu.node.cluster.ray_session import ray_session

    spec = config.platform.spec
    with native_output_to(log_path), ray_session(config.address, config.sockets) as session:
        # Actors restart only where a fault is injected: the limit is the preset's, as on the inline
        # backend; Ray warns about restartable actors otherwise for nothing.
        restarts = spec.socket.max_restarts if any(f.kind == "kill-socket" for f in config.serving.faults) else 0
        cluster = RayCluster(spec, config.nodes, config.tp, run_token=session.run_token(),
                             bind_host=session.bind_host, max_restarts=restarts, functional=config.functional,
                             **(ray_options or {}))
        try:
            cluster.launch()
            _serve(config, cluster, events, sinks, records, phases, state)
        finally:
            _detach(sinks)  # observers sample the actors for the last time, before they go
            cluster.shutdown()
        state["ray_info"] = {
            "ray_nodes": session.ray_nodes, "interconnect_token": True,
            "grpc_bind": session.bind_host,
            "ray_session": "started here" if session.started_here else f"joined {session.address}"}
    if log_path.exists() and log_path.stat().st_size == 0:
        log_path.unlink()  # Ray said nothing: no empty file in the run directory
    phases.end("teardown")


def execute_run(config: RunConfig, sinks: Sequence[EventSink] = (), ray_options: dict | None = None, *,
                force: bool = False, trace: bool = False, command: Sequence[str] | None = None) -> RunOutput:
    """Run the emulation on the configured backend and write the run directory. Every event
    also goes to each of `sinks` (a live dashboard, say). An existing run directory at
    `config.out` is refused unless `force` (and anything else there always is); `trace` also
    writes the Perfetto trace. A run that the emulated cluster cannot finish raises
    `RunStopped`, Ctrl-C `RunInterrupted`; both after writing the results so far."""
    started_at = time.time()
    phases = _Phases()
    directory = RunDirectory(config.out, force=force)
    events = EventsWriter(directory.partial / EVENTS_FILE)
    records = RecordsCsvWriter(directory.partial / "requests.csv")
    sinks = list(sinks)
    state: dict = {"server": None, "result": None, "backend_info": {}, "ray_info": {}}
    stopped = ""
    interrupted = False
    try:
        (directory.partial / "config.resolved.yaml").write_text(dump_yaml(config.resolved), encoding="utf-8")
        if config.backend == "inline":
            _serve_inline(config, events, sinks, records, phases, state)
        else:
            _serve_ray(config, events, sinks, records, phases, state, directory.partial / "ray.log", ray_options)
    except UserError:
        events.close()
        records.close()
        directory.discard()
        raise
    except ServingStopped as exc:
        state["result"], stopped = exc.result, str(exc)
    except KeyboardInterrupt:
        if state["server"] is None:
            events.close()
            records.close()
            directory.discard()
            raise
        state["result"], interrupted = state["server"].result(), True
    except Exception:
        state["crashed"] = True
        events.close()
        try:  # a crashed run keeps its hidden directory: make its trace too
            write_trace(directory.partial)
        except UserError:
            pass  # nothing traceable yet; keep the original error
        raise
    finally:
        result = state["result"]
        if result is not None and not state.get("crashed"):
            _announce(End(t_ns=result.summary["virtual_ns"] + result.summary["setup_ns"], interrupted=interrupted,
                          stopped=stopped, summary=result.summary), events, sinks)
        events.close()
        records.close()
    if stopped or interrupted:
        phases.end("serving" if "serving" not in phases.seconds else "teardown")
    return _finish(config, directory, phases, state, events.count, stopped, interrupted, started_at, trace,
                   command)


def _finish(config: RunConfig, directory: RunDirectory, phases: _Phases, state: dict, event_count: int,
            stopped: str, interrupted: bool, started_at: float, trace: bool,
            command: Sequence[str] | None) -> RunOutput:
    """Write summary.json, the trace if asked, then run.json (with every phase's wall time), and
    rename the directory into place. A second Ctrl-C while writing is held back until the
    directory is complete, so what was computed is never stranded in the hidden folder."""
    result = state["result"]
    summary = dict(result.summary)
    if stopped or interrupted:
        summary.update(stopped=stopped, interrupted=interrupted)
    with deferred_interrupts() as pending:
        write_json(directory.partial / "summary.json", summary)
        if trace:
            write_trace(directory.partial)
        phases.end("writing_outputs")
        wall_s = phases.total_s()
        completed = summary["requests_completed"]
        run_info = {
            "tool": TOOL_NAME, "version": tool_version(), "git_commit": git_commit(),
            "command": list(command) if command is not None else None,
            "name": config.name, "backend": config.backend, "wall_s": round(wall_s, 3),
            "phases_wall_s": dict(phases.seconds),
            "emulated_requests_per_wall_s": round(completed / wall_s, 2) if wall_s > 0 else None,
            "virtual_to_wall": round(summary["virtual_ns"] / 1e9 / wall_s, 2) if wall_s > 0 else None,
            "started_at_unix_s": round(started_at, 3), "host": host_platform.node(), "cpus": os.cpu_count(),
            "python": host_platform.python_version(), "events": event_count, "interrupted": interrupted,
            "stopped": stopped, "trace_written": trace, **state["ray_info"], "backend_checks": state["backend_info"],
        }
        write_json(directory.partial / "run.json", run_info)
        out_dir = directory.complete(finished=not (stopped or interrupted))
    if pending:
        interrupted = True
    if stopped:
        raise RunStopped(stopped, out_dir)
    if interrupted:
        raise RunInterrupted(out_dir)
    result.summary = summary
    return RunOutput(config=config, result=result, run_info=run_info, out_dir=out_dir)
