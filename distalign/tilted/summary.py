"""A tilted-world pipeline's closing summary: ``claims.md``/``claims.json`` (:mod:`.claims`),
the reward model against the Bayes-optimal accuracy, and the gold-reward-against-KL(π‖π₀)
frontier plot (``frontier.png``) with every row on it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from distalign.tilted.claims import check_claims, claims_markdown, frontier, read_rows
from distalign.tilted.measures import reward_model_stats
from distalign.tilted.world import TiltedWorld

BETAS = np.geomspace(0.01, 20.0, 48)


def reward_stats(world: TiltedWorld, reward: str, batch_size: int = 16) -> dict[str, Any]:
    """The trained R̂ on the world's held-out labelled pairs (exact ids): its accuracy against
    the Bayes-optimal one and the correlation of R̂ differences with γ Δ ln π*."""
    import torch

    from distalign.eval.judges.reward import length_batches
    from distalign.lm.models import ModelConfig, load_reward_model, load_tokenizer
    from distalign.lm.scoring import sequence_scores

    rows = [json.loads(x) for x in world.file("pairs-heldout.jsonl").read_text().splitlines()
            if x.strip()]
    tok = load_tokenizer(ModelConfig(name_or_path=reward))
    rm = load_reward_model(ModelConfig(name_or_path=reward, reward_model=reward))
    seqs = [(r["prompt_ids"], r[f"{side}_ids"]) for side in ("chosen", "rejected") for r in rows]
    scores = [math.nan] * len(seqs)
    with torch.no_grad():
        for idx, ids, attn, resp in length_batches(seqs, tok.pad_token_id, batch_size):
            for i, v in zip(idx, sequence_scores(rm, ids, attn, resp).tolist(), strict=True):
                scores[i] = float(v)
    n = len(rows)
    out = reward_model_stats(scores[:n], scores[n:], [r["p_chosen"] for r in rows],
                             [r["logit"] for r in rows])
    out["pi0_acc"] = float(np.mean([r["logp0_chosen"] > r["logp0_rejected"] for r in rows]))
    return out


def _base_groups(path: Path, world: TiltedWorld) -> tuple[list[Any], list[Any]]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    r = world.gold_reward().score([x["prompt"] for x in rows], [x["output"] for x in rows],
                                  [x["prompt_token_ids"] for x in rows],
                                  [x["output_token_ids"] for x in rows])
    by: dict[str, list[int]] = {}
    for i, x in enumerate(rows):
        by.setdefault(str(x["prompt_id"]), []).append(i)
    keys = sorted(by)
    return ([np.array([rows[i]["output_logprob"] for i in by[k]]) for k in keys],
            [np.array([r[i] for i in by[k]]) for k in keys])


def plot_frontier(path: Path, curve: list[tuple[float, float]], star: tuple[float, float],
                  by_method: dict[str, list], world: TiltedWorld) -> None:
    """Gold reward against KL(π‖π₀) of every row, over the frontier; ``star``: its β = β*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 4.2), layout="constrained")
    ax.plot([c[0] for c in curve], [c[1] for c in curve], color="0.6", lw=1.5,
            label="π₀·exp(r/β)/Z over β (reachable frontier)")
    if star:
        ax.scatter([star[0]], [star[1]], marker="*", s=160, color="gold", edgecolor="k",
                   zorder=4, label=f"π* on the frontier (β = β* = {world.beta_star:g})")
    marks = iter("os^vD<>PXhd")
    colors = iter(plt.get_cmap("tab10").colors)
    for label, runs in by_method.items():
        pts = [(m["tilted/kl_ref"], m["tilted/gold_reward"]) for m in runs
               if "tilted/kl_ref" in m and "tilted/gold_reward" in m]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=next(marks, "o"),
                       color=next(colors, "k"), s=40, label=label, zorder=3)
    ax.set_xlabel("KL(π‖π₀), nats per reply (from π's own samples)")
    ax.set_ylabel("gold reward E_π[r]")
    ax.set_title(f"tilted world: β* = {world.beta_star:g}, γ = {world.gamma:g}, "
                 f"L = {world.max_new_tokens}", fontsize=10)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(out: str, rows: list[dict[str, Any]], world: str, reward: str | None,
                  base_generations: str, title: str) -> dict[str, Any]:
    """Write ``claims.md``, ``claims.json`` and ``frontier.png`` under ``out``."""
    root, w = Path(out), TiltedWorld.load(world)
    by_method = read_rows(root, rows)
    claims = check_claims(by_method)
    groups = _base_groups(Path(base_generations), w)
    curve = frontier(*groups, BETAS)
    at_star = frontier(*groups, [w.beta_star])
    plot_frontier(root / "frontier.png", curve, at_star[0], by_method, w)
    extra = []
    held = w.data.get("pairs", {}).get("heldout", {})
    rm = reward_stats(w, reward) if reward else None
    if rm is not None:
        extra += ["## The reward model on the world's held-out pairs", "",
                  f"Accuracy {rm['rm_acc']:.3f} on {rm['pairs']} pairs (expected over the "
                  f"labels' noise {rm['rm_acc_expected']:.3f}); Bayes-optimal accuracy "
                  f"{rm['bayes_acc']:.3f}; \"the reply likelier under π₀ wins\" "
                  f"{rm['pi0_acc']:.3f}; correlation of R̂ differences with γ Δ ln π* "
                  f"{rm['rm_corr']:.3f}.", ""]
    extra += [f"World: β* = {w.beta_star:g}, γ = {w.gamma:g}, L = {w.max_new_tokens}; "
              f"held-out pairs' Bayes-optimal accuracy {held.get('bayes_acc', math.nan):.3f}. "
              "Frontier: `frontier.png` (the grey curve is the exact KL-regularised optimum "
              "π₀·exp(r/β)/Z for every β, by importance sampling from π₀'s replies)."]
    (root / "claims.md").write_text(claims_markdown(claims, title, extra), encoding="utf-8")
    result = {"claims": claims, "reward_model": rm, "frontier": curve,
              "frontier_at_beta_star": at_star[0],
              "verdicts": {v: sum(c["verdict"] == v for c in claims)
                           for v in ("agree", "disagree", "inconclusive")}}
    (root / "claims.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return {"verdicts": result["verdicts"], "reward_model": rm}
