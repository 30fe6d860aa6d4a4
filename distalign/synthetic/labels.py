"""Data of the synthetic world: oracle preference labels (eq. (3)) and SFT samples.

Pairs follow the paper's generative story exactly: x ∼ Uniform(𝒳); a, b ∼ μ(·|x) i.i.d.; a wins
with probability P_*(a ≻ b | x) = σ(γ · (ln π*(a|x) − ln π*(b|x))) computed from π*'s exact
log-probs. μ is given as an enumerated ``[P, N]`` log-prob table (by default π₀'s, restricted
to 𝒜), so sampling is exact and needs no ``generate``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distalign.synthetic.world import World, sample_responses


@dataclass
class PairSet:
    """n labelled pairs as indices into the world: prompt x, chosen a⁺, rejected a⁻."""

    x: Tensor
    chosen: Tensor
    rejected: Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, n: int) -> PairSet:
        """The first n pairs: nested data sizes share their pairs (less variance across n)."""
        return PairSet(self.x[:n], self.chosen[:n], self.rejected[:n])


def bt_probability(world: World, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """P_*(a ≻ b | x) = σ(γ · ln[π*(a|x)/π*(b|x)]), eq. (3)."""
    ls = world.logp_star()
    return torch.sigmoid(world.gamma * (ls[x, a] - ls[x, b]))


def sample_pairs(world: World, logp_mu: Tensor, n: int, seed: int) -> PairSet:
    """Draw n oracle-labelled pairs with responses from μ (``[P, N]`` log-probs)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(world.num_prompts, (n,), generator=gen)
    ab = sample_responses(logp_mu, x, gen, num=2) if n else torch.zeros(0, 2, dtype=torch.long)
    a, b = ab[:, 0], ab[:, 1]
    a_wins = torch.rand(n, generator=gen, dtype=torch.float64) < bt_probability(world, x, a, b)
    return PairSet(x, torch.where(a_wins, a, b), torch.where(a_wins, b, a))


def pair_records(world: World, pairs: PairSet) -> list[dict[str, str]]:
    """``prompt``/``chosen``/``rejected`` plain-text rows (the engine appends EOS)."""
    return [
        {
            "prompt": world.prompts[int(x)],
            "chosen": world.responses[int(c)],
            "rejected": world.responses[int(r)],
        }
        for x, c, r in zip(pairs.x, pairs.chosen, pairs.rejected, strict=True)
    ]


def prompt_records(world: World, pairs: PairSet) -> list[dict[str, str]]:
    """The prompts of D_n alone, for the on-policy methods (eq. (15) uses only these)."""
    return [{"prompt": world.prompts[int(x)]} for x in pairs.x]


def sft_records(world: World, logp: Tensor, n: int, seed: int) -> list[dict[str, str]]:
    """n ``prompt``/``completion`` rows with x uniform and the completion drawn from ``logp``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(world.num_prompts, (n,), generator=gen)
    a = sample_responses(logp, x, gen, num=1)[:, 0]
    return [
        {"prompt": world.prompts[int(i)], "completion": world.responses[int(j)]}
        for i, j in zip(x, a, strict=True)
    ]


def preference_loglik(logp_table: Tensor, pairs: PairSet, gamma: float) -> float:
    """Mean held-out ln P_π(a⁺ ≻ a⁻ | x) = ln σ(γ · ln[π(a⁺|x)/π(a⁻|x)]) of a policy's table.

    This is the validation criterion of ``distalign synthetic``: it needs only labelled pairs and
    the known γ (never π*), and it is the population objective PMLE's consistency rests on
    (Proposition 12), so it ranks every method on the same scale.
    """
    lq = logp_table.double()
    margin = gamma * (lq[pairs.x, pairs.chosen] - lq[pairs.x, pairs.rejected])
    return F.logsigmoid(margin).mean().item()


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    return path
