"""The numpy engine (``distalign.tabular.fast``, the CPU default) against the torch one.

The numpy engine must not import torch, so it cannot call the ``distalign.objectives`` losses
the way the torch solvers check themselves; these tests make that check instead: the world
and data are torch's draw for draw, the pair terms are the library's losses, and every
record equals the torch engine's.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from distalign.objectives import bt_reward_loss, distill_loss, pmle_loss, preference_logprob
from distalign.tabular import ToyConfig, run_toy, world
from distalign.tabular.config import TIE
from distalign.tabular.fast import engine as fastgrid
from distalign.tabular.fast import newton as fastnewton


def _torch_world(S: int, X: int, K: int, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """The toy's world and pairs as its torch engine drew them (App. D.1, eq. (3)), with
    torch's generator: log π*, log π₀, then context, winner and loser of each pair."""
    gen = torch.Generator().manual_seed(seed)
    log_star = torch.log_softmax(torch.randn((S, X, K), generator=gen, dtype=torch.float64), -1)
    log_ref = torch.log_softmax(torch.randn((S, X, K), generator=gen, dtype=torch.float64), -1)
    u = torch.rand((4, S, n), generator=gen, dtype=torch.float64)
    x = torch.clamp((u[0] * X).long(), max=X - 1)
    cdf_x = torch.gather(log_ref.exp().cumsum(-1), 1, x[..., None].expand(S, n, K))
    a, b = (torch.clamp((cdf_x <= v[..., None]).sum(-1), max=K - 1) for v in (u[1], u[2]))
    flat = log_star.reshape(S, X * K)
    la, lb = torch.gather(flat, 1, x * K + a), torch.gather(flat, 1, x * K + b)
    a_wins = u[3] < preference_logprob(la, lb, 0.5).exp()
    return log_star, log_ref, x, torch.where(a_wins, a, b), torch.where(a_wins, b, a)


@pytest.mark.parametrize(
    ("S", "X", "K", "n", "seed"),
    [(8, 10, 10, 4096, 0), (2, 3, 4, 64, 5), (1, 2, 3, 16, 1), (3, 1, 5, 7, 2)],
)
def test_world_and_pairs_are_torchs_draw_for_draw(S: int, X: int, K: int, n: int,
                                                  seed: int) -> None:
    log_star, log_ref, x, winner, loser = _torch_world(S, X, K, n, seed)
    rng = world.TorchRandom(seed)
    fw = world.make_world(S, X, K, 0.5, 1.0, "ref", rng=rng)
    fp = world.sample_pairs(fw, n, rng)
    for mine, theirs in ((fw.log_star, log_star), (fw.log_ref, log_ref)):
        assert np.abs(mine - theirs.numpy()).max() < 1e-14  # log_softmax may round apart
    for mine, theirs in ((fp.x, x), (fp.winner, winner), (fp.loser, loser)):
        assert np.array_equal(mine, theirs.numpy())
    cells = ((x * K + winner) * K + loser + torch.arange(S)[:, None] * (X * K * K)).reshape(-1)
    counts = torch.bincount(cells, minlength=S * X * K * K).double().reshape(S, X, K, K)
    assert np.array_equal(world.pair_counts(fp, 0, n, X, K), counts.numpy())


def _objective(kind: str, K: int, rng: np.random.Generator) -> tuple[fastnewton.Objective, float]:
    M = K * (K - 1) // 2
    weight = rng.uniform(0.0, 1.0, (M, 1))
    share = rng.uniform(0.0, 1.0, (M, 1))
    a = 1.0 if kind == "bt" else 0.5
    off = None
    if kind == "distill":
        p = 1 - share
        off = p * np.log(p) + (1 - p) * np.log(1 - p)
    kl = np.array([0.3]), np.log(rng.dirichlet(np.ones(K)))[:, None]
    return fastnewton.Objective(a, weight, share, np.zeros(1, dtype=np.int64), ridge=1e-3,
                                offset=off, kl_coef=kl[0], log_ref=kl[1]), a


def _library_value(kind: str, obj: fastnewton.Objective, theta: torch.Tensor) -> torch.Tensor:
    """F by the library losses: each unordered pair as its two orientations."""
    i, j = fastnewton.unordered_pairs(theta.shape[0])
    d = theta[i] - theta[j]
    w = torch.from_numpy(obj.weight[:, 0])
    q = torch.from_numpy(obj.share[:, 0])
    zero = torch.zeros_like(d)
    orientations = ((1, w * (1 - q)), (-1, w * q))  # w(1 − q) wins of i over j, w q of j
    if kind == "bt":
        part = sum(bt_reward_loss(s * d, zero, c)[0] * c.sum() for s, c in orientations)
    elif kind == "pmle":
        part = sum(pmle_loss(s * d, zero, 0.5, c)[0] * c.sum() for s, c in orientations)
    else:  # distillation towards the target p = 1 − q of i beating j
        part = sum(distill_loss(d[m:m + 1], zero[m:m + 1], 1 - q[m:m + 1], 0.5)[0] * w[m]
                   for m in range(d.numel()))
    log_p = torch.log_softmax(theta, 0)
    kl = (log_p.exp() * (log_p - torch.from_numpy(obj.log_ref[:, 0]))).sum()
    dev = theta - theta.mean()
    return part + float(obj.kl_coef[0]) * kl + 0.5 * obj.ridge * (dev * dev).sum()


