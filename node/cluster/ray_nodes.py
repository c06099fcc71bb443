"""Emulated nodes as Ray actors: per node a placement group holding its socket actors and its
DDR store actor; one peer registry per run.

A node's bundle asks for `sockets_per_node` `rdu_socket` resources on one Ray node
(STRICT_PACK), so on a laptop every emulated node shares the one Ray node, and on a cluster whose
Ray nodes each advertise one node's worth of sockets every emulated node lands on its own.

The interconnect of a run is always closed: without a `run_token` given, a fresh secret is made
here; off loopback, a per-run TLS certificate too (both reach the actors through Ray only).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from rdu.interconnect.plane_auth import PlaneTLS, is_loopback, make_run_tls
from rdu.interconnect.registry import PeerRegistry
from rdu.base import UserError
from rdu.interconnect.topology import socket_name
from rdu.node.cluster.model_store import ModelStore
from rdu.node.cluster.platform import NodeSpec
from rdu.node.cluster.ray_session import SOCKET_RESOURCE
from rdu.socket_actor.actor import SocketActor

__all__ = ["RayNodes"]

PLACEMENT_TIMEOUT_S = 60.0


@dataclass
class RayNodes:
    """Launches and owns the actors of `nodes` emulated nodes of `spec`."""

    spec: NodeSpec
    nodes: int
    run_token: str = ""
    bind_host: str = "127.0.0.1"
    max_restarts: int = 0
    sockets: dict[str, object] = field(default_factory=dict)
    model_stores: list = field(default_factory=list)
    placement_groups: list = field(default_factory=list)
    registry: object = None
    tls: PlaneTLS | None = None

    def __post_init__(self) -> None:
        """Never an open interconnect: a secret of this run when none was given."""
        if not self.run_token:
            self.run_token = secrets.token_hex(16)

    def _actor_kwargs(self) -> dict:
        """Off loopback the actors get the run's TLS certificate (made here once per run)."""
        if is_loopback(self.bind_host):
            return {}
        if self.tls is None:
            self.tls = make_run_tls(f"rdu {self.spec.name} x{self.nodes}")
        return {"tls": self.tls}

    @property
    def names(self) -> list[str]:
        return [socket_name(n, s) for n in range(self.nodes) for s in range(self.spec.sockets_per_node)]

    def start(self) -> dict[str, str]:
        """Create every actor and start every gRPC server; returns socket -> address."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        per_node = self.spec.sockets_per_node
        self.registry = ray.remote(PeerRegistry).options(num_cpus=0).remote()
        for n in range(self.nodes):
            group = placement_group([{SOCKET_RESOURCE: per_node}], strategy="STRICT_PACK")
            self.placement_groups.append(group)
        for n, group in enumerate(self.placement_groups):
            if not group.wait(PLACEMENT_TIMEOUT_S):
                raise UserError(f"emulated node{n} could not be placed: no Ray node offers {per_node} free "
                                f"'{SOCKET_RESOURCE}' resources")
        members = self.names
        extra = self._actor_kwargs()
        for n, group in enumerate(self.placement_groups):
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
            store = ray.remote(ModelStore).options(num_cpus=0, scheduling_strategy=strategy)
            self.model_stores.append(store.remote(f"node{n}", self.spec.capacity_tier_bytes, self.spec.capacity_tier_name))
            actor = ray.remote(SocketActor).options(num_cpus=0, resources={SOCKET_RESOURCE: 1},
                                                    scheduling_strategy=strategy,
                                                    max_restarts=self.max_restarts, max_task_retries=0)
            for s in range(per_node):
                name = socket_name(n, s)
                self.sockets[name] = actor.remote(name, self.spec.socket, self.spec.links, self.nodes, per_node,
                                                  self.registry, members, self.bind_host, self.run_token, **extra)
        addresses = ray.get([handle.start.remote() for handle in self.sockets.values()])
        return dict(zip(self.sockets, addresses))

    def ray_node_of(self) -> dict[str, str]:
        """Which Ray node hosts each socket actor (for reports and tests)."""
        import ray

        table = {a["ActorID"]: a.get("Address", {}).get("NodeID", "") for a in ray._private.state.actors().values()}
        return {name: table.get(handle._actor_id.hex(), "") for name, handle in self.sockets.items()}

    def shutdown(self) -> None:
        """Stop gRPC servers, kill every actor and release the placement groups."""
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get([handle.stop.remote() for handle in self.sockets.values()], timeout=10)
        except ray.exceptions.RayError:
            pass  # a dead actor has no server left to stop
        for handle in list(self.sockets.values()) + self.model_stores + ([self.registry] if self.registry else []):
            ray.kill(handle, no_restart=True)
        for group in self.placement_groups:
            remove_placement_group(group)
        self.sockets.clear()
        self.model_stores.clear()
        self.placement_groups.clear()
        self.registry = None
