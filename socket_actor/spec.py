"""What one accelerator socket is: compute peak, memory tiers, efficiencies and launch costs.

The same spec describes an SN40L RDU (SRAM / HBM / socket-attached DDR, fusion, software- or
hardware-orchestrated launches) and a GPU (L2+shared memory / HBM, no socket DDR: its third tier
is the node's host DRAM, no whole-layer fusion, one launch cost). Values come from platform
presets; see `node/cluster/presets/`.

A field that cannot change any result on the socket it describes is refused rather than
silently ignored (fused-kernel efficiencies on a socket without fusion, an SRAM bandwidth where
no kernel keeps data on chip): a preset must not carry numbers that look like they matter.
Costs the bottom-up model does not derive are named (`runtime.*`, `execution.fill_drain_ns`),
each with its own hypothesis in the preset.
"""

from __future__ import annotations

from dataclasses import dataclass

from rdu.base import Fields

__all__ = ["TierSpec", "SocketSpec", "MODES", "ORCHESTRATIONS", "FUSION_SCOPES"]

MODES = ("fused", "unfused")
ORCHESTRATIONS = ("SO", "HO")
FUSION_SCOPES = ("layer", "decoder")


@dataclass(frozen=True)
class TierSpec:
    """Capacity and peak bandwidth of one memory tier."""

    name: str
    capacity_bytes: int
    bandwidth_bytes_per_s: float | None

    @classmethod
    def from_fields(cls, name: str, fields: Fields, bandwidth_required: bool = True) -> "TierSpec":
        fields.check_known({"capacity_bytes", "bandwidth_bytes_per_s"})
        bandwidth = (fields.number("bandwidth_bytes_per_s")
                     if bandwidth_required or fields.has("bandwidth_bytes_per_s") else None)
        return cls(name=name, capacity_bytes=int(fields.number("capacity_bytes")), bandwidth_bytes_per_s=bandwidth)


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
    max_restarts: int          # restarts of one socket a run survives (both backends: the Ray actor's limit too)
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
    fill_drain_ns: float = 0.0        # per fused kernel call: pipeline fill/drain and call-boundary sync
    kernel_looping: bool = False      # consecutive decoder-layer calls merged into one looped kernel
    run_setup_ns: float = 0.0         # per run of a model: program / argument load when it is activated
    step_host_ns: float = 0.0         # per step: host work (sampling, scheduling, hand-off of the token)

    @classmethod
    def from_fields(cls, fields: Fields) -> "SocketSpec":
        """Parse the `socket:` section; fields are read, and mistakes reported, in a fixed order."""
        eff, launch, execution, runtime = _known_sections(fields)
        supports_fusion = execution.boolean("supports_fusion")
        if not supports_fusion:
            _refuse_inert(fields, eff, execution)
        ho_ns = launch.number("ho_ns", minimum=0.0, inclusive=True) if launch.has("ho_ns") else None
        default_mode, default_orch = _execution_defaults(execution, supports_fusion, ho_ns)
        groups = _unfused_kernel_groups(execution)
        spec = cls(
            kind=fields.string("kind", choices=("rdu", "gpu")),
            name=fields.string("name"),
            peak_flops_per_s=fields.number("peak_flops_per_s"),
            sram=TierSpec.from_fields("sram", fields.sub("sram"), bandwidth_required=supports_fusion),
            hbm=TierSpec.from_fields("hbm", fields.sub("hbm")),
            ddr=TierSpec.from_fields("ddr", fields.sub("ddr")) if fields.has("ddr") else None,
            hbm_reserved_bytes=int(fields.number("hbm_reserved_bytes", minimum=0.0, inclusive=True)),
            restart_ns=fields.number("restart_ns", minimum=0.0, inclusive=True),
            max_restarts=fields.integer("max_restarts", minimum=0, maximum=1_000_000),
            fused_compute_fraction=eff.fraction("fused_compute_fraction", 0.0),
            fused_hbm_bandwidth_fraction=eff.fraction("fused_hbm_bandwidth_fraction", 0.0),
            unfused_compute_fraction=eff.fraction("unfused_compute_fraction"),
            unfused_hbm_bandwidth_fraction=eff.fraction("unfused_hbm_bandwidth_fraction"),
            launch_so_ns=launch.number("so_ns", minimum=0.0, inclusive=True),
            launch_ho_ns=ho_ns,
            supports_fusion=supports_fusion,
            fusion_scope=execution.string("fusion_scope", "layer", choices=FUSION_SCOPES),
            default_mode=default_mode,
            default_orchestration=default_orch,
            unfused_kernel_groups=groups,
            fill_drain_ns=execution.number("fill_drain_ns", 0.0, minimum=0.0, inclusive=True),
            kernel_looping=execution.boolean("kernel_looping", False),
            run_setup_ns=runtime.number("run_setup_ns", 0.0, minimum=0.0, inclusive=True),
            step_host_ns=runtime.number("step_host_ns", 0.0, minimum=0.0, inclusive=True),
        )
        _check_fractions_and_reserve(spec, fields, eff)
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


