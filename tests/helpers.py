"""Small builders shared by tests (no Ray)."""

from __future__ import annotations

from interconnect.topology import Topology
from node.layout import nodes_for_tp, tp_groups
from node.platform import load_platform
from socket_actor.model_spec import load_model


def group_for(platform: str, tp: int, overrides: dict | None = None):
    spec = load_platform(platform, overrides).spec
    topology = Topology(spec.links, nodes_for_tp(spec, tp), spec.sockets_per_node)
    return tp_groups(spec, topology, tp)[0]


def cost_model(platform: str, model: str, tp: int, mode=None, orchestration=None):
    return group_for(platform, tp).cost_model(load_model(model), mode, orchestration)
