"""Functional numerics: a scaled-down Llama-style decoder that really executes, in numpy fp32.

Same architecture as the nominal models (RMSNorm, RoPE, GQA attention with a KV cache, SwiGLU
MLP, vocab-parallel embedding and LM head), seeded random weights, a few layers of width 256.
`shard_weights` splits it for tensor parallelism (column-parallel Q/K/V, gate and up; row-parallel
output and down projections; vocab-parallel embedding and LM head).

`forward_shard` is a generator that *yields* each collective it needs (an all-reduce of a
partial sum, an all-gather of logits) and receives the result, so the same numerics run
in-process (`run_lockstep`, which sums the partials) or in socket actors that carry the partials
over the gRPC interconnect. With one shard it is the single-process reference.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import numpy as np

from rdu.base import UserError
from rdu.socket_actor.model_spec import ModelSpec

__all__ = ["TinyConfig", "Collective", "KVCache", "init_weights", "shard_weights", "forward_shard", "collective_kinds",
           "run_lockstep", "run_reference", "Shard"]


@dataclass(frozen=True)
class TinyConfig:
    """Architecture of the functional model (a miniature Llama)."""

    vocab_size: int = 1024
    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 16
    num_kv_heads: int = 8
    intermediate_size: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def model_spec(self) -> ModelSpec:
        """The same architecture as a `ModelSpec` (fp32), so the cost model can time it."""
        return ModelSpec(name="functional-tiny", family="llama", vocab_size=self.vocab_size,
                         hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
                         num_kv_heads=self.num_kv_heads, intermediate_size=self.intermediate_size, gated_mlp=True,
                         norm="rms", position="rope", parallel_attention=False, norms_per_layer=2,
                         linear_bias=False, tie_embeddings=False, embedding_norm=False, sliding_window=None,
                         max_position_embeddings=self.max_seq, dtype_bytes=4)

    def kv_heads_per_shard(self, tp: int) -> int:
        return max(self.num_kv_heads // tp, 1)

    def check_tp(self, tp: int) -> None:
        problems = []
        if self.num_heads % tp:
            problems.append(f"{self.num_heads} heads")
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            problems.append(f"{self.num_kv_heads} key/value heads")
        if self.intermediate_size % tp:
            problems.append(f"intermediate size {self.intermediate_size}")
        if self.vocab_size % tp:
            problems.append(f"vocabulary {self.vocab_size}")
        if problems:
            raise UserError(f"the functional model cannot be split over TP {tp}: {', '.join(problems)}")


@dataclass(frozen=True)
class Collective:
    """A collective a shard needs before it can go on: `kind` is all_reduce or all_gather."""

    kind: str
    tensor: np.ndarray
    label: str


@dataclass
class Shard:
    """One rank's weights plus the head bookkeeping its attention needs."""

    cfg: TinyConfig
    tp: int
    rank: int
    weights: dict[str, np.ndarray]
    kv_of_q: np.ndarray      # local KV-head index used by each local query head
    vocab_offset: int

    def nbytes(self) -> int:
        return int(sum(w.nbytes for w in self.weights.values()))


