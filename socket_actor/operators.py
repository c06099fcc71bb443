"""The operator graph of one decoding step, per socket of a tensor-parallel group.

A step is `pre` operators (vocab-parallel embedding and its all-reduce), `num_layers` copies of
the decoder layer, and `post` operators (final norm, LM head, gather of the logits). Operators
read and write named tensors; a tensor is *persistent* if it lives in HBM whatever the kernel
boundaries are (weights are implicit, the KV cache and the logits handed to the host are named).
Whether any other tensor touches HBM is decided later by the kernel plan (`cost_model`), with
one rule: a kernel reads from HBM what it did not produce and writes to HBM what somebody
outside it reads.

Sizes are affine in the `PhaseShape` of the step (tokens, sequences, attention pairs, ...), so
the cost model can compile a graph once and evaluate thousands of steps with one matrix product.
Column-parallel: QKV, gate/up, LM head (vocab). Row-parallel: output and down projections,
followed by an all-reduce. Key/value heads are split when the TP degree divides their count and
replicated when it is a multiple of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rdu.base import UserError
from rdu.socket_actor.model_spec import ModelSpec

__all__ = ["PhaseShape", "Operator", "StepGraph", "build_step_graph", "shard_weight_bytes",
           "prefill_shape", "decode_shapes", "decode_step_shape", "kv_bytes_per_token_per_socket", "SHAPE_KEYS",
           "OPERATOR_CLASSES"]

SHAPE_KEYS = ("tokens", "seqs", "attn_pairs", "score_elems", "kv_read_tokens")
OPERATOR_CLASSES = ("embedding", "norm", "matmul", "attention", "elementwise", "collective", "launch", "pipeline", "host",
                    "setup")

# floating-point operations per element of the non-matmul operators (order of magnitude suffices:
# these operators are bound by memory traffic, not arithmetic)
_NORM_FLOPS_PER_ELEM = 4
_ROPE_FLOPS_PER_ELEM = 6
_SOFTMAX_FLOPS_PER_ELEM = 5
_ACT_FLOPS_PER_ELEM = 5
_ID_BYTES = 4
_LOGIT_BYTES = 4


@dataclass(frozen=True)
class PhaseShape:
    """What one step processes, summed over the sequences of the batch (scalars or arrays).

    tokens: new tokens; seqs: sequences; attn_pairs: (query, key) pairs attended, causal and
    window-capped; score_elems: query x key rectangle an eager implementation materialises;
    kv_read_tokens: cached positions read from the KV cache.
    """

    tokens: np.ndarray
    seqs: np.ndarray
    attn_pairs: np.ndarray
    score_elems: np.ndarray
    kv_read_tokens: np.ndarray

    def matrix(self) -> np.ndarray:
        """Rows = steps, columns = SHAPE_KEYS."""
        return np.array([self.tokens, self.seqs, self.attn_pairs, self.score_elems, self.kv_read_tokens],
                        dtype=np.float64).reshape(len(SHAPE_KEYS), -1).T


@dataclass
class Operator:
    """One operator instance: arithmetic, weights it streams, tensors it reads and writes."""

    name: str
    cls: str
    scope: str                     # "pre", "layer" or "post"
    layer: int                     # layer index, -1 outside the decoder layers
    flops: np.ndarray
    weight_bytes: np.ndarray
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    collective: str | None = None  # "all_reduce" / "all_gather"
    collective_bytes: np.ndarray | float = 0.0


@dataclass
class StepGraph:
    """The unrolled operators of one step and the byte size of every tensor they touch."""

    ops: list[Operator]
    tensor_bytes: dict[str, np.ndarray]
    persistent: set[str] = field(default_factory=set)


def _heads_per_socket(model: ModelSpec, tp: int) -> tuple[int, int]:
    if model.num_heads % tp:
        raise UserError(f"{model.name}: {model.num_heads} attention heads cannot be split over TP {tp}")
    if model.num_kv_heads % tp == 0:
        kv = model.num_kv_heads // tp
    elif tp % model.num_kv_heads == 0:
        kv = 1  # each key/value head replicated on tp / num_kv_heads sockets
    else:
        raise UserError(f"{model.name}: {model.num_kv_heads} key/value heads cannot be split or replicated "
                        f"over TP {tp}")
    return model.num_heads // tp, kv


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def shard_weight_bytes(model: ModelSpec, tp: int) -> int:
    """Weight bytes one socket of a TP group holds: sharded matrices plus replicated norms/biases."""
    hq, hkv = _heads_per_socket(model, tp)
    h, d, e = model.hidden_size, model.head_dim, model.dtype_bytes
    fs = _ceil_div(model.intermediate_size, tp)
    vs = _ceil_div(model.vocab_size, tp)
    mlp_in = (2 if model.gated_mlp else 1) * fs
    layer = h * (hq + 2 * hkv) * d + hq * d * h + h * mlp_in + fs * h
    if model.linear_bias:
        layer += (hq + 2 * hkv) * d + mlp_in + 2 * h  # column biases sharded, row biases replicated
    layer += model.norms_per_layer * model.norm_params
    total = model.num_layers * layer + vs * h + model.norm_params
    if model.embedding_norm:
        total += model.norm_params
    if not model.tie_embeddings:
        total += vs * h
    return total * e


@dataclass(frozen=True)
class _StepDims:
    """One socket's share of a step: head counts, widths (elements), bytes per element, the shape's
    variables as float arrays and the weight bytes of the sharded matrices of one layer."""

    heads: int
    kv_heads: int
    hidden: int
    head_dim: int
    dtype_bytes: int
    ffn: int                    # intermediate size on this socket
    vocab: int                  # vocabulary rows on this socket
    mlp_in: int                 # gate + up (gated MLP) or up width on this socket
    tokens: np.ndarray
    seqs: np.ndarray
    attn_pairs: np.ndarray
    score_elems: np.ndarray
    kv_read_tokens: np.ndarray
    zero: np.ndarray            # broadcasts every size to the shape's length
    norm_weight_bytes: np.ndarray
    qkv_weight_bytes: int
    o_weight_bytes: int
    up_weight_bytes: int
    down_weight_bytes: int


def _step_dims(model: ModelSpec, tp: int, shape: PhaseShape) -> _StepDims:
    """The sizes every operator of the step is written in."""
    hq, hkv = _heads_per_socket(model, tp)
    h, d, e = model.hidden_size, model.head_dim, model.dtype_bytes
    fs = _ceil_div(model.intermediate_size, tp)
    T = np.asarray(shape.tokens, float)
    zero = T * 0.0
    bias = model.linear_bias
    mlp_in = (2 if model.gated_mlp else 1) * fs
    return _StepDims(
        heads=hq, kv_heads=hkv, hidden=h, head_dim=d, dtype_bytes=e, ffn=fs,
        vocab=_ceil_div(model.vocab_size, tp), mlp_in=mlp_in,
        tokens=T, seqs=np.asarray(shape.seqs, float), attn_pairs=np.asarray(shape.attn_pairs, float),
        score_elems=np.asarray(shape.score_elems, float), kv_read_tokens=np.asarray(shape.kv_read_tokens, float),
        zero=zero, norm_weight_bytes=model.norm_params * e + zero,
        qkv_weight_bytes=h * (hq + 2 * hkv) * d * e + (bias * (hq + 2 * hkv) * d * e),
        o_weight_bytes=hq * d * h * e + bias * h * e,
        up_weight_bytes=h * mlp_in * e + bias * mlp_in * e,
        down_weight_bytes=fs * h * e + bias * h * e,
    )


class _GraphBuilder:
    """Collects operators and the tensors they touch in graph order, every size broadcast to the
    shape's length."""

    def __init__(self, zero: np.ndarray) -> None:
        self.zero = zero
        self.ops: list[Operator] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.persistent: set[str] = set()

    def op(self, name: str, cls: str, scope: str, layer: int, flops, weights, reads: list[str], writes: list[str],
           collective: str | None = None, coll_bytes=0.0) -> None:
        self.ops.append(Operator(name, cls, scope, layer, flops + self.zero, weights + self.zero, tuple(reads),
                                 tuple(writes), collective, coll_bytes))

    def act(self, name: str, size_bytes) -> str:
        self.tensors[name] = size_bytes + self.zero
        return name

    def graph(self) -> StepGraph:
        return StepGraph(ops=self.ops, tensor_bytes=self.tensors, persistent=self.persistent)


