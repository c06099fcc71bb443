"""Sensitivity: change one machine number, and the model must move in the known direction by
about the known amount (these fail on a model whose knobs stand in for missing physics)."""

import pytest

from rdu.base import UserError
from rdu.node.cluster.platform import load_platform
from rdu.socket_actor.model_spec import load_model
from rdu.socket_actor.operators import decode_shapes, prefill_shape
from tests.helpers import group_for

MODEL = load_model("llama-2-7b")


def _cost(platform, overrides=None, mode=None, orchestration=None, tp=8):
    return group_for(platform, tp, overrides).cost_model(MODEL, mode, orchestration)


def _stream_ns(cost, shape):
    """A step without its fixed costs (launches, fill/drain, host work)."""
    parts = cost._step_parts(cost._design(shape))
    return float(parts["ops"][0])


def test_double_hbm_bandwidth_halves_a_bandwidth_bound_step():
    shape = decode_shapes([128], [2])
    base = _cost("sn40l-node", tp=1)
    fast = _cost("sn40l-node", {"socket.hbm.bandwidth_bytes_per_s": 3.6e12}, tp=1)
    assert _stream_ns(base, shape) / _stream_ns(fast, shape) == pytest.approx(2.0, rel=0.03)
    gpu, gpu_fast = _cost("dgx-h100", tp=1), _cost("dgx-h100", {"socket.hbm.bandwidth_bytes_per_s": 6.7e12}, tp=1)
    assert _stream_ns(gpu, shape) / _stream_ns(gpu_fast, shape) == pytest.approx(2.0, rel=0.05)


def test_halving_link_latency_speeds_latency_bound_decode_not_prefill():
    slow = _cost("sn40l-node")
    fast = _cost("sn40l-node", {"links.p2p.latency_ns": slow.socket and 75})
    decode = decode_shapes([128], [2])
    d_slow, d_fast = slow.steps(decode).total_ns, fast.steps(decode).total_ns
    # a fused layer streams its weights through the first all-reduce's latency; the latencies on
    # the critical path are each kernel's final collective: the embedding's and the 32 layers'
    # last all-reduce (14 ring steps each) and the logits' all-gather (7 steps), 75 ns saved per step
    assert d_slow - d_fast == (33 * 14 + 7) * 75
    # with kernel looping the next layer's weights stream meanwhile: only the pre/post kernels' remain
    looped = _cost("sn40l-node-looped")
    looped_fast = _cost("sn40l-node-looped", {"links.p2p.latency_ns": 75})
    assert looped.steps(decode).total_ns - looped_fast.steps(decode).total_ns == (14 + 7) * 75
    prefill = prefill_shape([4096] * 8)
    p_slow, p_fast = slow.steps(prefill).total_ns, fast.steps(prefill).total_ns
    assert (p_slow - p_fast) / p_slow < 1e-3
    assert (d_slow - d_fast) / d_slow > 20 * (p_slow - p_fast) / p_slow


def test_a_weight_stream_too_short_to_hide_latencies_puts_them_all_on_the_path():
    """With HBM 100x faster a layer's weights stream in well under one all-reduce's latency:
    nothing hides the first all-reduce any more, so halving the hop latency saves every hop."""
    fast_hbm = {"socket.hbm.bandwidth_bytes_per_s": 1.8e14}
    slow, fast = _cost("sn40l-node", fast_hbm), _cost("sn40l-node", {**fast_hbm, "links.p2p.latency_ns": 75})
    decode = decode_shapes([128], [2])
    assert slow.steps(decode).total_ns - fast.steps(decode).total_ns == pytest.approx((65 * 14 + 7) * 75, abs=40)


def test_sram_too_small_slows_a_fused_layer_by_its_spill_traffic():
    shape = prefill_shape([128])          # a short prefill: bound by streaming the weights
    base = _cost("sn40l-node")
    small = _cost("sn40l-node", {"socket.sram.capacity_bytes": 256 * 2**10})
    b, s = base.steps(shape, breakdown=True), small.steps(shape, breakdown=True)
    assert b.spill_bytes == 0 and s.spill_bytes > 0
    extra_ns = s.total_ns - b.total_ns
    assert extra_ns > 0
    # at most the spill at the fused kernel's HBM rate (less where compute already hides some of it)
    rate = base.socket.hbm.bandwidth_bytes_per_s * base.socket.fused_hbm_bandwidth_fraction / 1e9
    assert extra_ns <= s.spill_bytes / rate * 1.01
    # a decode step's working set is small: it does not care
    decode = decode_shapes([128], [2])
    assert small.steps(decode).total_ns == base.steps(decode).total_ns


def test_large_batches_and_long_prompts_spill_on_the_rdu():
    base = _cost("sn40l-node")
    small = base.steps(prefill_shape([512] * 2), breakdown=True).spill_bytes
    large = base.steps(prefill_shape([4096] * 32), breakdown=True).spill_bytes
    assert small == 0 and large > 0


def test_ddr_bandwidth_bounds_a_switch():
    model = load_model("llama-2-7b")
    base = group_for("sn40l-node", 8)
    slow = group_for("sn40l-node", 8, {"socket.ddr.bandwidth_bytes_per_s": 50e9})
    t_base = max(base.copy_in(base.shard_bytes(model), 0).values())
    t_slow = max(slow.copy_in(slow.shard_bytes(model), 0).values())
    assert t_slow / t_base == pytest.approx(125 / 50, rel=0.02)
    # concurrent copies into one socket share its DDR channel
    group = group_for("sn40l-node", 8, {"socket.ddr.bandwidth_bytes_per_s": 50e9})
    first = group.copy_in(10**9, 0, members=[group.members[0]])
    second = group.copy_in(10**9, 0, members=[group.members[0]])
    assert second[group.members[0]] >= 2 * (first[group.members[0]] - 1000)


def test_kernel_looping_pays_launch_and_fill_once_per_step():
    plain, looped = _cost("sn40l-node"), _cost("sn40l-node-looped")
    assert plain.kernel_calls == 34 and looped.kernel_calls == 3
    shape = decode_shapes([128], [2])
    saved = plain.steps(shape).total_ns - looped.steps(shape).total_ns
    per_call = plain.socket.launch_ns("HO") + plain.socket.fill_drain_ns
    # and each layer's final all-reduce latency, which the looped kernel hides behind the next
    # layer's weight stream (8 KiB per rank: start-up and 14 hops, a few microseconds)
    latency, _ = plain.ring.timed("all_reduce", 4096 * 2)
    assert 2_000 < float(latency) < 5_000
    assert saved == pytest.approx(31 * per_call + 32 * float(latency), abs=40)


@pytest.mark.parametrize("field, value", [
    ("socket:\n  efficiency:\n    fused_hbm_bandwidth_fraction", "0.9"),
    ("socket:\n  sram:\n    bandwidth_bytes_per_s", "1.0e+13"),
    ("socket:\n  execution:\n    fill_drain_ns", "1000"),
])
def test_a_field_that_changes_nothing_is_refused(tmp_path, field, value):
    path = tmp_path / "inert.yaml"
    path.write_text(f"base: dgx-h100\n{field}: {value}\n")
    with pytest.raises(UserError, match="changes nothing"):
        load_platform(str(path))
