"""Links and the timing of a transfer, in virtual integer nanoseconds.

A link is a one-way pipe with a latency and a bandwidth. A transfer that is sent at
`send_ns` arrives at ``max(send_ns, link_free_ns) + latency_ns + bytes / bandwidth`` and keeps
the link busy (serialising later transfers) for ``bytes / bandwidth``. A path of several links
(say a shared host link followed by a per-device PCIe link) is held end to end at the rate of
its slowest link, and its latencies add up. Nothing here reads the wall clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rdu.base import Fields

__all__ = ["LinkSpec", "Link", "LinkDown", "serialisation_ns", "transmit_path", "path_spec"]


class LinkDown(RuntimeError):
    """A link every message of which is lost: nothing can cross it."""


def serialisation_ns(nbytes, bandwidth_bytes_per_s: float):
    """Whole nanoseconds to push `nbytes` through `bandwidth_bytes_per_s` (rounded up); numpy-friendly."""
    if isinstance(nbytes, np.ndarray):
        return np.ceil(nbytes * 1e9 / bandwidth_bytes_per_s)
    return math.ceil(nbytes * 1e9 / bandwidth_bytes_per_s)


@dataclass(frozen=True)
class LinkSpec:
    """Latency and bandwidth of one direction of a link."""

    latency_ns: float
    bandwidth_bytes_per_s: float

    @classmethod
    def from_fields(cls, fields: Fields) -> "LinkSpec":
        fields.check_known({"latency_ns", "bandwidth_bytes_per_s"})
        return cls(
            latency_ns=fields.number("latency_ns", minimum=0.0, inclusive=True),
            bandwidth_bytes_per_s=fields.number("bandwidth_bytes_per_s"),
        )

    def transfer_ns(self, nbytes: float) -> int:
        """Uncontended time of one transfer: latency plus serialisation."""
        return math.ceil(self.latency_ns) + serialisation_ns(nbytes, self.bandwidth_bytes_per_s)


def path_spec(specs: list[LinkSpec]) -> LinkSpec:
    """The end-to-end spec of links in series: latencies add, the slowest bandwidth wins."""
    return LinkSpec(
        latency_ns=sum(spec.latency_ns for spec in specs),
        bandwidth_bytes_per_s=min(spec.bandwidth_bytes_per_s for spec in specs),
    )


class Link:
    """One direction of a physical link with a virtual busy-until time (contention)."""

    __slots__ = ("name", "spec", "free_at_ns", "bytes_moved", "busy_ns", "transfers", "down_since_ns")

    def __init__(self, name: str, spec: LinkSpec) -> None:
        self.name = name
        self.spec = spec
        self.down_since_ns: int | None = None
        self.free_at_ns = 0
        self.bytes_moved = 0
        self.busy_ns = 0
        self.transfers = 0

    def transmit(self, nbytes: int, send_ns: int) -> int:
        """Carry one transfer; return its arrival time."""
        return transmit_path([self], nbytes, send_ns)

    def stats(self) -> dict:
        return {"name": self.name, "bytes": self.bytes_moved, "busy_ns": self.busy_ns,
                "transfers": self.transfers, "free_at_ns": self.free_at_ns}


def _check_up(links: list[Link]) -> None:
    for link in links:
        if link.down_since_ns is not None:
            raise LinkDown(f"link {link.name} is down since {link.down_since_ns} ns: every message is lost")


def transmit_path(links: list[Link], nbytes: int, send_ns: int) -> int:
    """Carry one transfer over links in series; return its arrival time in ns.

    The transfer starts when it is sent and every link on the path is free, holds all of them
    for the serialisation time at the slowest bandwidth, and arrives after the summed latency.
    """
    if not links:
        return send_ns
    _check_up(links)
    start_ns = max(send_ns, max(link.free_at_ns for link in links))
    busy_ns = serialisation_ns(nbytes, min(link.spec.bandwidth_bytes_per_s for link in links))
    latency_ns = math.ceil(sum(link.spec.latency_ns for link in links))
    for link in links:
        link.free_at_ns = start_ns + busy_ns
        link.bytes_moved += nbytes
        link.busy_ns += busy_ns
        link.transfers += 1
    return start_ns + latency_ns + busy_ns
