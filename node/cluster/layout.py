"""How sockets of a cluster of identical nodes are cut into tensor-parallel groups."""

from __future__ import annotations

import math

from rdu.base import UserError
from rdu.interconnect.topology import Topology, socket_name
from rdu.node.cluster.platform import NodeSpec
from rdu.socket_actor.tp_group import TPGroup

__all__ = ["tp_groups", "nodes_for_tp"]


def nodes_for_tp(spec: NodeSpec, tp: int) -> int:
    """Nodes one TP group of degree `tp` spans."""
    return max(1, math.ceil(tp / spec.sockets_per_node))


def tp_groups(spec: NodeSpec, topology: Topology, tp: int) -> list[TPGroup]:
    """Consecutive sockets form a group; a group larger than a node spans whole nodes."""
    per_node = spec.sockets_per_node
    if tp < 1:
        raise UserError(f"tensor-parallel degree must be >= 1, got {tp}")
    if tp <= per_node and per_node % tp:
        raise UserError(f"TP {tp} does not divide the {per_node} sockets of a {spec.name} node")
    if tp > per_node and tp % per_node:
        raise UserError(f"TP {tp} spans nodes, so it must be a multiple of {per_node} sockets per node")
    total = topology.nodes * per_node
    if total % tp:
        raise UserError(f"{topology.nodes} node(s) x {per_node} sockets cannot be cut into TP {tp} groups")
    names = [socket_name(i // per_node, i % per_node) for i in range(total)]
    return [TPGroup(name=f"group{g}", members=names[g * tp:(g + 1) * tp], socket=spec.socket, topology=topology)
            for g in range(total // tp)]
