"""The exact tabular world of the paper's Figure 1 (arXiv 2506.01523 v2, App. D.1; eq. (3)).

|X| contexts, K single-token responses. Every distribution is a table of log-probabilities of
shape ``[S, X, K]`` where S indexes independent seeds (each seed has its own π*, π₀ and data),
so everything downstream is batched over seeds in one tensor program.

Labelled pairs follow the paper's preference model (eq. (3)): x ∼ Uniform(X),
a, b ∼ μ(x) i.i.d., and a wins with probability σ(γ (ln π*(a|x) − ln π*(b|x))). Because the
world is tabular, a dataset is summarised without loss by its win-count table
C[s, x, i, j] = #{pairs in context x where response i beat response j}; every objective on
D_n is a count-weighted sum over that table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distalign.objectives import preference_logprob


@dataclass(frozen=True)
class World:
    """Log-probability tables ``[S, X, K]`` of π*, π₀ and the pair-generating μ, and γ."""

    log_star: Tensor
    log_ref: Tensor
    log_mu: Tensor
    gamma: float

    @property
    def seeds(self) -> int:
        return self.log_star.shape[0]

    @property
    def contexts(self) -> int:
        return self.log_star.shape[1]

    @property
    def responses(self) -> int:
        return self.log_star.shape[2]

    def win_prob(self) -> Tensor:
        """P_*(i ≻ j | x) for every ordered pair, ``[S, X, K, K]`` (eq. (3))."""
        ls = self.log_star
        return preference_logprob(ls[..., :, None], ls[..., None, :], self.gamma).exp()


def make_world(
    seeds: int,
    contexts: int,
    responses: int,
    gamma: float,
    logit_scale: float,
    mu: str = "ref",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> World:
    """Draw π* = softmax(α*) and π₀ = softmax(α₀) with α*, α₀ i.i.d. N(0, scale²) (App. D.1).

    π₀ is drawn independently of π*, as in the paper. ``mu`` is ``"ref"`` (μ = π₀, our reading
    of §5.2) or ``"uniform"``.
    """
    shape = (seeds, contexts, responses)
    # draw on CPU with a CPU generator so a seed gives the same world on every device
    alpha_star = torch.randn(shape, generator=generator, dtype=torch.float64) * logit_scale
    alpha_ref = torch.randn(shape, generator=generator, dtype=torch.float64) * logit_scale
    log_star = torch.log_softmax(alpha_star, -1)
    log_ref = torch.log_softmax(alpha_ref, -1)
    if mu == "ref":
        log_mu = log_ref
    elif mu == "uniform":
        log_mu = torch.full(shape, -torch.log(torch.tensor(float(responses))).item())
    else:
        raise ValueError(f"unknown mu {mu!r} (expected 'ref' or 'uniform')")
    return World(
        log_star.to(device=device, dtype=dtype),
        log_ref.to(device=device, dtype=dtype),
        log_mu.to(device=device, dtype=dtype),
        float(gamma),
    )


@dataclass(frozen=True)
class Pairs:
    """n labelled pairs per seed: context, winner and loser indices, each ``[S, n]`` (int64)."""

    x: Tensor
    winner: Tensor
    loser: Tensor

    @property
    def n(self) -> int:
        return self.x.shape[1]


def sample_pairs(world: World, n: int, generator: torch.Generator | None = None) -> Pairs:
    """Sample n labelled pairs per seed from the paper's preference model (eq. (3)).

    Responses are drawn by inverse-CDF on uniforms (one tensor program over seeds and pairs).
    Pairs are i.i.d., so any prefix of the result is itself a sample of that size; the
    experiment uses prefixes to get nested datasets across n.
    """
    S, X, K = world.log_star.shape
    device = world.log_star.device
    u = torch.rand((4, S, n), generator=generator, dtype=torch.float64).to(device)
    x = torch.clamp((u[0] * X).long(), max=X - 1)
    cdf = world.log_mu.double().exp().cumsum(-1)  # [S, X, K]
    cdf_x = torch.gather(cdf, 1, x[..., None].expand(S, n, K))  # [S, n, K]

    def draw(v: Tensor) -> Tensor:
        # first index with cdf > v; clamp guards against cdf[-1] rounding below 1
        return torch.clamp((cdf_x <= v[..., None]).sum(-1), max=K - 1)

    a, b = draw(u[1]), draw(u[2])
    ls = world.log_star.double()
    la = _lookup(ls, x, a)
    lb = _lookup(ls, x, b)
    a_wins = u[3] < preference_logprob(la, lb, world.gamma).exp()
    winner = torch.where(a_wins, a, b)
    loser = torch.where(a_wins, b, a)
    return Pairs(x, winner, loser)


def _lookup(table: Tensor, x: Tensor, a: Tensor) -> Tensor:
    """table[s, x[s, t], a[s, t]] for a ``[S, X, K]`` table and ``[S, n]`` indices."""
    S, X, K = table.shape
    flat = table.reshape(S, X * K)
    return torch.gather(flat, 1, x * K + a)


def pair_counts(pairs: Pairs, start: int, stop: int, contexts: int, responses: int) -> Tensor:
    """Win-count table C[s, x, i, j] of pairs ``start:stop`` (float64, ``[S, X, K, K]``)."""
    S = pairs.x.shape[0]
    K = responses
    x = pairs.x[:, start:stop]
    idx = (x * K + pairs.winner[:, start:stop]) * K + pairs.loser[:, start:stop]
    idx = idx + torch.arange(S, device=idx.device)[:, None] * (contexts * K * K)
    counts = torch.bincount(idx.reshape(-1), minlength=S * contexts * K * K)
    return counts.to(torch.float64).reshape(S, contexts, K, K)
