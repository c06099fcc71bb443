"""The distributed emulator on the shared local Ray: socket actors, DDR store, gRPC plane."""

import numpy as np
import pytest

from rdu.node.studies.check_tp import check_tp
from rdu.node.cluster.platform import load_platform
from rdu.node.cluster.ray_nodes import RayNodes
from rdu.interconnect.topology import Topology
from rdu.socket_actor.core import SocketCore
from rdu.socket_actor.numerics import TinyConfig
from rdu.socket_actor.operators import shard_weight_bytes
from rdu.socket_actor.tp_group import TPGroup

pytestmark = pytest.mark.ray


def _analytic_ns(platform: str, nodes: int, per_node: int, tokens: int, prompt: int, batch: int) -> int:
    """When check-tp's generation ends by the cost model: the weights' DDR -> HBM copy, then the
    functional model's prefill and decode steps on the group."""
    spec = load_platform(platform, {"sockets_per_node": per_node}).spec
    members = [f"node{n}/socket{s}" for n in range(nodes) for s in range(per_node)]
    model = TinyConfig(max_seq=prompt + tokens + 1).model_spec()
    copy_ns = TPGroup("g", members, spec.socket, Topology(spec.links, nodes, per_node)).copy_in(
        shard_weight_bytes(model, len(members)), 0)
    core = SocketCore(members[0], spec.socket, Topology(spec.links, nodes, per_node))
    generation = core.cost_model(model, tuple(members)).generate([prompt] * batch, [tokens] * batch, setup=False)
    return max(copy_ns.values()) + generation.total_ns


@pytest.mark.parametrize("nodes, per_node", [(1, 8), (2, 4)])
def test_check_tp_matches_reference_over_grpc(ray_local, nodes, per_node):
    result = check_tp(nodes, per_node, tokens=6, prompt_tokens=8, batch=2)
    assert result["max_abs_err"] <= 1e-4 and result["tokens_match"]
    assert result["tp"] == 8 and result["ray_session"].startswith("joined")
    # the virtual time is the cost model's time of the functional model's generation
    assert result["virtual_ns"] == _analytic_ns("sn40l-node", nodes, per_node, tokens=6, prompt=8, batch=2)
    # timed as sn40l-node's P2P ring; 6 collectives for the prompt, 5 per decode step (its embedding
    # all-reduce rides on the logits gather before it)...
    assert result["collective_algorithms"] == {"ring": 6 + 5 * 5}
    # ...while the tensors went to a root and back: 2 (n - 1) messages per collective and the agreement
    # (and, before the first token, an empty message between every member and every root)
    assert result["collective_transport"] == "root" and result["grpc_messages"] == 2 * 7 * (6 + 5 * 5 + 1 + 8)
    # every socket's server, asked over the plane's Stats call, received its share of what was sent
    received = result["plane_received"]
    assert sorted(received) == [f"node{n}/socket{s}" for n in range(nodes) for s in range(per_node)] and sum(r["bytes"] for r in received.values()) == result["grpc_bytes"] > 0
    assert all(r["dropped"] == 0 and r["rejected"] == 0 for r in received.values())


def test_check_tp_on_a_switch_runs_one_shot_and_survives_a_lossy_link(ray_local):
    """dgx-a100's small messages go one-shot; a link losing messages both ways loses real ones
    (its servers drop them), noticed by missing acknowledgements and resent: numerics exact,
    later virtual time."""
    lossy = check_tp(1, 4, tokens=3, prompt_tokens=4, platform="dgx-a100",
                     faults=["drop-link:node0/socket1-node0/socket2@p=0.4"])
    clean_ns = _analytic_ns("dgx-a100", 1, 4, tokens=3, prompt=4, batch=1)
    assert lossy["collective_algorithms"] == {"one_shot": 6 + 5 * 2}
    assert lossy["tokens_match"] and lossy["max_abs_err"] <= 1e-5
    dropped = {name: r["dropped"] for name, r in lossy["plane_received"].items() if r["dropped"]}
    assert set(dropped) <= {"node0/socket1", "node0/socket2"} and lossy["messages_lost"] == sum(dropped.values()) > 0
    assert lossy["messages_resent"] >= lossy["messages_lost"]
    # each lost message costs exactly one retransmission timeout (the agreement's own answers: the next run's)
    rto = int(load_platform("dgx-a100").spec.links.retransmit_timeout_ns)
    assert lossy["virtual_ns"] == clean_ns + lossy["messages_lost"] * rto - lossy["retransmit_ns_owed"]