def _add_embedding(g: _GraphBuilder, model: ModelSpec, tp: int, s: _StepDims) -> None:
    """pre: vocab-parallel embedding, then the all-reduce that assembles each row."""
    T, h, e, zero = s.tokens, s.hidden, s.dtype_bytes, s.zero
    ids = g.act("ids", T * _ID_BYTES)
    g.persistent.add(ids)
    emb = g.act("emb_part", T * h * e)
    x0 = g.act("emb_sum" if model.embedding_norm else "x@0", T * h * e)
    g.op("embedding", "embedding", "pre", -1, zero, T * h * e / tp, [ids], [emb])
    g.op("embed_all_reduce", "collective", "pre", -1, zero, zero, [emb], [x0], "all_reduce", T * h * e)
    if model.embedding_norm:
        g.op("embed_norm", "norm", "pre", -1, _NORM_FLOPS_PER_ELEM * T * h, s.norm_weight_bytes, [x0],
             [g.act("x@0", T * h * e)])


def _add_attention(g: _GraphBuilder, model: ModelSpec, s: _StepDims, layer: int) -> tuple[str, str]:
    """Input norm, QKV projection, position encoding, attention and output projection of one
    layer; returns the normed input and this socket's partial output (before any all-reduce)."""
    T, h, d, e, zero = s.tokens, s.hidden, s.head_dim, s.dtype_bytes, s.zero
    hq, hkv, kv_read, pairs = s.heads, s.kv_heads, s.kv_read_tokens, s.attn_pairs

    def t(name: str) -> str:
        return f"{name}@{layer}"

    xn = g.act(t("xn"), T * h * e)
    g.op("input_norm", "norm", "layer", layer, _NORM_FLOPS_PER_ELEM * T * h, s.norm_weight_bytes, [t("x")], [xn])
    qkv = g.act(t("qkv"), T * (hq + 2 * hkv) * d * e)
    g.op("qkv_proj", "matmul", "layer", layer, 2 * T * h * (hq + 2 * hkv) * d, s.qkv_weight_bytes, [xn], [qkv])
    q = g.act(t("q"), T * hq * d * e)
    k_new, v_new = g.act(t("k_new"), T * hkv * d * e), g.act(t("v_new"), T * hkv * d * e)
    k_past, v_past = g.act(t("k_past"), kv_read * hkv * d * e), g.act(t("v_past"), kv_read * hkv * d * e)
    g.persistent.update({k_new, v_new, k_past, v_past})
    if model.position == "rope":
        g.op("rope", "elementwise", "layer", layer, _ROPE_FLOPS_PER_ELEM * T * (hq + hkv) * d, zero,
             [qkv], [q, k_new, v_new])
    else:
        g.op("qkv_split", "elementwise", "layer", layer, zero, zero, [qkv], [q, k_new, v_new])
    if hq > hkv:  # eager GQA materialises the key/value heads once per query head
        keys = [g.act(t("k_exp"), (kv_read + T) * hq * d * e)]
        values = [g.act(t("v_exp"), (kv_read + T) * hq * d * e)]
        g.op("kv_repeat", "attention", "layer", layer, zero, zero, [k_new, k_past, v_new, v_past], keys + values)
    else:
        keys, values = [k_new, k_past], [v_new, v_past]
    sc = g.act(t("scores"), s.score_elems * hq * e)
    g.op("attn_scores", "attention", "layer", layer, 2 * pairs * hq * d, zero, [q] + keys, [sc])
    pr = g.act(t("probs"), s.score_elems * hq * e)
    g.op("attn_softmax", "attention", "layer", layer, _SOFTMAX_FLOPS_PER_ELEM * pairs * hq, zero, [sc], [pr])
    ctx = g.act(t("attn"), T * hq * d * e)
    g.op("attn_context", "attention", "layer", layer, 2 * pairs * hq * d, zero, [pr] + values, [ctx])
    o_part = g.act(t("o_part"), T * h * e)
    g.op("o_proj", "matmul", "layer", layer, 2 * T * hq * d * h, s.o_weight_bytes, [ctx], [o_part])
    return xn, o_part


