import numpy as np
import pytest

from rdu.socket_actor.model_spec import load_model
from rdu.socket_actor.operators import PhaseShape, decode_shapes, prefill_shape
from tests.helpers import cost_model, group_for

CASES = [
    ("sn40l-node", "llama-2-7b", 8, "fused", "HO"), ("sn40l-node", "llama-2-7b", 8, "unfused", "SO"),
    ("sn40l-node", "mistral-7b", 4, "fused", "SO"), ("sn40l-node", "falcon-40b", 8, "unfused", "HO"),
    ("sn40l-node", "bloom-176b", 8, "fused", "HO"), ("sn40l-16", "llama-3.1-70b", 16, "fused", "HO"),
    ("sn40l-node", "llama-2-70b", 2, "unfused", "SO"), ("dgx-a100", "llama-2-7b", 8, "unfused", "SO"),
    ("dgx-h100", "llama-3.1-8b", 1, "unfused", "SO"), ("dgx-h100", "falcon-40b", 4, "unfused", "SO"),
    ("sn40l-node", "llama-3.1-405b", 8, "fused", "HO"),
]


@pytest.mark.parametrize("platform, model, tp, mode, orchestration", CASES)
def test_no_step_beats_its_roofline(platform, model, tp, mode, orchestration):
    """Property: over many random shapes, a step takes at least max(its flops / peak, its compulsory
    bytes / peak bandwidth): a fused kernel overlaps its operators, but never beyond the hardware;
    unfused, every operator instance alone respects its own roofline."""
    cost = cost_model(platform, model, tp, mode, orchestration)
    rng = np.random.default_rng(hash((platform, model, tp, mode)) % 2**32)
    for _ in range(20):
        batch = int(rng.integers(1, 64))
        prompts = rng.integers(1, 4096, size=batch)
        outputs = rng.integers(1, 256, size=batch)
        for shape in (prefill_shape(prompts, cost.model.sliding_window),
                      decode_shapes(prompts, outputs, cost.model.sliding_window)):
            if len(shape.matrix()) == 0:
                continue
            times, *_ = cost.row_times(shape)
            if mode == "unfused":
                assert (times >= cost.roofline_ns(shape) * (1 - 1e-12)).all()
            x = np.column_stack([np.ones(len(shape.matrix())), shape.matrix()])
            c = cost.compiled
            step_bound = np.maximum(x @ c.flops.T @ c.count / (cost.socket.peak_flops_per_s / 1e9),
                                    x @ c.compulsory_bytes.T @ c.count / (cost.socket.hbm.bandwidth_bytes_per_s / 1e9))
            assert (cost.steps(shape).step_ns >= step_bound * (1 - 1e-12)).all()
            assert (times > 0).any()


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
