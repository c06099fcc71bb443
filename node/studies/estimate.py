"""`rdu estimate`: time one generation of a model on one TP group of a platform, analytically."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from rdu.base import UserError, format_bytes
from rdu.interconnect.topology import Topology
from rdu.node.cluster.layout import nodes_for_tp, tp_groups
from rdu.node.cluster.platform import Platform
from rdu.socket_actor.model_spec import ModelSpec
from rdu.socket_actor.operators import OPERATOR_CLASSES, PhaseShape, decode_shapes, prefill_shape

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
        phases.add_row("kernels per step", *(_kernels_text(d["phases"][p]) for p in ("prefill", "decode")))
        phases.add_row("SRAM spill to HBM",
                       *(format_bytes(int(d["phases"][p]["spill_bytes"])) for p in ("prefill", "decode")))
        phases.add_row("HBM traffic", *(format_bytes(int(d["phases"][p]["hbm_bytes"])) for p in ("prefill", "decode")))
        console.print(phases)
        runtime = Table(title="named runtime costs (not derived bottom-up; see the preset's sources)")
        runtime.add_column("cost")
        runtime.add_column("per unit", justify="right")
        runtime.add_column("total", justify="right")
        for row in d["runtime"].values():
            runtime.add_row(row["label"], ms(row["unit_ns"]), ms(row["total_ns"]))
        console.print(runtime)
        colls = Table(title="collectives per step: algorithm by size and topology, time of one call alone")
        for col in ("phase", "operator", "bytes/rank", "algorithm", "per call", "calls"):
            colls.add_column(col, justify="left" if col in ("phase", "operator", "algorithm") else "right",
                             no_wrap=True)
        for c in d["collectives"]:
            colls.add_row(c["phase"], c["operator"], format_bytes(int(c["bytes"])), c["algorithm"],
                          f"{c['ns'] / 1e3:,.1f} us", str(c["calls"]))
        console.print(colls)


def _kernels_text(phase: dict[str, Any]) -> str:
    """Kernel calls per step; with kernel looping, also the kernels before the layers were merged."""
    calls, kernels = phase["kernel_calls_per_step"], phase["kernels_per_step"]
    return str(calls) if calls == kernels else f"{calls} ({kernels} before looping)"


def _collectives(cost, shapes: dict[str, PhaseShape]) -> list[dict[str, Any]]:
    """Every distinct collective of a step: its message, the algorithm the group picks, its time.

    Per phase, the message of the phase's first step (decode messages change little from step to step)."""
    c, ring = cost.compiled, cost.ring
    out = []
    for phase, shape in shapes.items():
        if len(shape.matrix()) == 0:
            continue
        x = np.concatenate([[1.0], shape.matrix()[0]])
        for row, kind in enumerate(c.collectives):
            if kind is None:
                continue
            nbytes = float(x @ c.collective_bytes[row])
            out.append({"phase": phase, "operator": c.names[row], "kind": kind, "bytes": nbytes,
                        "algorithm": ring.algorithm(nbytes) if ring.ranks > 1 else "none (one rank)",
                        "ns": float(ring.hardware_ns(kind, nbytes)), "calls": int(c.count[row])})
    return out


def _runtime_costs(cost, decode_steps: int) -> dict[str, dict[str, Any]]:
    """The named costs the bottom-up model does not derive: per run, per step, per fused kernel call."""
    s = cost.socket
    steps = 1 + decode_steps
    fill = s.fill_drain_ns if cost.fused else 0.0
    fill_label = (f"fill/drain per fused kernel call ({cost.kernel_calls} per step)" if cost.fused
                  else "fill/drain (fused kernels only; none unfused)")
    return {
        "run_setup": {"label": "run set-up (program + argument load), once per run", "unit_ns": s.run_setup_ns,
                      "total_ns": s.run_setup_ns},
        "step_host": {"label": "host work per step", "unit_ns": s.step_host_ns, "total_ns": s.step_host_ns * steps},
        "fill_drain": {"label": fill_label, "unit_ns": fill,
                       "total_ns": fill * cost.kernel_calls * steps},
    }


MAX_BATCH = 1 << 20   # sequences in one estimated batch: far beyond any real serving batch


def estimate(platform: Platform, model: ModelSpec, tp: int, batch: int, prompt_tokens: int, output_tokens: int,
             mode: str | None = None, orchestration: str | None = None) -> Estimate:
    spec = platform.spec
    for flag, value in (("--batch", batch), ("--prompt", prompt_tokens), ("--output", output_tokens)):
        if value < 1:
            raise UserError(f"{flag}: expected a whole number >= 1, got {value}")
    if batch > MAX_BATCH:
        raise UserError(f"--batch: expected at most {MAX_BATCH:,} sequences, got {batch:,}")
    positions = model.max_position_embeddings
    if positions is not None and prompt_tokens + output_tokens > positions:
        raise UserError(f"--prompt + --output: {model.name} holds at most {positions:,} positions "
                        f"(max_position_embeddings), got {prompt_tokens:,} + {output_tokens:,}")
    topology = Topology(spec.links, nodes_for_tp(spec, tp), spec.sockets_per_node)
    group = tp_groups(spec, topology, tp)[0]
    cost = group.cost_model(model, mode, orchestration)
    prompts = [prompt_tokens] * batch
    generation = cost.generate(prompts, [output_tokens] * batch, breakdown=True)
    shard = group.shard_bytes(model)
    kv = group.kv_bytes(model, batch * (prompt_tokens + output_tokens))
    switch_ns = max(group.copy_in(shard, 0).values())
    decode_steps = max(output_tokens - 1, 0)

    def phase(times) -> dict[str, Any]:
        return {"total_ns": times.total_ns, "steps": len(times.step_ns), "class_ns": times.class_ns,
                "op_ns": times.op_ns, "flops": times.flops, "hbm_bytes": times.hbm_bytes,
                "collective_ns": times.collective_ns, "launch_ns": times.launch_ns,
                "spill_bytes": times.spill_bytes, "kernels_per_step": cost.compiled.kernels_per_step,
                "kernel_calls_per_step": cost.kernel_calls}

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
        "fits_in_ddr": model.weight_bytes() <= spec.capacity_tier_bytes * nodes_for_tp(spec, tp),
        "phases": {"prefill": phase(generation.prefill), "decode": phase(generation.decode)},
        "kernel_looping": bool(cost.fused and spec.socket.kernel_looping),
        "runtime": _runtime_costs(cost, decode_steps),
        "collectives": _collectives(cost, {"prefill": prefill_shape(prompts, model.sliding_window),
                                           "decode": decode_shapes(prompts, [output_tokens] * batch,
                                                                   model.sliding_window)}),
    }
    return Estimate(data)