def test_virtual_time_is_deterministic_and_layout_dependent(ray_local):
    """The virtual time is the cost model's (a function of the configuration alone, so the same
    every run) and depends on the layout: two of a ring's hops cross the slower scale-out links."""
    one = check_tp(1, 4, tokens=3, prompt_tokens=4)
    spread = check_tp(2, 2, tokens=3, prompt_tokens=4)
    assert one["virtual_ns"] == _analytic_ns("sn40l-node", 1, 4, tokens=3, prompt=4, batch=1)
    assert spread["virtual_ns"] == _analytic_ns("sn40l-node", 2, 2, tokens=3, prompt=4, batch=1)
    assert spread["virtual_ns"] > one["virtual_ns"]


def test_ddr_store_capacity_and_real_copy(ray_local):
    """The model store admits by capacity; a load copies the shard out of Ray's object store for
    real: the socket's HBM holds the same bytes in its own writable buffer (the store's is a
    read-only view of shared memory), and both ledgers count it; a P2P transfer over gRPC too."""
    import asyncio

    import ray

    from rdu.socket_actor.actor import SocketActor
    from rdu.socket_actor.numerics import Shard, TinyConfig

    spec = load_platform("sn40l-node", {"sockets_per_node": 2, "socket.ddr.capacity_bytes": 1 << 20}).spec
    cluster = RayNodes(spec, 1)
    try:
        cluster.start()
        store = cluster.model_stores[0]
        weights = {"w": np.random.default_rng(5).standard_normal(4096).astype(np.float32),
                   "v": np.arange(1000, dtype=np.float32)}
        shard = Shard(cfg=TinyConfig(), tp=1, rank=0, weights=weights, kv_of_q=np.zeros(1, np.int64), vocab_offset=0)
        assert ray.get(store.put.remote("a", 1_500_000, {0: shard})) == (2 << 20) - 1_500_000   # 2 sockets' DDR
        with pytest.raises(ray.exceptions.RayTaskError, match="b needs 585.94 KiB but only 583.16 KiB of 2.00 MiB is free"):
            ray.get(store.put.remote("b", 600_000, None))
        assert ray.get(store.snapshot.remote())["models"] == 1
        refs = ray.get(store.shard_ref.remote("a", 0))
        socket = SocketActor("node0/socket0", spec.socket, spec.links, 1, 2, None, list(cluster.names))
        assert asyncio.run(socket.load("a", 4096 * 4 + 4000, 0, refs)) == 4096 * 4 + 4000   # HBM ledger
        in_store = ray.get(refs[0]).weights
        in_hbm = socket.core.residents["a"].weights.weights
        for name, original in weights.items():
            assert in_hbm[name].tobytes() == original.tobytes()                # the same bytes...
            assert not np.shares_memory(in_hbm[name], in_store[name])           # ...in another buffer
            assert in_hbm[name].flags.writeable and not in_store[name].flags.writeable   # the store's is shared
        arrival = ray.get(cluster.sockets["node0/socket0"].send_to.remote("node0/socket1", "t", 1 << 20))
        got = ray.get(cluster.sockets["node0/socket1"].receive_from.remote("t"))
        assert got == {"bytes": 1 << 20, "arrival_ns": arrival}
        hop = spec.links.p2p
        assert arrival == hop.latency_ns + int(np.ceil((1 << 20) * 1e9 / hop.bandwidth_bytes_per_s))
        stats = ray.get(cluster.sockets["node0/socket1"].stats.remote())
        assert stats["grpc"]["bytes_received"] == 1 << 20 and stats["clock_ns"] == arrival
    finally:
        cluster.shutdown()
