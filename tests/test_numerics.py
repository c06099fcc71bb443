import numpy as np
import pytest

from rdu.socket_actor.numerics import (KVCache, TinyConfig, forward_shard, init_weights, run_lockstep,
                                   run_reference, shard_weights)


@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16])
def test_sharded_forward_equals_unsharded(tp):
    cfg = TinyConfig()
    weights = init_weights(cfg, seed=7)
    prompt = np.array([3, 14, 15, 92, 65, 35, 89, 79])
    ids, reference = run_reference(weights, cfg, prompt, new_tokens=6)
    ids = ids.tolist()
    shards = [shard_weights(weights, cfg, tp, r) for r in range(tp)]
    assert sum(s.weights["layers.0.wq"].shape[1] for s in shards) == cfg.hidden_size
    caches = [KVCache(cfg, s.weights["layers.0.wk"].shape[1] // cfg.head_dim) for s in shards]
    tokens, worst, generated = prompt, 0.0, []
    for step in range(6):
        logits = run_lockstep([forward_shard(s, tokens, c) for s, c in zip(shards, caches)])
        worst = max(worst, float(np.abs(logits[0] - reference[step]).max()))
        generated.append(int(np.argmax(logits[0])))
        tokens = np.array([generated[-1]])
    assert worst <= 1e-5
    assert generated == ids


def test_batched_sequences_match_one_at_a_time():
    cfg = TinyConfig()
    weights = init_weights(cfg, seed=3)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(3, 5))
    ids, logits = run_reference(weights, cfg, prompts, new_tokens=4)
    for b in range(3):
        one_ids, one_logits = run_reference(weights, cfg, prompts[b], new_tokens=4)
        assert ids[b].tolist() == one_ids.tolist()
        assert np.abs(logits[:, b] - one_logits).max() <= 1e-5


def test_kv_cache_matches_full_recompute():
    cfg = TinyConfig(num_layers=1)
    weights = init_weights(cfg, seed=1)
    shard = shard_weights(weights, cfg, 1, 0)
    seq = np.array([5, 6, 7, 8, 9])
    full = run_lockstep([forward_shard(shard, seq, KVCache(cfg, cfg.num_kv_heads))])[0]
    cache = KVCache(cfg, cfg.num_kv_heads)
    run_lockstep([forward_shard(shard, seq[:3], cache)])
    last = run_lockstep([forward_shard(shard, seq[3:], cache)])[0]
    assert np.abs(last - full).max() <= 1e-5


def test_functional_model_is_timed_like_any_model():
    spec = TinyConfig().model_spec()
    layer = 256 * (16 + 2 * 8) * 16 + 16 * 16 * 256 + 3 * 256 * 512 + 2 * 256
    assert spec.params() == 2 * 1024 * 256 + 2 * layer + 256 and spec.dtype_bytes == 4


def test_functional_model_rejects_bad_tp():
    from rdu.base import UserError

    with pytest.raises(UserError, match="cannot be split over TP 3"):
        shard_weights(init_weights(TinyConfig(), 0), TinyConfig(), 3, 0)