def _add_mlp_input(g: _GraphBuilder, model: ModelSpec, s: _StepDims, layer: int, xn: str,
                   o_part: str) -> tuple[str, str | None]:
    """What the MLP reads: with parallel attention the layer input (normed again if the layer has
    two norms); otherwise the attention's residual sum, all-reduced and normed. Returns it and that
    residual sum (None with parallel attention)."""
    T, h, e, zero = s.tokens, s.hidden, s.dtype_bytes, s.zero
    x = f"x@{layer}"
    if model.parallel_attention:
        if model.norms_per_layer != 2:
            return xn, None
        mlp_input = g.act(f"xm@{layer}", T * h * e)
        g.op("mlp_norm", "norm", "layer", layer, _NORM_FLOPS_PER_ELEM * T * h, s.norm_weight_bytes, [x], [mlp_input])
        return mlp_input, None
    o_sum = g.act(f"o_sum@{layer}", T * h * e)
    g.op("attn_all_reduce", "collective", "layer", layer, zero, zero, [o_part], [o_sum], "all_reduce", T * h * e)
    h1 = g.act(f"h1@{layer}", T * h * e)
    g.op("attn_residual", "elementwise", "layer", layer, T * h, zero, [x, o_sum], [h1])
    mlp_input = g.act(f"h1n@{layer}", T * h * e)
    g.op("post_norm", "norm", "layer", layer, _NORM_FLOPS_PER_ELEM * T * h, s.norm_weight_bytes, [h1], [mlp_input])
    return mlp_input, h1