class KVCache:
    """Keys and values of a batch of equally long sequences, per layer, for one shard's KV heads."""

    def __init__(self, cfg: TinyConfig, kv_heads: int, batch: int = 1) -> None:
        shape = (cfg.num_layers, batch, kv_heads, cfg.max_seq, cfg.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.length = 0
        self.batch = batch
        self.max_seq = cfg.max_seq


def init_weights(cfg: TinyConfig, seed: int) -> dict[str, np.ndarray]:
    """Seeded random weights, scaled by 1/sqrt(fan-in) so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)

    weights = {"embed": rng.standard_normal((cfg.vocab_size, h)).astype(np.float32)}
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}."
        weights[p + "attn_norm"] = (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        weights[p + "wq"] = mat(h, cfg.num_heads * d)
        weights[p + "wk"] = mat(h, cfg.num_kv_heads * d)
        weights[p + "wv"] = mat(h, cfg.num_kv_heads * d)
        weights[p + "wo"] = mat(cfg.num_heads * d, h)
        weights[p + "mlp_norm"] = (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        weights[p + "w_gate"] = mat(h, f)
        weights[p + "w_up"] = mat(h, f)
        weights[p + "w_down"] = mat(f, h)
    weights["final_norm"] = (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)
    weights["lm_head"] = mat(h, cfg.vocab_size)
    return weights


def shard_weights(weights: dict[str, np.ndarray], cfg: TinyConfig, tp: int, rank: int) -> Shard:
    """Rank `rank`'s slice of the weights for tensor parallelism over `tp` ranks."""
    cfg.check_tp(tp)
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} outside TP {tp}")
    d = cfg.head_dim
    hq = cfg.num_heads // tp
    group = cfg.num_heads // cfg.num_kv_heads          # query heads per KV head
    q_heads = np.arange(rank * hq, (rank + 1) * hq)
    kv_needed = np.unique(q_heads // group)              # global KV heads this rank's queries use
    kv_of_q = np.searchsorted(kv_needed, q_heads // group)
    fs, vs = cfg.intermediate_size // tp, cfg.vocab_size // tp

    def head_cols(matrix: np.ndarray, heads: np.ndarray) -> np.ndarray:
        cols = (heads[:, None] * d + np.arange(d)[None, :]).ravel()
        return np.ascontiguousarray(matrix[:, cols])

    out: dict[str, np.ndarray] = {"embed": np.ascontiguousarray(weights["embed"][rank * vs:(rank + 1) * vs])}
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}."
        out[p + "attn_norm"] = weights[p + "attn_norm"].copy()
        out[p + "wq"] = head_cols(weights[p + "wq"], q_heads)
        out[p + "wk"] = head_cols(weights[p + "wk"], kv_needed)
        out[p + "wv"] = head_cols(weights[p + "wv"], kv_needed)
        rows = (q_heads[:, None] * d + np.arange(d)[None, :]).ravel()
        out[p + "wo"] = np.ascontiguousarray(weights[p + "wo"][rows])
        out[p + "mlp_norm"] = weights[p + "mlp_norm"].copy()
        out[p + "w_gate"] = np.ascontiguousarray(weights[p + "w_gate"][:, rank * fs:(rank + 1) * fs])
        out[p + "w_up"] = np.ascontiguousarray(weights[p + "w_up"][:, rank * fs:(rank + 1) * fs])
        out[p + "w_down"] = np.ascontiguousarray(weights[p + "w_down"][rank * fs:(rank + 1) * fs])
    out["final_norm"] = weights["final_norm"].copy()
    out["lm_head"] = np.ascontiguousarray(weights["lm_head"][:, rank * vs:(rank + 1) * vs])
    return Shard(cfg=cfg, tp=tp, rank=rank, weights=out, kv_of_q=kv_of_q, vocab_offset=rank * vs)


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, the mean formed as `np.mean` forms it (the sum, then
    divided by the count as an intp in place: the same bits) without its Python wrapper (one
    per norm, five norms per token, was measurable CPU per decoded token)."""
    mean = np.add.reduce(x * x, axis=-1, keepdims=True)
    np.true_divide(mean, np.intp(x.shape[-1]), out=mean, casting="unsafe")
    return (x / np.sqrt(mean + eps)) * weight


_ROPE_FREQS: dict[tuple[int, float], np.ndarray] = {}


def _rope_tables(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the rotary angles of `positions` (positions x 1 x head_dim / 2): the same
    for every head and layer of one forward pass, so computed once per pass (and the frequencies
    once per head size)."""
    freqs = _ROPE_FREQS.get((head_dim, theta))
    if freqs is None:
        freqs = _ROPE_FREQS[head_dim, theta] = theta ** (-np.arange(head_dim // 2, dtype=np.float32) * 2.0 / head_dim)
    angles = positions[:, None].astype(np.float32) * freqs[None, :]
    return np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]


def _rope(x: np.ndarray, tables: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Rotary embedding on (tokens, heads, head_dim), rotating the two halves of each head."""
    cos, sin = tables
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def forward_shard(shard: Shard, tokens: np.ndarray, cache: KVCache,
                  embedded: np.ndarray | None = None) -> Generator[Collective, np.ndarray, np.ndarray]:
    """Run `tokens` — shape (batch, new positions), or (new positions,) for one sequence — through
    one shard after what the cache holds; return the full-vocabulary logits of the last position
    of each sequence, shape (batch, vocab) (or (vocab,) for a 1-D input).

    Yields a `Collective` whenever the shard needs its partial combined with the other ranks'.
    `embedded` (batch x positions, hidden) is the tokens' embedding when the caller already has
    it (the sum the embedding all-reduce would form: then that collective is not yielded).

    Over 60 lines on purpose: it is one pass of the model, written straight through in the order
    of the reference implementation (embedding, per layer attention and MLP with their
    collectives, final norm, LM head) so that it can be read against it line by line; split up,
    the yields of the collectives would have to be threaded through every helper.
    """
    cfg, w = shard.cfg, shard.weights
    tokens = np.asarray(tokens, dtype=np.int64)
    single = tokens.ndim == 1
    tokens = tokens[None, :] if single else tokens
    b, n = tokens.shape
    d = cfg.head_dim
    start = cache.length
    if b != cache.batch:
        raise ValueError(f"{b} sequences for a cache of {cache.batch}")
    if start + n > cache.max_seq:
        raise UserError(f"the functional model holds {cache.max_seq} positions; {start + n} requested")
    if tokens.min(initial=0) < 0 or tokens.max(initial=0) >= cfg.vocab_size:
        raise UserError(f"token ids must be in [0, {cfg.vocab_size})")
    positions = np.arange(start, start + n)
    if embedded is not None:
        x = np.asarray(embedded, dtype=np.float32).reshape(b * n, cfg.hidden_size)
    else:
        local = (tokens - shard.vocab_offset).reshape(-1)
        mine = (local >= 0) & (local < w["embed"].shape[0])
        x_part = np.zeros((b * n, cfg.hidden_size), dtype=np.float32)
        x_part[mine] = w["embed"][local[mine]]
        x = yield Collective("all_reduce", x_part, "embedding")
    hq, hkv = len(shard.kv_of_q), w["layers.0.wk"].shape[1] // d
    causal = positions[:, None] >= np.arange(start + n)[None, :] if n > 1 else None   # one new position sees all
    rope = _rope_tables(positions if b == 1 else np.tile(positions, b), d, cfg.rope_theta)
    scale = np.float32(np.sqrt(d))
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}."
        xn = _rms_norm(x, w[p + "attn_norm"], cfg.norm_eps)
        q = _rope((xn @ w[p + "wq"]).reshape(b * n, hq, d), rope).reshape(b, n, hq, d)
        k = _rope((xn @ w[p + "wk"]).reshape(b * n, hkv, d), rope).reshape(b, n, hkv, d)
        v = (xn @ w[p + "wv"]).reshape(b, n, hkv, d)
        cache.k[layer, :, :, start:start + n] = k.transpose(0, 2, 1, 3)
        cache.v[layer, :, :, start:start + n] = v.transpose(0, 2, 1, 3)
        keys = cache.k[layer][:, shard.kv_of_q, :start + n]      # (b, hq, keys, d)
        values = cache.v[layer][:, shard.kv_of_q, :start + n]
        scores = np.einsum("bqhd,bhkd->bhqk", q, keys) / scale
        if causal is not None:
            scores = np.where(causal[None, None], scores, np.float32(-np.inf))
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        attn = np.einsum("bhqk,bhkd->bqhd", probs, values).reshape(b * n, hq * d)
        attn_sum = yield Collective("all_reduce", (attn @ w[p + "wo"]).astype(np.float32, copy=False),
                                    f"layer{layer}.attn")
        x = x + attn_sum
        hn = _rms_norm(x, w[p + "mlp_norm"], cfg.norm_eps)
        mlp = (_silu(hn @ w[p + "w_gate"]) * (hn @ w[p + "w_up"])) @ w[p + "w_down"]
        mlp_sum = yield Collective("all_reduce", mlp.astype(np.float32, copy=False), f"layer{layer}.mlp")
        x = x + mlp_sum
    cache.length = start + n
    last = x.reshape(b, n, -1)[:, -1]                             # only the last positions are decoded
    final = _rms_norm(last, w["final_norm"], cfg.norm_eps)
    logits = yield Collective("all_gather", (final @ w["lm_head"]).astype(np.float32, copy=False), "logits")
    return logits[0] if single else logits


def collective_kinds(cfg: TinyConfig) -> list[str]:
    """The kinds of the collectives `forward_shard` yields in one step, in order: the embedding,
    two per layer (attention, MLP), then the logits."""
    return ["all_reduce"] * (1 + 2 * cfg.num_layers) + ["all_gather"]


def run_lockstep(steps: list[Generator[Collective, np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Drive the shards of one TP group in-process: all-reduce = sum, all-gather = concatenation."""
    pending = [next(step) for step in steps]
    while True:
        kinds = {c.kind for c in pending}
        if len(kinds) != 1 or len({c.label for c in pending}) != 1:
            raise RuntimeError(f"ranks disagree on the next collective: {[c.label for c in pending]}")
        if pending[0].kind == "all_reduce":
            combined = [np.sum([c.tensor for c in pending], axis=0, dtype=np.float32)] * len(steps)
        else:
            combined = [np.concatenate([c.tensor for c in pending], axis=-1)] * len(steps)
        results, nxt = [], []
        for step, value in zip(steps, combined):
            try:
                nxt.append(step.send(value))
            except StopIteration as done:
                results.append(done.value)
        if results:
            if len(results) != len(steps):
                raise RuntimeError("ranks finished at different collectives")
            return results
        pending = nxt


def run_reference(weights: dict[str, np.ndarray], cfg: TinyConfig, prompts: np.ndarray,
                  new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy generation with the unsharded model for a batch of prompts of equal length
    (shape (batch, length), or (length,) for one): (generated ids (batch, new_tokens),
    logits (new_tokens, batch, vocab)); 1-D prompts drop the batch axis."""
    prompts = np.asarray(prompts)
    single = prompts.ndim == 1
    prompts = prompts[None, :] if single else prompts
    shard = shard_weights(weights, cfg, 1, 0)
    cache = KVCache(cfg, cfg.num_kv_heads, batch=len(prompts))
    tokens, all_logits, ids = prompts, [], []
    for _ in range(new_tokens):
        logits = run_lockstep([forward_shard(shard, tokens, cache)])[0]
        all_logits.append(logits)
        ids.append(np.argmax(logits, axis=-1))
        tokens = ids[-1][:, None]
    ids_array, logits_array = np.stack(ids, axis=1), np.stack(all_logits)
    if single:
        return ids_array[0], logits_array[:, 0]
    return ids_array, logits_array
