"""What every backend's cluster is: nodes of one platform cut into TP groups, their capacity
tiers, and the scale-out fabric over which the ingress forwards requests to the nodes. The
backends (inline_backend.py, ray_backend.py) add how the nodes' engines run."""

from __future__ import annotations

from rdu.interconnect.links import transmit_path
from rdu.interconnect.topology import Topology
from rdu.node.cluster.layout import tp_groups
from rdu.node.cluster.platform import NodeSpec
from rdu.scheduler.backend import GroupInfo

__all__ = ["EmulatedCluster", "cluster_groups"]


def cluster_groups(spec: NodeSpec, topology: Topology, tp: int) -> list[GroupInfo]:
    """The TP groups of `topology`'s nodes of `spec` cut at degree `tp` (checks that the cut works)."""
    return [GroupInfo(index=i, name=g.name, node=Topology.parse(g.members[0])[0], members=tuple(g.members),
                      hbm_usable_bytes=spec.socket.hbm_usable_bytes)
            for i, g in enumerate(tp_groups(spec, topology, tp))]


class EmulatedCluster:
    """`nodes` nodes of `spec` cut into TP groups of `tp` (the scheduler's `Cluster`, less how
    its engines run)."""

    name = ""

    def __init__(self, spec: NodeSpec, nodes: int, tp: int, functional: bool = False) -> None:
        self.spec, self.nodes, self.tp, self.functional = spec, nodes, tp, functional
        self.capacity_tier_bytes = spec.capacity_tier_bytes
        self.capacity_tier_name = spec.capacity_tier_name
        self.fabric = Topology(spec.links, nodes, spec.sockets_per_node)   # request forwarding at the ingress
        self._groups = cluster_groups(spec, self.fabric, tp)

    def groups(self) -> list[GroupInfo]:
        return list(self._groups)

    def forward_request(self, src_node: int, dst_node: int, nbytes: int, send_ns: int) -> int:
        """A request's bytes from the ingress node to `dst_node` over the (contended) fabric."""
        if src_node == dst_node:
            return send_ns
        links = [self.fabric.links[f"node{src_node}->fabric"], self.fabric.links[f"fabric->node{dst_node}"]]
        return transmit_path(links, nbytes, send_ns)

    def degrade_fabric(self, a: str, b: str, probability: float, at_ns: int) -> None:
        self.fabric.degrade(a, b, probability, at_ns)

    def lost_node(self, node: int) -> None:
        """A kill-node fault took `node` (its engine already dropped its sockets and tier)."""
