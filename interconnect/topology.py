"""Who is wired to whom: the links of a cluster of nodes and the path between two sockets.

Sockets are named ``node{n}/socket{s}``. Inside a node, sockets talk over peer-to-peer links
laid out as a `ring`, a `full_mesh` or through a `switch` (one port per socket each way, as in
NVSwitch). Between nodes, each node has one scale-out port each way. Each socket also has the
path its DDR -> HBM copies take: its own DDR channel, behind a host link that the whole node
shares on GPU nodes (host DRAM over PCIe).
"""

from __future__ import annotations

from dataclasses import dataclass

from rdu.interconnect.links import Link, LinkSpec
from rdu.base import Fields, UserError

__all__ = ["TopologySpec", "CollectiveSpec", "Topology", "socket_name", "TOPOLOGY_KINDS"]

TOPOLOGY_KINDS = ("ring", "full_mesh", "switch")


@dataclass(frozen=True)
class CollectiveSpec:
    """What a collective costs beyond its links: the library's or runtime's own work.

    `startup_ns` is paid once per collective call (software launch, the synchronisation of the
    ranks; ~30 us for NCCL on a DGX, a fraction of a microsecond for an SN40L P2P primitive
    inside a kernel); `bandwidth_fraction` is the share of link bandwidth a collective reaches;
    messages up to `one_shot_max_bytes` go one-shot (every rank sends straight to every peer)
    where the topology allows it (switch, full mesh), larger ones go round the ring.
    """

    startup_ns: float = 0.0
    bandwidth_fraction: float = 1.0
    one_shot_max_bytes: float = 0.0

    @classmethod
    def from_fields(cls, fields: Fields) -> "CollectiveSpec":
        fields.check_known({"startup_ns", "bandwidth_fraction", "one_shot_max_bytes"})
        return cls(startup_ns=fields.number("startup_ns", minimum=0.0, inclusive=True),
                   bandwidth_fraction=fields.fraction("bandwidth_fraction"),
                   one_shot_max_bytes=fields.number("one_shot_max_bytes", minimum=0.0, inclusive=True))


def socket_name(node: int, socket: int) -> str:
    return f"node{node}/socket{socket}"


@dataclass(frozen=True)
class TopologySpec:
    """The link section of a platform: P2P layout and specs, scale-out, DDR -> HBM copy path."""

    p2p_kind: str
    p2p: LinkSpec
    scale_out: LinkSpec
    ddr_to_hbm: LinkSpec
    host_shared: LinkSpec | None
    retransmit_timeout_ns: float = 50_000.0   # a lost message is resent after this long
    collective: CollectiveSpec = CollectiveSpec()
    # the memory a DDR -> HBM copy reads from: each socket's own DDR channel (RDU) or the
    # node's host DRAM (GPU, shared by every copy of the node); set from the socket / node tiers
    ddr_read: LinkSpec | None = None
    ddr_read_shared: bool = False

    @classmethod
    def from_fields(cls, fields: Fields) -> "TopologySpec":
        fields.check_known({"p2p", "scale_out", "ddr_to_hbm", "host_shared", "retransmit_timeout_ns", "collective"})
        p2p = fields.sub("p2p")
        p2p.check_known({"topology", "latency_ns", "bandwidth_bytes_per_s"})
        kind = p2p.string("topology", choices=TOPOLOGY_KINDS)
        p2p_link = LinkSpec(latency_ns=p2p.number("latency_ns", minimum=0.0, inclusive=True),
                            bandwidth_bytes_per_s=p2p.number("bandwidth_bytes_per_s"))
        host = LinkSpec.from_fields(fields.sub("host_shared")) if fields.has("host_shared") else None
        return cls(
            p2p_kind=kind,
            p2p=p2p_link,
            scale_out=LinkSpec.from_fields(fields.sub("scale_out")),
            ddr_to_hbm=LinkSpec.from_fields(fields.sub("ddr_to_hbm")),
            host_shared=host,
            retransmit_timeout_ns=fields.number("retransmit_timeout_ns"),
            collective=(CollectiveSpec.from_fields(fields.sub("collective")) if fields.has("collective")
                        else CollectiveSpec()),
        )


