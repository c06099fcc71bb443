"""The socket actor: a thin async Ray actor around `SocketCore` plus the socket's gRPC server.

Ray carries the host's commands (the control plane); tensors between sockets go over the gRPC
interconnect (the data plane). The class is plain Python; `node` wraps it with `ray.remote`
(`num_cpus=0`, one `rdu_socket` resource) when it launches a node.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np

from rdu.interconnect.collectives import RingCollectives
from rdu.interconnect.plane_auth import PlaneTLS
from rdu.interconnect.grpc_plane import InterconnectServer, PeerClient
from rdu.base import UserError
from rdu.interconnect.topology import Topology, TopologySpec
from rdu.socket_actor.core import SocketCore, RunRequest, RunResult, SpanRequest, SpanResult
from rdu.socket_actor.numerics import KVCache, Shard, TinyConfig, forward_shard
from rdu.socket_actor.operators import decode_step_shape, prefill_shape
from rdu.socket_actor.spec import SocketSpec

__all__ = ["SocketActor"]


class SocketActor:
    """Hosts one socket core; methods are the commands the host may send it."""

    def __init__(self, name: str, spec: SocketSpec, links: TopologySpec, nodes: int, sockets_per_node: int,
                 registry, members: list[str], bind_host: str = "127.0.0.1", run_token: str = "",
                 tls: "PlaneTLS | None" = None) -> None:
        self.name = name
        self.topology = Topology(links, nodes, sockets_per_node)
        self.core = SocketCore(name, spec, self.topology)
        self.registry = registry
        self.bind_host = bind_host
        self.server = InterconnectServer(name, bind_host=bind_host, members=members, run_token=run_token,
                                         clock_ns=lambda: self.core.clock_ns, tls=tls)
        self.client = PeerClient(name, self._resolve, self.server.stats, run_token=run_token,
                                 retransmit_timeout_ns=links.retransmit_timeout_ns, tls=tls)
        self._rings: dict[tuple[str, ...], RingCollectives] = {}
        self.address = ""
        self._batches = asyncio.Condition()
        self._next_batch = 0

    async def _resolve(self, peer: str) -> str:
        return await self.registry.lookup.remote(peer)

    def _ring(self, members: tuple[str, ...]) -> RingCollectives:
        if members not in self._rings:
            self._rings[members] = RingCollectives(self.name, list(members), self.topology, self.client,
                                                   self.server.mailbox)
        return self._rings[members]

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> str:
        """Start the gRPC server (inside this actor's event loop) and register its address."""
        if self.bind_host == "node-ip":
            import ray

            self.server.bind_host = ray.util.get_node_ip_address()
        self.address = await self.server.start()
        await self.registry.register.remote(self.name, self.address)
        return self.address

    async def stop(self) -> None:
        await self.client.close()
        await self.server.stop()

    async def ping(self) -> str:
        return self.name

    # -- residency ------------------------------------------------------------------------------
    async def load(self, model_id: str, shard_bytes: int, ready_at_ns: int, refs: list | None = None) -> int:
        """Load a shard. With `refs` (one ObjectRef from the node's DDR store) the functional
        weights are really copied out of the object store into this socket's HBM buffers."""
        weights = None
        if refs:
            shard: Shard = await refs[0]
            weights = Shard(cfg=shard.cfg, tp=shard.tp, rank=shard.rank, kv_of_q=shard.kv_of_q.copy(),
                            vocab_offset=shard.vocab_offset,
                            weights={key: np.array(value, copy=True) for key, value in shard.weights.items()})
        self.core.load(model_id, shard_bytes, ready_at_ns, weights)
        return self.core.tiers.hbm.used_bytes

    async def evict(self, model_id: str) -> int:
        return self.core.evict(model_id)

    # -- timing plane ---------------------------------------------------------------------------
    async def run(self, request: RunRequest) -> RunResult:
        return self.core.run(request)

    async def follow(self, request: RunRequest, busy_ns: int) -> int:
        return self.core.follow(request, busy_ns)

    async def run_span(self, request: SpanRequest) -> SpanResult:
        """Time a span with this socket's own cost model and execute it (KV entry resized)."""
        return self.core.run_span(request)

    async def follow_span(self, request: SpanRequest, busy_ns: int) -> int:
        return self.core.run_span(request, busy_ns).end_ns

    async def set_kv(self, kv_bytes: int) -> int:
        return self.core.set_kv(kv_bytes)

    async def abort(self, job_id: str, at_ns: int) -> int:
        return self.core.abort(job_id, at_ns)

    async def advance_to(self, clock_ns: int) -> int:
        self.core.advance_to(clock_ns)
        return self.core.clock_ns

    async def set_link_loss(self, peer: str, probability: float, seed: int = 0) -> None:
        """Fault injection on the data plane: lose messages to `peer` with `probability`."""
        self.client.set_loss(peer, probability, seed)

    async def degrade_link(self, a: str, b: str, probability: float, at_ns: int) -> list[str]:
        """This socket's copy of the topology learns that a link lost messages (or went down)."""
        links = self.topology.degrade(a, b, probability, at_ns)
        self.core.topology_changed()
        return links

    async def run_many(self, batch: int, commands: list[tuple]) -> list:
        """Apply batch number `batch` of commands, after every earlier batch; returns each
        command's result. (Ray may start an async actor's calls out of order when their
        arguments take different routes, so the batches carry their order themselves.)"""
        async with self._batches:
            await self._batches.wait_for(lambda: self._next_batch == batch)
            try:
                results = []
                for name, *args in commands:
                    results.append(await getattr(self, name)(*args))
                return results
            finally:
                self._next_batch += 1
                self._batches.notify_all()

    # -- functional plane -----------------------------------------------------------------------
    async def generate(self, model_id: str, members: tuple[str, ...], prompts: list[list[int]], new_tokens: int,
                       mode: str | None = None, orchestration: str | None = None,
                       advance_clock: bool = True, epoch: str | None = None) -> dict:
        """Greedy generation of a batch of equally long prompts with this socket's functional
        shard, all-reducing over gRPC.

        Virtual time: compute segments from the cost model of the functional model, collectives
        from the link model as the chunks travel. Returns the logits of every generated token,
        shape (new_tokens, batch, vocab). With `advance_clock` false (the payload of a served
        batch, whose time the nominal model already accounts for) the socket's clock and
        counters are left alone. `epoch` (a job id) names this generation's messages, so every
        rank agrees on them even after one of them restarted.
        """
        resident = self.core.residents.get(model_id)
        if resident is None or resident.weights is None:
            raise UserError(f"{self.name}: no functional weights of {model_id} in HBM")
        shard: Shard = resident.weights
        cfg: TinyConfig = shard.cfg
        ring = self._ring(tuple(members))
        if epoch is not None:
            ring.begin(f"{epoch}#")
        cost = self.core.cost_model(cfg.model_spec(), tuple(members), mode, orchestration)
        tokens = np.asarray(prompts, dtype=np.int64)
        batch = len(tokens)
        cache = KVCache(cfg, cfg.kv_heads_per_shard(len(members)), batch=batch)
        clock = max(self.core.clock_ns, resident.ready_at_ns)
        start = clock
        ids, all_logits = [], []
        for step in range(new_tokens):
            shape = (prefill_shape([tokens.shape[1]] * batch) if step == 0
                     else decode_step_shape([cache.length] * batch))
            segments = iter(cost.segments(shape))
            run = forward_shard(shard, tokens, cache)
            collective = next(run)
            while True:
                segment = next(segments)
                clock += segment.compute_ns + segment.staging_ns
                if collective.kind == "all_reduce":
                    result = await ring.all_reduce(collective.tensor, clock, collective.label)
                else:
                    result = await ring.all_gather(collective.tensor, clock, collective.label)
                clock = result.clock_ns
                try:
                    collective = run.send(result.tensor)
                except StopIteration as done:
                    logits = done.value
                    break
            clock += next(segments).compute_ns
            all_logits.append(logits)
            ids.append(np.argmax(logits, axis=-1))
            tokens = ids[-1][:, None]
        if advance_clock:
            self.core.advance_to(clock)
            self.core.counters.tokens += new_tokens * batch
            self.core.counters.busy_ns += clock - start
        return {"socket": self.name, "tokens": np.stack(ids, axis=1), "logits": np.stack(all_logits),
                "start_ns": start, "end_ns": clock, "grpc_bytes_sent": ring.wire_bytes,
                "messages_lost": self.client.lost_messages}

    # -- point-to-point transfers (KV or activation moves) ---------------------------------------
    async def send_to(self, peer: str, tensor_id: str, nbytes: int) -> int:
        """Send `nbytes` of activations to `peer` now (virtual time: this socket's clock); returns
        the modelled arrival time. The peer collects it with `receive_from`."""
        from rdu.protos import interconnect_pb2 as pb
        from rdu.interconnect.links import transmit_path

        array = np.zeros(nbytes // 4, dtype=np.float32)
        arrival = transmit_path(self.topology.path(self.name, peer), array.nbytes, self.core.clock_ns)
        await self.client.send(pb.TensorHeader(tensor_id=tensor_id, dst=peer, virtual_send_ns=self.core.clock_ns,
                                               virtual_arrival_ns=arrival), array, wait_ack=True)
        return arrival

    async def receive_from(self, tensor_id: str, timeout_s: float = 60.0) -> dict:
        received = await self.server.mailbox.take(tensor_id, timeout_s)
        self.core.advance_to(received.header.virtual_arrival_ns)
        return {"bytes": received.array.nbytes, "arrival_ns": int(received.header.virtual_arrival_ns)}

    async def memory(self) -> dict:
        """This actor process's resident memory now and at its peak (bytes)."""
        return process_memory()

    # -- reporting ------------------------------------------------------------------------------
    async def stats(self) -> dict:
        snapshot = self.core.snapshot()
        s = self.server.stats
        snapshot["grpc"] = {"address": self.address, "tensors_received": s.tensors_received,
                            "bytes_received": s.bytes_received, "tensors_sent": s.tensors_sent,
                            "bytes_sent": s.bytes_sent, "rejected": s.rejected}
        return snapshot


def reset_peak_memory() -> None:
    """Start this process's peak-RSS measurement afresh (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then counts from the process start


def process_memory() -> dict:
    """Resident set size now (VmRSS) and at its high-water mark (VmHWM) of this process, in bytes."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return {"pid": os.getpid(), "rss_bytes": values.get("VmRSS", 0), "peak_rss_bytes": values.get("VmHWM", 0)}
