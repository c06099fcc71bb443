"""Functional payloads of a serving run: every model id stands for a small model of the same
architecture with its own seeded weights, and every served batch also really runs on them.

Nominal sizes still drive ledgers and time; the payload makes the run *compute*: a switch copies
the expert's shards out of the DDR store into the sockets' HBM buffers, and a batch generates a
few tokens (a capped slice of its requests) tensor-parallel across the group, checked against the
single-process reference of the same weights. Everything is seeded by the model id, so both
backends and every layout produce the same tokens.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from rdu.socket_actor.core import RunRequest, SpanRequest
from rdu.socket_actor.numerics import (KVCache, Shard, TinyConfig, forward_shard, init_weights, run_lockstep,
                                   run_reference, shard_weights)

__all__ = ["FUNCTIONAL_MODEL", "PROMPT_CAP", "OUTPUT_CAP", "model_shards", "batch_payload", "span_payload",
           "request_payload", "reference", "in_process_tp", "FunctionalChecks"]

# small enough for 150 experts in a laptop's object store (~1.7 MB each), splittable up to TP 16
FUNCTIONAL_MODEL = TinyConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=16, num_kv_heads=8,
                              intermediate_size=256, max_seq=64)
PROMPT_CAP, OUTPUT_CAP = 16, 4   # tokens of each request that really run


def _seed(text: str) -> int:
    return zlib.crc32(text.encode())


def _weights(model_id: str) -> dict[str, np.ndarray]:
    return init_weights(FUNCTIONAL_MODEL, _seed(model_id))


def model_shards(model_id: str, tp: int) -> list[Shard]:
    """The TP shards of a model id's weights, one per rank."""
    weights = _weights(model_id)
    return [shard_weights(weights, FUNCTIONAL_MODEL, tp, rank) for rank in range(tp)]


def batch_payload(model_id: str, prompt_lens, output_lens) -> tuple[np.ndarray, int]:
    """(prompts of shape (batch, length), tokens to generate) that a batch really runs: equally
    long prompts of at most PROMPT_CAP seeded tokens, at most OUTPUT_CAP new tokens."""
    length = max(1, min(PROMPT_CAP, min(prompt_lens)))
    new_tokens = max(1, min(OUTPUT_CAP, min(output_lens)))
    rng = np.random.default_rng(_seed(f"{model_id}/{tuple(prompt_lens)}/{tuple(output_lens)}"))
    return rng.integers(0, FUNCTIONAL_MODEL.vocab_size, size=(len(prompt_lens), length)), new_tokens


def span_payload(model_id: str, chunk_offsets, chunk_lens, decode_contexts, iterations: int
                 ) -> tuple[np.ndarray, int]:
    """The payload of a span (see `SpanRequest`), derived from its fields as `batch_payload` is
    from a static batch's: one sequence per sequence of its first iteration (each prefill chunk
    and each decode), equally long prompts of at most PROMPT_CAP seeded tokens (the shortest
    context of that iteration: a chunk's cached plus new tokens, a decode's cached tokens plus
    its new one), and at most OUTPUT_CAP new tokens (one per iteration)."""
    contexts = [o + n for o, n in zip(chunk_offsets, chunk_lens)] + [c + 1 for c in decode_contexts]
    length = max(1, min(PROMPT_CAP, min(contexts, default=1)))
    new_tokens = max(1, min(OUTPUT_CAP, int(iterations)))
    rng = np.random.default_rng(_seed(f"{model_id}/span/{tuple(chunk_offsets)}/{tuple(chunk_lens)}/"
                                      f"{tuple(decode_contexts)}/{int(iterations)}"))
    return rng.integers(0, FUNCTIONAL_MODEL.vocab_size, size=(max(1, len(contexts)), length)), new_tokens


def request_payload(request: RunRequest | SpanRequest) -> tuple[np.ndarray, int]:
    """(prompts, new tokens) that a served batch really runs: `batch_payload` of a static batch,
    `span_payload` of a span."""
    if isinstance(request, RunRequest):
        return batch_payload(request.model_id, request.prompt_lens, request.output_lens)
    return span_payload(request.model_id, request.chunk_offsets, request.chunk_lens, request.decode_contexts,
                        request.iterations)


def reference(model_id: str, prompts: np.ndarray, new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Single-process greedy generation: (ids (batch, new), logits (new, batch, vocab))."""
    return run_reference(_weights(model_id), FUNCTIONAL_MODEL, prompts, new_tokens)


def in_process_tp(shards: list[Shard], prompts: np.ndarray, new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The same generation with the shards of a TP group, collectives summed in-process."""
    cfg, tp = FUNCTIONAL_MODEL, len(shards)
    caches = [KVCache(cfg, cfg.kv_heads_per_shard(tp), batch=len(prompts)) for _ in shards]
    tokens, ids, all_logits = prompts, [], []
    for _ in range(new_tokens):
        logits = run_lockstep([forward_shard(s, tokens, c) for s, c in zip(shards, caches)])[0]
        all_logits.append(logits)
        ids.append(np.argmax(logits, axis=-1))
        tokens = ids[-1][:, None]
    return np.stack(ids, axis=1), np.stack(all_logits)


@dataclass
class FunctionalChecks:
    """How the functional payloads compared with the single-process reference."""

    runs: int = 0
    token_mismatches: int = 0
    max_abs_err: float = 0.0
    tokens: int = field(default=0)

    def check(self, model_id: str, prompts: np.ndarray, new_tokens: int, ids: np.ndarray,
              logits: np.ndarray) -> None:
        ref_ids, ref_logits = reference(model_id, prompts, new_tokens)
        self.runs += 1
        self.tokens += int(ids.size)
        self.token_mismatches += int((np.asarray(ids) != ref_ids).sum())
        self.max_abs_err = max(self.max_abs_err, float(np.abs(np.asarray(logits) - ref_logits).max()))

    def to_dict(self) -> dict:
        return {"functional_runs": self.runs, "functional_tokens": self.tokens,
                "functional_token_mismatches": self.token_mismatches,
                "functional_max_abs_err": self.max_abs_err}
