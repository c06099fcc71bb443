"""Platforms as data: a node preset (YAML) -> `NodeSpec` (sockets, links, third memory tier).

A user file may start from a preset with ``base: sn40l-node`` and override any field; values
may be bare or carry ``{value, source}``. Every resolved value keeps its source (the preset's
citation, or the user file that set it), so reports can cite each number they used.

A value the calibration fits carries ``fitted: {bounds: [low, high], observations: [ids]}``
beside its value and source (`rdu calibrate` fits it to those observations of
`node/cluster/presets/observations.yaml` within the bounds). A value that a user file or ``--set``
overrides is no longer the fitted one, and loses the mark.

The platform's node-level tiers feed its copy path: a DDR -> HBM copy reads from the socket's
own DDR channel (RDU) or from the node's host DRAM (GPU), so their bandwidths bound copies too.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from rdu.base import Fields, UserError, deep_merge, split_sources
from rdu.interconnect.links import LinkSpec
from rdu.interconnect.topology import TopologySpec
from rdu.yaml_io import leaf_paths, parse_yaml, read_yaml
from rdu.socket_actor.spec import SocketSpec, TierSpec

__all__ = ["NodeSpec", "Platform", "load_platform", "platform_presets", "apply_overrides", "Fitted"]

MAX_SOCKETS_PER_NODE = 1024   # far beyond any built node; bounds the topology the emulator builds
_TOP_KEYS = {"base", "name", "description", "sockets_per_node", "socket", "links", "host_dram"}


@dataclass(frozen=True)
class NodeSpec:
    """One node: `sockets_per_node` identical sockets, their links, and the node's capacity tier
    (the memory that holds every model's weights).

    On an RDU node the capacity tier is the sum of the sockets' own DDR; on a GPU node it is the
    host DRAM (`host_dram`), reached over PCIe.
    """

    name: str
    description: str
    sockets_per_node: int
    socket: SocketSpec
    links: TopologySpec
    host_dram: TierSpec | None

    @property
    def capacity_tier_bytes(self) -> int:
        if self.host_dram is not None:
            return self.host_dram.capacity_bytes
        assert self.socket.ddr is not None
        return self.socket.ddr.capacity_bytes * self.sockets_per_node

    @property
    def capacity_tier_name(self) -> str:
        return "host_dram" if self.host_dram is not None else "ddr"

    @classmethod
    def from_tree(cls, values: Any, origin: str) -> "NodeSpec":
        fields = Fields(values, origin)
        fields.check_known(_TOP_KEYS)
        socket = SocketSpec.from_fields(fields.sub("socket"))
        host = TierSpec.from_fields("host_dram", fields.sub("host_dram")) if fields.has("host_dram") else None
        if (host is None) == (socket.ddr is None):
            fields.fail("give exactly one DDR tier: socket.ddr (attached to each socket) or host_dram "
                        "(shared by the node, behind PCIe)", "host_dram")
        links = TopologySpec.from_fields(fields.sub("links"))
        memory = host if host is not None else socket.ddr
        links = dataclasses.replace(links, ddr_read=LinkSpec(0.0, memory.bandwidth_bytes_per_s),
                                    ddr_read_shared=host is not None)
        return cls(
            name=fields.string("name"),
            description=fields.string("description", ""),
            sockets_per_node=fields.integer("sockets_per_node", maximum=MAX_SOCKETS_PER_NODE),
            socket=socket,
            links=links,
            host_dram=host,
        )


@dataclass(frozen=True)
class Fitted:
    """A preset value the calibration fits: its plausible bounds and the observations it is fitted to."""

    path: str
    low: float
    high: float
    observations: tuple[str, ...]
    origin: str = ""          # the preset or file that declares it (platforms built on it share it)


@dataclass
class Platform:
    """A resolved platform: the spec, the merged value tree and the source of every value."""

    spec: NodeSpec
    values: dict
    sources: dict[str, str] = field(default_factory=dict)
    origin: str = ""
    fitted: dict[str, Fitted] = field(default_factory=dict)


def _take_fitted(tree: Any, origin: str, path: str = "") -> dict[str, Fitted]:
    """Remove every ``fitted:`` mark from a raw preset tree (in place) and return them by path."""
    marks: dict[str, Fitted] = {}
    if not isinstance(tree, dict):
        return marks
    if "value" in tree and "fitted" in tree:
        raw = tree.pop("fitted")
        bounds = raw.get("bounds") if isinstance(raw, dict) else None
        observations = raw.get("observations") if isinstance(raw, dict) else None
        if (not isinstance(bounds, list) or len(bounds) != 2 or not all(isinstance(b, (int, float)) for b in bounds)
                or not bounds[0] <= bounds[1] or not isinstance(observations, list) or not observations):
            raise UserError(f"{origin}: {path}.fitted: expected {{bounds: [low, high], observations: [ids]}}, "
                            f"got {raw!r}")
        value = tree.get("value")
        if isinstance(value, (int, float)) and not bounds[0] <= value <= bounds[1]:
            raise UserError(f"{origin}: {path}: fitted value {value} is outside its bounds {bounds}")
        marks[path] = Fitted(path, float(bounds[0]), float(bounds[1]), tuple(str(o) for o in observations),
                             origin.removeprefix("platform preset "))
        return marks
    for key, value in tree.items():
        marks.update(_take_fitted(value, origin, f"{path}.{key}" if path else str(key)))
    return marks


def platform_presets() -> list[str]:
    folder = resources.files("rdu.node.cluster") / "presets"
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir()
                  if entry.name.endswith(".yaml") and entry.name != "observations.yaml")


def _read_raw(name_or_path: str) -> tuple[Any, str]:
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        return read_yaml(name_or_path), name_or_path
    if name_or_path not in platform_presets():
        raise UserError(f"unknown platform {name_or_path!r}; presets: {', '.join(platform_presets())} "
                        f"(or a path to a platform YAML file)")
    text = (resources.files("rdu.node.cluster") / "presets" / f"{name_or_path}.yaml").read_text(encoding="utf-8")
    return parse_yaml(text, f"platform preset {name_or_path}"), f"platform preset {name_or_path}"


def _resolve(name_or_path: str, seen: tuple[str, ...]) -> tuple[dict, dict[str, str], dict[str, Fitted]]:
    if name_or_path in seen:
        raise UserError(f"platform {name_or_path!r} names itself as a base (through {' -> '.join(seen)})")
    raw, origin = _read_raw(name_or_path)
    if not isinstance(raw, dict):
        raise UserError(f"{origin}: expected a mapping of platform fields, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    base = raw.pop("base", None)
    fitted = _take_fitted(raw, origin)
    values, sources = split_sources(raw)
    for path in leaf_paths(values):
        sources.setdefault(path, f"set in {origin}")
    if base is None:
        return values, sources, fitted
    if not isinstance(base, str):
        raise UserError(f"{origin}: base: expected a preset name or file path, got {base!r}")
    base_values, base_sources, base_fitted = _resolve(base, seen + (name_or_path,))
    # a value this file sets is its own, not the base's fitted one (unless it marks it fitted itself)
    base_fitted = {p: f for p, f in base_fitted.items() if p not in sources}
    return deep_merge(base_values, values), {**base_sources, **sources}, {**base_fitted, **fitted}


def apply_overrides(values: dict, sources: dict[str, str], overrides: Mapping[str, Any], origin: str) -> dict:
    """Set dotted fields (``socket.hbm.bandwidth_bytes_per_s``) on a resolved value tree."""
    values = deep_merge(values, {})
    for dotted, value in overrides.items():
        node = values
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise UserError(f"{origin}: {dotted}: no such platform section {part!r}")
            node = node[part]
        if parts[-1] not in node:
            raise UserError(f"{origin}: {dotted}: no such platform field")
        node[parts[-1]] = value
        sources[dotted] = f"set by {origin}"
    return values


def load_platform(name_or_path: str, overrides: Mapping[str, Any] | None = None,
                  overrides_origin: str = "--set") -> Platform:
    """A preset name or a platform YAML path (optionally with ``base:``), plus dotted overrides."""
    values, sources, fitted = _resolve(name_or_path, ())
    if overrides:
        values = apply_overrides(values, sources, overrides, overrides_origin)
        fitted = {p: f for p, f in fitted.items() if p not in overrides}
    origin = name_or_path if Path(name_or_path).is_file() else f"platform preset {name_or_path}"
    if overrides:
        origin = f"{origin} with {overrides_origin} {', '.join(overrides)}"
    spec = NodeSpec.from_tree(values, origin)
    return Platform(spec=spec, values=values, sources=sources, origin=origin, fitted=fitted)
