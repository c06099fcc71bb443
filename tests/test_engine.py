"""The continuous serving engine (scheduler.kind: continuous) on the in-process backend."""

from dataclasses import asdict

import pytest

from rdu.scheduler.timeline import Evict

from rdu.base import Fields, UserError
from rdu.node.studies.estimate import estimate
from rdu.node.cluster.inline_backend import InlineCluster
from rdu.node.cluster.platform import load_platform
from rdu.scheduler.serving import CoEServer, ServingConfig
from rdu.scheduler.workloads import Request, Workload, WorkloadSpec, build_workload
from rdu.socket_actor.core import KV_ENTRY
from rdu.socket_actor.model_spec import load_model
from rdu.socket_actor.operators import shard_weight_bytes

LLAMA = load_model("llama-2-7b")
RANDOM = {"kind": "synthetic", "requests": 120, "rate_per_s": 20,
          "prompt_tokens": {"kind": "lognormal", "median": 300, "sigma": 1.0, "max": 3000},
          "output_tokens": {"kind": "uniform", "min": 1, "max": 120}}
CROWDED = {"kind": "synthetic", "requests": 120, "rate_per_s": 200,         # preempts on a 4 GB HBM
           "prompt_tokens": {"kind": "lognormal", "median": 600, "sigma": 0.8, "max": 4000},
           "output_tokens": {"kind": "uniform", "min": 50, "max": 600}}


def serve(platform="dgx-h100", experts=1, workload=None, seed=0, overrides=None, backend=None, **config):
    spec = load_platform(platform, overrides).spec
    if not isinstance(workload, Workload):
        fields = Fields(workload or {"kind": "trace", "limit": 300}, "test", "workload")
        workload = build_workload(WorkloadSpec.from_fields(fields), experts, seed)
    backend = backend or InlineCluster(spec, 1, 8)
    result = CoEServer(backend, LLAMA, experts, LLAMA, workload, ServingConfig(**config)).run()
    return result, backend


def _records(result):
    return sorted((asdict(r) for r in result.records), key=lambda r: r["id"])


@pytest.mark.parametrize("platform, experts, seed, config", [
    ("sn40l-node", 6, 0, {}),
    ("dgx-h100", 1, 1, {}),
    ("dgx-h100", 4, 2, {"max_num_batched_tokens": 512, "max_num_seqs": 16, "block_size": 8,
                        "model_selection": "oldest-first"}),
    ("dgx-h100", 1, 3, {"overrides": {"socket.hbm.capacity_bytes": "4 GB"}, "workload": CROWDED}),
    ("dgx-h100", 1, 3, {"overrides": {"socket.hbm.capacity_bytes": "4 GB"}, "workload": CROWDED,
                        "preemption": "swap"}),
])
def test_event_to_event_equals_one_iteration_at_a_time(platform, experts, seed, config):
    """Spans (k up to the next event) and forced k = 1 give the same summary and records, to the ns."""
    workload = config.pop("workload", RANDOM)
    spans, _ = serve(platform, experts, workload, seed, **config)
    steps, _ = serve(platform, experts, workload, seed, max_span_iterations=1, **config)
    assert spans.summary == steps.summary
    assert _records(spans) == _records(steps)
    assert spans.summary["iterations"] == steps.summary["iterations"]


def test_preemption_loses_nothing_and_kv_returns_to_zero():
    result, backend = serve(workload=CROWDED, overrides={"socket.hbm.capacity_bytes": "4 GB"}, seed=3)
    s = result.summary
    assert s["preemptions"] > 0
    assert sorted(r.id for r in result.records) == list(range(120)) and s["requests_duplicated"] == 0
    assert sum(r.preemptions for r in result.records) == s["preemptions"]
    assert all(r.e2e_ns >= r.ttft_ns > 0 for r in result.records)
    for core in backend.sockets.values():
        assert KV_ENTRY not in core.tiers.hbm
        assert core.tiers.hbm.peak_bytes > core.tiers.hbm.used_bytes   # the KV really was in the ledger


def test_swap_preemption_keeps_the_computed_tokens_and_pays_for_the_copies():
    """The same crowded load with swap: sequences resume where they were (no second prefill of
    what they had computed), their KV crossing the HBM <-> capacity-tier links both ways, and
    nothing is lost; recompute prefills the preempted tokens again instead."""
    crowded = {"socket.hbm.capacity_bytes": "4 GB"}
    swap, backend = serve("dgx-h100", 1, CROWDED, overrides=crowded, preemption="swap")
    recompute, _ = serve("dgx-h100", 1, CROWDED, overrides=crowded)
    sw, rc = swap.summary, recompute.summary
    assert sw["preemptions"] > 0 and rc["preemptions"] > 0
    assert sorted(r.id for r in swap.records) == list(range(120)) and sw["requests_duplicated"] == 0
    assert sw["swapped_bytes"] > 0 and rc["swapped_bytes"] == 0
    prefilled = lambda s: s["tokens_per_step"]["mean"] * s["iterations"]  # noqa: E731  tokens of every step
    assert prefilled(sw) < prefilled(rc)   # recompute prefills the preempted tokens again
    for core in backend.sockets.values():
        assert KV_ENTRY not in core.tiers.hbm


