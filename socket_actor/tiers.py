"""Capacity ledgers of a socket's memory tiers (SRAM, HBM, DDR) at nominal sizes.

A ledger tracks named allocations (an expert's weight shard, a KV cache, a router) and refuses
one that does not fit with an error that says what, how big, and how much is free. Transfer
times between tiers come from tier bandwidths; DDR -> HBM copies go over the interconnect's
copy path instead, where they can contend (see `interconnect.topology.Topology.copy_path`).
"""

from __future__ import annotations

from rdu.interconnect.links import LinkSpec
from rdu.base import UserError, format_bytes
from rdu.socket_actor.spec import SocketSpec

__all__ = ["CapacityError", "Ledger", "MemoryTiers"]


class CapacityError(UserError):
    """Something does not fit in a memory tier."""


class Ledger:
    """Named allocations against one tier's capacity."""

    def __init__(self, owner: str, tier: str, capacity_bytes: int) -> None:
        self.owner, self.tier, self.capacity_bytes = owner, tier, int(capacity_bytes)
        self._items: dict[str, int] = {}
        self.used_bytes = 0
        self.peak_bytes = 0

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.free_bytes

    def allocate(self, name: str, nbytes: int) -> None:
        if name in self._items:
            raise ValueError(f"{self.owner} {self.tier}: {name} is already allocated")
        if nbytes < 0:
            raise ValueError(f"{self.owner} {self.tier}: negative size for {name}")
        if not self.fits(nbytes):
            raise CapacityError(
                f"{self.owner} {self.tier}: {name} needs {format_bytes(nbytes)} but only "
                f"{format_bytes(self.free_bytes)} of {format_bytes(self.capacity_bytes)} is free")
        self._items[name] = int(nbytes)
        self.used_bytes += int(nbytes)
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def release(self, name: str) -> int:
        """Free `name`; return its size."""
        if name not in self._items:
            raise KeyError(f"{self.owner} {self.tier}: {name} is not allocated")
        nbytes = self._items.pop(name)
        self.used_bytes -= nbytes
        return nbytes

    def items(self) -> dict[str, int]:
        return dict(self._items)

    def snapshot(self) -> dict:
        return {"tier": self.tier, "capacity_bytes": self.capacity_bytes, "used_bytes": self.used_bytes,
                "peak_bytes": self.peak_bytes, "items": len(self._items)}


class MemoryTiers:
    """The ledgers of one socket; HBM capacity excludes the runtime's reserve."""

    def __init__(self, owner: str, spec: SocketSpec) -> None:
        self.spec = spec
        self.sram = Ledger(owner, "sram", spec.sram.capacity_bytes)
        self.hbm = Ledger(owner, "hbm", spec.hbm_usable_bytes)
        self.ddr = Ledger(owner, "ddr", spec.ddr.capacity_bytes) if spec.ddr is not None else None

    def hbm_to_sram_ns(self, nbytes: int) -> int:
        """Time to stream `nbytes` from HBM into SRAM at the HBM's peak bandwidth."""
        return LinkSpec(0.0, self.spec.hbm.bandwidth_bytes_per_s).transfer_ns(nbytes)

    def snapshot(self) -> dict:
        tiers = [self.sram, self.hbm] + ([self.ddr] if self.ddr is not None else [])
        return {ledger.tier: ledger.snapshot() for ledger in tiers}
