"""gRPC for the plane, initialised with the posix transport that costs a socket the least CPU.

In grpcio's asyncio API every completed operation (a message written, a message read) reaches the
event loop through the completion-queue poller thread. With gRPC's EventEngine endpoints (its
default since ~1.60) a socket event is first handled by an EventEngine worker thread, which then
wakes the poller thread: one more thread hop, and a futex wake, per message. On a host whose
cores are shared by many socket processes that hop is most of a small message's cost: a ping-pong
of 1 KiB tensors between two plane processes on 2 cores made ~10 futex calls per message with
EventEngine endpoints and ~0.4 with the iomgr ones, and took 25-40% less CPU per message.

So, before grpcio is first imported in a process (a socket actor imports it through this
module), the gRPC experiments that select the EventEngine client, listener and callback
completion queue are switched off for that import only: gRPC reads its configuration once, when
it initialises, and the variable is restored right after, so nothing this process starts later
(Ray's own gRPC, which reads the same variable) inherits it. The same transport otherwise: TLS,
deadlines, message limits and the plane's authentication are unchanged. It is done only

- when grpcio has not been imported yet in this process (otherwise its configuration is fixed),
- when the user did not set GRPC_EXPERIMENTS themselves,
- for grpcio versions where these experiments were checked to exist (an unknown experiment is an
  error line at start-up), so a newer grpcio simply runs with its defaults.
"""

from __future__ import annotations

import os
import sys

__all__ = ["grpc", "PLANE_GRPC_EXPERIMENTS", "plane_transport"]

PLANE_GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener,-event_engine_callback_cq"
_CHECKED_VERSIONS = ("1.85.",)
_ENV = "GRPC_EXPERIMENTS"


def _grpcio_version() -> str:
    try:
        from importlib.metadata import version

        return version("grpcio")
    except Exception:  # noqa: BLE001 (no metadata: leave gRPC's defaults alone)
        return ""


def _applies() -> bool:
    return ("grpc" not in sys.modules and _ENV not in os.environ
            and _grpcio_version().startswith(_CHECKED_VERSIONS))


_APPLIED = _applies()
if _APPLIED:
    os.environ[_ENV] = PLANE_GRPC_EXPERIMENTS
    try:
        import grpc  # noqa: E402  (gRPC initialises here, reading the variable once)
    finally:
        del os.environ[_ENV]
else:
    import grpc  # noqa: E402,F401


def plane_transport() -> str:
    """Which posix transport this process's grpcio runs (for reports)."""
    return "iomgr" if _APPLIED else "default"
