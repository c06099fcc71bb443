import math

import pytest

from rdu.interconnect.collectives_timing import RingTiming
from rdu.interconnect.links import Link, LinkSpec, transmit_path
from rdu.interconnect.topology import Topology
from rdu.node.cluster.platform import load_platform
from rdu.socket_actor.tiers import CapacityError, Ledger, MemoryTiers


def test_transfer_formula_and_contention():
    link = Link("a->b", LinkSpec(latency_ns=1000, bandwidth_bytes_per_s=1e9))
    assert link.transmit(1000, send_ns=0) == 1000 + 1000      # latency + 1000 B at 1 B/ns
    # sent at 500 while the link is busy until 1000: starts at 1000
    assert link.transmit(1000, send_ns=500) == 1000 + 1000 + 1000
    assert link.free_at_ns == 2000 and link.bytes_moved == 2000


def test_path_runs_at_slowest_link_and_adds_latency():
    fast, slow = Link("f", LinkSpec(100, 10e9)), Link("s", LinkSpec(50, 1e9))
    assert transmit_path([fast, slow], 1000, 0) == 150 + 1000
    assert fast.free_at_ns == slow.free_at_ns == 1000


def test_shared_host_link_serialises_gpu_copies():
    spec = load_platform("dgx-a100").spec
    topo = Topology(spec.links, 1, 8)
    arrivals = [transmit_path(topo.copy_path(f"node0/socket{s}"), 32_000_000, 0) for s in range(8)]
    assert arrivals == sorted(arrivals) and arrivals[-1] >= 8 * 1_000_000  # 8 x 1 ms at 32 GB/s


def test_ring_paths_and_ring_timing():
    spec = load_platform("sn40l-node").spec
    topo = Topology(spec.links, 2, 8)
    assert len(topo.path("node0/socket0", "node0/socket3")) == 3
    assert len(topo.path("node0/socket0", "node0/socket7")) == 1
    assert [l.name for l in topo.path("node0/socket2", "node1/socket5")] == ["node0->fabric", "fabric->node1"]
    ring = RingTiming.for_group(topo, [f"node0/socket{s}" for s in range(8)])
    hop = spec.links.p2p
    chunk = 8192 // 8
    assert ring.collective_ns("all_reduce", 8192) == 14 * (hop.latency_ns + math.ceil(chunk * 1e9 / hop.bandwidth_bytes_per_s))


def test_ledger_reports_what_does_not_fit():
    ledger = Ledger("node0/socket3", "hbm", 10 * 2**30)
    ledger.allocate("expert-1", 6 * 2**30)
    with pytest.raises(CapacityError, match=r"node0/socket3 hbm: expert-2 needs 6.00 GiB but only 4.00 GiB of 10.00 GiB"):
        ledger.allocate("expert-2", 6 * 2**30)
    assert ledger.release("expert-1") == 6 * 2**30
    ledger.allocate("expert-2", 6 * 2**30)
    assert ledger.peak_bytes == 6 * 2**30 and "expert-2" in ledger


def test_memory_tiers_of_a_socket():
    spec = load_platform("sn40l-node").spec.socket
    tiers = MemoryTiers("node0/socket0", spec)
    assert tiers.hbm.capacity_bytes == spec.hbm.capacity_bytes - spec.hbm_reserved_bytes
    assert tiers.hbm_to_sram_ns(1_800_000) == 1000
    assert set(tiers.snapshot()) == {"sram", "hbm", "ddr"}
    gpu = MemoryTiers("node0/socket0", load_platform("dgx-a100").spec.socket)
    assert gpu.ddr is None
