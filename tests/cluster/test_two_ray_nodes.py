"""check-tp on a fake two-node Ray cluster: each emulated node's sockets on their own Ray node,
with the same virtual time as when every socket shares one Ray node.

Runs in its own pytest invocation (`pytest -m cluster tests/cluster`): it starts and stops Ray
itself, so it cannot share a process with the session-wide local Ray of the other tests.
"""

import logging

import pytest

from node.check_tp import check_tp

pytestmark = pytest.mark.cluster


def test_two_ray_nodes_same_virtual_time():
    import ray
    from ray.cluster_utils import Cluster

    ray.init(num_cpus=1, resources={"rdu_socket": 8}, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, object_store_memory=256 * 2**20)
    try:
        one_node = check_tp(2, 4, tokens=4, prompt_tokens=6)
    finally:
        ray.shutdown()
    assert one_node["ray_nodes_used"] == 1

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "object_store_memory": 128 * 2**20})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={"rdu_socket": 4}, object_store_memory=128 * 2**20)
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
        try:
            two_nodes = check_tp(2, 4, tokens=4, prompt_tokens=6)
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()
    assert two_nodes["ray_nodes_used"] == 2
    assert two_nodes["max_abs_err"] <= 1e-4 and two_nodes["tokens_match"]
    assert two_nodes["virtual_ns"] == one_node["virtual_ns"]
    assert two_nodes["grpc_bytes"] == one_node["grpc_bytes"] > 0
