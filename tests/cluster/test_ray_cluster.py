"""The emulator on a fake four-node Ray cluster (one fake cluster for every test: starting one
costs seconds): each emulated node's sockets, model store and node runtime on their own Ray
node, the driver as the ingress; results identical to the single-process and single-Ray-node
runs, a lost Ray node survived, and the interconnect closed with a per-run token that is never
written down.

Runs in its own pytest invocation (`pytest -m cluster tests/cluster`): it starts and stops Ray
itself, so it cannot share a process with the session-wide local Ray of the other tests.
"""

import logging
from pathlib import Path

import pytest

from rdu.node.studies.check_tp import check_tp
from rdu.node.runs.run import execute_run
from rdu.node.runs.run_config import resolve_run_config
from tests.helpers import assert_each_request_once

pytestmark = pytest.mark.cluster

KNOWN_TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def one_node_check():
    """check-tp with every socket on a single Ray node (run first, before the cluster exists)."""
    import ray

    ray.init(num_cpus=1, resources={"rdu_socket": 8}, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, object_store_memory=256 * 2**20)
    try:
        return check_tp(2, 4, tokens=4, prompt_tokens=6)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster(one_node_check):
    import ray
    from ray.cluster_utils import Cluster

    fake = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                         "object_store_memory": 128 * 2**20})
    workers = [fake.add_node(num_cpus=1, resources={"rdu_socket": 8}, object_store_memory=96 * 2**20)
               for _ in range(4)]
    ray.init(address=fake.address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield fake, workers
    finally:
        ray.shutdown()
        fake.shutdown()


def test_check_tp_same_virtual_time_on_two_ray_nodes(cluster, one_node_check):
    two_nodes = check_tp(2, 4, tokens=4, prompt_tokens=6)
    assert one_node_check["ray_nodes_used"] == 1 and two_nodes["ray_nodes_used"] == 2
    assert two_nodes["max_abs_err"] <= 1e-4 and two_nodes["tokens_match"]
    assert two_nodes["virtual_ns"] == one_node_check["virtual_ns"]
    assert two_nodes["grpc_bytes"] == one_node_check["grpc_bytes"] > 0
    assert two_nodes["interconnect_token"] and one_node_check["interconnect_token"]  # a secret on one machine too


def _fields(tmp_path: Path, name: str) -> dict:
    return {"nodes": 2, "experts": 40, "workload": {"kind": "trace", "limit": 300}, "out": str(tmp_path / name)}


def test_a_partitioned_run_on_four_ray_nodes_equals_the_inline_run(cluster, tmp_path, monkeypatch):
    """Four emulated nodes, one per Ray node, a socket killed and restarted on its Ray node:
    summary.json and requests.csv byte for byte the in-process run's."""
    import secrets

    monkeypatch.setattr(secrets, "token_hex", lambda n=16: KNOWN_TOKEN)
    fields = {"nodes": 4, "experts": 40, "workload": {"kind": "trace", "limit": 400, "time_scale": 0.25},
              "scheduler": {"dispatch_window_ms": 200.0}, "faults": ["kill-socket:node2/socket5@request=120"]}
    inline = execute_run(resolve_run_config(None, {**fields, "backend": "inline", "out": str(tmp_path / "inline")}))
    spread = execute_run(resolve_run_config(None, {**fields, "backend": "ray", "out": str(tmp_path / "ray")}))
    assert (inline.out_dir / "summary.json").read_bytes() == (spread.out_dir / "summary.json").read_bytes()
    assert (inline.out_dir / "requests.csv").read_bytes() == (spread.out_dir / "requests.csv").read_bytes()
    checks = spread.run_info["backend_checks"]
    assert spread.run_info["ray_nodes"] == 5 and checks["partitions"] == 4
    assert checks["logs_confirmed"] == checks["logs_sent"] > 0 and checks["actor_restarts"] == 1
    # the per-run secret reaches the actors through Ray, and is written nowhere
    assert spread.run_info["interconnect_token"]
    for path in list(spread.out_dir.rglob("*")) + list(Path("/tmp/ray/session_latest/logs").rglob("*")):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert KNOWN_TOKEN.encode() not in path.read_bytes(), path


def test_losing_a_ray_node(cluster, tmp_path):
    """kill-node: the emulated node's actors die with their Ray node; its work goes to the
    survivor; nothing is lost or served twice; same results as the in-process model."""
    fake, workers = cluster
    fault = {"faults": ["kill-node:node1@virtual_ms=30000"]}
    inline = execute_run(resolve_run_config(None, {**_fields(tmp_path, "inline"), "backend": "inline", **fault}))
    lost = []

    def take_the_ray_node_away(node: int, ray_nodes: set[str]) -> None:
        for worker in workers:
            if worker.node_id in ray_nodes:
                fake.remove_node(worker)
                lost.append(worker.node_id)

    output = execute_run(resolve_run_config(None, {**_fields(tmp_path, "ray"), "backend": "ray", **fault}),
                         ray_options={"on_node_lost": take_the_ray_node_away})
    summary = output.result.summary
    assert lost and summary["faults_recovered"] == 1
    assert_each_request_once(output.out_dir)
    assert (inline.out_dir / "summary.json").read_bytes() == (output.out_dir / "summary.json").read_bytes()

