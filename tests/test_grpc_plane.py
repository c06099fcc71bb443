"""The gRPC data plane in one process (no Ray): servers on loopback, collectives (tensors to a
root and back, timed as the algorithm the timing model picks: ring or one-shot), rejections,
lossy links."""

import asyncio
import contextlib
import math

import grpc
import numpy as np
import pytest

from rdu.interconnect.collectives import Collectives
from rdu.interconnect.collectives_timing import RingTiming
from rdu.interconnect.grpc_plane import InterconnectServer, PeerClient, TransferRejected
from rdu.interconnect.plane_auth import call_metadata
from rdu.interconnect.topology import Topology, socket_name
from rdu.interconnect.wire import MAX_CHUNK_BYTES, TensorAssembler, WireError, chunk_tensor, encode_chunks, \
    parse_chunk
from rdu.node.cluster.platform import load_platform
from rdu.protos import interconnect_pb2 as pb
from rdu.protos import interconnect_pb2_grpc as pb_grpc


TOKEN = "plane-test-secret"


@contextlib.asynccontextmanager
async def ring_plane(nodes: int, per_node: int, platform: str = "sn40l-node", token: str = TOKEN,
                     overrides: dict | None = None):
    """Servers, clients and collectives of `nodes` x `per_node` sockets in this event loop."""
    spec = load_platform(platform, overrides or {}).spec
    members = [socket_name(n, s) for n in range(nodes) for s in range(per_node)]
    servers = {m: InterconnectServer(m, members=members, run_token=token) for m in members}
    addresses = {m: await server.start() for m, server in servers.items()}

    async def resolve(name):
        return addresses[name]

    rings = []
    for m in members:
        topology = Topology(spec.links, nodes, per_node)  # each rank holds its own view of its egress links
        client = PeerClient(m, resolve, servers[m].stats, run_token=token)
        rings.append(Collectives(m, members, topology, client, servers[m].mailbox, timeout_s=10))
    try:
        yield spec, members, servers, rings
    finally:
        for ring in rings:
            await ring.client.close()
        for server in servers.values():
            await server.stop(0)


@pytest.mark.parametrize("nodes, per_node", [(1, 4), (1, 8), (2, 4)])
def test_all_reduce_goes_to_a_root_and_back_timed_as_the_ring(nodes, per_node):
    async def main():
        async with ring_plane(nodes, per_node) as (spec, members, servers, rings):
            rng = np.random.default_rng(0)
            tensors = [rng.standard_normal((16, 256)).astype(np.float32) for _ in members]
            results = await asyncio.gather(*(ring.all_reduce(t, 1000, "x") for ring, t in zip(rings, tensors)))
            total = tensors[0].copy()
            for t in tensors[1:]:
                total += t
            for r in results:   # the root's sum, formed as rank 0 + rank 1 + ...: the same bits everywhere
                assert np.array_equal(r.tensor, total)
            timing = RingTiming.for_group(Topology(spec.links, nodes, per_node), members)
            assert {r.algorithm for r in results} == {"ring"}
            # every rank's clock: the start plus the analytic time of the ring, to the nanosecond
            assert {r.clock_ns for r in results} == {1000 + timing.hardware_ns("all_reduce", tensors[0].nbytes)}
            # 2 (n - 1) messages: every member to the root (rank 0 for the first collective) and back
            t = len(members)
            assert [ring.messages for ring in rings] == [t - 1] + [1] * (t - 1)
            assert [s.stats.tensors_received for s in servers.values()] == [t - 1] + [1] * (t - 1)
            assert sum(s.stats.bytes_received for s in servers.values()) == sum(r.wire_bytes for r in results) > 0
            # the next collective is rooted at rank 1
            await asyncio.gather(*(ring.all_reduce(x, 2000, "y") for ring, x in zip(rings, tensors)))
            assert [ring.messages for ring in rings][:3] == [t, t, 2]

    asyncio.run(main())


