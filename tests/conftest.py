"""Shared fixtures. Ray-free tests need nothing; Ray tests share one session-wide local Ray."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
os.environ.setdefault("RAY_AUTH_MODE", "token")

LOCAL_SOCKETS = 64


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (started lazily by the first test that needs it), with
    the watchdog a run's Ray has: none of it outlives the session, even a killed one."""
    import ray

    from rdu.node.cluster.ray_session import RayWatchdog

    watchdog = RayWatchdog.start()
    ray.init(num_cpus=2, resources={"rdu_socket": LOCAL_SOCKETS}, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, object_store_memory=768 * 2**20)
    yield ray
    ray.shutdown()
    if watchdog is not None:
        watchdog.close()
