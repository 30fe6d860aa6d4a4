"""DPO, eq. (6): offline pairs, π₀ inside the sigmoid, temperature γ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distalign.lm.collators import PairCollator
from distalign.methods.base import Batch, Context, Method, Metrics, pair_batch
from distalign.methods.config import AlgoConfig
from distalign.objectives import dpo_loss


@dataclass
class DPOConfig(AlgoConfig):
    gamma: float = 0.05  # γ in (6); the "β: 0.05" of Tables 5/6 (DPO temperature)
    # compute π₀'s log-probs once over the dataset before training (no π₀ forward per step)
    precompute_ref: bool = False

    RULES = (("gamma", lambda v: v > 0, "> 0"),)
    # TRL and the DPO paper call this temperature β; here β is always a KL-to-π₀ weight
    HINTS = (("beta", "gamma", "DPO's temperature is γ in eq. (6); TRL calls it beta"),)


def pair_experience(method: Method, batch: Batch) -> Batch:
    """Pairs as ``[B, 2, ...]`` plus π₀'s sequence log-probs (precomputed or computed now)."""
    exp = pair_batch(batch)
    if "ref_logp" in batch:
        exp["ref_logp"] = batch["ref_logp"]
    else:
        assert method.ctx.ref is not None, f"{method.name} needs a reference model"
        exp["ref_logp"] = method.ctx.ref.pair_logprobs(method.ctx.policy, batch)
    return exp


class DPO(Method):
    name = "dpo"
    data_kind = "pairs"
    Config = DPOConfig
    algo: DPOConfig
    uses_reference = True

    @classmethod
    @torch.no_grad()
    def prepare_dataset(
        cls, algo: DPOConfig, ds: Any, models: Context, device: Any, batch_size: int
    ) -> tuple[Any, tuple[str, ...]]:
        """With ``precompute_ref``: π₀'s sequence log-probs of (chosen, rejected) as a
        ``ref_logp`` column, in one pass over the training set."""
        if not algo.precompute_ref:
            return ds, ()
        assert models.ref is not None, "dpo needs a reference model"
        collate = PairCollator(models.tokenizer.pad_token_id)
        policy = models.policy.to(device)
        values: list[list[float]] = []
        bs = max(batch_size, 1)
        for start in range(0, len(ds), bs):
            batch = collate([ds[i] for i in range(start, min(start + bs, len(ds)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            values.extend(models.ref.pair_logprobs(policy, batch).tolist())
        return ds.add_column("ref_logp", values), ("ref_logp",)

    @torch.no_grad()
    def collect(self, batch: Batch) -> tuple[Batch, Metrics]:
        return pair_experience(self, batch), {}

    def loss(self, exp: Batch) -> tuple[Tensor, Metrics]:
        logp_c, logp_r = self.policy_pair_logprobs(exp)
        ref = exp["ref_logp"]
        return dpo_loss(logp_c, logp_r, ref[:, 0], ref[:, 1], self.algo.gamma)


METHOD = DPO
