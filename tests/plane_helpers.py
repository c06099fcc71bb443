"""Socket actors in one process for plane tests (no Ray): a registry that stands in for the
`PeerRegistry` actor."""

from __future__ import annotations

import asyncio

from rdu.interconnect.registry import PeerRegistry


class _Remote:
    """Stands in for a Ray actor method (`.remote(...)` returns an awaitable)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.fn(*args))
        return future


class InProcessRegistry:
    """`lookup.remote(name)` and `register.remote(name, address)` as socket actors call them."""

    def __init__(self) -> None:
        inner = PeerRegistry()
        self.lookup, self.register = _Remote(inner.lookup), _Remote(inner.register)
