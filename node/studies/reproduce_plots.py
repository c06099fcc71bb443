"""PNG plots of a reproduction: headline ratios, fusion/orchestration ranges, CoE time breakdown.

Drawn in the shared style of `node.plot_style` (object API on the Agg canvas, no pyplot). Each
`*_figure` function returns its Figure so tests can inspect the axes; `plot_reproduction` saves them.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from rdu.node.observe.plot_style import legend_outside, log_axis, new_figure, plain_number, save_figure, style_axes

__all__ = ["plot_reproduction", "headline_figure", "fusion_figure", "coe_figure", "PAPER_RANGES"]

# The paper's published ranges of each fusion / orchestration speedup, drawn as a band behind the bars.
PAPER_RANGES = (("fusion_decode", (1.0, 13.0)), ("fusion_prefill", (1.5, 3.0)),
                ("orchestration_decode", (1.4, 8.0)), ("orchestration_prefill", (1.0, 1.1)))
_INSIDE, _OUTSIDE, _BAND = "tab:blue", "tab:orange", "tab:green"


def _claim_label(name: str) -> str:
    """`coe_bs8_vs_dgx_a100` -> two short lines, 'coe bs8' over 'vs dgx a100'."""
    head, _, tail = name.partition("_vs_")
    return head.replace("_", " ") + ("\nvs " + tail.replace("_", " ") if tail else "")


def headline_figure(reproduction) -> Figure:
    """Paper vs emulator for every single-number speedup claim, log y (the ratios span 1.5x to 31x)."""
    claims = [c for c in reproduction.claims if isinstance(c.paper, float) and c.unit == "x"]
    figure = new_figure(11.0, 4.8)
    axes = figure.subplots()
    x = range(len(claims))
    for offset, label, values in ((-0.2, "paper", [c.paper for c in claims]),
                                  (0.2, "emulator", [c.emulator for c in claims])):
        bars = axes.bar([i + offset for i in x], values, width=0.4, label=label)
        axes.bar_label(bars, labels=[plain_number(float(f"{v:.3g}")) for v in values], fontsize="x-small", padding=2)
    axes.set_xticks(list(x), [_claim_label(c.name) for c in claims], fontsize="small")
    values = [v for c in claims for v in (c.paper, c.emulator)]
    if values:
        log_axis(axes, "y", min(values), max(values))
        axes.set_ylim(top=max(values) * 1.6)  # room for the value labels on a log axis
    style_axes(axes, "SN40L headline claims: paper vs emulator (one set of presets)",
               "claim (benchmark, and the DGX it is compared with)", "SN40L speedup over the DGX (x, log scale)")
    axes.grid(False, axis="x")
    legend_outside(axes)
    return figure


def fusion_figure(reproduction) -> Figure:
    """One panel per speedup kind: the emulator's value per benchmark against the paper's range."""
    fusion = reproduction.details["fusion"]
    names = list(fusion)
    figure = new_figure(15.0, 4.8)
    figure.suptitle("Operator fusion (unfused SO vs fused HO) and orchestration (SO vs HO, unfused) on "
                    "sn40l-node, TP8\nSO = host software orchestration, HO = on-chip hardware orchestration")
    for axes, (kind, (low, high)) in zip(figure.subplots(1, len(PAPER_RANGES)), PAPER_RANGES):
        values = [fusion[n][kind] for n in names]
        axes.axhspan(low, high, color=_BAND, alpha=0.18)
        axes.bar(range(len(names)), values, color=[_INSIDE if low <= v <= high else _OUTSIDE for v in values])
        axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize="x-small")
        axes.set_ylim(0, 1.08 * max([high, *values]))
        style_axes(axes, kind.replace("_", " "), "", "speedup (x)")
        axes.grid(False, axis="x")
    handles = [Patch(color=_BAND, alpha=0.18, label="paper's range"),
               Patch(color=_INSIDE, label="emulator, inside the paper's range"),
               Patch(color=_OUTSIDE, label="emulator, outside the paper's range")]
    figure.legend(handles=handles, loc="outside lower center", ncols=3, fontsize="small")
    return figure


def coe_figure(reproduction) -> Figure:
    """Stacked virtual time per platform and batch size (linear: the stack's parts must add up)."""
    coe = reproduction.details["coe"]
    labels = list(coe)
    parts = (("router", "router"), ("switching_stall", "switching (DDR/host -> HBM)"), ("expert", "expert runs"))
    figure = new_figure(10.0, 4.8)
    axes = figure.subplots()
    bottom = [0.0] * len(labels)
    for key, label in parts:
        values = [coe[name][key] / 1e6 for name in labels]
        axes.bar(labels, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, total in enumerate(bottom):  # the total on top: small bars stay readable next to 4-second ones
        axes.annotate(f"{total:,.0f} ms", (i, total), xytext=(0, 3), textcoords="offset points", ha="center",
                      fontsize="x-small")
    axes.margins(y=0.1)
    axes.tick_params(axis="x", labelsize="small")
    style_axes(axes, "CoE benchmark (128 in / 20 out): where the time goes",
               "platform / batch size", "virtual time (ms)")
    axes.grid(False, axis="x")
    legend_outside(axes, title="time spent on")
    return figure


def plot_reproduction(reproduction, out_dir: Path) -> list[Path]:
    """Write the three PNGs of a reproduction into `out_dir`; returns their paths."""
    paths = [out_dir / "headline_claims.png", out_dir / "fusion_orchestration.png", out_dir / "coe_breakdown.png"]
    for build, path in zip((headline_figure, fusion_figure, coe_figure), paths):
        save_figure(build(reproduction), path)
    return paths
