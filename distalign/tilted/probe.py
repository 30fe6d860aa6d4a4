"""``distalign tilted probe``: choose β*, γ and L by measurement, before building a world.

On held-out prompts, n replies per prompt are sampled from π₀ once at the largest L (a draw
of the L-space cut to L' < L tokens is an exact draw of the L'-space, :meth:`Replies.cut`),
scored by the gold reward at every L, and for each (L, β*, γ) the probe reports:

- KL(π*‖π₀) (SNIS, ± SE over prompts): how far π* is from π₀, the aim being 0.3–3 nats;
- ESS per sample of the importance weights exp(r/β*): how many π₀ samples a forward-KL
  estimate is worth, and the rejection sampler's acceptance rate E_π₀ exp((r − r_max)/β*);
- E_π*[r] against E_π₀[r]: what the tilt buys in gold reward;
- on all within-prompt pairs: the Bayes-optimal label accuracy, the accuracy of "the likelier
  reply under π₀ wins", and the share of the label log-odds' variance from Δ ln π₀ (the rest
  is Δr/β*): under eq. (3) a label says as much about π₀ as about r unless β* is small.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distalign.tilted.labels import label_stats
from distalign.tilted.measures import forward_kl, log_partition

Groups = list[np.ndarray]


def within_pairs(groups: Groups) -> np.ndarray:
    """Differences x_i − x_j over all i < j of each prompt's group, concatenated."""
    out = [g[i] - g[j] for g in groups for i, j in itertools.combinations(range(g.size), 2)]
    return np.asarray(out, np.float64)


def probe_rows(logp0: Groups, r: Groups, betas: Sequence[float], gammas: Sequence[float],
               r_max: float, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (β*, γ) from π₀'s samples (ln π₀ and r per prompt) at one L."""
    d0, dr = within_pairs(logp0), within_pairs(r)
    base = {"prompts": len(r), "n": int(np.mean([g.size for g in r])),
            "sd_logp0": float(np.mean([g.std(ddof=1) for g in logp0])),
            "sd_r": float(np.mean([g.std(ddof=1) for g in r])),
            "mean_r_pi0": float(np.mean([g.mean() for g in r])), **(extra or {})}
    rows = []
    for beta in betas:
        kl = forward_kl(logp0, r, logp0, beta)
        lz = log_partition(r, beta)
        # E_π*[r] by the same self-normalised weights
        er = [float(np.sum(np.exp(g / beta - z) * g) / g.size) for g, z in zip(r, lz, strict=True)]
        acc = float(np.mean([np.mean(np.exp((g - r_max) / beta)) for g in r]))
        for gamma in gammas:
            ls = label_stats(d0, dr, beta, gamma)
            rows.append({**base, "beta_star": beta, "gamma": gamma,
                         "kl_star_pi0": kl["kl_fwd"], "kl_star_pi0_se": kl["kl_fwd_se"],
                         "ess_per_sample": kl["ess_per_sample"], "accept_rate": acc,
                         "mean_r_star": float(np.mean(er)), **ls})
    return rows


def probe(pi0: str, prompts: str, *, n: int = 16, limit: int = 8,
          lengths: Sequence[int] = (16, 32, 64), betas: Sequence[float] = (0.05, 0.1, 0.2, 0.5),
          gammas: Sequence[float] = (0.1, 1.0), gold: str = "vader",
          gold_bounds: Sequence[float] | None = None, split_seed: int = 0, heldout: int = 200,
          max_prompt_length: int = 96, seed: int = 0, rows_per_batch: int = 32,
          progress: bool = True) -> list[dict[str, Any]]:
    """Sample π₀ on the first ``limit`` held-out prompts of the split and return the rows of
    :func:`probe_rows` for every L in ``lengths``."""
    from distalign.eval.prompts import load_prompt_set
    from distalign.tilted.gold import check_gold_spec, make_gold_reward
    from distalign.tilted.labels import check_positive
    from distalign.tilted.pi0 import load_pi0
    from distalign.tilted.space import eos_ids, sample_replies
    from distalign.tilted.world import split_prompts

    betas = [check_positive("beta_star (β*)", b) for b in betas]
    gammas = [check_positive("gamma (γ)", g) for g in gammas]
    _, r_max = check_gold_spec(gold, gold_bounds)
    reward = make_gold_reward(gold, gold_bounds)
    model, tok = load_pi0(pi0)
    with tempfile.TemporaryDirectory() as tmp:
        split_prompts(prompts, Path(tmp), split_seed, heldout)
        pset = load_prompt_set(str(Path(tmp) / "heldout.jsonl"), tok, fmt="hh", limit=limit,
                               max_prompt_length=max_prompt_length)
    ids = [p.token_ids for p in pset.prompts]
    full = sample_replies(model, tok, ids, n, max(lengths), seed=seed,
                          rows_per_batch=rows_per_batch, progress=progress)
    eos = eos_ids(tok, model)
    rows = []
    for L in sorted(lengths):
        reps = full.cut(L, eos)
        texts = reps.texts(tok)
        r = reward.score([pset.prompts[i].prompt for i in reps.prompt_index], texts,
                         [ids[i] for i in reps.prompt_index], reps.reply_ids)
        g0, gr = reps.groups(reps.logp), reps.groups(r)
        extra = {"L": L, "ended": float(np.mean(reps.ended)),
                 "mean_len": float(np.mean(reps.lengths)),
                 "r_above_half": float(np.mean(np.asarray(r) > 0.5))}
        rows += probe_rows(g0, gr, betas, gammas, r_max, extra)
    return rows


COLUMNS = [("L", "L", "{}"), ("beta_star", "β*", "{:g}"), ("gamma", "γ", "{:g}"),
           ("kl_star_pi0", "KL(π*‖π₀)", "{:.2f}"), ("kl_star_pi0_se", "± se", "{:.2f}"),
           ("ess_per_sample", "ESS/n", "{:.2f}"), ("accept_rate", "accept", "{:.3f}"),
           ("mean_r_pi0", "E₀[r]", "{:.2f}"), ("mean_r_star", "E*[r]", "{:.2f}"),
           ("bayes_acc", "Bayes acc", "{:.3f}"), ("pi0_acc", "π₀-only acc", "{:.3f}"),
           ("share_logp0", "share Δln π₀", "{:.2f}")]


def format_probe(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the probe's rows, with each L's sample description above it."""
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [f.format(row[k]) if isinstance(row.get(k), int | float)
                 and not (isinstance(row[k], float) and math.isnan(row[k])) else "–"
                 for k, _, f in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    seen = {}
    for row in rows:
        seen.setdefault(row["L"], row)
    notes = [f"L={L}: {r['prompts']} prompts × {r['n']} replies; ended {r['ended']:.0%}, mean "
             f"length {r['mean_len']:.1f} tokens; within-prompt sd of ln π₀ {r['sd_logp0']:.1f} "
             f"nats, of r {r['sd_r']:.2f}; r > 0.5 for {r['r_above_half']:.0%}"
             for L, r in seen.items()]
    return "\n".join(notes + [""] + lines)
