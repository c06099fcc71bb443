"""Runs partitioned by node: node runtimes serve their partition against socket actors that hold
the state (the results come from them: a socket whose state is tampered with stops the run),
the same algorithm in one process gives the same results, and faults lose nothing."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from rdu.base import Fields
from rdu.node.cluster.inline_backend import InlineCluster
from rdu.node.cluster.platform import load_platform
from rdu.scheduler.faults import parse_faults
from rdu.scheduler.serving import CoEServer, ServingConfig, ServingStopped
from rdu.scheduler.timeline import Done
from rdu.scheduler.workloads import WorkloadSpec, build_workload
from rdu.socket_actor.model_spec import load_model

LLAMA = load_model("llama-2-7b")
LOAD = {"kind": "synthetic", "requests": 240, "rate_per_s": 3.0, "prompt_tokens": {"kind": "uniform", "min": 50,
        "max": 900}, "output_tokens": {"kind": "uniform", "min": 5, "max": 120}}


def workload(experts: int, seed: int = 0, spec: dict = LOAD):
    return build_workload(WorkloadSpec.from_fields(Fields(spec, "test", "workload")), experts, seed)


def serve(cluster, experts: int = 12, seed: int = 0, on_event=None, load: dict = LOAD, **config):
    server = CoEServer(cluster, LLAMA, experts, LLAMA, workload(experts, seed, load), ServingConfig(**config), on_event)
    result = server.run()
    return result, server.backend_info()


def served_once(result, requests: int) -> None:
    """Every request exactly once, finishing after it arrived (checked on the records themselves)."""
    ids = sorted(r.id for r in result.records)
    assert ids == list(range(requests))
    assert all(r.finish_ns > r.arrival_ns and r.e2e_ns == r.finish_ns - r.arrival_ns for r in result.records)


def test_two_nodes_in_one_process_serve_every_request_once():
    result, info = serve(InlineCluster(load_platform("sn40l-node").spec, 2, 8), dispatch_window_ms=50.0)
    served_once(result, 240)
    assert info["partitions"] == 2 and info["rounds"] > 10
    assert {r.node for r in result.records} == {0, 1}


@pytest.mark.parametrize("fault", ["kill-socket:node1/socket2@request=60", "kill-node:node1@request=100",
                                   "drop-link:node0/socket1-node0/socket2@p=0.2,virtual_ms=5000"])
def test_faults_under_the_continuous_engine_lose_nothing(fault):
    """A busy load and least-loaded dispatch: the node that dies has requests in flight."""
    faults = parse_faults([fault])
    result, _ = serve(InlineCluster(load_platform("sn40l-node").spec, 2, 4), faults=faults, kind="continuous",
                      dispatch="least-loaded", load={**LOAD, "rate_per_s": 25.0, "output_tokens": 300})
    served_once(result, 240)
    summary = result.summary
    assert summary["faults_injected"] == 1 and summary["faults_recovered"] == 1
    assert summary["requests_duplicated"] == 0
    if fault.startswith("kill-node"):
        assert summary["requests_redispatched"] > 0
        late = [r for r in result.records if r.arrival_ns > 5e9]
        assert late and all(r.node == 0 for r in late)   # nothing goes to the dead node after it died


@pytest.mark.ray
def test_the_partitioned_ray_run_equals_the_inline_one(ray_local):
    from rdu.node.cluster.ray_backend import RayCluster

    spec = load_platform("sn40l-node").spec
    faults = parse_faults(["kill-socket:node0/socket3@request=50"])
    inline, _ = serve(InlineCluster(spec, 2, 8), faults=faults, kind="continuous", dispatch_window_ms=200.0)
    cluster = RayCluster(spec, 2, 8, max_restarts=spec.socket.max_restarts, flush_commands=128)
    cluster.launch()
    try:
        on_ray, info = serve(cluster, faults=faults, kind="continuous", dispatch_window_ms=200.0)
    finally:
        cluster.shutdown()
    assert on_ray.summary == inline.summary
    assert [asdict(r) for r in on_ray.records] == [asdict(r) for r in inline.records]
    assert info["partitions"] == 2 and info["logs_confirmed"] == info["logs_sent"] > 0 and info["actor_restarts"] == 1


@pytest.mark.ray
@pytest.mark.parametrize("tamper", ["evict", "clock"])
def test_a_socket_whose_state_is_tampered_with_stops_the_run(ray_local, tamper):
    """Behind the runtime's back, one socket actor loses the router (or its clock jumps ahead):
    the next command it gets no longer fits its state, and the run stops naming it."""
    import ray

    from rdu.node.cluster.ray_backend import RayCluster

    spec = load_platform("sn40l-node").spec
    cluster = RayCluster(spec, 1, 8, flush_commands=32)
    cluster.launch()
    victim = cluster.actors.sockets["node0/socket3"]
    done = []

    def tamper_once(event):
        if isinstance(event, Done):
            done.append(event)
            if len(done) == 20:
                call = victim.evict.remote("router") if tamper == "evict" else victim.advance_to.remote(1 << 60)
                ray.get(call)

    try:
        with pytest.raises(ServingStopped) as stop:
            serve(cluster, on_event=tamper_once)
    finally:
        cluster.shutdown()
    message = str(stop.value)
    assert "node0/socket3" in message and "diverged" in message
    assert ("router is not resident" in message) if tamper == "evict" else ("before the socket is free" in message)
    assert 20 <= stop.value.result.summary["requests_completed"] < 240
