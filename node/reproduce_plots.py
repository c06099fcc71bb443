"""PNG plots of a reproduction: headline ratios, fusion/orchestration ranges, CoE time breakdown."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_reproduction"]


def _headline(reproduction, path: Path) -> None:
    claims = [c for c in reproduction.claims if isinstance(c.paper, float) and c.unit == "x"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = range(len(claims))
    ax.bar([i - 0.2 for i in x], [c.paper for c in claims], width=0.4, label="paper")
    ax.bar([i + 0.2 for i in x], [c.emulator for c in claims], width=0.4, label="emulator")
    ax.set_xticks(list(x), [c.name.replace("_vs_", "\nvs ").replace("_", " ") for c in claims], fontsize=8)
    ax.set_ylabel("SN40L speedup over the DGX (x)")
    ax.set_yscale("log")
    ax.set_title("SN40L headline claims: paper vs emulator (one set of presets)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fusion(reproduction, path: Path) -> None:
    fusion = reproduction.details["fusion"]
    kinds = (("fusion_decode", (1, 13)), ("fusion_prefill", (1.5, 3)), ("orchestration_decode", (1.4, 8)),
             ("orchestration_prefill", (1.0, 1.1)))
    fig, axes = plt.subplots(1, 4, figsize=(14, 4.2), sharey=False)
    names = list(fusion)
    for ax, (kind, (low, high)) in zip(axes, kinds):
        ax.axhspan(low, high, color="tab:green", alpha=0.15, label="paper's range")
        ax.bar(range(len(names)), [fusion[n][kind] for n in names], color="tab:blue", label="emulator")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(kind.replace("_", " "))
        ax.set_ylabel("speedup (x)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Operator fusion (unfused SO vs fused HO) and orchestration (SO vs HO, unfused) on sn40l-node, TP8")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _coe(reproduction, path: Path) -> None:
    coe = reproduction.details["coe"]
    labels = list(coe)
    parts = (("router", "router"), ("switching_stall", "switching (DDR/host -> HBM)"), ("expert", "expert runs"))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bottom = [0.0] * len(labels)
    for key, label in parts:
        values = [coe[name][key] / 1e6 for name in labels]
        ax.bar(labels, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("virtual time (ms)")
    ax.set_title("CoE benchmark (128 in / 20 out): where the time goes")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reproduction(reproduction, out_dir: Path) -> list[Path]:
    paths = [out_dir / "headline_claims.png", out_dir / "fusion_orchestration.png", out_dir / "coe_breakdown.png"]
    _headline(reproduction, paths[0])
    _fusion(reproduction, paths[1])
    _coe(reproduction, paths[2])
    return paths
