"""What one accelerator socket is: compute peak, memory tiers, efficiencies and launch costs.

The same spec describes an SN40L RDU (SRAM / HBM / socket-attached DDR, fusion, software- or
hardware-orchestrated launches) and a GPU (L2+shared memory / HBM, no socket DDR: its third tier
is the node's host DRAM, no whole-layer fusion, one launch cost). Values come from platform
presets; see `node/presets/`.
"""

from __future__ import annotations

from dataclasses import dataclass

from interconnect.spec_fields import Fields

__all__ = ["TierSpec", "SocketSpec", "MODES", "ORCHESTRATIONS", "FUSION_SCOPES"]

MODES = ("fused", "unfused")
ORCHESTRATIONS = ("SO", "HO")
FUSION_SCOPES = ("layer", "decoder")


@dataclass(frozen=True)
class TierSpec:
    """Capacity and peak bandwidth of one memory tier."""

    name: str
    capacity_bytes: int
    bandwidth_bytes_per_s: float

    @classmethod
    def from_fields(cls, name: str, fields: Fields) -> "TierSpec":
        fields.check_known({"capacity_bytes", "bandwidth_bytes_per_s"})
        return cls(name=name, capacity_bytes=int(fields.number("capacity_bytes")),
                   bandwidth_bytes_per_s=fields.number("bandwidth_bytes_per_s"))


@dataclass(frozen=True)
class SocketSpec:
    """One socket. Fractions say how much of a peak a kernel achieves in each execution mode."""

    kind: str
    name: str
    peak_flops_per_s: float
    sram: TierSpec
    hbm: TierSpec
    ddr: TierSpec | None
    hbm_reserved_bytes: int
    restart_ns: float
    fused_compute_fraction: float
    fused_hbm_bandwidth_fraction: float
    unfused_compute_fraction: float
    unfused_hbm_bandwidth_fraction: float
    launch_so_ns: float
    launch_ho_ns: float | None
    supports_fusion: bool
    fusion_scope: str
    default_mode: str
    default_orchestration: str
    unfused_kernel_groups: tuple[tuple[str, ...], ...]

    @classmethod
    def from_fields(cls, fields: Fields) -> "SocketSpec":
        fields.check_known({"kind", "name", "peak_flops_per_s", "sram", "hbm", "ddr", "hbm_reserved_bytes",
                            "restart_ns", "efficiency", "launch", "execution"})
        eff = fields.sub("efficiency")
        eff.check_known({"fused_compute_fraction", "fused_hbm_bandwidth_fraction",
                         "unfused_compute_fraction", "unfused_hbm_bandwidth_fraction"})
        launch = fields.sub("launch")
        launch.check_known({"so_ns", "ho_ns"})
        execution = fields.sub("execution")
        execution.check_known({"supports_fusion", "fusion_scope", "default_mode", "default_orchestration",
                               "unfused_kernel_groups"})
        supports_fusion = execution.boolean("supports_fusion")
        ho_ns = launch.number("ho_ns", minimum=0.0, inclusive=True) if launch.has("ho_ns") else None
        default_mode = execution.string("default_mode", choices=MODES)
        default_orch = execution.string("default_orchestration", choices=ORCHESTRATIONS)
        if default_mode == "fused" and not supports_fusion:
            execution.fail("default_mode is fused but supports_fusion is false", "default_mode")
        if default_orch == "HO" and ho_ns is None:
            execution.fail("default_orchestration is HO but launch.ho_ns is not given", "default_orchestration")
        groups_raw = execution.data.get("unfused_kernel_groups") or []
        if not isinstance(groups_raw, list):
            execution.fail(f"expected a list of operator-name lists, got {groups_raw!r}", "unfused_kernel_groups")
        groups = []
        for i, group in enumerate(groups_raw):
            if not isinstance(group, list) or not all(isinstance(op, str) for op in group) or not group:
                execution.fail(f"expected a non-empty list of operator names, got {group!r}",
                               f"unfused_kernel_groups[{i}]")
            groups.append(tuple(group))
        spec = cls(
            kind=fields.string("kind", choices=("rdu", "gpu")),
            name=fields.string("name"),
            peak_flops_per_s=fields.number("peak_flops_per_s"),
            sram=TierSpec.from_fields("sram", fields.sub("sram")),
            hbm=TierSpec.from_fields("hbm", fields.sub("hbm")),
            ddr=TierSpec.from_fields("ddr", fields.sub("ddr")) if fields.has("ddr") else None,
            hbm_reserved_bytes=int(fields.number("hbm_reserved_bytes", minimum=0.0, inclusive=True)),
            restart_ns=fields.number("restart_ns", minimum=0.0, inclusive=True),
            fused_compute_fraction=eff.fraction("fused_compute_fraction"),
            fused_hbm_bandwidth_fraction=eff.fraction("fused_hbm_bandwidth_fraction"),
            unfused_compute_fraction=eff.fraction("unfused_compute_fraction"),
            unfused_hbm_bandwidth_fraction=eff.fraction("unfused_hbm_bandwidth_fraction"),
            launch_so_ns=launch.number("so_ns", minimum=0.0, inclusive=True),
            launch_ho_ns=ho_ns,
            supports_fusion=supports_fusion,
            fusion_scope=execution.string("fusion_scope", "layer", choices=FUSION_SCOPES),
            default_mode=default_mode,
            default_orchestration=default_orch,
            unfused_kernel_groups=tuple(groups),
        )
        if spec.hbm_reserved_bytes >= spec.hbm.capacity_bytes:
            fields.fail(f"reserves {spec.hbm_reserved_bytes} bytes of a {spec.hbm.capacity_bytes}-byte HBM",
                        "hbm_reserved_bytes")
        return spec

    @property
    def hbm_usable_bytes(self) -> int:
        """HBM left for weights and KV cache after the runtime's reserve."""
        return self.hbm.capacity_bytes - self.hbm_reserved_bytes

    def launch_ns(self, orchestration: str) -> float:
        """Cost of launching one kernel under software (host) or hardware (on-chip) orchestration."""
        if orchestration == "HO":
            if self.launch_ho_ns is None:
                raise ValueError(f"{self.name} has no hardware-orchestrated launch (HO)")
            return self.launch_ho_ns
        return self.launch_so_ns
