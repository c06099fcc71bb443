"""The socket actor: a thin async Ray actor around `SocketCore` plus the socket's gRPC server.

Ray carries the host's commands (the control plane); tensors between sockets go over the gRPC
interconnect (the data plane). The class is plain Python; `node` wraps it with `ray.remote`
(`num_cpus=0`, one `rdu_socket` resource) when it launches a node.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np

from rdu.interconnect.collectives import Collectives
from rdu.interconnect.plane_auth import PlaneTLS
from rdu.interconnect.grpc_plane import InterconnectServer, PeerClient
from rdu.base import UserError
from rdu.interconnect.topology import Topology, TopologySpec
from rdu.socket_actor.command_log import CommandLog, apply_log
from rdu.socket_actor.core import SocketCore, RunRequest, RunResult, SpanRequest, SpanResult
from rdu.socket_actor.numerics import Shard
from rdu.socket_actor.spec import SocketSpec
from rdu.socket_actor.timed_run import NominalTiming, execute, generation_schedule, run_functional

__all__ = ["SocketActor", "NominalTiming"]


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
        self._collectives: dict[tuple[str, ...], Collectives] = {}
        self.address = ""
        self._batches = asyncio.Condition()
        self._next_batch = 0

    async def _resolve(self, peer: str) -> str:
        return await self.registry.lookup.remote(peer)

    def _group(self, members: tuple[str, ...]) -> Collectives:
        if members not in self._collectives:
            self._collectives[members] = Collectives(self.name, list(members), self.topology, self.client,
                                                     self.server.mailbox)
        return self._collectives[members]

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
        """Fault injection on the data plane: the link from `peer` to this socket loses each
        message with `probability` (this server drops it, seeded), and this socket's messages to
        `peer` wait for their acknowledgement and are resent when it does not come. Set it on
        both ends for a link that loses messages both ways."""
        self.server.set_loss(peer, probability, seed)
        self.client.set_loss(peer, probability)

    async def degrade_link(self, a: str, b: str, probability: float, at_ns: int) -> list[str]:
        """This socket's copy of the topology learns that a link lost messages (or went down)."""
        links = self.topology.degrade(a, b, probability, at_ns)
        self.core.topology_changed()
        for group in self._collectives.values():
            group.topology_changed()
        return links

    async def apply_log(self, batch: int, log: CommandLog) -> tuple:
        """Apply the runtime's command log number `batch` to this socket, after every earlier one,
        checking each command against this socket's own state; returns its digest (see
        socket_actor.command_log). Ray may start an async actor's calls out of order when their
        arguments take different routes, so the logs carry their order themselves."""
        async with self._batches:
            await self._batches.wait_for(lambda: self._next_batch == batch)
            try:
                return apply_log(self.core, log)
            finally:
                self._next_batch += 1
                self._batches.notify_all()

    # -- functional plane -----------------------------------------------------------------------
    def _functional_shard(self, model_id: str) -> tuple[Shard, int]:
        """This socket's functional shard of `model_id` in HBM, and when it landed."""
        resident = self.core.residents.get(model_id)
        if resident is None or resident.weights is None:
            raise UserError(f"{self.name}: no functional weights of {model_id} in HBM")
        return resident.weights, resident.ready_at_ns

    def _counters(self, group: Collectives) -> tuple[int, int, int]:
        """(bytes this socket sent in `group`, messages its server dropped, resends of its client)."""
        return group.wire_bytes, self.server.stats.dropped, self.client.lost_messages

    def _plane_report(self, group: Collectives, before: tuple[int, int, int]) -> dict:
        wire, dropped, resent = self._counters(group)
        return {"grpc_bytes_sent": wire - before[0], "messages_lost": dropped - before[1],
                "messages_resent": resent - before[2], "owed_ns": group.owed_ns}

    async def generate(self, model_id: str, members: tuple[str, ...], prompts: list[list[int]], new_tokens: int,
                       mode: str | None = None, orchestration: str | None = None,
                       advance_clock: bool = True, epoch: str | None = None,
                       nominal: NominalTiming | None = None) -> dict:
        """Greedy generation of a batch of equally long prompts with this socket's functional
        shard, combining partial results with the other members over gRPC.

        Virtual time (socket_actor.timed_run): each step takes the cost model's time of the timing
        model's step (the functional model's own, or `nominal`'s), collectives their analytic
        time for the timing model's bytes; with nothing lost and nothing contending the clock
        after the generation is the cost model's time of it to the nanosecond, every message lost
        and resent adds one retransmission timeout. Returns the ids (batch, new_tokens) and the
        logits (new_tokens, batch, vocab) of every generated token. With `advance_clock` false
        (the payload of a served batch whose time the engine accounts for) the socket's clock
        and counters are left alone. `epoch` (a job id) names this generation's messages, so
        every rank agrees on them even after one of them restarted."""
        shard, ready_at_ns = self._functional_shard(model_id)
        group = self._group(tuple(members))
        if epoch is not None:
            group.begin(f"{epoch}#")
        tokens = np.asarray(prompts, dtype=np.int64)
        batch = len(tokens)
        timing_model = nominal.model if nominal is not None else shard.cfg.model_spec()
        prompt_lens = tuple(nominal.prompt_lens) if nominal is not None and nominal.prompt_lens else \
            (int(tokens.shape[1]),) * batch
        if len(prompt_lens) != batch:
            raise UserError(f"{len(prompt_lens)} nominal prompt lengths for a batch of {batch}")
        cost = self.core.cost_model(timing_model, tuple(members), mode, orchestration)
        schedule = generation_schedule(cost, prompt_lens, (new_tokens,) * batch,
                                       nominal is not None and nominal.setup, new_tokens)
        start, before = max(self.core.clock_ns, ready_at_ns), self._counters(group)
        run = await run_functional(shard, group, tokens, schedule, start)
        if advance_clock:
            self.core.advance_to(run.clock_ns)
            self.core.counters.tokens += new_tokens * batch
            self.core.counters.busy_ns += run.clock_ns - start
        return {"socket": self.name, "tokens": run.ids, "logits": run.logits, "start_ns": start,
                "end_ns": run.clock_ns, "algorithms": run.algorithms, **self._plane_report(group, before)}

    async def execute(self, request: RunRequest | SpanRequest) -> dict:
        """Run a served batch for real on this member of its TP group, then apply it to this
        socket's state as the runtime's cache does (see socket_actor.timed_run.execute)."""
        shard, _ = self._functional_shard(request.model_id)
        group = self._group(tuple(request.members))
        before = self._counters(group)
        result = await execute(self.core, group, shard, request)
        return {"socket": self.name, **result, **self._plane_report(group, before)}

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

    async def connect(self, members: list[str]) -> None:
        """Make the group's communicator before it runs: open the plane's streams to every other
        member and exchange an empty message with each (`Collectives.rendezvous`); every member of
        the group calls it at the same time."""
        await self.client.connect([m for m in members if m != self.name])
        await self._group(tuple(members)).rendezvous()

    async def plane_stats(self, peers: list[str]) -> dict[str, dict]:
        """What each of `peers` says its gRPC server received, asked over the plane itself (the
        authenticated Stats call): the run's own account of its messages, per socket."""
        replies = {}
        for peer in peers:
            reply = await self.client.peer_stats(peer)
            replies[peer] = {"tensors_received": reply.tensors_received, "bytes_received": reply.bytes_received,
                             "tensors_sent": reply.tensors_sent, "bytes_sent": reply.bytes_sent,
                             "rejected": reply.rejected, "dropped": reply.dropped}
        return replies

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
