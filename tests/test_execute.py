"""`SocketActor.execute`: a served batch (a static batch or a span of the continuous engine) run for
real on the socket actors of its TP group over the gRPC plane, timed by the nominal model: with
nothing contending the end is the start plus the cost model's busy time to the nanosecond, every
member agrees, the tokens are the reference's, and each socket's state digest is the one the
runtime's cache reaches by applying the same request; a link that loses messages makes the end
later by exactly one retransmission timeout per lost message."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rdu.interconnect.topology import Topology
from rdu.node.cluster.platform import load_platform
from rdu.node.cluster.ray_nodes import RayNodes
from rdu.socket_actor.command_log import digest
from rdu.socket_actor.core import RunRequest, SocketCore, SpanRequest
from rdu.socket_actor.functional_payload import OUTPUT_CAP, PROMPT_CAP, model_shards, reference, request_payload
from rdu.socket_actor.model_spec import load_model
from rdu.socket_actor.operators import shard_weight_bytes
from rdu.socket_actor.timed_run import request_schedule

MODEL_ID = "expert-7"
READY_NS = 5_000


def _requests(members: tuple[str, ...]) -> list[RunRequest | SpanRequest]:
    """A static batch, a span with chunks and decodes over several iterations, and a static batch
    again (run over a lossy link), each starting when the one before ends (start filled in)."""
    llama = load_model("llama-2-7b")
    return [
        RunRequest("run-1", MODEL_ID, llama, members, prompt_lens=(128, 40), output_lens=(7, 5), start_ns=0),
        SpanRequest("span-1", MODEL_ID, llama, members, start_ns=0, iterations=6, chunk_offsets=(0, 64),
                    chunk_lens=(48, 32), decode_contexts=(300, 21), next_contexts=(48, 301, 22), kv_bytes=1 << 28),
        RunRequest("run-2", MODEL_ID, llama, members, prompt_lens=(64,), output_lens=(9,), start_ns=0),
    ]


def test_payloads_and_schedules_are_derived_from_the_request():
    """A span's payload comes from its fields alone (one sequence per sequence of its first
    iteration, capped lengths); every step of a request is timed as the runtime's cache times it,
    and each functional step's plan adds up to its step's time."""
    spec = load_platform("sn40l-node").spec
    members = tuple(f"node0/socket{s}" for s in range(8))
    core = SocketCore(members[0], spec.socket, Topology(spec.links, 1, 8))
    run, span, _ = _requests(members)
    prompts, new_tokens = request_payload(span)
    assert prompts.shape == (4, min(PROMPT_CAP, 22)) and new_tokens == OUTPUT_CAP
    assert np.array_equal(request_payload(span)[0], prompts)
    assert request_payload(dataclasses.replace(span, iterations=2))[1] == 2
    for request, busy in ((run, core.timing(run).total_ns), (span, int(core.span_times(span)[0].sum()))):
        schedule = request_schedule(core, request, request_payload(request)[1])
        assert schedule.total_ns == busy and len(schedule.plans) == request_payload(request)[1]
        for plan, step_ns in zip(schedule.plans, schedule.step_ns):
            assert sum(plan.gaps_ns) + sum(c[2] for c in plan.collectives) == step_ns
            assert len(plan.collectives) == 66      # Llama-2-7B: embedding, 2 per layer, logits


@pytest.mark.ray
@pytest.mark.parametrize("nodes, per_node", [(1, 8), pytest.param(2, 4, marks=pytest.mark.scale)])   # 2x4: check-tp covers it too
def test_execute_runs_the_batch_and_lands_on_the_cost_model(ray_local, nodes, per_node):
    import ray

    spec = load_platform("sn40l-node", {"sockets_per_node": per_node}).spec
    cluster = RayNodes(spec, nodes)
    try:
        cluster.start()
        members = tuple(cluster.names)
        tp = len(members)
        shard_bytes = shard_weight_bytes(load_model("llama-2-7b"), tp)
        shards = model_shards(MODEL_ID, tp)
        ray.get([cluster.sockets[m].load.remote(MODEL_ID, shard_bytes, READY_NS, [ray.put(shards[r])])
                 for r, m in enumerate(members)])
        ray.get([cluster.sockets[m].connect.remote(list(members)) for m in members])
        # the runtime's cache: a core that applies the same commands with the analytic times
        cache = SocketCore(members[0], spec.socket, Topology(spec.links, nodes, per_node))
        cache.load(MODEL_ID, shard_bytes, READY_NS)
        rto = int(spec.links.retransmit_timeout_ns)
        lossy = (members[1], members[2])
        start = READY_NS
        for request in _requests(members):
            request = dataclasses.replace(request, start_ns=start)
            if request.job_id == "run-2":   # a link that loses messages both ways, for real
                for a, b in (lossy, lossy[::-1]):
                    ray.get(cluster.sockets[a].set_link_loss.remote(b, 0.3, 7))
            results = ray.get([cluster.sockets[m].execute.remote(request) for m in members])
            if isinstance(request, RunRequest):
                busy = cache.timing(request).total_ns
                steps = max(request.output_lens)
            else:
                busy = int(cache.span_times(request)[0].sum())
                steps = request.iterations
            lost = sum(r["messages_lost"] for r in results)
            owed = sum(r["owed_ns"] for r in results)   # losses of the group's last answers: charged next time
            late = lost * rto - owed
            assert {r["end_ns"] for r in results} == {start + busy + late}, request.job_id
            assert {r["busy_ns"] for r in results} == {busy + late}
            assert {r["analytic_ns"] for r in results} == {busy}
            assert {r["steps"] for r in results} == {steps}
            prompts, new_tokens = request_payload(request)
            assert {r["functional_steps"] for r in results} == {new_tokens} and new_tokens <= min(steps, OUTPUT_CAP)
            ids, logits = reference(MODEL_ID, prompts, new_tokens)
            for r in results:
                assert np.array_equal(r["tokens"], ids) and np.array_equal(r["prompts"], prompts)
                assert np.abs(r["logits"] - logits).max() <= 1e-4
            # the sockets' state is what the cache reaches with the same request and busy time
            if isinstance(request, RunRequest):
                cache.follow(request, busy + late)
            else:
                cache.run_span(request, busy + late)
            assert {r["digest"] for r in results} == {digest(cache)}
            if request.job_id == "run-2":
                assert lost > 0 and sum(r["messages_resent"] for r in results) >= lost
                assert {m for m, r in zip(members, results) if r["messages_lost"]} <= set(lossy)
            else:
                assert lost == 0 and late == 0
            start = cache.clock_ns
    finally:
        cluster.shutdown()
