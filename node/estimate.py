"""`rdu estimate`: time one generation of a model on one TP group of a platform, analytically."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from interconnect.spec_fields import UserError, format_bytes
from interconnect.topology import Topology
from node.layout import nodes_for_tp, tp_groups
from node.platform import Platform
from socket_actor.model_spec import ModelSpec
from socket_actor.operators import OPERATOR_CLASSES

__all__ = ["Estimate", "estimate"]


@dataclass
class Estimate:
    """The numbers `rdu estimate` prints (all times in ns, sizes in bytes)."""

    data: dict[str, Any]

    def render(self, console: Console) -> None:
        d = self.data
        head = Table(title=f"{d['model']} on {d['platform']}: TP{d['tp']}, batch {d['batch']}, "
                           f"{d['prompt_tokens']} in / {d['output_tokens']} out, {d['mode']} / {d['orchestration']}")
        head.add_column("quantity")
        head.add_column("value", justify="right")
        ms = lambda ns: f"{ns / 1e6:,.3f} ms"  # noqa: E731
        head.add_row("parameters", f"{d['params'] / 1e9:.2f} B")
        head.add_row("weights", f"{d['weight_bytes'] / 1e9:.2f} GB ({format_bytes(d['shard_bytes'])} per socket)")
        head.add_row("TTFT (prefill)", ms(d["ttft_ns"]))
        head.add_row("time per output token", ms(d["tpot_ns"]))
        head.add_row("total", ms(d["total_ns"]))
        head.add_row("DDR -> HBM switch of the model", ms(d["switch_ns"]))
        head.add_row("fits in HBM (weights + KV)",
                     f"{'yes' if d['fits_in_hbm'] else 'NO'} ({format_bytes(d['hbm_needed_bytes'])} of "
                     f"{format_bytes(d['hbm_usable_bytes'])} per socket)")
        head.add_row("fits in node DDR", "yes" if d["fits_in_ddr"] else "NO")
        console.print(head)
        phases = Table(title="time by operator class (per socket, summed over steps)")
        phases.add_column("class")
        for phase in ("prefill", "decode"):
            phases.add_column(phase, justify="right")
        for cls in OPERATOR_CLASSES:
            phases.add_row(cls, *(ms(d["phases"][p]["class_ns"].get(cls, 0.0)) for p in ("prefill", "decode")))
        phases.add_row("[b]total[/b]", *(ms(d["phases"][p]["total_ns"]) for p in ("prefill", "decode")))
        phases.add_row("kernels per step", *(str(d["phases"][p]["kernels_per_step"]) for p in ("prefill", "decode")))
        console.print(phases)


def estimate(platform: Platform, model: ModelSpec, tp: int, batch: int, prompt_tokens: int, output_tokens: int,
             mode: str | None = None, orchestration: str | None = None) -> Estimate:
    spec = platform.spec
    for flag, value in (("--batch", batch), ("--prompt", prompt_tokens), ("--output", output_tokens)):
        if value < 1:
            raise UserError(f"{flag}: expected a whole number >= 1, got {value}")
    topology = Topology(spec.links, nodes_for_tp(spec, tp), spec.sockets_per_node)
    group = tp_groups(spec, topology, tp)[0]
    cost = group.cost_model(model, mode, orchestration)
    generation = cost.generate([prompt_tokens] * batch, [output_tokens] * batch, breakdown=True)
    shard = group.shard_bytes(model)
    kv = group.kv_bytes(model, batch * (prompt_tokens + output_tokens))
    switch_ns = max(group.copy_in(shard, 0).values())
    decode_steps = max(output_tokens - 1, 0)

    def phase(times) -> dict[str, Any]:
        return {"total_ns": times.total_ns, "steps": len(times.step_ns), "class_ns": times.class_ns,
                "op_ns": times.op_ns, "flops": times.flops, "hbm_bytes": times.hbm_bytes,
                "collective_ns": times.collective_ns, "launch_ns": times.launch_ns,
                "kernels_per_step": cost.compiled.kernels_per_step}

    data = {
        "platform": spec.name, "model": model.name, "tp": tp, "batch": batch,
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "mode": cost.mode, "orchestration": cost.orchestration,
        "params": model.params(), "weight_bytes": model.weight_bytes(), "shard_bytes": shard,
        "kv_bytes": kv, "hbm_needed_bytes": shard + kv, "hbm_usable_bytes": spec.socket.hbm_usable_bytes,
        "ttft_ns": generation.ttft_ns,
        "tpot_ns": round(generation.decode.total_ns / decode_steps) if decode_steps else 0,
        "total_ns": generation.total_ns,
        "switch_ns": switch_ns,
        "fits_in_hbm": shard + kv <= spec.socket.hbm_usable_bytes,
        "fits_in_ddr": model.weight_bytes() <= spec.ddr_capacity_bytes * nodes_for_tp(spec, tp),
        "phases": {"prefill": phase(generation.prefill), "decode": phase(generation.decode)},
    }
    return Estimate(data)
