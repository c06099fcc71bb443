"""The distributed emulator on the shared local Ray: socket actors, DDR store, gRPC plane."""

import numpy as np
import pytest

from rdu.node.studies.check_tp import check_tp
from rdu.node.cluster.platform import load_platform
from rdu.node.cluster.ray_nodes import RayNodes

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("nodes, per_node", [(1, 8), (2, 4)])
def test_check_tp_matches_reference_over_grpc(ray_local, nodes, per_node):
    result = check_tp(nodes, per_node, tokens=6, prompt_tokens=8, batch=2)
    assert result["max_abs_err"] <= 1e-4 and result["tokens_match"]
    assert result["grpc_bytes"] > 0 and result["virtual_ns"] > 0
    assert result["tp"] == 8 and result["ray_session"].startswith("joined")


def test_virtual_time_is_deterministic_and_layout_dependent(ray_local):
    one = check_tp(1, 4, tokens=3, prompt_tokens=4)
    again = check_tp(1, 4, tokens=3, prompt_tokens=4)
    spread = check_tp(2, 2, tokens=3, prompt_tokens=4)
    assert one["virtual_ns"] == again["virtual_ns"]
    assert spread["virtual_ns"] > one["virtual_ns"]  # two hops cross the slower scale-out links


def test_ddr_store_capacity_and_real_copy(ray_local):
    import ray

    spec = load_platform("sn40l-node", {"sockets_per_node": 2, "socket.ddr.capacity_bytes": 1000}).spec
    cluster = RayNodes(spec, 1)
    try:
        cluster.start()
        store = cluster.model_stores[0]
        assert ray.get(store.put.remote("a", 1500, None)) == 500
        with pytest.raises(ray.exceptions.RayTaskError, match="b needs 600 B but only 500 B of 1.95 KiB is free"):
            ray.get(store.put.remote("b", 600, None))
        arrival = ray.get(cluster.sockets["node0/socket0"].send_to.remote("node0/socket1", "t", 1 << 20))
        got = ray.get(cluster.sockets["node0/socket1"].receive_from.remote("t"))
        assert got == {"bytes": 1 << 20, "arrival_ns": arrival}
        hop = spec.links.p2p
        assert arrival == hop.latency_ns + int(np.ceil((1 << 20) * 1e9 / hop.bandwidth_bytes_per_s))
        stats = ray.get(cluster.sockets["node0/socket1"].stats.remote())
        assert stats["grpc"]["bytes_received"] == 1 << 20 and stats["clock_ns"] == arrival
    finally:
        cluster.shutdown()
