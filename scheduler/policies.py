"""Residency policies: which experts stay in a TP group's HBM. Small classes behind one
interface, chosen by name.

* `lru`: evict the expert used least recently (the paper's policy).
* `lfu`: evict the expert used least often (ties: least recently).
* `belady`: evict the expert whose next request is farthest in the future (an offline oracle
  over the workload's request order: an upper bound for any online policy).
* `prefetch`: LRU eviction, plus copies started as soon as the router has decided (and for
  requests already waiting), overlapping DDR -> HBM switching with compute.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

from rdu.base import UserError

__all__ = ["ResidencyPolicy", "make_policy", "POLICIES"]


class ResidencyPolicy:
    """Told about every expert run; asked for eviction victims."""

    name = "base"
    prefetch = False

    def __init__(self, expert_sequence: Sequence[int]) -> None:
        self.clock = 0
        self.last_use: dict[int, int] = {}
        self.uses: dict[int, int] = {}

    def touch(self, expert: int, position: int) -> None:
        """`expert` runs for the request at `position` in the workload's order."""
        self.clock += 1
        self.last_use[expert] = self.clock
        self.uses[expert] = self.uses.get(expert, 0) + 1

    def rank(self, expert: int, position: int) -> tuple:
        """Sort key: the smallest key is evicted first."""
        raise NotImplementedError

    def victims(self, candidates: Iterable[int], count: int, position: int) -> list[int]:
        ordered = sorted(candidates, key=lambda e: (self.rank(e, position), e))
        return ordered[:count]


class LRU(ResidencyPolicy):
    name = "lru"

    def rank(self, expert: int, position: int) -> tuple:
        return (self.last_use.get(expert, 0),)


class LFU(ResidencyPolicy):
    name = "lfu"

    def rank(self, expert: int, position: int) -> tuple:
        return (self.uses.get(expert, 0), self.last_use.get(expert, 0))


class Belady(ResidencyPolicy):
    name = "belady"

    def __init__(self, expert_sequence: Sequence[int]) -> None:
        super().__init__(expert_sequence)
        self.positions: dict[int, list[int]] = {}
        for index, expert in enumerate(expert_sequence):
            self.positions.setdefault(expert, []).append(index)

    def next_use(self, expert: int, position: int) -> float:
        uses = self.positions.get(expert, [])
        i = bisect.bisect_right(uses, position)
        return uses[i] if i < len(uses) else float("inf")

    def rank(self, expert: int, position: int) -> tuple:
        return (-self.next_use(expert, position),)


class Prefetch(LRU):
    name = "prefetch"
    prefetch = True


POLICIES: dict[str, type[ResidencyPolicy]] = {cls.name: cls for cls in (LRU, LFU, Belady, Prefetch)}


def make_policy(name: str, expert_sequence: Sequence[int], where: str = "scheduler.policy") -> ResidencyPolicy:
    if name not in POLICIES:
        raise UserError(f"{where}: unknown policy {name!r}; expected one of {', '.join(POLICIES)}")
    return POLICIES[name](expert_sequence)
