"""Starting, joining and leaving Ray: one place that knows how this project uses it.

`local` (the default) starts a private in-process Ray sized for the run and shuts it down
afterwards; an address (`auto`, `host:port`, `ray://...`) joins an existing cluster whose nodes
advertise `rdu_socket` resources. When Ray is already up (e.g. a test session's), it is reused
and left running for its owner.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rdu.base import UserError

__all__ = ["ray_session", "RaySessionInfo", "socket_capacity"]

SOCKET_RESOURCE = "rdu_socket"


@dataclass
class RaySessionInfo:
    started_here: bool
    address: str
    ray_nodes: int
    multi_host: bool     # sockets may sit on other machines: bind gRPC to the node IP

    @property
    def bind_host(self) -> str:
        """Where socket servers listen: loopback unless sockets sit on several machines."""
        return "node-ip" if self.multi_host else "127.0.0.1"

    def run_token(self) -> str:
        """A fresh secret for this run's interconnect (every call must carry it): on a cluster and
        on one machine alike, since any local process can reach a loopback port."""
        return secrets.token_hex(16)


def socket_capacity() -> int:
    import ray

    return int(ray.cluster_resources().get(SOCKET_RESOURCE, 0))


def _signal_handlers() -> dict:
    """The SIGINT/SIGTERM handlers in force (Ray's start-up replaces them with its own)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(handlers: dict) -> None:
    for signum, handler in handlers.items():
        if handler is not None:
            signal.signal(signum, handler)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A `host:port` that nobody answers on is a one-line error within `timeout_s`, not an
    endless retry inside Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or address.startswith("ray://") or address == "auto" or not port.isdigit():
        return
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise UserError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


@contextmanager
def ray_session(address: str | None, sockets_needed: int, object_store_bytes: int = 1 << 30) -> Iterator[RaySessionInfo]:
    """Ray for a run of `sockets_needed` socket actors; shuts down only what it started.
    (The package sets Ray's environment defaults on import: see node/__init__.py.)"""
    import ray

    started = False
    if not ray.is_initialized():
        handlers = _signal_handlers()
        try:
            if address in (None, "", "local"):
                ray.init(num_cpus=os.cpu_count() or 2, resources={SOCKET_RESOURCE: sockets_needed},
                         include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                         object_store_memory=object_store_bytes)
            else:
                _check_reachable(address)
                try:
                    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise UserError(f"--address {address}: cannot join a Ray cluster ({exc})") from exc
            started = True
        except BaseException:
            if ray.is_initialized():  # interrupted half-way through start-up: stop what started
                ray.shutdown()
            raise
        finally:
            _restore_signal_handlers(handlers)
    try:
        capacity = socket_capacity()
        if capacity < sockets_needed:
            raise UserError(f"the Ray cluster advertises {capacity} '{SOCKET_RESOURCE}' resources but the run "
                            f"needs {sockets_needed} socket actors")
        hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
        yield RaySessionInfo(started_here=started, address=address or "local",
                             ray_nodes=sum(1 for n in ray.nodes() if n.get("Alive")), multi_host=len(hosts) > 1)
    finally:
        if started:
            ray.shutdown()
