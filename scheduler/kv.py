"""Paged KV blocks of one tensor-parallel group (vLLM style): a sequence holds
ceil(tokens / block_size) blocks of its model, on every socket of the group; blocks are taken as
it grows and given back when it finishes or is preempted. There is no look-ahead: the pool is
whatever HBM the resident weights leave, at the moment of asking (see `GroupMemory`)."""

from __future__ import annotations

import numpy as np

__all__ = ["GroupMemory", "blocks_for"]


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` cached tokens."""
    return -(-tokens // block_size)


class GroupMemory:
    """Per-socket HBM of a group: weights of resident (or arriving) models plus KV blocks.
    Every member holds the same, so one ledger view stands for all of them; the socket cores keep
    the real ledgers, which the engine's spans resize to `kv_bytes`."""

    def __init__(self, usable_bytes: int, block_size: int) -> None:
        self.usable_bytes = int(usable_bytes)
        self.block_size = block_size
        self.weights_bytes = 0
        self.kv_bytes = 0
        self.peak_kv_bytes = 0

    @property
    def free_bytes(self) -> int:
        return self.usable_bytes - self.weights_bytes - self.kv_bytes

    def take_kv(self, nbytes: int, provisional: bool = False) -> None:
        """Account KV blocks (the caller checked that they fit). `provisional`: blocks a span
        reserves for its later iterations, which a cut may give back; they count towards the
        peak only once the span is committed (`commit_peak`)."""
        self.kv_bytes += nbytes
        if not provisional:
            self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes)

    def commit_peak(self) -> None:
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes)

    def give_kv(self, nbytes: int) -> None:
        self.kv_bytes -= nbytes

    def growth_fits(self, contexts: np.ndarray, held: np.ndarray, block_bytes: int, iterations: int) -> int:
        """How many decode iterations (<= `iterations`) the sequences with `contexts` cached tokens
        and `held` blocks can run before a new block no longer fits in the free HBM (the
        iteration that would need it is where the batch changes: eviction or preemption)."""
        if iterations <= 0 or contexts.size == 0:
            return max(iterations, 0)
        free_blocks = self.free_bytes // block_bytes if block_bytes else 1 << 62
        bs = self.block_size

        def extra(j: int) -> int:  # blocks needed to run iterations 1..j
            return int((-(-(contexts + j) // bs) - held).sum())

        if extra(iterations) <= free_blocks:
            return iterations
        low, high = 0, iterations          # extra(low) fits, extra(high) does not
        while high - low > 1:
            middle = (low + high) // 2
            if extra(middle) <= free_blocks:
                low = middle
            else:
                high = middle
        return low