@pytest.mark.parametrize("kind", ["bt", "pmle", "distill"])
def test_pair_terms_are_the_library_losses(kind: str) -> None:
    """Value, gradient and Hessian of the numpy objective equal autograd through the library."""
    rng = np.random.default_rng(0)
    obj, _ = _objective(kind, 6, rng)
    for scale in (0.3, 3.0, 30.0):
        theta = rng.normal(0, scale, 6)
        t = torch.tensor(theta, requires_grad=True)
        want = _library_value(kind, obj, t)
        (g_want,) = torch.autograd.grad(want, t, create_graph=True)
        H_want = torch.stack([torch.autograd.grad(g_want[k], t, retain_graph=True)[0]
                              for k in range(6)])
        batch = obj.at(np.zeros(1, dtype=np.int64))
        value = float(batch.value(theta[:, None])[0])
        want = want.detach()
        g, H = batch.grad_hess(theta[:, None])
        assert abs(value - float(want)) <= 1e-10 * max(1.0, abs(float(want)))
        assert np.abs(g[:, 0] - g_want.detach().numpy()).max() <= 1e-10
        assert np.abs(H[:, :, 0] - H_want.numpy()).max() <= 1e-10


def test_numpy_engine_equals_the_torch_engine() -> None:
    """Every record of a small grid in both worlds, every method, to the toy's 1e-6."""
    for preset in ("strong", "paper"):
        kw = {"seeds": 2, "ns": (32, 128, 1024), "threads": 1}
        fast = run_toy(ToyConfig.from_preset(preset, **kw)).records
        slow = run_toy(ToyConfig.from_preset(preset, engine="torch", **kw)).records
        assert len(fast) == len(slow) == 2 * 3 * 6
        for a, b in zip(fast, slow, strict=True):
            assert a.keys() == b.keys()
            _same_or_tied(a, b)


def _same_or_tied(a: dict, b: dict) -> None:
    """Two records agree, or their honest picks differ within a tie: at tiny n several β
    have the same held-out log-likelihood up to rounding (R̂ agrees to ~1e-11 between the
    engines, and a small β or a large η multiplies that), and both take the smallest β
    within config.TIE of the best; the honest fields follow that pick."""
    if a["beta_honest"] != b["beta_honest"]:
        assert abs(a["val_loglik_honest"] - b["val_loglik_honest"]) <= 2 * TIE
        a = {k: v for k, v in a.items() if "honest" not in k}
        b = {k: v for k, v in b.items() if "honest" not in k}
    for key, value in b.items():
        if isinstance(value, float):
            assert abs(a[key] - value) <= 1e-6 * max(1.0, abs(value)), (b, key, a[key])
        else:
            assert a[key] == value


def test_records_do_not_move_when_the_reward_moves_by_rounding(monkeypatch) -> None:
    """Every record of the paper grid's methods without a Newton solve per β stays within
    1e-6 (relative), or within a held-out tie, when R̂ is perturbed by 1e-11, the solver's
    own error (the two engines' R̂ differ by up to 6e-11)."""
    cfg = ToyConfig.from_preset("paper", threads=1, methods=("rlhf", "dpo", "rebel"))
    base = fastgrid.run(cfg).records
    init = fastgrid.Grid.__init__

    def noisy(self: fastgrid.Grid, config: ToyConfig) -> None:
        init(self, config)
        self.reward = self.reward + 1e-11 * np.random.default_rng(1).standard_normal(
            self.reward.shape)

    monkeypatch.setattr(fastgrid.Grid, "__init__", noisy)
    moved = fastgrid.run(cfg).records
    for a, b in zip(base, moved, strict=True):
        _same_or_tied(b, a)


def test_the_toy_command_does_not_import_torch(tmp_path) -> None:
    code = ("import sys; from distalign.cli import main\n"
            f"main(['toy', '--seeds', '1', '--ns', '16,64', '--out', {str(tmp_path)!r}])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr


def test_held_out_log_likelihood_is_the_sum_over_held_out_pairs() -> None:
    """val_loglik's per-unordered-pair form against the sum of C_ij ln σ(γ(ℓ_i − ℓ_j)) over
    every ordered cell, ties included, on RLHF's policies (β = 0: greedy tiers 1000 nats
    apart, where π^γ underflows)."""
    cfg = ToyConfig.from_preset("paper", seeds=2, ns=(32, 512))
    grid = fastgrid.Grid(cfg)
    log_pi = fastgrid.rlhf(grid, grid.betas)[:, 1]  # the train fits [N, S, B, X, K]
    got = fastgrid.val_loglik(log_pi, grid)
    d = log_pi[..., :, None] - log_pi[..., None, :]  # [N, S, B, X, K, K]
    cell = -np.logaddexp(0.0, -cfg.gamma * d)  # ln σ(γ(ℓ_i − ℓ_j))
    want = np.einsum("nsxij,nsbxij->nsb", grid.val_counts, cell) / grid.n_val[:, None, None]
    assert np.abs(got - want).max() <= 1e-9 * np.abs(want).max()
    assert (grid.val_ties > 0).any()  # the test covers ties