def test_a_late_rank_holds_the_group_and_large_tensors_travel_in_chunks():
    """The group starts when its last member enters; a tensor larger than a chunk is cut into
    chunks on the wire and the numerics stay exact."""
    async def main():
        async with ring_plane(1, 2) as (spec, members, servers, rings):
            big = [np.full(3 * MAX_CHUNK_BYTES // 4 + 5, r + 1, dtype=np.float32) for r in range(2)]
            results = await asyncio.gather(rings[0].all_reduce(big[0], 1_000, "big"),
                                           rings[1].all_reduce(big[1], 9_000, "big"))
            analytic = RingTiming.for_group(Topology(spec.links, 1, 2), members).hardware_ns("all_reduce", big[0].nbytes)
            assert [r.clock_ns for r in results] == [9_000 + analytic] * 2
            assert all(np.array_equal(r.tensor, np.full_like(big[0], 3)) for r in results)
            assert servers["node0/socket0"].stats.bytes_received == big[0].nbytes

    asyncio.run(main())


def test_all_gather_and_reduce_scatter():
    async def main():
        async with ring_plane(1, 4) as (spec, members, servers, rings):
            parts = [np.full((2, 3), r, dtype=np.float32) for r in range(4)]
            gathered = await asyncio.gather(*(ring.all_gather(p, 0, "g") for ring, p in zip(rings, parts)))
            for g in gathered:
                assert g.tensor.shape == (2, 12) and g.tensor[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
            hop, startup = spec.links.p2p, spec.links.collective.startup_ns
            assert gathered[0].clock_ns == startup + 3 * (hop.latency_ns + math.ceil(24 * 1e9 / hop.bandwidth_bytes_per_s))
            tensors = [np.arange(8, dtype=np.float32) * (r + 1) for r in range(4)]
            scattered = await asyncio.gather(*(ring.reduce_scatter(t, 0, "rs") for ring, t in zip(rings, tensors)))
            total = np.arange(8, dtype=np.float32) * 10
            for rank, s in enumerate(scattered):
                owned = (rank + 1) % 4
                assert s.tensor.tolist() == total[2 * owned:2 * owned + 2].tolist()

    asyncio.run(main())


def test_one_stream_carries_many_tensors_and_reopens_after_a_refusal():
    async def main():
        server = InterconnectServer("node0/socket0", members=["node0/socket0", "node0/socket1"], run_token=TOKEN)
        address = await server.start()

        async def resolve(name):
            return address

        client = PeerClient("node0/socket1", resolve, server.stats, run_token=TOKEN)
        try:
            for i in range(5):
                await client.send(pb.TensorHeader(tensor_id=f"t{i}", dst="node0/socket0"),
                                  np.full(3 * MAX_CHUNK_BYTES // 4, i, dtype=np.float32), wait_ack=True)
            got = await server.mailbox.take("t4", 5)
            assert got.array.shape == (3 * MAX_CHUNK_BYTES // 4,) and got.array[0] == 4
            with pytest.raises(TransferRejected, match="addressed to"):
                await client.send(pb.TensorHeader(tensor_id="x", dst="node0/socket7"), np.ones(1, np.float32),
                                  wait_ack=True)
            await client.send(pb.TensorHeader(tensor_id="after", dst="node0/socket0"), np.ones(1, np.float32),
                              wait_ack=True)
            assert server.stats.tensors_received == 6 and server.stats.rejected == 1
        finally:
            await client.close()
            await server.stop(0)

    asyncio.run(main())


def test_large_tensor_is_chunked():
    header = pb.TensorHeader(tensor_id="t", dst="b")
    array = np.zeros(3 * MAX_CHUNK_BYTES // 4 + 5, dtype=np.float32)
    chunks = list(chunk_tensor(header, array))
    assert len(chunks) == 4 and all(len(c.data) <= MAX_CHUNK_BYTES for c in chunks)
    assembler = TensorAssembler()
    for c in chunks:
        assembler.add(c)
    assert np.array_equal(assembler.result().array, array)


@pytest.mark.parametrize("values", [np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros(0, np.int64),
                                    np.arange(8, dtype=np.int32)[::2], np.arange(3 * MAX_CHUNK_BYTES // 8 + 3, dtype=np.int64)])
def test_encoded_chunks_are_tensor_chunk_messages(values):
    """The plane writes chunk bytes itself and reads them itself: both are the protobuf encoding
    of TensorChunk, interchangeable with protobuf's own, and the tensor comes back intact."""
    mine = list(encode_chunks(pb.TensorHeader(tensor_id="t", dst="b", virtual_send_ns=7, virtual_arrival_ns=9), values))
    theirs = list(chunk_tensor(pb.TensorHeader(tensor_id="t", dst="b", virtual_send_ns=7, virtual_arrival_ns=9), values))
    assert [pb.TensorChunk.FromString(raw) for raw in mine] == theirs
    for encoding in (mine, [c.SerializeToString() for c in theirs]):
        assembler = TensorAssembler()
        for raw in encoding:
            assembler.add(parse_chunk(raw))
        received = assembler.result()
        assert received.array.dtype == np.asarray(values).dtype and np.array_equal(received.array, values)
        assert received.header.virtual_send_ns == 7


@pytest.mark.parametrize("raw, message", [
    (b"\x10", "truncated varint"),
    (b"\x1a\x05abc", "truncated"),
    (b"\x10\x01\x10\x02", "repeated"),
    (b"\x0a\x02\xff\xff", "header"),
    (b"\x12\x01x", "wire type"),              # seq as a length-delimited field
    (b"\x0b", "wire type 3"),                  # a group
    (b"\x00", "field number 0"),
    (b"\x10" + b"\xff" * 11, "longer than 10 bytes"),
])
def test_parse_chunk_refuses_what_is_no_tensor_chunk(raw, message):
    with pytest.raises(WireError, match=message):
        parse_chunk(raw)


def test_parse_chunk_reads_like_protobuf():
    """Unknown fields are skipped and a negative seq reads as protobuf's int32 does."""
    raw = pb.TensorChunk(seq=-3, data=b"abc", last=True).SerializeToString() + b"\x28\x07\x35\0\0\0\0"
    chunk = parse_chunk(raw)
    assert (chunk.seq, bytes(chunk.data), chunk.last, chunk.HasField("header")) == (-3, b"abc", True, False)


def _raw_stream(header: pb.TensorHeader, payload: bytes, seqs=None):
    seqs = seqs or [0]
    for i, seq in enumerate(seqs):
        yield pb.TensorChunk(header=header if i == 0 else None, seq=seq, data=payload, last=i == len(seqs) - 1)


@pytest.mark.parametrize("header, payload, seqs, code, message", [
    (dict(dtype="float32", shape=[2, 2], total_bytes=16), b"\0" * 12, None, "INVALID_ARGUMENT", "received 12 bytes"),
    (dict(dtype="float32", shape=[3], total_bytes=16), b"\0" * 16, None, "INVALID_ARGUMENT", "is 12 bytes"),
    (dict(dtype="object", shape=[1], total_bytes=8), b"\0" * 8, None, "INVALID_ARGUMENT", "not allowed"),
    (dict(dtype="float32", shape=[1], total_bytes=4), b"\0" * 4, [1], "INVALID_ARGUMENT", "out of order"),
    (dict(dtype="float32", shape=[1 << 29], total_bytes=1 << 31), b"", None, "INVALID_ARGUMENT", "exceeds"),
    (dict(dtype="float32", shape=[1], total_bytes=4, src="node9/socket9"), b"\0" * 4, None, "PERMISSION_DENIED",
     "unknown peer"),
])
def test_server_rejects_bad_streams_and_keeps_serving(header, payload, seqs, code, message):
    async def main():
        server = InterconnectServer("node0/socket0", members=["node0/socket0", "node0/socket1"], run_token=TOKEN)
        address = await server.start()
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.InterconnectStub(channel)
            fields = {"tensor_id": "bad", "dst": "node0/socket0", "src": "node0/socket1", "run_token": TOKEN, **header}
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.Transfer(_raw_stream(pb.TensorHeader(**fields), payload, seqs), timeout=5):
                    pass
            assert info.value.code().name == code and message in info.value.details()
            ok = pb.TensorHeader(tensor_id="good", dst="node0/socket0", src="node0/socket1", want_ack=True)
            creds = call_metadata(TOKEN, "node0/socket1")
            acks = [ack async for ack in stub.Transfer(chunk_tensor(ok, np.ones(4, dtype=np.float32)), timeout=5,
                                                       metadata=creds)]
            assert [a.received_bytes for a in acks] == [16]
            health = await stub.Health(pb.HealthRequest(), timeout=5, metadata=creds)
            assert health.status == "serving"
        assert server.stats.rejected == 1
        await server.stop(0)

    asyncio.run(main())


def test_token_is_required_when_set():
    async def main():
        async with ring_plane(1, 2, token="s3cret") as (spec, members, servers, rings):
            intruder = PeerClient("node0/socket1", rings[0].client.resolve, servers["node0/socket1"].stats, run_token="guess")
            with pytest.raises(TransferRejected, match="PERMISSION_DENIED.*bad credential"):
                await intruder.send(pb.TensorHeader(tensor_id="x", dst="node0/socket0"), np.ones(2, dtype=np.float32),
                                wait_ack=True)
            await intruder.close()
            result = await asyncio.gather(*(ring.all_reduce(np.ones(4, dtype=np.float32), 0, "ok") for ring in rings))
            assert result[0].tensor.tolist() == [2, 2, 2, 2]

    asyncio.run(main())


def test_assembler_rules():
    with pytest.raises(WireError, match="no header"):
        TensorAssembler().add(pb.TensorChunk(seq=0, data=b"", last=True))
    with pytest.raises(WireError, match="empty stream"):
        TensorAssembler().result()


def test_lossy_link_resends_and_stays_exact():
    """Messages on a lossy link are lost (seeded), noticed by the missing ack, and resent; the
    numerics are unchanged and each loss costs the group one retransmission timeout."""
    async def main():
        async with ring_plane(1, 4) as (spec, members, servers, rings):
            for ring in rings:
                ring.client.ack_deadline_s = 0.05
            servers["node0/socket2"].set_loss("node0/socket1", 0.4, seed=3)   # the link loses for real...
            rings[1].client.set_loss("node0/socket2", 0.4)                     # ...and its sender resends
            clean = RingTiming.for_group(Topology(spec.links, 1, 4), members).hardware_ns("all_reduce", 256)
            clock = 0
            for call in range(4):    # rooted at each rank once: the link carries messages when 1 or 2 is the root
                tensors = [np.full(64, r + 1, dtype=np.float32) for r in range(4)]
                results = await asyncio.gather(*(ring.all_reduce(t, clock, f"lossy{call}")
                                                 for ring, t in zip(rings, tensors)))
                assert all(np.array_equal(r.tensor, np.full(64, 10, dtype=np.float32)) for r in results)
                assert len({r.clock_ns for r in results}) == 1     # every member agrees
                clock = results[0].clock_ns
            ends = await asyncio.gather(*(ring.settle(clock) for ring in rings))   # rooted at rank 0
            dropped = servers["node0/socket2"].stats.dropped
            assert dropped > 0 and rings[1].client.lost_messages >= dropped
            assert set(ends) == {4 * clean + dropped * int(spec.links.retransmit_timeout_ns)}
            rings[1].client.set_loss("node0/socket2", 1.0)
            rings[1].client.ack_deadline_s = 0.005
            servers["node0/socket2"].set_loss("node0/socket1", 1.0)
            with pytest.raises(Exception, match="the link is down"):
                await rings[1].client.send(pb.TensorHeader(tensor_id="dead", dst="node0/socket2"),
                                           np.ones(1, np.float32))

    asyncio.run(main())


def test_a_root_takes_a_members_tensor_only_from_that_member():
    """An authenticated member (node0/socket2) that sends the root (rank 0, first collective) the
    id the root expects from node0/socket1 is not summed in: the root refuses it."""
    async def main():
        async with ring_plane(1, 4) as (spec, members, servers, rings):
            insider = rings[2].client
            await insider.send(pb.TensorHeader(tensor_id="1/x/up/node0/socket1", dst="node0/socket0"),
                               np.full(16, 1e3, np.float32), wait_ack=True)
            with pytest.raises(PermissionError, match="came from 'node0/socket2', not from 'node0/socket1'"):
                await rings[0].all_reduce(np.ones(16, np.float32), 0, "x")

    asyncio.run(main())


# The virtual time of a functional collective is the timing model's, algorithm by algorithm: the
# tensors go to a root and back, and every rank's clock lands on `RingTiming.hardware_ns` of the
# algorithm `RingTiming.algorithm` picks for the size it times by.
ALGORITHM_CASES = [
    # platform, overrides, nodes x per node, bytes to time by, algorithm the timing model picks
    ("sn40l-node", {}, 1, 8, 1024, "ring"),                           # a ring topology: always the ring
    ("sn40l-node", {}, 2, 4, 1024, "ring"),                           # across nodes: slower hops
    ("dgx-a100", {}, 1, 8, 4096, "one_shot"),                         # a switch: copies share one port
    ("dgx-a100", {}, 1, 8, 1 << 20, "ring"),                          # above one_shot_max_bytes
    ("dgx-a100", {"links.p2p.topology": "full_mesh"}, 1, 4, 4096, "one_shot"),   # a link per peer
]


@pytest.mark.parametrize("kind", ["all_reduce", "all_gather", "reduce_scatter"])
@pytest.mark.parametrize("platform, overrides, nodes, per_node, timed_bytes, algorithm", ALGORITHM_CASES)
def test_each_algorithm_lands_on_the_analytic_time(platform, overrides, nodes, per_node, timed_bytes, algorithm,
                                                   kind):
    async def main():
        async with ring_plane(nodes, per_node, platform, overrides=overrides) as (spec, members, servers, rings):
            timing = RingTiming.for_group(Topology(spec.links, nodes, per_node), members)
            assert timing.algorithm(timed_bytes) == algorithm
            rng = np.random.default_rng(1)
            t = len(members)
            tensors = [rng.standard_normal(4 * t).astype(np.float32) for _ in members]   # a small payload...
            if kind == "all_gather":
                calls = [ring.all_gather(x, 7_000, "k", timed_bytes=timed_bytes) for ring, x in zip(rings, tensors)]
            else:
                calls = [getattr(ring, kind)(x, 7_000, "k", timed_bytes=timed_bytes) for ring, x in zip(rings, tensors)]
            results = await asyncio.gather(*calls)                                        # ...timed by the nominal size
            assert {r.algorithm for r in results} == {algorithm}
            assert {r.clock_ns for r in results} == {7_000 + timing.hardware_ns(kind, timed_bytes)}
            assert sum(ring.messages for ring in rings) == 2 * (t - 1)
            # numerics: sums formed in a fixed order, the same bits on every rank
            total = tensors[0].copy()
            for x in tensors[1:]:
                total += x
            if kind == "all_reduce":
                for r in results:
                    assert np.array_equal(r.tensor, total)   # rank 0 + rank 1 + ..., exactly
            elif kind == "all_gather":
                for r in results:
                    assert np.array_equal(r.tensor, np.concatenate(tensors))
            else:
                for rank, r in enumerate(results):
                    owned = (rank + 1) % t
                    assert np.array_equal(r.tensor, total[4 * owned:4 * owned + 4])

    asyncio.run(main())


def test_one_shot_numerics_are_the_same_bits_every_run():
    async def once():
        async with ring_plane(1, 8, "dgx-a100") as (spec, members, servers, rings):
            tensors = [np.random.default_rng(r).standard_normal(256).astype(np.float32) for r in range(8)]
            results = await asyncio.gather(*(ring.all_reduce(x, 0, "bits") for ring, x in zip(rings, tensors)))
            assert {r.algorithm for r in results} == {"one_shot"}
            return [r.tensor.tobytes() for r in results]

    first, second = asyncio.run(once()), asyncio.run(once())
    assert len(set(first)) == 1 and first == second


def test_each_loss_costs_the_group_one_retransmit_timeout():
    """One-shot timing over a link that loses messages for real: node0/socket2's server drops some
    of node0/socket1's messages, socket1 misses their acknowledgements and resends. A loss of a
    member's tensor to the root (root socket2) is charged to the whole group in that collective;
    a loss of the root's answer (root socket1) is charged in the group's next collective, since
    only its receiver learns of it. Every member agrees on every collective's end."""
    async def main():
        async with ring_plane(1, 4, "dgx-a100") as (spec, members, servers, rings):
            victim = servers["node0/socket2"]
            victim.set_loss("node0/socket1", 0.3, seed=11)
            rings[1].client.set_loss("node0/socket2", 0.3)
            clean = RingTiming.for_group(Topology(spec.links, 1, 4), members).hardware_ns("all_reduce", 64)
            rto = int(spec.links.retransmit_timeout_ns)
            clock, owed = 0, 0
            for call in range(12):
                before = victim.stats.dropped
                tensors = [np.full(16, r + call, dtype=np.float32) for r in range(4)]
                results = await asyncio.gather(*(ring.all_reduce(x, clock, f"c{call}") for ring, x in zip(rings, tensors)))
                lost = victim.stats.dropped - before
                assert all(np.array_equal(r.tensor, np.full(16, 6 + 4 * call, np.float32)) for r in results)
                root = call % 4
                up_losses = lost if root == 2 else 0          # socket1 -> root socket2: known before the answer
                assert {r.clock_ns for r in results} == {clock + clean + (up_losses + owed) * rto}
                owed = lost if root == 1 else 0               # root socket1's answer to socket2: charged next time
                clock = results[0].clock_ns
            assert victim.stats.dropped > 0 and rings[1].client.lost_messages >= victim.stats.dropped
            ends = await asyncio.gather(*(ring.settle(clock) for ring in rings))
            assert set(ends) == {clock + owed * rto}
            assert set(ends) == {12 * clean + victim.stats.dropped * rto}

    asyncio.run(main())


def test_plane_processes_run_the_lean_transport_and_leave_the_environment_alone():
    """A process whose first gRPC import is the plane's (a socket actor) runs gRPC's iomgr
    endpoints (interconnect/grpc_runtime.py); the variable that selects them is gone afterwards,
    so processes it starts (Ray's) do not inherit it. A user's own setting is left as it is."""
    import os
    import subprocess
    import sys

    probe = ("import os; import rdu.interconnect.grpc_plane; from rdu.interconnect.grpc_runtime import "
             "plane_transport; print(plane_transport(), os.environ.get('GRPC_EXPERIMENTS'))")
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["iomgr", "None"]
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "GRPC_EXPERIMENTS": "-x"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["default", "-x"]


def test_a_write_that_does_not_complete_times_out_and_posts_fail_their_receiver():
    """Writes carry a deadline without a timer each (one watchdog per stream): a peer that never
    reads holds a large write past it, and the send fails with TimeoutError. A posted message
    that cannot be sent fails the receive of the answer waiting for it, at once."""
    async def main():
        async def never_reads(requests, context):
            await asyncio.sleep(30)
            yield pb.Ack()

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("rdu.interconnect.Interconnect", {
            "Transfer": grpc.stream_stream_rpc_method_handler(never_reads)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()

        async def resolve(name):
            return f"127.0.0.1:{port}"

        client = PeerClient("node0/socket1", resolve, InterconnectServer("x").stats, run_token=TOKEN, deadline_s=0.5)
        try:
            with pytest.raises(TimeoutError, match="big not written within 0.5 s"):
                await client.send(pb.TensorHeader(tensor_id="big", dst="node0/socket0"), np.zeros(8 << 20, np.uint8))
            await client.connect(["node0/socket0"])
            mailbox = InterconnectServer("y").mailbox
            client.post(pb.TensorHeader(tensor_id="up", dst="node0/socket0"), np.zeros(8 << 20, np.uint8),
                        lambda failure: mailbox.fail("answer", failure))
            with pytest.raises(TimeoutError, match="up not written within 0.5 s"):
                await mailbox.take("answer", 10)
            await client.drain()
        finally:
            await client.close()
            await server.stop(0)

    asyncio.run(main())


def test_a_root_waits_once_for_all_its_tensors_and_receives_keep_their_deadlines():
    """Mailbox.wait_all returns when the last of its ids arrives (whatever the order), a wait
    that is not satisfied fails with TimeoutError at its deadline, and so does a take (one
    timer serves every deadline)."""
    from rdu.interconnect.mailbox import Mailbox
    from rdu.interconnect.wire import Received

    def deliver(mailbox, tensor_id, src="node0/socket1"):
        header = pb.TensorHeader(tensor_id=tensor_id, src=src, total_bytes=4)
        mailbox.reserve(src, tensor_id, 4)
        mailbox.deliver(Received(header, np.ones(1, np.float32)))

    async def main():
        mailbox = Mailbox()
        deliver(mailbox, "b")
        waiting = asyncio.ensure_future(mailbox.wait_all(["a", "b", "c"], 5))
        await asyncio.sleep(0.01)
        deliver(mailbox, "c")
        await asyncio.sleep(0.01)
        assert not waiting.done()
        deliver(mailbox, "a")
        await asyncio.wait_for(waiting, 1)
        assert [(await mailbox.take(i, 1)).header.tensor_id for i in "abc"] == ["a", "b", "c"]
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError, match="no tensor 'late' within 0.2 s"):
            await mailbox.wait_all(["late"], 0.2)
        with pytest.raises(TimeoutError, match="no tensor 'never' within 0.1 s"):
            await mailbox.take("never", 0.1)
        assert asyncio.get_running_loop().time() - started < 2

    asyncio.run(main())
