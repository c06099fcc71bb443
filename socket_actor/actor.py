"""The socket actor: a thin async Ray actor around `SocketCore` plus the socket's gRPC server.

Ray carries the host's commands (the control plane); tensors between sockets go over the gRPC
interconnect (the data plane). The class is plain Python; `node` wraps it with `ray.remote`
(`num_cpus=0`, one `rdu_socket` resource) when it launches a node.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import numpy as np

from rdu.interconnect.collectives import Collectives
from rdu.interconnect.plane_auth import PlaneTLS
from rdu.interconnect.grpc_plane import InterconnectServer, PeerClient
from rdu.base import UserError
from rdu.interconnect.topology import Topology, TopologySpec
from rdu.socket_actor.command_log import CommandLog, apply_log
from rdu.socket_actor.core import SocketCore, RunRequest, RunResult, SpanRequest, SpanResult
from rdu.socket_actor.cost_model import CostModel
from rdu.socket_actor.model_spec import ModelSpec
from rdu.socket_actor.numerics import KVCache, Shard, TinyConfig, collective_kinds, forward_shard
from rdu.socket_actor.operators import PhaseShape, SHAPE_KEYS, decode_shapes, decode_step_shape, prefill_shape
from rdu.socket_actor.spec import SocketSpec

__all__ = ["SocketActor", "NominalTiming"]


@dataclass(frozen=True)
class NominalTiming:
    """Time a functional generation as the nominal model would take it (say the run's real
    Llama-2-7B), while the small functional model computes: step times from the cost model of
    `model` on `prompt_lens` (default: the functional prompts' length), collective messages timed
    by that model's bytes. `setup` charges the run's set-up to the prefill step."""

    model: ModelSpec
    prompt_lens: tuple[int, ...] | None = None
    setup: bool = False


@dataclass(frozen=True)
class _StepPlan:
    """One step of a timed generation: the gap of compute before each collective of the timing
    model (and after the last), and each collective's kind, bytes and analytic time."""

    gaps_ns: tuple[int, ...]
    collectives: tuple[tuple[str, int, int], ...]


def _apportion(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights` into integers that sum to it exactly."""
    whole = sum(weights)
    if whole <= 0:
        return [0] * (len(weights) - 1) + [total]
    cuts, running = [0], 0
    for weight in weights:
        running += weight
        cuts.append(total * running // whole)
    return [b - a for a, b in zip(cuts, cuts[1:])]


def _step_plans(cost: CostModel, prompt_lens: tuple[int, ...], new_tokens: int, setup: bool) -> list[_StepPlan]:
    """The plan of every step of a generation of `new_tokens` (prefill, then decode steps),
    such that its gaps plus its collectives' analytic times add up to the cost model's step
    time exactly: the step times are one evaluation of the same rows `CostModel.generate` uses.
    Where a fused step hides more collective time than its compute (gaps would go negative)
    the gaps are 0 and the step takes its collectives' time."""
    window = cost.model.sliding_window
    first = prefill_shape(prompt_lens, window)
    rest = decode_shapes(prompt_lens, [new_tokens] * len(prompt_lens), window)
    both = PhaseShape(*(np.concatenate([getattr(first, k), getattr(rest, k)]) for k in SHAPE_KEYS))
    step_ns = cost.steps(both, setup=setup).step_ns
    templates = [cost.segments(first)]
    if new_tokens > 1:   # every decode step of a batch moves the same bytes; its compute shares barely move
        templates.append(cost.segments(decode_step_shape(prompt_lens, window)))
    shapes = []
    for segments in templates:
        collectives = tuple((seg.collective, seg.collective_bytes, int(cost.ring.hardware_ns(seg.collective,
                                                                                             seg.collective_bytes)))
                            for seg in segments[:-1])
        shapes.append((collectives, [seg.compute_ns + seg.staging_ns for seg in segments]))
    plans = []
    for step, total_ns in enumerate(step_ns):
        collectives, weights = shapes[min(step, len(shapes) - 1)]
        compute_ns = max(int(total_ns) - sum(c[2] for c in collectives), 0)
        plans.append(_StepPlan(tuple(_apportion(compute_ns, weights)), collectives))
    return plans


def _stand_ins(functional: int, nominal: list[str], kinds: list[str]) -> list[int]:
    """Which of the timing model's collectives each of the functional model's stands in for:
    the first for the first, the last for the last, the others spread evenly between them (a
    2-layer functional model in a 32-layer nominal one). Their kinds must agree."""
    if len(nominal) < functional:
        raise UserError(f"the timing model has {len(nominal)} collectives per step, fewer than the functional "
                        f"model's {functional}: time it by a model with at least as many layers")
    if functional == 1:
        picks = [len(nominal) - 1]
    else:
        picks = [round(j * (len(nominal) - 1) / (functional - 1)) for j in range(functional)]
    for j, k in enumerate(picks):
        if nominal[k] != kinds[j]:
            raise UserError(f"the functional model's collective {j} ({kinds[j]}) cannot stand for the timing "
                            f"model's {k} ({nominal[k]})")
    return picks


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
    async def generate(self, model_id: str, members: tuple[str, ...], prompts: list[list[int]], new_tokens: int,
                       mode: str | None = None, orchestration: str | None = None,
                       advance_clock: bool = True, epoch: str | None = None,
                       nominal: NominalTiming | None = None) -> dict:
        """Greedy generation of a batch of equally long prompts with this socket's functional
        shard, combining partial results with the other members over gRPC.

        Virtual time: each step takes the cost model's time of the timing model's step (the
        functional model's own, or `nominal`'s): compute gaps from the cost model, collectives
        from the link model as their messages travel, timed by the timing model's bytes, with the
        algorithm the timing model picks for that size. With nothing contending the clock after
        the generation is the cost model's analytic time of it to the nanosecond; a lost and
        resent message adds its retransmission timeouts. A nominal model with more layers than
        the functional one has more collectives than travel: the functional collectives stand in
        for evenly spread ones, the others are charged their analytic time. Returns the logits of
        every generated token, shape (new_tokens, batch, vocab). With `advance_clock` false (the
        payload of a served batch whose time the engine accounts for) the socket's clock,
        counters and link state are left alone. `epoch` (a job id) names this generation's
        messages, so every rank agrees on them even after one of them restarted.
        """
        resident = self.core.residents.get(model_id)
        if resident is None or resident.weights is None:
            raise UserError(f"{self.name}: no functional weights of {model_id} in HBM")
        shard: Shard = resident.weights
        cfg: TinyConfig = shard.cfg
        group = self._group(tuple(members))
        if epoch is not None:
            group.begin(f"{epoch}#")
        tokens = np.asarray(prompts, dtype=np.int64)
        batch = len(tokens)
        timing_model = nominal.model if nominal is not None else cfg.model_spec()
        prompt_lens = tuple(nominal.prompt_lens) if nominal is not None and nominal.prompt_lens else \
            (int(tokens.shape[1]),) * batch
        if len(prompt_lens) != batch:
            raise UserError(f"{len(prompt_lens)} nominal prompt lengths for a batch of {batch}")
        cost = self.core.cost_model(timing_model, tuple(members), mode, orchestration)
        plans = _step_plans(cost, prompt_lens, new_tokens, nominal is not None and nominal.setup)
        saved_links = None if advance_clock else {name: link.free_at_ns for name, link in self.topology.links.items()}
        cache = KVCache(cfg, cfg.kv_heads_per_shard(len(members)), batch=batch)
        clock = max(self.core.clock_ns, resident.ready_at_ns)
        start, wire_start, algorithms_start = clock, group.wire_bytes, dict(group.algorithms)
        functional_kinds = collective_kinds(cfg)
        stand_ins = {k: j for j, k in enumerate(_stand_ins(len(functional_kinds), [c[0] for c in plans[0].collectives],
                                                            functional_kinds))}
        ids, all_logits = [], []
        for plan in plans:
            run = forward_shard(shard, tokens, cache)
            collective = next(run)
            logits = None
            for k, (kind, nbytes, analytic_ns) in enumerate(plan.collectives):
                clock += plan.gaps_ns[k]
                if k in stand_ins:
                    if collective.kind == "all_reduce":
                        result = await group.all_reduce(collective.tensor, clock, collective.label, timed_bytes=nbytes)
                    else:
                        result = await group.all_gather(collective.tensor, clock, collective.label, timed_bytes=nbytes)
                    clock = result.clock_ns
                    try:
                        collective = run.send(result.tensor)
                    except StopIteration as done:
                        logits = done.value
                else:
                    clock += analytic_ns   # a collective of the timing model the functional one lacks
            clock += plan.gaps_ns[-1]
            if logits is None:
                raise RuntimeError(f"{self.name}: the functional step did not end with the timing model's step")
            all_logits.append(logits)
            ids.append(np.argmax(logits, axis=-1))
            tokens = ids[-1][:, None]
        if advance_clock:
            self.core.advance_to(clock)
            self.core.counters.tokens += new_tokens * batch
            self.core.counters.busy_ns += clock - start
        else:
            for name, free_at_ns in saved_links.items():
                self.topology.links[name].free_at_ns = free_at_ns
        algorithms = {name: count - algorithms_start.get(name, 0) for name, count in group.algorithms.items()
                      if count > algorithms_start.get(name, 0)}
        return {"socket": self.name, "tokens": np.stack(ids, axis=1), "logits": np.stack(all_logits),
                "start_ns": start, "end_ns": clock, "grpc_bytes_sent": group.wire_bytes - wire_start,
                "algorithms": algorithms, "messages_lost": self.client.lost_messages}

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
        """Open the plane's streams to every other member of a group before it runs."""
        await self.client.connect([m for m in members if m != self.name])

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
