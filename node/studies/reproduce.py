"""`rdu reproduce sn40l`: run the experiment behind each headline claim of the SN40L paper
(Prabhakar et al., MICRO 2024; targets in ../shared/reference/sn40l-calibration.md section 4)
with one set of presets, and compare.

Every number comes from the emulator's own machinery — the link model for switching, the serving
loop on the in-process backend for the CoE benchmark, capacity ledgers for the spill, out-of-
memory and footprint points, the cost model for fusion and orchestration — never from a formula
written for the claim. How each experiment is set up is stated in `Claim.definition` and in the
report, together with every preset value that is an assumption rather than a published number.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

from rdu.base import Fields, UserError
from rdu.interconnect.topology import Topology
from rdu.node.cluster.inline_backend import InlineCluster
from rdu.node.cluster.layout import nodes_for_tp, tp_groups
from rdu.node.cluster.platform import load_platform
from rdu.scheduler.serving import CoEServer, ServingConfig
from rdu.scheduler.workloads import Request, Workload, WorkloadSpec, build_workload
from rdu.socket_actor.model_spec import load_model
from rdu.socket_actor.tiers import CapacityError

__all__ = ["Claim", "Reproduction", "reproduce_sn40l", "FUSION_BENCHMARKS", "PLATFORMS", "claim_values",
           "overridden"]

PLATFORMS = ("sn40l-node", "dgx-a100", "dgx-h100")
EXPERT = "llama-2-7b"
TP = 8
PROMPT_TOKENS, OUTPUT_TOKENS = 128, 20        # the paper's chatbot case (from NVIDIA NeMo's benchmark)
ROUTER_OUTPUT_TOKENS = 1                      # the router classifies: prefill + one token picks the expert
COE_EXPERTS = 40                              # enough distinct experts for batch 8, small enough for a DGX's DRAM
FUSION_BATCH = 8                              # assumption: the paper's kernel benchmarks run at the CoE batch
# the paper's fusion benchmark list (model, sequence length); training runs are not modelled
FUSION_BENCHMARKS = (("llama-2-7b", 4096), ("llama-2-70b", 4096), ("mistral-7b", 2048), ("mistral-7b", 4096),
                     ("falcon-40b", 2048), ("bloom-176b", 8192))


@dataclass
class Claim:
    name: str
    description: str
    paper: float | tuple[float, float] | str
    emulator: float | str
    unit: str = "x"
    definition: str = ""
    tolerance: float = 0.10
    role: str = "predicted"            # "fitted" if a preset value is fitted to this claim
    loo_rel_err: float | None = None   # leave-one-out error from the recorded calibration

    @property
    def rel_err(self) -> float | None:
        if isinstance(self.paper, str):
            return None
        if isinstance(self.paper, tuple):
            low, high = self.paper
            if low <= self.emulator <= high:
                return 0.0
            bound = low if self.emulator < low else high
            return abs(self.emulator - bound) / bound
        return abs(self.emulator - self.paper) / self.paper

    @property
    def ok(self) -> bool:
        if isinstance(self.paper, str):
            return self.emulator == self.paper
        return self.rel_err <= (0.0 if isinstance(self.paper, tuple) else self.tolerance)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "paper": list(self.paper) if isinstance(self.paper, tuple) else self.paper,
                "emulator": round(self.emulator, 4) if isinstance(self.emulator, float) else self.emulator,
                "rel_err": None if self.rel_err is None else round(self.rel_err, 4), "ok": self.ok,
                "unit": self.unit, "definition": self.definition, "role": self.role,
                "loo_rel_err": None if self.loo_rel_err is None else round(self.loo_rel_err, 4)}


@dataclass
class Reproduction:
    claims: list[Claim]
    details: dict = field(default_factory=dict)
    assumptions: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def all_ok(self) -> bool:
        return all(c.ok for c in self.claims)

    def to_dict(self) -> dict:
        return {"claims": [c.to_dict() for c in self.claims], "all_ok": self.all_ok, "details": self.details,
                "assumptions": self.assumptions}


# -- experiments --------------------------------------------------------------------------------

_OVERRIDES: dict[str, dict] = {}     # platform -> dotted field -> value, while a calibration tries values


@contextlib.contextmanager
def overridden(overrides: dict[str, dict]):
    """Run the experiments with some preset fields set (the calibration's trial values)."""
    global _OVERRIDES
    saved = _OVERRIDES
    _OVERRIDES = {p: dict(v) for p, v in overrides.items()}
    _experiment.cache_clear()
    try:
        yield
    finally:
        _OVERRIDES = saved
        _experiment.cache_clear()


def load_platform_for(platform: str):
    return load_platform(platform, _OVERRIDES.get(platform) or None, "calibration")


def _group(platform: str):
    spec = load_platform_for(platform).spec
    topology = Topology(spec.links, nodes_for_tp(spec, TP), spec.sockets_per_node)
    return spec, tp_groups(spec, topology, TP)[0]


def _switch_ns(platform: str) -> int:
    """One expert's DDR -> HBM switch into a TP8 group, on the link model."""
    _, group = _group(platform)
    return max(group.copy_in(group.shard_bytes(load_model(EXPERT)), 0).values())


def _expert_ns(platform: str) -> int:
    """One expert run, batch 1, 128 in / 20 out, weights already in HBM: execution only (the
    calibration sheet's definition of the expert-only claim), so without the run's set-up, which
    the CoE claims charge whenever a group changes model."""
    spec, group = _group(platform)
    return group.cost_model(load_model(EXPERT)).generate([PROMPT_TOKENS], [OUTPUT_TOKENS], setup=False).total_ns


def _paper_coe(platform: str, batch: int) -> dict:
    """The paper's CoE benchmark served by the scheduler: router at batch B, B cold experts."""
    spec = load_platform_for(platform).spec
    model = load_model(EXPERT)
    fields = Fields({"kind": "paper-coe", "batch": batch, "prompt_tokens": PROMPT_TOKENS,
                     "output_tokens": OUTPUT_TOKENS, "router_output_tokens": ROUTER_OUTPUT_TOKENS},
                    "reproduce", "workload")
    workload = build_workload(WorkloadSpec.from_fields(fields), COE_EXPERTS, seed=0)
    server = CoEServer(InlineCluster(spec, 1, TP), model, COE_EXPERTS, model, workload,
                       ServingConfig(policy="lru", max_batch=batch))
    return server.run().summary


def _cyclic_workload(experts: int, rounds: int = 3) -> Workload:
    requests = tuple(Request(i, i * 1_000_000, PROMPT_TOKENS, OUTPUT_TOKENS, i % experts)
                     for i in range(experts * rounds))
    return Workload("cyclic", requests, 1, f"{rounds} rounds over {experts} experts")


def _only_cold_switches(platform: str, experts: int) -> bool:
    """Serve every expert in turn, three times; True if no expert had to be switched in twice."""
    spec = load_platform_for(platform).spec
    model = load_model(EXPERT)
    server = CoEServer(InlineCluster(spec, 1, TP), model, experts, model, _cyclic_workload(experts),
                       ServingConfig(policy="lru", max_batch=1))
    return server.run().summary["switches"] == experts


def _fits_in_ddr(platform: str, experts: int) -> bool:
    """True if the router and `experts` experts fit in one node's DDR (host DRAM on a GPU node)."""
    spec = load_platform_for(platform).spec
    model = load_model(EXPERT)
    try:
        CoEServer(InlineCluster(spec, 1, TP), model, experts, model, _cyclic_workload(1, 1), ServingConfig())
    except CapacityError:
        return False
    return True


def _largest(predicate, low: int, high: int) -> int:
    """Largest n in [low, high] with predicate(n) true, predicate monotone (true then false)."""
    if not predicate(low):
        return low - 1
    while low < high:
        middle = (low + high + 1) // 2
        if predicate(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _fusion_ratios(benchmarks=FUSION_BENCHMARKS) -> dict[str, dict[str, float]]:
    """Per benchmark: fused (production: fused layers, HO) vs unfused (one kernel per operator,
    SO), and HO vs SO on the unfused graph, for prefill of the sequence and one decode step at it."""
    spec, group = _group("sn40l-node")
    out = {}
    for model_name, seq in benchmarks:
        model = load_model(model_name)
        times = {}
        for mode, orchestration in (("fused", "HO"), ("unfused", "SO"), ("unfused", "HO")):
            cost = group.cost_model(model, mode, orchestration)
            prompts = [seq] * FUSION_BATCH
            times[(mode, orchestration)] = (cost.prefill(prompts).total_ns,
                                            cost.decode([seq - 1] * FUSION_BATCH, [2] * FUSION_BATCH).total_ns)
        key = f"{model_name}@{seq // 1024}K"
        base, fused, ho = times[("unfused", "SO")], times[("fused", "HO")], times[("unfused", "HO")]
        out[key] = {"fusion_prefill": base[0] / fused[0], "fusion_decode": base[1] / fused[1],
                    "orchestration_prefill": base[0] / ho[0], "orchestration_decode": base[1] / ho[1]}
    return out


@functools.lru_cache(maxsize=None)
def _experiment(name: str, *args):
    """One experiment's result, computed once per set of overrides."""
    if name == "fusion":
        model_name, seq = args
        return _fusion_ratios(((model_name, seq),))[f"{model_name}@{seq // 1024}K"]
    return {"switch": _switch_ns, "expert": _expert_ns, "coe": lambda p, b: _paper_coe(p, b)["virtual_ns"]}[name](*args)


def claim_values(names: list[str]) -> dict[str, float]:
    """The emulator's value of some claims (by name), running only the experiments they need."""
    values = {}
    for name in names:
        if name.startswith("switching_vs_"):
            gpu = name.removeprefix("switching_vs_").replace("_", "-")
            values[name] = _experiment("switch", gpu) / _experiment("switch", "sn40l-node")
        elif name.startswith("coe_bs"):
            batch, gpu = name.removeprefix("coe_bs").split("_vs_")
            values[name] = _experiment("coe", gpu.replace("_", "-"), int(batch)) / _experiment("coe", "sn40l-node",
                                                                                                int(batch))
        elif name.startswith("expert_only_vs_"):
            gpu = name.removeprefix("expert_only_vs_").replace("_", "-")
            values[name] = _experiment("expert", gpu) / _experiment("expert", "sn40l-node")
        elif name.split("[")[0] in ("fusion_decode", "fusion_prefill", "orchestration_decode", "orchestration_prefill"):
            kind, key = name.rstrip("]").split("[")
            model_name, seq = key.split("@")
            bench = next(b for b in FUSION_BENCHMARKS if b[0] == model_name and b[1] // 1024 == int(seq[:-1]))
            values[name] = _experiment("fusion", *bench)[kind]
        else:
            raise UserError(f"no experiment measures claim {name!r}")
    return values


def _assumptions() -> dict[str, dict[str, str]]:
    table = {}
    for platform in PLATFORMS:
        sources = load_platform_for(platform).sources
        table[platform] = {path: source for path, source in sorted(sources.items()) if "assumption" in source}
    return table


def _switching_claims(switch_ns: dict[str, int]) -> list[Claim]:
    """The expert-switch speedups: the SN40L's per-socket DDR links against a DGX's shared host link."""
    return [
        Claim("switching_vs_dgx_a100", "expert switch (DDR -> HBM) speedup over DGX A100", 31.0,
              switch_ns["dgx-a100"] / switch_ns["sn40l-node"],
              definition="Llama-2-7B into a TP8 group: 8 shards over each socket's DDR link (SN40L) vs over the "
                         "host link all GPUs share (DGX), on the link model"),
        Claim("switching_vs_dgx_h100", "expert switch speedup over DGX H100 (15x; 16x in one section)", 15.0,
              switch_ns["dgx-h100"] / switch_ns["sn40l-node"], definition="as above, PCIe Gen5 host link"),
    ]


def _coe_claims(coe: dict[tuple[str, int], dict]) -> list[Claim]:
    """The CoE end-to-end speedups, batch 8 then batch 1, each over DGX A100 then H100."""
    claims = []
    for batch, targets in ((8, (6.6, 3.7)), (1, (4.8, 2.8))):
        sn_ns = coe[("sn40l-node", batch)]["virtual_ns"]
        for gpu, target in zip(("dgx-a100", "dgx-h100"), targets):
            claims.append(Claim(f"coe_bs{batch}_vs_{gpu.replace('-', '_')}",
                                f"CoE end-to-end speedup over {gpu.upper()}, batch {batch}, 128 in / 20 out", target,
                                coe[(gpu, batch)]["virtual_ns"] / sn_ns,
                                definition=f"paper-coe workload served by the scheduler (inline backend): router once "
                                           f"at batch {batch}, {batch} distinct cold experts switched in and run one "
                                           f"after another; time from arrival to the last token"))
    return claims


def _expert_only_claims(expert_ns: dict[str, int]) -> list[Claim]:
    """The speedups of one resident expert's generation, with no switching, over each DGX."""
    return [Claim(f"expert_only_vs_{gpu.replace('-', '_')}",
                  f"expert-only speedup over {gpu.upper()} (resident, no switching), batch 1", target,
                  expert_ns[gpu] / expert_ns["sn40l-node"],
                  definition="one expert generation, 128 in / 20 out, TP8, weights in HBM; execution only "
                             "(the sheet's definition): the run's set-up is a CoE cost")
            for gpu, target in zip(("dgx-a100", "dgx-h100"), (2.0, 1.5))]


def _capacity_claims(spill_experts: int, oom_experts: int, sn_node_experts: int) -> list[Claim]:
    """The capacity points: a DGX's HBM spill and out-of-memory counts, an SN40L node's DDR capacity,
    and the DGX footprint holding as many experts."""
    dgx_nodes = math.ceil(sn_node_experts / spill_experts)
    return [
        Claim("dgx_spill_experts", "experts that fit in a DGX's HBM before latency jumps", 50.0, float(spill_experts),
              unit="experts", definition="largest N for which serving N experts round-robin three times on "
                                         "dgx-h100 switches each expert in only once (router and KV cache resident)"),
        Claim("dgx_oom_experts", "expert count at which a DGX runs out of memory", 150.0, float(oom_experts),
              unit="experts", definition="smallest N whose experts plus router do not fit in the DGX's host DRAM "
                                         "(2 TB): the emulator explains the paper's out-of-memory point by capacity"),
        Claim("sn40l_node_experts", "experts one SN40L node holds at TP8", 850.0, float(sn_node_experts),
              unit="experts", definition="largest N whose experts plus router fit in one node's DDR (8 x 1.5 TB)"),
        Claim("dgx_nodes_for_same_experts", "DGX nodes needed to hold those experts in HBM (footprint)", 19.0,
              float(dgx_nodes), unit="nodes",
              definition="ceil(experts one SN40L node holds / experts one DGX holds in HBM (the spill point))"),
    ]


def _fusion_claims(fusion: dict[str, dict[str, float]]) -> list[Claim]:
    """Fusion and orchestration speedups per benchmark, then which benchmark gains most from fusion."""
    claims = []
    for key, ratios in fusion.items():
        claims += [
            Claim(f"fusion_decode[{key}]", f"fused vs unfused decode, {key}", (1.0, 13.0), ratios["fusion_decode"],
                  definition=f"one decode step at context {key.split('@')[1]}, batch {FUSION_BATCH}, TP8: unfused "
                             f"(one kernel per operator, host-orchestrated) vs fused layers, hardware-orchestrated"),
            Claim(f"fusion_prefill[{key}]", f"fused vs unfused prefill, {key}", (1.5, 3.0), ratios["fusion_prefill"],
                  definition=f"prefill of {FUSION_BATCH} sequences, same configurations"),
            Claim(f"orchestration_decode[{key}]", f"HO vs SO decode, {key}", (1.4, 8.0),
                  ratios["orchestration_decode"],
                  definition="one decode step on the unfused graph (many short kernels), SO vs HO launches"),
            Claim(f"orchestration_prefill[{key}]", f"HO vs SO prefill, {key}", (1.0, 1.1),
                  ratios["orchestration_prefill"], definition="prefill on the unfused graph, SO vs HO launches"),
        ]
    top = max(fusion, key=lambda k: fusion[k]["fusion_decode"]).split("@")[0]
    claims.append(Claim("fusion_decode_highest", "benchmark with the highest decode fusion speedup", "mistral-7b",
                        top, unit="", definition="argmax over the benchmark list of fused vs unfused decode"))
    return claims


def reproduce_sn40l() -> Reproduction:
    """Run every experiment once (in this order), then state each claim from the measurements."""
    switch_ns = {p: _switch_ns(p) for p in PLATFORMS}
    expert_ns = {p: _expert_ns(p) for p in PLATFORMS}
    coe = {(p, b): _paper_coe(p, b) for p in PLATFORMS for b in (8, 1)}
    spill = _largest(lambda n: _only_cold_switches("dgx-h100", n), 1, 200)
    oom = _largest(lambda n: _fits_in_ddr("dgx-h100", n), 1, 400) + 1
    sn_capacity = _largest(lambda n: _fits_in_ddr("sn40l-node", n), 1, 4000)
    fusion = _fusion_ratios()

    claims = (_switching_claims(switch_ns) + _coe_claims(coe) + _expert_only_claims(expert_ns)
              + _capacity_claims(spill, oom, sn_capacity) + _fusion_claims(fusion))
    details = {
        "switch_ns": switch_ns, "expert_run_ns": expert_ns,
        "coe": {f"{p}/bs{b}": {"virtual_ns": s["virtual_ns"], **s["time_breakdown_ns"]} for (p, b), s in coe.items()},
        "fusion": fusion, "dgx_spill_experts": spill, "dgx_oom_experts": oom, "sn40l_node_experts": sn_capacity,
    }
    _tag_claims(claims)
    return Reproduction(claims=claims, details=details, assumptions=_assumptions())


CALIBRATION_RECORD = "calibration.json"   # in node/cluster/presets/: `rdu calibrate --out` output, committed


def _tag_claims(claims: list[Claim]) -> None:
    """Mark each claim fitted or predicted (from the presets' fitted marks) and attach its
    leave-one-out error from the recorded calibration (`rdu calibrate`), when it has one."""
    import json
    from importlib import resources

    fitted_to: set[str] = set()
    for platform in PLATFORMS:
        for mark in load_platform_for(platform).fitted.values():
            fitted_to.update(mark.observations)
    record = resources.files("rdu.node.cluster") / "presets" / CALIBRATION_RECORD
    loo = {}
    if record.is_file():
        loo = {o["id"]: o.get("loo_error") for o in json.loads(record.read_text()).get("observations", [])}
    for claim in claims:
        claim.role = "fitted" if claim.name in fitted_to else "predicted"
        error = loo.get(claim.name)
        claim.loo_rel_err = abs(error) if error is not None else None


def check_target(target: str) -> None:
    if target != "sn40l":
        raise UserError(f"unknown reproduction target {target!r}; available: sn40l")


def write_report(reproduction: Reproduction, out_dir: Path) -> list[Path]:
    """REPORT.md, claims.json and PNG plots into `out_dir`."""
    import json

    from rdu.node.studies.reproduce_plots import plot_reproduction

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "claims.json").write_text(json.dumps(reproduction.to_dict(), indent=2, sort_keys=True) + "\n")
    plots = plot_reproduction(reproduction, out_dir)
    lines = ["# SN40L paper claims, reproduced by the emulator", "",
             "Command: `rdu reproduce sn40l`. One set of presets (`node/cluster/presets/`) serves every claim.", "",
             "A claim is *fitted* when a preset value marked `fitted` was fitted to it (`rdu calibrate`), "
             "*predicted* otherwise; the leave-one-out error is that of the claim predicted by a calibration "
             "that left it out (recorded in `node/cluster/presets/calibration.json`).", "",
             "| claim | paper | emulator | relative error | role | leave-one-out error | within tolerance |",
             "|---|---|---|---|---|---|---|"]
    for c in reproduction.claims:
        paper = f"{c.paper[0]:g}-{c.paper[1]:g}" if isinstance(c.paper, tuple) else str(c.paper)
        value = f"{c.emulator:.3g}" if isinstance(c.emulator, float) else str(c.emulator)
        err = "" if c.rel_err is None else f"{c.rel_err:.1%}"
        loo = "" if c.loo_rel_err is None else f"{c.loo_rel_err:.1%}"
        lines.append(f"| {c.description} | {paper} {c.unit} | {value} {c.unit} | {err} | {c.role} | {loo} | "
                     f"{'yes' if c.ok else 'NO'} |")
    lines += ["", "## How each number is measured", ""]
    lines += [f"- **{c.name}**: {c.definition}" for c in reproduction.claims if c.definition]
    lines += ["", "## Assumptions behind the numbers (preset values the paper does not publish)", ""]
    for platform, entries in reproduction.assumptions.items():
        lines.append(f"### {platform}")
        lines += [f"- `{path}`: {source}" for path, source in entries.items()]
        lines.append("")
    lines += ["Further assumptions of the experiments: the router is a Llama-2-7B run as a classification "
              "(prefill of the batch's prompts and one token, which picks the expert); the kernel benchmarks run "
              "at batch 8; prefill and decode only (training, FlashFFTConv and the Monarch operational-intensity "
              "example are not modelled).", "",
              "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    report = out_dir / "REPORT.md"
    report.write_text("\n".join(lines) + "\n")
    return [report, out_dir / "claims.json", *plots]
