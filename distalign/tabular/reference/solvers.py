"""Exact tabular solvers for the six methods of the paper (arXiv 2506.01523 v2, §2 and App. B).

Shapes: a :class:`FitInput` holds batch dims ``[...]`` (for the toy: {full, train} fit × seed)
followed by ``[X, K]`` (or ``[X, K, K]`` for win counts). A solver takes a β grid ``[B]`` and
returns log π̂ of shape ``[..., B, X, K]``: the β grid is one more batch axis, never a loop.

Per-context scaling: x is uniform, so E_x KL = (1/X) Σ_x KL and each context's share of an
objective is its pairs' weight plus (β/X)·KL. Every iterative objective carries a tiny ridge
``ridge`` (λ, default 1e-6, in *reward* units, see each solver) on the centred logits: with few
pairs some responses are never compared (or always win) and the MLE is not identified; the
ridge picks the solution nearest the anchor and changes nothing measurable otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distalign.objectives import (
    bt_reward_loss,
    distill_loss,
    dpo_loss,
    pmle_loss,
    preference_logprob,
    rebel_loss,
)
from distalign.stats import rkl_logits, rlhf_logits
from distalign.tabular.config import GREEDY_GAP, greedy_tiers
from distalign.tabular.reference.newton import newton_decrement, newton_solve, objective_value
from distalign.tabular.reference.pairwise import (
    ClosedForm,
    PairwiseObjective,
    gather_pairs,
    pair_index,
)
from distalign.tabular.rules import QUADRATIC, SAME_POINT

# Closed-form ψ, ψ', ψ'' (derivatives in d) of each pair term below, for speed; newton_solve
# checks them against autograd through the library call at the start of every solve.
SOFTPLUS_LINEAR = 40.0  # softplus(x) = x to float64 precision beyond this (torch's default 20
#                         drops e^{-x} ≈ 2e-9, visible in distillation's near-zero losses)


def _softplus(x: Tensor) -> Tensor:
    return F.softplus(x, threshold=SOFTPLUS_LINEAR)


def _softplus_neg(scale: float | None = None) -> ClosedForm:
    """ψ = −ln σ(z), z = scale·d (or z = τ(d − d_ref) with τ an extra when scale is None)."""

    def z_and_scale(d: Tensor, *e: Tensor) -> tuple[Tensor, Tensor | float]:
        if scale is not None:
            return scale * d, scale
        d_ref, tau = e
        return tau * (d - d_ref), tau

    def value(d: Tensor, *e: Tensor) -> Tensor:
        return _softplus(-z_and_scale(d, *e)[0])

    def derivs(d: Tensor, *e: Tensor) -> tuple[Tensor, Tensor]:
        z, a = z_and_scale(d, *e)
        s = torch.sigmoid(-z)
        return -a * s, (a * a) * s * torch.sigmoid(z)

    return ClosedForm(value, derivs)


#: what the tuned grid parameter means for each method
TUNED = {
    "rlhf": "β (KL-to-π₀ weight, eq. 1)",
    "rkl": "β (KL-to-π₀ weight, eq. 15; entropy weight fixed to γ)",
    "pmle": "β (KL-to-π₀ weight, eq. 5)",
    "distill": "β (KL-to-π₀ weight, eq. 12)",
    "dpo": "DPO temperature (the γ of eq. 6; 'β' in Tables 5/6)",
    "rebel": "η (REBEL reward scale, eq. 10)",
}


@dataclass(frozen=True)
class FitInput:
    """Everything a solver may use: data, reference, μ and the BT reward of (9)."""

    counts: Tensor  # [..., X, K, K] win counts C[x, winner, loser]
    n: Tensor  # [...] pairs behind ``counts``
    log_ref: Tensor  # [..., X, K] (broadcastable)
    log_mu: Tensor  # [..., X, K] (broadcastable)
    reward: Tensor  # [..., X, K] R̂ from (9)
    gamma: float
    ridge: float = 1e-6

    @property
    def contexts(self) -> int:
        return self.counts.shape[-3]

    @property
    def responses(self) -> int:
        return self.counts.shape[-1]

    def pairs(self) -> Tensor:
        """All ordered pairs i ≠ j (the labelled pairs (a⁺, a⁻) = (i, j) of D_n)."""
        return pair_index(self.responses, ordered=True, device=self.counts.device)

    def pair_weight(self) -> Tensor:
        """W = C / n: the mean over D_n as a weighted sum, ``[..., 1, X, M]`` over ``pairs()``."""
        w = self.counts / self.n[..., None, None, None]
        return gather_pairs(w, self.pairs())[..., None, :, :]


def _grid(betas: Tensor) -> Tensor:
    """β grid ``[B]`` → ``[B, 1, 1]`` so it broadcasts against ``[..., 1, X, K]``."""
    return betas[:, None, None]


# ---------------------------------------------------------------------- (9) reward model
def _bt_pair(d: Tensor, weight: Tensor | None = None) -> Tensor:
    return bt_reward_loss(d, torch.zeros_like(d), weight)[0]


def fit_reward(counts: Tensor, n: Tensor, ridge: float = 1e-6) -> Tensor:
    """BT reward MLE, eq. (9), by Newton on tabular logistic regression.

    Minimises (1/n) Σ_{D_n} −ln σ(R(x,a⁺) − R(x,a⁻)) + (λ/2X) Σ_x ‖R(x) − mean R(x)‖². The
    ridge λ makes the MLE unique when a response is unseen or undefeated (small n); R̂ is
    returned centred per context (the shift is not identified and cancels everywhere).
    """
    theta0 = torch.zeros(counts.shape[:-1], dtype=counts.dtype, device=counts.device)
    r, _ = newton_solve(_bt_objective(counts, n, ridge), theta0)
    return r - r.mean(-1, keepdim=True)


def _bt_objective(counts: Tensor, n: Tensor, ridge: float) -> PairwiseObjective:
    """The objective of (9) with the ridge of :func:`fit_reward`, per context ``[..., X]``."""
    X, K = counts.shape[-3], counts.shape[-1]
    pairs = pair_index(K, ordered=True, device=counts.device)
    weight = gather_pairs(counts / n[..., None, None, None], pairs)
    return PairwiseObjective(_bt_pair, pairs, weight, ridge=ridge / X, closed=_softplus_neg(1.0))


# ---------------------------------------------------------------------- closed forms
def rlhf_policy(inp: FitInput, betas: Tensor) -> Tensor:
    """RLHF (1) with reward R̂: π ∝ π₀ exp(R̂/β) (App. B). β = 0 → the greedy limit: π₀ on the
    best tier of rewards (config.greedy_tiers, as the numpy engine)."""
    b = _grid(betas)
    soft = rlhf_logits(inp.log_ref[..., None, :, :], inp.reward[..., None, :, :],
                       torch.where(b > 0, b, 1.0))
    tiers = torch.from_numpy(greedy_tiers(inp.reward.detach().cpu().double().numpy()))
    greedy = inp.log_ref - GREEDY_GAP * tiers.to(inp.reward)
    return torch.log_softmax(torch.where(b > 0, soft, greedy[..., None, :, :]), -1)


def rkl_policy(inp: FitInput, betas: Tensor) -> Tensor:
    """Reverse KL (15): π ∝ π₀^{β/(β+γ)} exp(R̂/(β+γ)) (App. B); γ is the entropy weight."""
    logits = rkl_logits(inp.log_ref[..., None, :, :], inp.reward[..., None, :, :],
                        _grid(betas), inp.gamma)
    return torch.log_softmax(logits, -1)


# ---------------------------------------------------------------------- iterative methods
def pmle_policy(inp: FitInput, betas: Tensor) -> Tensor:
    """PMLE with KL, eq. (5): (4) on D_n + β·KL(π‖π₀) (exact KL, no sampling).

    Ridge λγ² on the centred logits, i.e. λ on the implied reward γ ln π, so that at β = 0
    PMLE's optimum is exactly π ∝ exp(R̂/γ), the reverse-KL optimum at β = 0.
    """
    gamma = inp.gamma

    # The two orientations of a pair {i, j} enter as one term: C_ij wins of i and C_ji of j
    # are weight (C_ij + C_ji)/n and share q = C_ji/(C_ij + C_ji) won by j, so that
    # ψ(d; q) = (1 − q)·(4)(d) + q·(4)(−d), d = ln π_i − ln π_j: the sum over D_n unchanged.
    def pair(d: Tensor, q: Tensor, weight: None = None) -> Tensor:
        both = torch.stack([d, -d])
        return pmle_loss(both, torch.zeros_like(both), gamma, torch.stack([1 - q, q]))[0]

    # ψ = softplus(−z) + q z, z = γd; ψ' = γ(σ(z) + q − 1), ψ'' = γ² σ(z) σ(−z)
    def value(d: Tensor, q: Tensor) -> Tensor:
        z = gamma * d
        return _softplus(-z) + q * z

    def derivs(d: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        sig = torch.sigmoid(gamma * d)
        return gamma * (sig + q - 1), gamma**2 * sig * (1 - sig)

    pairs = pair_index(inp.responses, ordered=False, device=inp.counts.device)
    won = gather_pairs(inp.counts, pairs)
    lost = gather_pairs(inp.counts.transpose(-1, -2), pairs)
    total = won + lost
    q = torch.where(total > 0, lost / total.clamp_min(1), torch.zeros_like(total))
    b = _grid(betas)
    obj = PairwiseObjective(
        pair,
        pairs,
        (total / inp.n[..., None, None])[..., None, :, :],
        extras=(q[..., None, :, :],),
        kl_coef=b[..., 0] / inp.contexts,
        log_ref=inp.log_ref[..., None, :, :],
        ridge=inp.ridge * gamma**2 / inp.contexts,
        weighted=False,  # the two orientations are weighted inside: values pair by pair
        closed=ClosedForm(value, derivs),
    )
    return _solve(obj, rkl_policy(inp, betas), inp.log_ref[..., None, :, :])


def distill_policy(inp: FitInput, betas: Tensor) -> Tensor:
    """Preference distillation with KL, eq. (12), the pair expectation EXACT under μ.

    E_{x, a, b ∼ μ(x)} KL(Bern(σ(R̂_a − R̂_b)) ‖ Bern(σ(γ(ln π_a − ln π_b)))) + β KL(π‖π₀). With
    μ of full support this is strictly convex in the centred logits, so no ridge is needed.
    """
    gamma = inp.gamma

    def pair(d: Tensor, target: Tensor, weight: None = None) -> Tensor:
        return distill_loss(d, torch.zeros_like(d), target, gamma)[0]

    # ψ = KL(Bern(p)‖Bern(σ(z))), z = γd, p the target clamped as distill_loss does:
    # ψ = softplus(−z) + (1 − p) z − H(p), ψ' = γ(σ(z) − p), ψ'' = γ² σ(z) σ(−z)
    def prepare(target: Tensor) -> tuple[Tensor, Tensor]:
        p = target.clamp(1e-7, 1 - 1e-7)
        return 1 - p, p * p.log() + (1 - p) * (1 - p).log()  # 1 − p and −H(p)

    def value(d: Tensor, q: Tensor, neg_ent: Tensor) -> Tensor:
        z = gamma * d
        return _softplus(-z) + q * z + neg_ent

    def derivs(d: Tensor, q: Tensor, neg_ent: Tensor) -> tuple[Tensor, Tensor]:
        sig = torch.sigmoid(gamma * d)
        return gamma * (sig + q - 1), gamma**2 * sig * (1 - sig)

    X = inp.contexts
    # The pair loss is symmetric (swapping a, b flips d and p̃ and keeps the KL) and μ(a)μ(b)
    # is symmetric, so the exact expectation is 2 Σ_{i<j} μ_i μ_j ψ_ij: half the pairs.
    pairs = pair_index(inp.responses, ordered=False, device=inp.counts.device)
    mu = inp.log_mu.exp()
    weight = gather_pairs(2 * mu[..., :, None] * mu[..., None, :] / X, pairs)[..., None, :, :]
    r = gather_pairs(inp.reward[..., :, None] - inp.reward[..., None, :], pairs)
    # the paper's preference simulator (before eq. (11)): P_π̃(a ≻ b) = σ(R̂_a − R̂_b)
    target = preference_logprob(r, torch.zeros_like(r), 1.0).exp()[..., None, :, :]
    b = _grid(betas)
    obj = PairwiseObjective(
        pair,
        pairs,
        weight,
        extras=(target,),
        kl_coef=b[..., 0] / X,
        log_ref=inp.log_ref[..., None, :, :],
        weighted=False,  # distill_loss has no weight argument: values are taken pair by pair
        closed=ClosedForm(value, derivs, prepare),
    )
    return _solve(obj, rkl_policy(inp, betas), inp.log_ref[..., None, :, :])


def dpo_policy(inp: FitInput, temps: Tensor) -> Tensor:
    """DPO, eq. (6), with temperature τ from the grid (Tables 5/6 call it "β").

    Ridge λτ² on the centred π/π₀ log-ratio, i.e. λ on the implied reward τ ln(π/π₀): the
    same ridge as (9), so the tabular DPO optimum is exactly RLHF's closed form at β = τ
    (Rafailov et al.). At τ = 0 the loss is constant and the ridge λ returns π₀.
    """
    obj = dpo_objective(inp, temps)
    ref = inp.log_ref[..., None, :, :]
    # RLHF's closed form at β = τ; τ = 0 gives π₀ (its answer)
    init = torch.where(temps > 0, temps, torch.full_like(temps, float("inf")))
    # Certificate: in the implied reward r = τ(θ − ln π₀) the objective IS that of (9), same
    # pairs and ridge, so its gradient and Hessian are τ and τ² times those of (9) at r = R̂:
    # the Newton step from the closed form is (the step of (9) at R̂)/τ and the decrement is
    # that of (9), the same for every τ. Where that decrement is in Newton's quadratic regime
    # the solve would stop after that one step, so it is taken here without the solve.
    step, dec = newton_decrement(_bt_objective(inp.counts, inp.n, inp.ridge), inp.reward)
    if not bool((dec < QUADRATIC).all()):
        return _solve(obj, rlhf_policy(inp, init))
    inv_tau = torch.where(temps > 0, 1.0 / temps, torch.zeros_like(temps))[:, None, None]
    return torch.log_softmax(ref + (inp.reward + step)[..., None, :, :] * inv_tau, -1)


def dpo_objective(inp: FitInput, temps: Tensor) -> PairwiseObjective:
    """The objective of (6) at each temperature of ``temps``, per problem ``[..., B, X]``."""

    def pair(d: Tensor, d_ref: Tensor, tau: Tensor, weight: Tensor | None = None) -> Tensor:
        z = torch.zeros_like(d)
        return dpo_loss(d, z, d_ref, z, tau, weight)[0]

    X = inp.contexts
    tau = _grid(temps)
    ref = inp.log_ref[..., None, :, :]
    d_ref = gather_pairs(ref[..., :, None] - ref[..., None, :], inp.pairs())
    ridge = torch.where(tau > 0, inp.ridge * tau**2, torch.full_like(tau, inp.ridge)) / X
    return PairwiseObjective(
        pair,
        inp.pairs(),
        inp.pair_weight(),
        extras=(d_ref, tau),
        ridge=ridge[..., 0],
        anchor=ref,
        closed=_softplus_neg(None),
    )


def rebel_policy(inp: FitInput, etas: Tensor) -> Tensor:
    """REBEL, eq. (10), relative to π₀, on the labelled pairs of D_n; η is tuned.

    Least squares (ln(π/π₀)(a⁺) − ln(π/π₀)(a⁻) − η(R̂(a⁺) − R̂(a⁻)))² + ridge λ on the centred
    ln(π/π₀) (for responses never compared). When every context's comparison graph is
    connected the optimum is π ∝ π₀ exp(η R̂): RLHF at β = 1/η.
    """
    one = torch.ones(1, dtype=etas.dtype, device=etas.device)
    ref = inp.log_ref[..., None, :, :]
    # In δ = θ − ln π₀ the objective is (δ − ηR̂)ᵀL(δ − ηR̂) + (λ/2X)‖Pδ‖², L the Laplacian of
    # the pair weights: a quadratic whose optimum δ = η(2L + (λ/X)P)⁺2LR̂ is linear in η.
    # One solve at η = 1 (from RLHF's closed form at β = 1, the optimum when the pairs
    # connect) gives every η.
    delta = _solve(rebel_objective(inp, one), rlhf_policy(inp, one)) - ref
    return torch.log_softmax(ref + _grid(etas) * delta, -1)


def rebel_objective(inp: FitInput, etas: Tensor) -> PairwiseObjective:
    """The objective of (10) at each η of ``etas``, per problem ``[..., B, X]``."""

    def pair(
        d: Tensor, d_ref: Tensor, dr: Tensor, eta: Tensor, weight: Tensor | None = None
    ) -> Tensor:
        # rebel_loss has no weight argument, but its residual is linear in every input, so
        # scaling the inputs by √w turns its mean of squares into a w-weighted one (exact).
        z = torch.zeros_like(d)
        if weight is None:
            return rebel_loss(d, z, d_ref, z, dr, z, eta)[0]
        s = weight.sqrt()
        wsum = weight.sum().clamp_min(1e-12)
        return rebel_loss(d * s, z, d_ref * s, z, dr * s, z, eta)[0] * s.numel() / wsum

    def value(d: Tensor, d_ref: Tensor, dr: Tensor, eta: Tensor) -> Tensor:
        err = d - d_ref - eta * dr
        return err * err

    def derivs(d: Tensor, d_ref: Tensor, dr: Tensor, eta: Tensor) -> tuple[Tensor, Tensor]:
        return 2 * (d - d_ref - eta * dr), torch.full_like(d, 2.0)

    ref = inp.log_ref[..., None, :, :]
    r = inp.reward[..., None, :, :]
    d_ref = gather_pairs(ref[..., :, None] - ref[..., None, :], inp.pairs())
    d_r = gather_pairs(r[..., :, None] - r[..., None, :], inp.pairs())
    return PairwiseObjective(
        pair,
        inp.pairs(),
        inp.pair_weight(),
        extras=(d_ref, d_r, _grid(etas)),
        ridge=inp.ridge / inp.contexts,
        anchor=ref,
        closed=ClosedForm(value, derivs),
    )


def _solve(obj: PairwiseObjective, *inits: Tensor) -> Tensor:
    """Newton from each start (one batched program); keep the lowest objective per problem.

    PMLE (5) and distillation (12) with β > 0 are not convex: KL(π‖π₀) is bounded as one
    response's probability goes to 0, while the preference loss keeps rewarding pushing a
    never-winning response down (for γ < 1 the data force e^{γθ} beats the KL's θe^{θ}).
    Local minima with and without such a collapsed response coexist, so those solvers are
    started both from the closed-form reverse-KL policy and from π₀.
    """
    # broadcast_tensors, not broadcast_shapes: the latter imports sympy (0.5 s) in torch 2.13
    starts = torch.stack(torch.broadcast_tensors(*inits))
    shape = starts.shape[1:]
    theta, _ = newton_solve(obj, starts)
    if len(inits) > 1:
        # values only where the starts ended in different points (small n); elsewhere every
        # start found the same optimum and the first is kept
        centred = theta - theta.mean(-1, keepdim=True)
        differ = (centred - centred[:1]).abs().amax(-1).amax(0) > SAME_POINT
        best = objective_value(obj, theta, where=differ.expand(theta.shape[:-1])).argmin(0)
        theta = torch.gather(theta, 0, best[None, ..., None].expand(1, *shape))
    return torch.log_softmax(theta[0], -1)


SOLVERS: dict[str, Callable[[FitInput, Tensor], Tensor]] = {
    "rlhf": rlhf_policy,
    "rkl": rkl_policy,
    "pmle": pmle_policy,
    "distill": distill_policy,
    "dpo": dpo_policy,
    "rebel": rebel_policy,
}
