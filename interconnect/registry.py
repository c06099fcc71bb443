"""Where each socket's gRPC server listens. Hosted in a Ray actor per run; sockets register on
start (and again after a restart, on a new port) and resolve their peers through it."""

from __future__ import annotations

__all__ = ["PeerRegistry"]


class PeerRegistry:
    """Socket name -> gRPC address, with a generation count per name (bumped by re-registration)."""

    def __init__(self) -> None:
        self._addresses: dict[str, str] = {}
        self._generation: dict[str, int] = {}

    def register(self, name: str, address: str) -> int:
        self._addresses[name] = address
        self._generation[name] = self._generation.get(name, 0) + 1
        return self._generation[name]

    def lookup(self, name: str) -> str:
        if name not in self._addresses:
            raise KeyError(f"no socket named {name!r} is registered")
        return self._addresses[name]