def test_a_swap_waits_for_its_copy_on_the_links():
    """A swapped-out sequence comes back only after its KV crossed the links: a slower copy path
    (capacity tier -> HBM) makes the swapping run slower, and leaves recompute as it was."""
    crowded = {"socket.hbm.capacity_bytes": "4 GB"}
    slow = {**crowded, "links.ddr_to_hbm.bandwidth_bytes_per_s": 2e9, "links.host_shared.bandwidth_bytes_per_s": 2e9}
    fast_swap, _ = serve("dgx-h100", 1, CROWDED, overrides=crowded, preemption="swap")
    slow_swap, _ = serve("dgx-h100", 1, CROWDED, overrides=slow, preemption="swap")
    assert slow_swap.summary["e2e_ns"]["mean"] > fast_swap.summary["e2e_ns"]["mean"]


@pytest.mark.parametrize("platform", ["dgx-h100", "sn40l-node"])
def test_light_load_equals_the_single_request_estimate(platform):
    """Requests far apart, one model: each one's TTFT and e2e are `rdu estimate`'s batch-1 numbers
    (the model is activated once: later requests do not pay the run set-up again)."""
    lengths = [(128, 20), (700, 5), (2000, 64), (50, 300)]
    requests = tuple(Request(i, i * 60_000_000_000, p, o, 0) for i, (p, o) in enumerate(lengths))
    result, _ = serve(platform, 1, Workload("synthetic", requests, 1, "far apart"), pinned_experts=(0,))
    setup = load_platform(platform).spec.socket.run_setup_ns
    for record in sorted(result.records, key=lambda r: r.id):
        p, o = lengths[record.id]
        e = estimate(load_platform(platform), LLAMA, 8, 1, p, o).data
        paid = setup if record.id > 0 else 0
        assert record.ttft_ns == pytest.approx(e["ttft_ns"] - paid, rel=0.01)
        assert record.e2e_ns == pytest.approx(e["total_ns"] - paid, rel=0.01)


def test_azure_code_trace_one_model_on_dgx_h100_keeps_up_where_static_saturates():
    workload = {"kind": "trace", "limit": 3000}
    continuous, _ = serve("dgx-h100", 1, workload)
    static, _ = serve("dgx-h100", 1, workload, kind="static")
    requests = continuous.records
    span_s = (max(r.arrival_ns for r in requests) - min(r.arrival_ns for r in requests)) / 1e9
    arrival_rate = (len(requests) - 1) / span_s
    c, s = continuous.summary, static.summary
    assert c["scheduler"] == "continuous" and s["scheduler"] == "static"
    assert c["throughput_requests_per_s"] == pytest.approx(arrival_rate, rel=0.02)
    assert c["ttft_ns"]["p99"] < 1e9                     # bounded: under a second
    assert s["ttft_ns"]["p99"] > 10 * c["ttft_ns"]["p99"]  # the static cycle queues behind itself
    assert c["itl_ns"]["p50"] > 0 and c["tokens_per_step"]["mean"] > 1


def test_coe_switches_in_the_background():
    """150 experts on one SN40L node: every request served, experts switched while others step."""
    workload = {"kind": "synthetic", "requests": 200, "rate_per_s": 5,
                "prompt_tokens": {"kind": "lognormal", "median": 800, "sigma": 0.6, "max": 6000},
                "output_tokens": {"kind": "uniform", "min": 20, "max": 300}}
    result, _ = serve("sn40l-node", 150, workload)
    s = result.summary
    assert sorted(r.id for r in result.records) == list(range(200)) and s["switches"] > 20
    # the experts resident at the end (switched in, not evicted) fit in HBM next to the router:
    # every switch beyond that evicted a model (a residency that lost count of either would not)
    spec = load_platform("sn40l-node").spec.socket
    fits = (spec.hbm.capacity_bytes - spec.hbm_reserved_bytes) // shard_weight_bytes(LLAMA, 8) - 1
    assert 0 < s["switches"] - s["evictions"] <= fits
    assert 0 < s["model_time_share"]["router"] < s["model_time_share"]["experts"]
    waits = [r.switch_wait_ns for r in result.records if not r.hbm_hit]
    assert waits and max(waits) > 0


