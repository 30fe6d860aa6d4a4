"""The exact tabular world of the paper's Figure 1 (arXiv 2506.01523 v2, App. D.1; eq. (3)),
in numpy: the one sampler of both engines (the torch reference converts its tables).

|X| contexts, K single-token responses. Every distribution is a table of log-probabilities of
shape ``[S, X, K]`` where S indexes independent seeds (each seed has its own π*, π₀ and data),
so everything downstream is batched over seeds.

Labelled pairs follow the paper's preference model (eq. (3)): x ∼ Uniform(X),
a, b ∼ μ(x) i.i.d., and a wins with probability σ(γ (ln π*(a|x) − ln π*(b|x))). Because the
world is tabular, a dataset is summarised without loss by its win-count table
C[s, x, i, j] = #{pairs in context x where response i beat response j}; every objective on
D_n is a count-weighted sum over that table.

The draws are those of torch's CPU generator (:class:`TorchRandom`), which the toy used when it
ran on torch: a seed keeps giving the world and the data it gave (the frozen reference of
``tests/test_tabular_reference.py``), while the toy's CPU path never imports torch (1.3 s of a
3 s budget). torch's generator is MT19937 seeded like numpy's legacy ``RandomState(seed)``, so
the 32-bit words are numpy's; what is rebuilt here is how torch turns them into float64
uniforms and normals (ATen's ``uniform_real_distribution``, ``normal_fill`` and
``normal_distribution``). ``tests/test_tabular_fast.py`` checks the tables against torch's bit
for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_LOW21 = np.uint32((1 << 21) - 1)  # the bits of the high word that a 53-bit mask keeps


class TorchRandom:
    """The float64 draws of ``torch.Generator().manual_seed(seed)`` on the CPU, in order."""

    def __init__(self, seed: int) -> None:
        self._words = np.random.RandomState(seed & 0xFFFFFFFF)
        self._cached_normal: float | None = None  # ATen keeps the second Box–Muller value

    def uniform(self, size: int) -> np.ndarray:
        """``torch.rand(size, dtype=float64)``: 53 bits of two words, the first one high."""
        w = self._words.randint(0, 2**32, size=2 * size, dtype=np.uint32)
        # (hi·2³² + lo) mod 2⁵³ is an integer below 2⁵³: exact in float64, as is the scaling
        return ((w[0::2] & _LOW21) * 2.0**32 + w[1::2]) * 2.0**-53

    def normal(self, size: int) -> np.ndarray:
        """``torch.randn(size, dtype=float64)`` (a contiguous tensor)."""
        if size < 16:  # element by element, one Box–Muller pair per two values
            out = np.empty(size)
            for k in range(size):
                out[k] = self._scalar_normal()
            return out
        data = self.uniform(size)
        for start in range(0, size - 15, 16):
            _box_muller_16(data, start)
        if size % 16:  # the last 16 values are drawn again and transformed together
            data[size - 16:] = self.uniform(16)
            _box_muller_16(data, size - 16)
        return data

    def _scalar_normal(self) -> float:
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        u1, u2 = self.uniform(2)
        r = np.sqrt(-2.0 * np.log1p(-u2))
        theta = 2.0 * np.pi * u1
        self._cached_normal = float(r * np.sin(theta))
        return float(r * np.cos(theta))


def _box_muller_16(data: np.ndarray, start: int) -> None:
    """ATen's ``normal_fill_16``: uniforms [start, start+16) → 16 normals, in place."""
    u1 = 1.0 - data[start:start + 8]
    u2 = data[start + 8:start + 16]
    radius = np.sqrt(-2.0 * np.log(u1))
    theta = 2.0 * np.pi * u2
    data[start:start + 8] = radius * np.cos(theta)
    data[start + 8:start + 16] = radius * np.sin(theta)


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis, keepdims=True))


def log_sigmoid(z: np.ndarray) -> np.ndarray:
    """ln σ(z) without overflow."""
    return -(np.log1p(np.exp(-np.abs(z))) + np.maximum(-z, 0.0))


