"""Measures of a policy π̂ in the tilted world, as pure functions of recorded log-probs and r.

π* = π₀·exp(r/β*)/Z with r bounded, so (Korbak et al. 2022; the paper's forward-KL criterion):

- **forward KL** E_x KL(π*‖π̂) by self-normalised importance sampling from y ~ π₀: weights
  w = exp(r/β*) are bounded, Ẑ(x) = mean w, and
  KL_x = Σ w̃ (ln π₀ + r/β* − ln π̂) − ln Ẑ with w̃ = w/Σw; the effective sample size
  (Σw)²/Σw² says how many π₀ samples the weights are worth;
- **rejection** gives exact draws of π*: accept y ~ π₀ with probability exp((r − r_max)/β*);
  the acceptance rate is Z(x)·exp(−r_max/β*), so it also estimates ln Z(x) on its own;
- **reverse KL** KL(π̂‖π*) = E_π̂[ln π̂ − ln π₀ − r/β*] + ln Z(x), from π̂'s own samples;
- E_π̂[r], KL(π̂‖π₀), entropy, length, and the oracle win probability of eq. (3).

Inputs are grouped **per prompt**: a sequence with one 1-D array (one value per sampled reply)
for each prompt, possibly of different lengths (rejection keeps a random number). Every
expectation over x is the mean over prompts, and its standard error (``_se``) is the spread of
the per-prompt values over √(number of prompts): the prompts are a sample too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from distalign.tilted.labels import preference_prob

Groups = Sequence[ArrayLike]  # one array per prompt


def _arrays(groups: Groups) -> list[NDArray[np.float64]]:
    return [np.asarray(g, np.float64).reshape(-1) for g in groups]


def _mean_se(values: Sequence[float], name: str) -> dict[str, float]:
    x = np.asarray([v for v in values if math.isfinite(v)], np.float64)
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return {name: float(x.mean()) if x.size else math.nan, f"{name}_se": se}


def log_partition(r: Groups, beta_star: float) -> NDArray[np.float64]:
    """ln Ẑ(x) = ln mean exp(r/β*) over y ~ π₀, per prompt (log-sum-exp, no overflow)."""
    out = []
    for a in _arrays(r):
        s = a / beta_star
        m = s.max()
        out.append(m + math.log(np.mean(np.exp(s - m))))
    return np.asarray(out)


def forward_kl(logp0: Groups, r: Groups, logp_hat: Groups, beta_star: float) -> dict[str, float]:
    """E_x KL(π*‖π̂) by self-normalised importance sampling from π₀'s samples.

    ``logp0``, ``r``, ``logp_hat``: ln π₀, r and ln π̂ of the same replies y ~ π₀(·|x). Returns
    ``kl_fwd`` ± ``kl_fwd_se`` over prompts, ``ess`` (mean effective sample size per prompt)
    and ``ess_per_sample`` (ESS/n; 1 for flat weights). With ``logp_hat = logp0`` it is
    KL(π*‖π₀), the distance the world asks a method to travel.
    """
    kls, ess, frac = [], [], []
    for l0, rr, lh in zip(_arrays(logp0), _arrays(r), _arrays(logp_hat), strict=True):
        s = rr / beta_star
        w = np.exp(s - s.max())
        wt = w / w.sum()
        log_z = s.max() + math.log(w.mean())
        kls.append(float(np.sum(wt * (l0 + s - lh)) - log_z))
        e = float(w.sum() ** 2 / np.sum(w**2))
        ess.append(e)
        frac.append(e / w.size)
    return {**_mean_se(kls, "kl_fwd"), "ess": float(np.mean(ess)),
            "ess_per_sample": float(np.mean(frac)), "prompts": len(kls)}


def acceptance_prob(r: ArrayLike, r_max: float, beta_star: float) -> NDArray[np.float64]:
    """exp((r − r_max)/β*) ∈ (0, 1]: accepting y ~ π₀ with it leaves an exact draw of π*."""
    r = np.asarray(r, np.float64)
    if np.any(r > r_max):
        raise ValueError(f"reward {float(r.max())} above its stated bound {r_max}")
    return np.exp((r - r_max) / beta_star)


def rejection_accept(r: ArrayLike, r_max: float, beta_star: float,
                     rng: np.random.Generator) -> NDArray[np.bool_]:
    """Which proposals y ~ π₀ are kept as draws of π*."""
    p = acceptance_prob(r, r_max, beta_star)
    return rng.random(p.shape) < p


def log_partition_from_acceptance(accepted: ArrayLike, proposed: ArrayLike, r_max: float,
                                  beta_star: float) -> NDArray[np.float64]:
    """ln Z(x) = r_max/β* + ln(accepted/proposed), per prompt: independent of the SNIS Ẑ."""
    acc, prop = np.asarray(accepted, np.float64), np.asarray(proposed, np.float64)
    with np.errstate(divide="ignore"):
        return r_max / beta_star + np.log(acc / prop)


def rejection_forward_kl(logp0: Groups, r: Groups, logp_hat: Groups, beta_star: float,
                         log_z: ArrayLike) -> dict[str, float]:
    """E_x KL(π*‖π̂) from exact draws y ~ π* (accepted proposals): the mean of
    ln π₀ + r/β* − ln Z − ln π̂. Prompts without an accepted draw are left out (counted)."""
    kls = []
    for l0, rr, lh, lz in zip(_arrays(logp0), _arrays(r), _arrays(logp_hat),
                              np.asarray(log_z, np.float64), strict=True):
        if l0.size and math.isfinite(lz):
            kls.append(float(np.mean(l0 + rr / beta_star - lh)) - float(lz))
    return {**_mean_se(kls, "kl_fwd_rs"), "prompts": len(kls),
            "prompts_without_draws": len(_arrays(logp0)) - len(kls)}


def reverse_kl(logp_hat: Groups, logp0: Groups, r: Groups, beta_star: float,
               log_z: ArrayLike) -> dict[str, float]:
    """E_x KL(π̂‖π*) from y ~ π̂ (ln π̂, ln π₀, r of π̂'s own samples) and ln Z(x) per prompt
    (``log_partition`` of π₀'s samples, or ``log_partition_from_acceptance``)."""
    kls = [float(np.mean(lh - l0 - rr / beta_star)) + float(lz)
           for lh, l0, rr, lz in zip(_arrays(logp_hat), _arrays(logp0), _arrays(r),
                                     np.asarray(log_z, np.float64), strict=True)]
    return _mean_se(kls, "kl_rev")


def policy_stats(logp_hat: Groups, logp0: Groups, r: Groups,
                 lengths: Groups | None = None) -> dict[str, float]:
    """From π̂'s own samples: gold reward E_π̂[r], KL(π̂‖π₀) (k1), entropy E[−ln π̂] (nats per
    reply) and mean length (tokens, EOS included)."""
    lh, l0, rr = _arrays(logp_hat), _arrays(logp0), _arrays(r)
    out = {**_mean_se([float(np.mean(a)) for a in rr], "gold_reward"),
           **_mean_se([float(np.mean(a - b)) for a, b in zip(lh, l0, strict=True)], "kl_ref"),
           **_mean_se([float(-np.mean(a)) for a in lh], "entropy")}
    if lengths is not None:
        out.update(_mean_se([float(np.mean(a)) for a in _arrays(lengths)], "length"))
    return out


def oracle_win_prob(logp0_a: Groups, r_a: Groups, logp0_b: Groups, r_b: Groups,
                    beta_star: float, gamma: float) -> dict[str, float]:
    """E P(a ≻ b | x) of eq. (3) for paired replies a (the policy's) and b (a reference's)."""
    wins = [float(np.mean(preference_prob(a0, ar, b0, br, beta_star, gamma)))
            for a0, ar, b0, br in zip(_arrays(logp0_a), _arrays(r_a), _arrays(logp0_b),
                                      _arrays(r_b), strict=True)]
    return _mean_se(wins, "oracle_win")


def reward_model_stats(rhat_chosen: ArrayLike, rhat_rejected: ArrayLike, p_chosen: ArrayLike,
                       logit_star: ArrayLike | None = None) -> dict[str, float]:
    """A reward model R̂ on held-out labelled pairs.

    ``p_chosen`` is the exact P(chosen ≻ rejected) stored with each pair, ``logit_star`` its
    γ Δ ln π* (default: the logit of ``p_chosen``). Returns ``rm_acc`` (on the drawn labels),
    ``rm_acc_expected`` (E of that accuracy over the labels' own noise: the same number with
    less variance), ``bayes_acc`` = E max(P, 1−P), the ceiling of any R̂, and ``rm_corr``, the
    correlation of R̂(a) − R̂(b) with γ Δ ln π* about 0 (a pair's orientation is arbitrary, so
    the differences are not centred: this is Pearson's r over the pairs taken both ways).
    """
    rc, rr = np.asarray(rhat_chosen, np.float64), np.asarray(rhat_rejected, np.float64)
    p = np.asarray(p_chosen, np.float64)
    d = rc - rr
    if logit_star is None:
        q = np.clip(p, 1e-300, 1 - 1e-16)
        z = np.log(q) - np.log1p(-q)
    else:
        z = np.asarray(logit_star, np.float64)
    right = np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5))
    expected = np.where(d > 0, p, np.where(d < 0, 1.0 - p, 0.5))
    norm = math.sqrt(float(np.sum(d**2)) * float(np.sum(z**2)))
    corr = float(np.sum(d * z)) / norm if norm > 0 else math.nan
    return {"rm_acc": float(right.mean()), "rm_acc_expected": float(expected.mean()),
            "bayes_acc": float(np.mean(np.maximum(p, 1.0 - p))), "rm_corr": corr,
            "pairs": int(d.size)}