def test_repeated_runs_are_identical():
    a, _ = serve("sn40l-node", 20, RANDOM, policy="prefetch")
    b, _ = serve("sn40l-node", 20, RANDOM, policy="prefetch")
    assert a.summary == b.summary and _records(a) == _records(b)


def test_slo_goodput_and_bad_configs():
    result, _ = serve(workload=RANDOM, slo_ttft_ms=50.0)
    slo = result.summary["slo"]
    assert 0 <= slo["attained"] <= 1 and slo["goodput_requests_per_s"] <= result.summary["throughput_requests_per_s"]
    for bad, match in (({"kind": "vllm"}, "scheduler.kind"), ({"max_num_seqs": 9000}, "max_num_seqs"),
                       ({"dispatch": "random"}, "scheduler.dispatch")):
        with pytest.raises(UserError, match=match):
            serve(workload=RANDOM, **bad)


@pytest.mark.ray
def test_ray_backend_gives_the_same_summary(ray_local):
    """The node runtime serves the partition against socket actors that confirm every command."""
    from rdu.node.cluster.ray_backend import RayCluster

    spec = load_platform("sn40l-node").spec
    fields = Fields(RANDOM, "test", "workload")
    workload = build_workload(WorkloadSpec.from_fields(fields), 6, 0)
    cluster = RayCluster(spec, 1, 8, flush_commands=64)
    cluster.launch()
    try:
        server = CoEServer(cluster, LLAMA, 6, LLAMA, workload, ServingConfig())
        on_ray = server.run()
        info = server.backend_info()
    finally:
        cluster.shutdown()
    inline, _ = serve("sn40l-node", 6, RANDOM)
    assert on_ray.summary == inline.summary and info["logs_confirmed"] == info["logs_sent"] > 0 and info["commands"] > 0


class _StubBackend:
    """Only what Residency calls: copies land 1 us after they start."""

    def __init__(self):
        self.evicted, self.kv = [], []

    def evict(self, group, model_id):
        self.evicted.append(model_id)

    def set_kv(self, group, kv_bytes):
        self.kv.append(kv_bytes)

    def copy_in(self, group, model_id, model, now):
        return {"node0/socket0": now + 1000}


def _residency(resident_shards=2):
    from rdu.scheduler.backend import GroupInfo
    from rdu.scheduler.kv import GroupMemory
    from rdu.scheduler.metrics import GroupStats
    from rdu.scheduler.policies import make_policy
    from rdu.scheduler.residency import Residency
    from rdu.socket_actor.operators import shard_weight_bytes

    shard = shard_weight_bytes(LLAMA, 1)
    info = GroupInfo(0, "group0", 0, ("node0/socket0",), resident_shards * shard + shard // 2)
    events, backend = [], _StubBackend()
    residency = Residency(backend, info, GroupMemory(info.hbm_usable_bytes, 16), make_policy("lru", [0, 1, 2, 3]),
                          LLAMA, LLAMA, GroupStats(name="group0", node=0, expert_slots=0), events.append)
    for key in range(resident_shards):
        assert residency.start(key, 0, set(), {}, prefetch=False) == 1000
    return residency, backend, events


def test_a_switch_evicts_a_waited_for_model_only_for_an_older_request():
    """The rule that stops a CoE under load from thrashing: expert 0's requests (oldest 5) are
    older than the switch's (10), expert 1's (50) younger: only expert 1 may go."""
    residency, backend, events = _residency()
    assert residency.start(2, 2000, set(), {0: 5, 1: 50}, prefetch=False, position=10) == 3000
    assert backend.evicted == ["expert0001"] and events[-1].victims == ["expert0001"]
    assert residency.start(3, 4000, set(), {0: 5, 2: 10}, prefetch=False, position=60) is None  # both older
    assert residency.start(3, 4000, {0}, {2: 70}, prefetch=False, position=60) is not None     # 2 is younger
    assert backend.evicted == ["expert0001", "expert0002"]


def test_making_room_for_kv_says_which_models_it_evicted():
    residency, backend, events = _residency()
    need = residency.memory.free_bytes + 1
    assert residency.make_room(need, {1}, {}, now=5000)
    assert backend.evicted == ["expert0000"]
    assert events[-1] == Evict(t_ns=5000, group="group0", models=["expert0000"], reason="room for KV",
                               kv_bytes_needed=need)
    assert not residency.make_room(residency.memory.free_bytes + 1, {1}, {}, now=6000)   # 1 is busy: no room