def _add_mlp(g: _GraphBuilder, s: _StepDims, layer: int, mlp_input: str) -> str:
    """Gate/up projection, activation and down projection; returns this socket's partial output."""
    T, h, e, fs, zero = s.tokens, s.hidden, s.dtype_bytes, s.ffn, s.zero
    gu = g.act(f"gate_up@{layer}", T * s.mlp_in * e)
    g.op("gate_up_proj", "matmul", "layer", layer, 2 * T * h * s.mlp_in, s.up_weight_bytes, [mlp_input], [gu])
    a = g.act(f"mlp_act@{layer}", T * fs * e)
    g.op("mlp_act", "elementwise", "layer", layer, _ACT_FLOPS_PER_ELEM * T * fs, zero, [gu], [a])
    d_part = g.act(f"down_part@{layer}", T * h * e)
    g.op("down_proj", "matmul", "layer", layer, 2 * T * fs * h, s.down_weight_bytes, [a], [d_part])
    return d_part


def _add_layer_output(g: _GraphBuilder, model: ModelSpec, s: _StepDims, layer: int, o_part: str, d_part: str,
                      h1: str | None) -> None:
    """The all-reduce(s) of the row-parallel outputs and the residual that writes the next layer's
    input: one all-reduce of both branches' sum with parallel attention, else the MLP's."""
    T, h, e, zero = s.tokens, s.hidden, s.dtype_bytes, s.zero
    x, out = f"x@{layer}", f"x@{layer + 1}"
    if model.parallel_attention:
        p_part = g.act(f"sum_part@{layer}", T * h * e)
        g.op("branch_add", "elementwise", "layer", layer, T * h, zero, [o_part, d_part], [p_part])
        p_sum = g.act(f"sum@{layer}", T * h * e)
        g.op("layer_all_reduce", "collective", "layer", layer, zero, zero, [p_part], [p_sum], "all_reduce",
             T * h * e)
        g.op("residual", "elementwise", "layer", layer, T * h, zero, [x, p_sum], [out])
    else:
        d_sum = g.act(f"down_sum@{layer}", T * h * e)
        g.op("mlp_all_reduce", "collective", "layer", layer, zero, zero, [d_part], [d_sum], "all_reduce",
             T * h * e)
        g.op("mlp_residual", "elementwise", "layer", layer, T * h, zero, [h1, d_sum], [out])


def _add_layer(g: _GraphBuilder, model: ModelSpec, s: _StepDims, layer: int) -> None:
    """One decoder layer, from its input x@layer to x@layer+1."""
    # the last layer keeps only the rows the LM head needs (last position of each sequence)
    g.act(f"x@{layer + 1}", (s.seqs if layer == model.num_layers - 1 else s.tokens) * s.hidden * s.dtype_bytes)
    xn, o_part = _add_attention(g, model, s, layer)
    mlp_input, h1 = _add_mlp_input(g, model, s, layer, xn, o_part)
    d_part = _add_mlp(g, s, layer, mlp_input)
    _add_layer_output(g, model, s, layer, o_part, d_part, h1)


def _add_lm_head(g: _GraphBuilder, model: ModelSpec, s: _StepDims) -> None:
    """post: only the last position of each sequence goes through the final norm and the LM head;
    the vocab-parallel logits are gathered for the host."""
    B, h, e, vs, zero = s.seqs, s.hidden, s.dtype_bytes, s.vocab, s.zero
    final = g.act("final", B * h * e)
    g.op("final_norm", "norm", "post", -1, _NORM_FLOPS_PER_ELEM * B * h, s.norm_weight_bytes,
         [f"x@{model.num_layers}"], [final])
    logits_part = g.act("logits_part", B * vs * e)
    g.op("lm_head", "matmul", "post", -1, 2 * B * h * vs, h * vs * e, [final], [logits_part])
    logits = g.act("logits", B * model.vocab_size * _LOGIT_BYTES)
    g.persistent.add(logits)
    g.op("logits_all_gather", "collective", "post", -1, zero, zero, [logits_part], [logits], "all_gather",
         B * model.vocab_size * e)