class Topology:
    """The links of `nodes` nodes of `sockets_per_node` sockets, with per-link contention state."""

    def __init__(self, spec: TopologySpec, nodes: int, sockets_per_node: int,
                 only_nodes: tuple[int, ...] | None = None) -> None:
        """`only_nodes`: build the links of these nodes only (a partition of a large cluster
        needs its own nodes' links, not a copy of everyone's)."""
        if nodes < 1 or sockets_per_node < 1:
            raise UserError(f"a topology needs at least one node and one socket, got {nodes} x {sockets_per_node}")
        self.spec = spec
        self.nodes = nodes
        self.sockets_per_node = sockets_per_node
        self.links: dict[str, Link] = {}
        for node in range(nodes) if only_nodes is None else only_nodes:
            self._build_node(node)

    # -- construction -----------------------------------------------------------------------
    def _add(self, name: str, spec: LinkSpec) -> None:
        self.links[name] = Link(name, spec)

    def _build_node(self, node: int) -> None:
        count = self.sockets_per_node
        if self.spec.ddr_read is not None and self.spec.ddr_read_shared:
            self._add(f"node{node}/dram", self.spec.ddr_read)
        for s in range(count):
            src = socket_name(node, s)
            self._add(f"{src}/ddr", self.spec.ddr_to_hbm)
            if self.spec.ddr_read is not None and not self.spec.ddr_read_shared:
                self._add(f"{src}/ddr_channel", self.spec.ddr_read)
            if self.spec.p2p_kind == "switch":
                self._add(f"{src}->switch", self.spec.p2p)
                self._add(f"switch->{src}", self.spec.p2p)
            elif self.spec.p2p_kind == "full_mesh":
                for d in range(count):
                    if d != s:
                        self._add(f"{src}->{socket_name(node, d)}", self.spec.p2p)
            elif count > 1:  # ring: both directions to each neighbour
                for d in {(s + 1) % count, (s - 1) % count}:
                    self._add(f"{src}->{socket_name(node, d)}", self.spec.p2p)
        if self.spec.host_shared is not None:
            self._add(f"node{node}/host", self.spec.host_shared)
        if self.nodes > 1:
            self._add(f"node{node}->fabric", self.spec.scale_out)
            self._add(f"fabric->node{node}", self.spec.scale_out)

    # -- paths ------------------------------------------------------------------------------
    @staticmethod
    def parse(name: str) -> tuple[int, int]:
        try:
            node, socket = name.split("/")
            return int(node.removeprefix("node")), int(socket.removeprefix("socket"))
        except ValueError as exc:
            raise UserError(f"not a socket name: {name!r} (expected node<N>/socket<S>)") from exc

    def check_socket(self, name: str) -> tuple[int, int]:
        node, socket = self.parse(name)
        if not (0 <= node < self.nodes and 0 <= socket < self.sockets_per_node):
            raise UserError(f"no socket {name} in a topology of {self.nodes} node(s) x "
                            f"{self.sockets_per_node} socket(s)")
        return node, socket

    def path(self, src: str, dst: str) -> list[Link]:
        """The links a message from `src` to `dst` crosses, in order."""
        src_node, src_socket = self.check_socket(src)
        dst_node, dst_socket = self.check_socket(dst)
        if src == dst:
            return []
        if src_node != dst_node:
            return [self.links[f"node{src_node}->fabric"], self.links[f"fabric->node{dst_node}"]]
        if self.spec.p2p_kind == "switch":
            return [self.links[f"{src}->switch"], self.links[f"switch->{dst}"]]
        if self.spec.p2p_kind == "full_mesh":
            return [self.links[f"{src}->{dst}"]]
        return self._ring_path(src_node, src_socket, dst_socket)

    def _ring_path(self, node: int, src: int, dst: int) -> list[Link]:
        count = self.sockets_per_node
        forward = (dst - src) % count
        step = 1 if forward <= count - forward else -1
        hops, here = [], src
        while here != dst:
            nxt = (here + step) % count
            hops.append(self.links[f"{socket_name(node, here)}->{socket_name(node, nxt)}"])
            here = nxt
        return hops

    def copy_path(self, socket: str) -> list[Link]:
        """Links a DDR -> HBM copy into `socket` crosses: the memory it reads (the socket's DDR
        channel, or the node's host DRAM), the shared host link if any, the socket's own link.
        Copies that share one of them share its bandwidth."""
        node, _ = self.check_socket(socket)
        path = [self.links[f"{socket}/ddr"]]
        if self.spec.host_shared is not None:
            path.insert(0, self.links[f"node{node}/host"])
        if self.spec.ddr_read is not None:
            source = f"node{node}/dram" if self.spec.ddr_read_shared else f"{socket}/ddr_channel"
            path.insert(0, self.links[source])
        return path

    def degrade(self, a: str, b: str, probability: float, at_ns: int) -> list[str]:
        """Make the links between sockets `a` and `b` (both ways) lose each message with
        `probability`: a lost message is resent after the retransmission timeout, so on average a
        message arrives p / (1 - p) timeouts late; with probability 1 the links are down."""
        if not 0.0 < probability <= 1.0:
            raise ValueError(f"loss probability must be in (0, 1], got {probability}")
        links = {link.name: link for link in self.path(a, b) + self.path(b, a)}
        for link in links.values():
            if probability >= 1.0:
                link.down_since_ns = at_ns
            else:
                extra = probability / (1.0 - probability) * self.spec.retransmit_timeout_ns
                link.spec = LinkSpec(link.spec.latency_ns + extra, link.spec.bandwidth_bytes_per_s)
        return sorted(links)