@dataclass(frozen=True)
class World:
    """Log-probability tables ``[S, X, K]`` of π*, π₀ and the pair-generating μ, and γ."""

    log_star: np.ndarray
    log_ref: np.ndarray
    log_mu: np.ndarray
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

    def win_prob(self) -> np.ndarray:
        """P_*(i ≻ j | x) for every ordered pair, ``[S, X, K, K]`` (eq. (3))."""
        ls = self.log_star
        return np.exp(log_sigmoid(self.gamma * (ls[..., :, None] - ls[..., None, :])))


def make_world(seeds: int, contexts: int, responses: int, gamma: float, logit_scale: float,
               mu: str = "ref", *, rng: TorchRandom) -> World:
    """Draw π* = softmax(α*) and π₀ = softmax(α₀) with α*, α₀ i.i.d. N(0, scale²) (App. D.1).

    π₀ is drawn independently of π*, as in the paper. ``mu`` is ``"ref"`` (μ = π₀, our reading
    of §5.2) or ``"uniform"``.
    """
    shape = (seeds, contexts, responses)
    size = seeds * contexts * responses
    log_star = log_softmax(rng.normal(size).reshape(shape) * logit_scale)
    log_ref = log_softmax(rng.normal(size).reshape(shape) * logit_scale)
    if mu == "ref":
        log_mu = log_ref
    elif mu == "uniform":
        log_mu = np.full(shape, -np.log(float(responses)))
    else:
        raise ValueError(f"unknown mu {mu!r} (expected 'ref' or 'uniform')")
    return World(log_star, log_ref, log_mu, float(gamma))


@dataclass(frozen=True)
class Pairs:
    """n labelled pairs per seed: context, winner and loser indices, each ``[S, n]`` (int64)."""

    x: np.ndarray
    winner: np.ndarray
    loser: np.ndarray

    @property
    def n(self) -> int:
        return self.x.shape[1]


def sample_pairs(world: World, n: int, rng: TorchRandom) -> Pairs:
    """Sample n labelled pairs per seed from the paper's preference model (eq. (3)).

    Responses are drawn by inverse CDF on uniforms. Pairs are i.i.d., so any prefix of the
    result is itself a sample of that size; the toy uses prefixes for nested datasets across n.
    """
    S, X, K = world.log_star.shape
    u = rng.uniform(4 * S * n).reshape(4, S, n)
    x = np.minimum((u[0] * X).astype(np.int64), X - 1)
    cdf = np.exp(world.log_mu).cumsum(-1)  # [S, X, K]
    cdf_x = np.take_along_axis(cdf, x[..., None], 1)  # [S, n, K]

    def draw(v: np.ndarray) -> np.ndarray:
        # the first index with cdf > v; the clamp guards against cdf[-1] rounding below 1
        return np.minimum((cdf_x <= v[..., None]).sum(-1), K - 1)

    a, b = draw(u[1]), draw(u[2])
    flat = world.log_star.reshape(S, X * K)
    la = np.take_along_axis(flat, x * K + a, 1)
    lb = np.take_along_axis(flat, x * K + b, 1)
    a_wins = u[3] < np.exp(log_sigmoid(world.gamma * (la - lb)))
    return Pairs(x, np.where(a_wins, a, b), np.where(a_wins, b, a))


def pair_counts(pairs: Pairs, start: int, stop: int, contexts: int,
                responses: int) -> np.ndarray:
    """Win-count table C[s, x, i, j] of pairs ``start:stop`` (float64, ``[S, X, K, K]``)."""
    S, K = pairs.x.shape[0], responses
    cells = (pairs.x[:, start:stop] * K + pairs.winner[:, start:stop]) * K
    cells = cells + pairs.loser[:, start:stop] + np.arange(S)[:, None] * (contexts * K * K)
    counts = np.bincount(cells.ravel(), minlength=S * contexts * K * K)
    return counts.astype(np.float64).reshape(S, contexts, K, K)
