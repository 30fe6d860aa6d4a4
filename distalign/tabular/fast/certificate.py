"""When one Newton start is enough: a proof that a stationary point is the global optimum.

PMLE (5) and distillation (12) with β > 0 minimise, per context, F = G + c·KL(softmax θ ‖ π₀)
with G convex (the pair losses, PMLE's ridge) and c = β/|X|. The KL is not convex in the
logits, so F can have several local minima and the toy solves from two starts (the RKL closed
form and π₀). A converged first start θ_A needs no second one when this holds:

1. Every θ with F(θ) ≤ F(θ_A) has KL ≤ κ = (F(θ_A) − min G)/c, since G ≥ min G; min G is the
   β = 0 solve of the same data (convex; less a margin for its rounding).
2. KL(p‖π₀) ≥ KL(Bern(p_l) ‖ Bern(π₀_l)) =: g_l(p_l/π₀_l), decreasing below p_l = π₀_l. If
   g_l(e^{κ−1}) > κ for every response l, then KL ≤ κ forces p_l > π₀_l e^{κ−1}, i.e.
   d_l = ln(p_l/π₀_l) − KL > −1.
3. The KL's Hessian in the logits is vᵀ∇²KL v = Σ_l p_l (d_l + 1)(v_l − p·v)², so on
   T = {KL ≤ κ} it is positive definite on centred v. T is compact and connected (its only
   critical point is π₀) and locally convex, hence convex (Tietze–Nakajima); F = G + c·KL is
   strictly convex on it. So F has one critical point in T, T holds every θ at least as good
   as θ_A, and θ_A is the global minimiser: a second start can find nothing lower.

The test is a few exponentials per problem; tests/test_tabular_certificate.py checks steps
2–3 numerically and that no certified problem of the toy's grid has a better second start.
"""

from __future__ import annotations

import numpy as np

#: slack subtracted from the β = 0 optimum: its solve stops within ~1e-13 of min G
MIN_G_MARGIN = 1e-9


def kl_floor(t: np.ndarray, log_ref: np.ndarray) -> np.ndarray:
    """g_l(t) = min KL(p‖π₀) over p with p_l = t·π₀_l: KL(Bern(tπ₀_l) ‖ Bern(π₀_l))."""
    pi = np.exp(log_ref)
    tp = t * pi
    return tp * np.log(t) + (1 - tp) * (np.log1p(-tp) - np.log1p(-pi))


def unique_optimum(value: np.ndarray, min_g: np.ndarray, kl_coef: np.ndarray,
                   log_ref: np.ndarray) -> np.ndarray:
    """Which problems' stationary points are certified global minima (steps 1–3 above).

    ``value`` F(θ_A), ``min_g`` a lower bound on min G and ``kl_coef`` c, all ``[P]``;
    ``log_ref`` ln π₀ ``[K, P]``. Problems with c = 0 or an unknown bound (NaN) are not
    certified.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = (value - min_g) / kl_coef
        ok = (kl_coef > 0) & (kappa >= 0) & (kappa < 1)
        kappa = np.where(ok, kappa, 0.5)
        floor = kl_floor(np.exp(kappa - 1), log_ref)
    return ok & (floor > kappa * (1 + 1e-9) + 1e-12).all(0)