_FUSED_ONLY = {"efficiency": ("fused_compute_fraction", "fused_hbm_bandwidth_fraction"),
               "execution": ("fusion_scope", "fill_drain_ns", "kernel_looping")}


def _refuse_inert(fields: Fields, eff: Fields, execution: Fields) -> None:
    """A socket without fusion never runs a fused kernel: fields that only shape one (and an SRAM
    bandwidth, which only a fused kernel's on-chip traffic uses) would change nothing. Refuse them."""
    for section, keys in ((eff, _FUSED_ONLY["efficiency"]), (execution, _FUSED_ONLY["execution"])):
        for key in keys:
            if section.has(key):
                section.fail("changes nothing on a socket without fusion (supports_fusion: false); remove it", key)
    if fields.sub("sram").has("bandwidth_bytes_per_s"):
        fields.sub("sram").fail("changes nothing on a socket without fusion (supports_fusion: false): no kernel "
                                "keeps data on chip; remove it", "bandwidth_bytes_per_s")


def _known_sections(fields: Fields) -> tuple[Fields, Fields, Fields, Fields]:
    """Refuse unknown keys up front, so a typo is named before any value is read; returns the
    `efficiency`, `launch`, `execution` and `runtime` sub-sections (`runtime` may be absent)."""
    fields.check_known({"kind", "name", "peak_flops_per_s", "sram", "hbm", "ddr", "hbm_reserved_bytes",
                        "restart_ns", "max_restarts", "efficiency", "launch", "execution", "runtime"})
    eff = fields.sub("efficiency")
    eff.check_known({"fused_compute_fraction", "fused_hbm_bandwidth_fraction",
                     "unfused_compute_fraction", "unfused_hbm_bandwidth_fraction"})
    launch = fields.sub("launch")
    launch.check_known({"so_ns", "ho_ns"})
    execution = fields.sub("execution")
    execution.check_known({"supports_fusion", "fusion_scope", "default_mode", "default_orchestration",
                           "unfused_kernel_groups", "fill_drain_ns", "kernel_looping"})
    runtime = fields.sub("runtime") if fields.has("runtime") else Fields({}, fields.origin, "socket.runtime")
    runtime.check_known({"run_setup_ns", "step_host_ns"})
    return eff, launch, execution, runtime


def _execution_defaults(execution: Fields, supports_fusion: bool, ho_launch_ns: float | None) -> tuple[str, str]:
    """The default mode and orchestration, refused when the socket cannot run them (fused without
    fusion, HO without an HO launch cost)."""
    default_mode = execution.string("default_mode", choices=MODES)
    default_orch = execution.string("default_orchestration", choices=ORCHESTRATIONS)
    if default_mode == "fused" and not supports_fusion:
        execution.fail("default_mode is fused but supports_fusion is false", "default_mode")
    if default_orch == "HO" and ho_launch_ns is None:
        execution.fail("default_orchestration is HO but launch.ho_ns is not given", "default_orchestration")
    return default_mode, default_orch


def _unfused_kernel_groups(execution: Fields) -> tuple[tuple[str, ...], ...]:
    """`execution.unfused_kernel_groups`: lists of operator names an unfused plan runs as one kernel."""
    groups_raw = execution.data.get("unfused_kernel_groups") or []
    if not isinstance(groups_raw, list):
        execution.fail(f"expected a list of operator-name lists, got {groups_raw!r}", "unfused_kernel_groups")
    groups = []
    for i, group in enumerate(groups_raw):
        if not isinstance(group, list) or not all(isinstance(op, str) for op in group) or not group:
            execution.fail(f"expected a non-empty list of operator names, got {group!r}",
                           f"unfused_kernel_groups[{i}]")
        groups.append(tuple(group))
    return tuple(groups)


def _check_fractions_and_reserve(spec: SocketSpec, fields: Fields, eff: Fields) -> None:
    """Checks across fields, once all are parsed: a fusing socket needs fused efficiencies above 0,
    and the HBM reserve must leave some HBM."""
    if spec.supports_fusion and (spec.fused_compute_fraction <= 0 or spec.fused_hbm_bandwidth_fraction <= 0):
        eff.fail("a socket that runs fused kernels needs fused_compute_fraction and "
                 "fused_hbm_bandwidth_fraction > 0", "fused_hbm_bandwidth_fraction")
    if spec.hbm_reserved_bytes >= spec.hbm.capacity_bytes:
        fields.fail(f"reserves {spec.hbm_reserved_bytes} bytes of a {spec.hbm.capacity_bytes}-byte HBM",
                    "hbm_reserved_bytes")
