"""A run partitioned across a fake four-node Ray cluster: each emulated node's sockets, model
store and node runtime on their own Ray node, the driver as the ingress, and `summary.json` byte
for byte the in-process run's. Its own pytest invocation (`pytest -m cluster tests/cluster`)."""

import logging

import pytest

from rdu.node.runs.run import execute_run
from rdu.node.runs.run_config import resolve_run_config

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def four_nodes():
    import ray
    from ray.cluster_utils import Cluster

    fake = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                         "object_store_memory": 128 * 2**20})
    for _ in range(4):
        fake.add_node(num_cpus=1, resources={"rdu_socket": 8}, object_store_memory=96 * 2**20)
    ray.init(address=fake.address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield fake
    finally:
        ray.shutdown()
        fake.shutdown()


def test_a_partitioned_run_on_four_ray_nodes_equals_the_inline_run(four_nodes, tmp_path):
    fields = {"nodes": 4, "experts": 40, "workload": {"kind": "trace", "limit": 400, "time_scale": 0.25},
              "scheduler": {"dispatch_window_ms": 200.0}, "faults": ["kill-socket:node2/socket5@request=120"]}
    inline = execute_run(resolve_run_config(None, {**fields, "backend": "inline", "out": str(tmp_path / "inline")}))
    spread = execute_run(resolve_run_config(None, {**fields, "backend": "ray", "out": str(tmp_path / "ray")}))
    assert (inline.out_dir / "summary.json").read_bytes() == (spread.out_dir / "summary.json").read_bytes()
    assert (inline.out_dir / "requests.csv").read_bytes() == (spread.out_dir / "requests.csv").read_bytes()
    checks = spread.run_info["backend_checks"]
    assert spread.run_info["ray_nodes"] == 5 and checks["partitions"] == 4
    assert checks["logs_confirmed"] == checks["logs_sent"] > 0 and checks["actor_restarts"] == 1
