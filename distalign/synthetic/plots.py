"""Figures of ``distalign synthetic``: forward KL and win-rate against n, per reward class.

Solid: leak-aware choice, mean ± std over seeds; dotted: oracle grid point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distalign.eval.report import METHOD_NAMES


def _curves(ax: Any, rows: dict[str, Any], metric: str) -> None:
    for i, (m, row) in enumerate(rows.items()):
        ns = [int(n) for n in row["by_n"]]
        for kind, style in (("leak_aware", "-o"), ("oracle", ":")):
            mu = [row["by_n"][str(n)][kind][metric]["mean"] for n in ns]
            sd = [row["by_n"][str(n)][kind][metric]["std"] for n in ns]
            label = METHOD_NAMES.get(m, m) if kind == "leak_aware" else None
            ax.errorbar(ns, mu, yerr=sd, fmt=style, color=f"C{i}", capsize=3, label=label,
                        alpha=1.0 if kind == "leak_aware" else 0.6, ms=4)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("preference pairs n")


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """synthetic_kl.png (forward KL vs n, one panel per reward class) and
    synthetic_winrate.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = results["reference"]
    variants = list(results["methods"])
    fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 4.4), sharey=True,
                             squeeze=False)
    for ax, variant in zip(axes[0], variants, strict=True):
        _curves(ax, results["methods"][variant], "kl_fwd")
        rm = results["reward_model"].get(variant)
        if rm:  # what distill / RKL converge to at β = 0: the reward model's own LM
            ns = [int(n) for n in rm]
            ax.plot(ns, [rm[str(n)]["rm_kl_fwd"]["mean"] for n in ns], "k--", lw=0.8,
                    label="reward model's π̃ ∝ exp(R̂/γ)")
        ax.axhline(ref["pi0"]["kl_fwd"], color="gray", ls="--", lw=1, label="π₀")
        ax.axhline(ref["rlhf_floor_true_reward"]["kl_fwd"], color="black", ls="-.", lw=1,
                   label="RLHF family, true reward")
        ax.set_yscale("log")
        ax.set_title(f"E_x KL(π*‖π̂), {variant} reward class", fontsize=10)
    axes[0][0].set_ylabel("forward KL (nats)")
    axes[0][-1].legend(fontsize=7, ncol=2, loc="lower left")
    fig.suptitle("solid = leak-aware choice, dotted = oracle grid point", fontsize=9)
    fig.tight_layout()
    paths = [out / "synthetic_kl.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 4.4), squeeze=False)
    for ax, variant in zip(axes[0], variants, strict=True):
        _curves(ax, results["methods"][variant], "win_ref")
        ax.axhline(0.5, color="gray", ls="--", lw=1)
        ax.set_title(f"oracle win-rate vs π₀, {variant}", fontsize=10)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out / "synthetic_winrate.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
