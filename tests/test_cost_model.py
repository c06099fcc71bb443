import numpy as np
import pytest

from rdu.node.cluster.platform import load_platform
from rdu.socket_actor.model_spec import load_model
from rdu.socket_actor.operators import PhaseShape, decode_shapes, prefill_shape, shard_weight_bytes
from tests.helpers import cost_model, group_for

CASES = [
    ("sn40l-node", "llama-2-7b", 8, "fused", "HO"), ("sn40l-node", "llama-2-7b", 8, "unfused", "SO"),
    ("sn40l-node", "mistral-7b", 4, "fused", "SO"), ("sn40l-node", "falcon-40b", 8, "unfused", "HO"),
    ("sn40l-node", "bloom-176b", 8, "fused", "HO"), ("sn40l-16", "llama-3.1-70b", 16, "fused", "HO"),
    ("sn40l-node", "llama-2-70b", 2, "unfused", "SO"), ("dgx-a100", "llama-2-7b", 8, "unfused", "SO"),
    ("dgx-h100", "llama-3.1-8b", 1, "unfused", "SO"), ("dgx-h100", "falcon-40b", 4, "unfused", "SO"),
    ("sn40l-node", "llama-3.1-405b", 8, "fused", "HO"),
]


def _cost(case: tuple, overrides: dict | None = None):
    platform, model, tp, mode, orchestration = case
    return group_for(platform, tp, overrides).cost_model(load_model(model), mode, orchestration)


def _random_steps(cost, seed: int, batches: int = 10):
    """Prefill and decode steps of random batches (1-63 sequences, prompts up to 4K tokens)."""
    rng = np.random.default_rng(seed)
    window = cost.model.sliding_window
    for _ in range(batches):
        batch = int(rng.integers(1, 64))
        prompts, outputs = rng.integers(1, 4096, size=batch), rng.integers(2, 256, size=batch)
        yield prefill_shape(prompts, window)
        yield decode_shapes(prompts, outputs, window)


# Properties of the physics, each of which a wrong cost model breaks (the roofline bound that
# stood here held by construction: every time is a max over flops / peak and bytes / bandwidth).

@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_faster_hbm_never_slows_a_step_and_speeds_up_a_small_decode(case):
    """Twice the HBM bandwidth: no step of any shape gets slower (a fused kernel whose visible
    collective latency grew as its weight stream shrank would), and a batch-1 decode, bound by
    streaming the weights, gets strictly faster (a model that ignores HBM traffic would not)."""
    base = _cost(case)
    fast = _cost(case, {"socket.hbm.bandwidth_bytes_per_s": 2 * base.socket.hbm.bandwidth_bytes_per_s})
    for shape in _random_steps(base, seed=1):
        assert (fast.steps(shape).step_ns <= base.steps(shape).step_ns).all()
    small = decode_shapes([128], [2])
    assert fast.steps(small).total_ns < base.steps(small).total_ns


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_more_compute_never_slows_a_step(case):
    base = _cost(case)
    fast = _cost(case, {"socket.peak_flops_per_s": 2 * base.socket.peak_flops_per_s})
    for shape in _random_steps(base, seed=2):
        assert (fast.steps(shape).step_ns <= base.steps(shape).step_ns).all()


@pytest.mark.parametrize("platform, mode", [("sn40l-node", "fused"), ("sn40l-node", "unfused"),
                                            ("dgx-a100", "unfused"), ("dgx-h100", "unfused")])
