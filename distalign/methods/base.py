"""What every method shares: its config, the experience it needs, and how it turns that
experience into a loss built from ``distalign.objectives``.

Three kinds of experience exist (DESIGN.md): ``pairs`` (offline labelled pairs, read from the
dataset), ``prompts`` (prompts whose responses the method samples on-policy) and ``sft``
(prompt/completion text). Experience is a dict of tensors whose first dimension indexes
examples, so the engine can shuffle and slice it into mini- and micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from distalign.lm.logprobs import token_logprobs

if TYPE_CHECKING:
    from distalign.lm.generation import GenerationConfig, Rollout, Sampler
    from distalign.lm.models import Reference
    from distalign.train.config import TrainConfig

Batch = dict[str, Tensor]
Metrics = dict[str, Tensor]


@dataclass
class Context:
    """Models and services the engine hands to a method (already placed on the device)."""

    cfg: TrainConfig
    accelerator: Any
    tokenizer: Any
    policy: nn.Module  # the trained model (a scorer for `reward`), possibly DDP-wrapped
    ref: Reference | None = None
    reward_model: nn.Module | None = None
    value_model: nn.Module | None = None
    sampler: Sampler | None = None

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)


class Method:
    """Base class: subclasses set the class attributes and implement ``loss``."""

    name: ClassVar[str]
    data_kind: ClassVar[str]  # "pairs" | "prompts" | "sft"
    Config: ClassVar[type]
    trains_scorer: ClassVar[bool] = False  # `reward` trains a sequence scorer, not an LM
    uses_reference: ClassVar[bool] = False
    uses_reward_model: ClassVar[bool] = False
    uses_value_model: ClassVar[bool] = False

    def __init__(self, cfg: TrainConfig, ctx: Context) -> None:
        self.cfg = cfg
        self.algo = cfg.algo
        self.ctx = ctx
        self.samples: list[dict[str, Any]] = []  # generations to log in samples.jsonl

    @classmethod
    def needs_reference(cls, algo: Any) -> bool:
        return cls.uses_reference

    @classmethod
    def needs_sampler(cls, algo: Any) -> bool:
        """Online methods sample; offline ones override this if they do (PMLE's KL term)."""
        return cls.data_kind == "prompts"

    @classmethod
    def generation_config(cls, cfg: TrainConfig) -> GenerationConfig:
        """Sampling settings for on-policy responses (the config's ``gen`` by default)."""
        return cfg.gen

    @property
    def update_epochs(self) -> int:
        return int(getattr(self.algo, "update_epochs", 1))

    def units(self, exp: Batch) -> float:
        """How many loss units a micro-batch holds; the engine weights micro-batch losses by
        their share so that gradient accumulation reproduces the full mini-batch mean."""
        return float(next(iter(exp.values())).shape[0])

    @torch.no_grad()
    def collect(self, batch: Batch) -> Batch:
        """Turn a dataloader batch into experience. Offline methods read the batch as is."""
        return batch

    def loss(self, exp: Batch) -> tuple[Tensor, Metrics]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> Metrics:
        """Held-out metrics on an eval batch (defaults to the loss's metrics)."""
        _, metrics = self.loss(self.collect(batch))
        return metrics

    # shared helpers -------------------------------------------------------------------
    def policy_token_logprobs(self, batch: Batch, temperature: float = 1.0) -> Tensor:
        return token_logprobs(
            self.ctx.policy, batch["input_ids"], batch["attention_mask"], temperature,
            batch.get("response_mask"),
        )

    def ref_token_logprobs(self, batch: Batch, temperature: float = 1.0) -> Tensor:
        assert self.ctx.ref is not None, f"{self.name} needs a reference model"
        return self.ctx.ref.token_logprobs(
            self.ctx.policy, batch["input_ids"], batch["attention_mask"], temperature,
            batch.get("response_mask"),
        )

    def sample(self, batch: Batch, num_samples: int) -> Rollout:
        """Draw ``num_samples`` on-policy responses per prompt (sample-major rows)."""
        assert self.ctx.sampler is not None
        self.ctx.policy.eval()
        try:
            rollout = self.ctx.sampler.generate(
                self.ctx.unwrap(self.ctx.policy),
                batch["prompt_input_ids"],
                batch["prompt_attention_mask"],
                num_samples=num_samples,
            )
        finally:
            self.ctx.policy.train()
        self._record_samples(rollout)
        return rollout

    def _record_samples(self, rollout: Rollout) -> None:
        k = self.cfg.run.num_samples_logged
        if k <= 0:
            return
        tok, p = self.ctx.tokenizer, rollout.prompt_length
        self.samples = [
            {
                "prompt": tok.decode(rollout.input_ids[i, :p], skip_special_tokens=True),
                "response": tok.decode(
                    rollout.input_ids[i, p:][rollout.response_mask[i, p:].bool()],
                    skip_special_tokens=True,
                ),
                "ended": bool(rollout.ended[i]),
            }
            for i in range(min(k, rollout.input_ids.shape[0]))
        ]


def as_pairs(x: Tensor) -> Tensor:
    """``[2B, ...]`` (chosen rows then rejected rows) → ``[B, 2, ...]`` so slicing keeps pairs."""
    b = x.shape[0] // 2
    return torch.stack([x[:b], x[b:]], dim=1)


def from_pairs(x: Tensor) -> Tensor:
    """Inverse of ``as_pairs``: ``[B, 2, ...]`` → ``[2B, ...]``."""
    return torch.cat([x[:, 0], x[:, 1]], dim=0)


def seq_sum(tok: Tensor, mask: Tensor) -> Tensor:
    return (tok * mask.to(tok.dtype)).sum(-1)