def build_step_graph(model: ModelSpec, tp: int, shape: PhaseShape) -> StepGraph:
    """Operators and tensor sizes of one step; `shape` fields may be arrays (evaluated elementwise)."""
    dims = _step_dims(model, tp, shape)
    g = _GraphBuilder(dims.zero)
    _add_embedding(g, model, tp, dims)
    for layer in range(model.num_layers):
        _add_layer(g, model, dims, layer)
    _add_lm_head(g, model, dims)
    return g.graph()


def window_pairs(prompt: np.ndarray, window: int | None) -> np.ndarray:
    """Causal (query, key) pairs of the first `prompt` positions, each query seeing `window` keys at
    most (also used by the span shapes of socket_actor/core.py, for chunks at an offset)."""
    full = prompt * (prompt + 1) / 2
    if window is None:
        return full
    over = np.maximum(prompt - window, 0)
    return full - over * (over + 1) / 2


def prefill_shape(prompt_lens, window: int | None = None) -> PhaseShape:
    """One prefill step over a batch of fresh prompts (no prefix in the cache)."""
    n = np.asarray(prompt_lens, dtype=np.float64)
    return PhaseShape(tokens=np.array([n.sum()]), seqs=np.array([float(n.size)]),
                      attn_pairs=np.array([window_pairs(n, window).sum()]),
                      score_elems=np.array([(n * n).sum()]), kv_read_tokens=np.array([0.0]))


def decode_step_shape(past_lens, window: int | None = None) -> PhaseShape:
    """One decode step of a batch whose sequences hold `past_lens` tokens in the cache."""
    past = np.asarray(past_lens, dtype=np.float64)
    read = past if window is None else np.minimum(past, window - 1)
    return PhaseShape(tokens=np.array([float(past.size)]), seqs=np.array([float(past.size)]),
                      attn_pairs=np.array([(read + 1).sum()]), score_elems=np.array([(read + 1).sum()]),
                      kv_read_tokens=np.array([read.sum()]))


def decode_shapes(prompt_lens, output_lens, window: int | None = None) -> PhaseShape:
    """Decode steps of a static batch: step j (1-based) produces output token j+1 of every
    sequence still generating; sequence i needs `output_lens[i] - 1` steps after prefill.

    Sequence i attends to min(prompt_i + j, window) keys at step j: linear in j until the window
    is full, constant after. The per-step sums are built from difference arrays over the steps,
    so memory is O(batch + steps), never a batch x steps matrix."""
    n = np.asarray(prompt_lens, dtype=np.float64)
    steps = np.asarray(output_lens, dtype=np.int64) - 1
    total = int(steps.max(initial=0))
    if total <= 0:
        empty = np.zeros(0)
        return PhaseShape(empty, empty, empty, empty, empty)
    live = steps >= 1
    n, steps = n[live], steps[live]
    if window is None:
        linear_end = steps
    else:  # the first step at which prompt + j reaches the window; before it keys grow with j
        full_from = np.maximum(1, np.ceil(window - n)).astype(np.int64)
        linear_end = np.minimum(steps, full_from - 1)
    size = total + 2

    def ramp(start, stop_exclusive, weights=None):
        """Per step j in 1..total: the sum of `weights` over sequences with start <= j < stop."""
        w = np.ones(len(start)) if weights is None else weights
        diff = np.bincount(start, w, size) - np.bincount(stop_exclusive, w, size)
        return np.cumsum(diff)[1:total + 1]

    ones = np.ones(len(n), dtype=np.int64)
    active = ramp(ones, steps + 1)
    has_linear = linear_end >= 1
    lin_count = ramp(ones[has_linear], linear_end[has_linear] + 1)
    lin_prompt = ramp(ones[has_linear], linear_end[has_linear] + 1, n[has_linear])
    j = np.arange(1, total + 1, dtype=np.float64)
    keys = lin_prompt + j * lin_count
    if window is not None:
        has_flat = steps > linear_end
        keys = keys + float(window) * ramp(linear_end[has_flat] + 1, steps[has_flat] + 1)
    return PhaseShape(tokens=active, seqs=active.copy(), attn_pairs=keys, score_elems=keys.copy(),
                      kv_read_tokens=keys - active)


def kv_bytes_per_token_per_socket(model: ModelSpec, tp: int) -> int:
    """KV-cache bytes one token adds on one socket of a TP group (all layers)."""
    _, hkv = _heads_per_socket(model, tp)
    return 2 * model.num_layers * hkv * model.head_dim * model.dtype_bytes