def test_a_long_prefill_on_one_socket_is_bound_by_compute(platform, mode):
    """4K tokens through Llama-2-7B on one socket (~55 TFLOP, no collective): twice the FLOPs
    makes it faster by a fifth at least (about half as long where nothing else bounds it; unfused
    on the RDU its attention round-trips HBM)."""
    case = (platform, "llama-2-7b", 1, mode, "SO")
    base = _cost(case)
    fast = _cost(case, {"socket.peak_flops_per_s": 2 * base.socket.peak_flops_per_s})
    shape = prefill_shape([4096])
    assert fast.steps(shape).total_ns < 0.8 * base.steps(shape).total_ns


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_a_decode_step_grows_with_the_context(case):
    """More cached tokens to read never make a decode step faster; 128 -> 4,000 makes it slower."""
    cost = _cost(case)
    contexts = [1, 16, 128, 512, 1024, 2048, 4000]
    times = [cost.steps(decode_shapes([c] * 4, [2] * 4)).total_ns for c in contexts]
    assert times == sorted(times) and times[-1] > times[2]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_a_decode_step_reads_the_weights_once_whatever_the_batch(case):
    """Per-step HBM bytes are weights (once) + a part per sequence: the part independent of the
    batch, 2 x bytes(batch 1) - bytes(batch 2), is exactly the socket's weight shard, less the
    input embedding table when it is not tied to the output head (a decode step gathers one row
    of it per token). A model that read the weights per sequence, or missed the output head,
    would not match."""
    cost = _cost(case)
    model = cost.model
    one = cost.steps(decode_shapes([512], [2]), breakdown=True).hbm_bytes
    two = cost.steps(decode_shapes([512] * 2, [2] * 2), breakdown=True).hbm_bytes
    embedding_bytes = -(-model.vocab_size // cost.tp) * model.hidden_size * model.dtype_bytes
    streamed = cost.shard_bytes() - (0 if model.tie_embeddings else embedding_bytes)
    assert 2 * one - two == pytest.approx(streamed, rel=1e-9)


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3.1-8b", "mistral-7b"])
def test_tensor_parallel_shards_divide_the_weights_exactly(name):
    """Over TP t, the t sockets together hold the model once plus t - 1 more copies of what is
    replicated (the norms), to the byte; one socket holds the whole model."""
    model = load_model(name)
    replicated = (model.num_layers * model.norms_per_layer + 1 + bool(model.embedding_norm)) * model.norm_params
    whole = shard_weight_bytes(model, 1)
    assert whole == model.weight_bytes() == model.params() * model.dtype_bytes
    for tp in (2, 4, 8):
        assert tp * shard_weight_bytes(model, tp) - whole == (tp - 1) * replicated * model.dtype_bytes


FUSABLE = [("sn40l-node", "llama-2-7b", 8), ("sn40l-node", "mistral-7b", 4), ("sn40l-node", "falcon-40b", 8),
           ("sn40l-node", "bloom-176b", 8), ("sn40l-16", "llama-3.1-70b", 16), ("sn40l-node", "llama-2-70b", 2),
           ("sn40l-node-looped", "llama-2-7b", 8), ("sn40l-node", "llama-2-7b", 1)]


@pytest.mark.parametrize("platform, model, tp", FUSABLE)
def test_fusion_never_moves_more_hbm_bytes_nor_takes_longer(platform, model, tp):
    """Fused and unfused run the same operators: fusing keeps intermediates on chip and reads
    the weights once, so for any shape it moves at most the unfused HBM bytes (SRAM spill
    included) and takes at most the unfused time (same orchestration)."""
    fused, unfused = (_cost((platform, model, tp, mode, "HO")) for mode in ("fused", "unfused"))
    for shape in _random_steps(fused, seed=3):
        f, u = fused.steps(shape, breakdown=True), unfused.steps(shape, breakdown=True)
        assert f.hbm_bytes <= u.hbm_bytes
        assert (f.step_ns <= u.step_ns).all()


@pytest.mark.parametrize("platform, mode", [("sn40l-node", "fused"), ("sn40l-node", "unfused"),
                                            ("dgx-h100", "unfused")])
def test_one_socket_pays_no_collective_and_eight_pay_their_links(platform, mode):
    """Slower links (10x the hop latency and the collective start-up, a tenth of the bandwidth)
    change nothing at TP 1, which has no collective, and slow every TP 8 decode step."""
    slow = {"links.p2p.latency_ns": 10 * load_platform(platform).spec.links.p2p.latency_ns,
            "links.collective.startup_ns": 10 * load_platform(platform).spec.links.collective.startup_ns,
            "links.p2p.bandwidth_bytes_per_s": load_platform(platform).spec.links.p2p.bandwidth_bytes_per_s / 10}
    one, one_slow = _cost((platform, "llama-2-7b", 1, mode, "SO")), _cost((platform, "llama-2-7b", 1, mode, "SO"), slow)
    for shape in _random_steps(one, seed=4, batches=4):
        assert (one_slow.steps(shape).step_ns == one.steps(shape).step_ns).all()
    eight, eight_slow = _cost((platform, "llama-2-7b", 8, mode, "SO")), _cost((platform, "llama-2-7b", 8, mode, "SO"),
                                                                              slow)
    decode = decode_shapes([100, 700, 3000], [40, 10, 5])
    assert (eight_slow.steps(decode).step_ns > eight.steps(decode).step_ns).all()


def test_breakdown_adds_up():
    cost = cost_model("sn40l-node", "llama-2-7b", 8)
    gen = cost.generate([512, 300], [40, 10], breakdown=True)
    for phase in (gen.prefill, gen.decode):
        assert sum(phase.class_ns.values()) == pytest.approx(phase.total_ns, rel=1e-6, abs=len(phase.step_ns))
    assert gen.finish_ns[0] == gen.total_ns and gen.finish_ns[1] < gen.finish_ns[0]


def test_decode_slows_with_context_and_prefill_with_prompt():
    cost = cost_model("sn40l-node", "llama-2-7b", 8, "unfused", "SO")
    steps = cost.decode([100], [500]).step_ns
    assert (np.diff(steps) >= 0).all() and steps[-1] > steps[0]
    assert cost.prefill([4096]).total_ns > cost.prefill([128]).total_ns


def test_sliding_window_caps_attention():
    shape = decode_shapes([8000], [3], window=4096)
    assert shape.kv_read_tokens.tolist() == [4095, 4095]
    assert prefill_shape([5], window=2).attn_pairs.tolist() == [1 + 2 + 2 + 2 + 2]


def test_fusion_reads_weights_once_and_keeps_activations_on_chip():
    fused = cost_model("sn40l-node", "llama-2-7b", 8, "fused", "HO")
    unfused = cost_model("sn40l-node", "llama-2-7b", 8, "unfused", "HO")
    f = fused.steps(decode_shapes([1000], [2]), breakdown=True)
    u = unfused.steps(decode_shapes([1000], [2]), breakdown=True)
    weights = fused.shard_bytes()
    assert weights < f.hbm_bytes < u.hbm_bytes
    assert f.kernels == 34 and u.kernels > 400


def test_switch_ratios_reproduce_the_paper():
    """Model switching: 31x over DGX A100 and 15-16x over DGX H100 from preset numbers alone."""
    model = load_model("llama-2-7b")

    def switch_ns(platform):
        group = group_for(platform, 8)
        return max(group.copy_in(group.shard_bytes(model), 0).values())

    sn, a100, h100 = switch_ns("sn40l-node"), switch_ns("dgx-a100"), switch_ns("dgx-h100")
    assert a100 / sn == pytest.approx(31, rel=0.05)
    assert 15 <= h100 / sn <= 16
    assert sn / 1e6 == pytest.approx(13.5, rel=0.02)


def test_fused_vs_unfused_decode_in_paper_range():
    fused = cost_model("sn40l-node", "llama-2-7b", 8, "fused", "SO").generate([128], [20])
    unfused = cost_model("sn40l-node", "llama-2-7b", 8, "unfused", "SO").generate([128], [20])
    assert 1.0 <= unfused.decode.total_ns / fused.decode.total_ns <= 13.0


def test_gpu_cannot_fuse_or_hardware_orchestrate():
    from rdu.base import UserError

    with pytest.raises(UserError, match="cannot run fused"):
        cost_model("dgx-a100", "llama-2-7b", 8, "fused", "SO")
    with pytest.raises(UserError, match="no hardware-orchestrated"):
        cost_model("dgx-a100", "llama-2-7b", 8, "unfused", "HO")


def test_tp_must_split_heads():
    from rdu.base import UserError
    from rdu.socket_actor.operators import build_step_graph

    assert cost_model("sn40l-16", "falcon-40b", 16).compiled  # 8 key/value heads replicate over 16
    base = load_model("llama-2-7b").to_dict()
    odd = load_model("llama-2-7b").__class__(**{**base, "num_heads": 12, "num_kv_heads": 12, "hidden_size": 4080})
    with pytest.raises(UserError, match="12 attention heads cannot be split over TP 8"):
        build_step_graph(odd, 8, PhaseShape(*[np.ones(1)] * 5))


def test_run_setup_is_charged_only_when_asked():
    """The expert-only claim times execution alone; a run that activates its model pays the set-up once."""
    cost = cost_model("sn40l-node", "llama-2-7b", 8)
    with_setup = cost.generate([128], [20])
    without = cost.generate([128], [20], setup=False)
    assert cost.socket.run_setup_ns > 0
    assert abs(with_setup.total_ns - without.total_ns - cost.socket.run_setup_ns) <= 1
    assert without.decode.total_ns == with_setup.decode.total_ns
    detailed = cost.generate([128], [20], breakdown=True, setup=False)
    assert "setup" not in detailed.prefill.class_ns and detailed.total_ns == without.total_ns
