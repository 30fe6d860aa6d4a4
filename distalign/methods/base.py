"""What every method shares: its hyper-parameters, the experience it needs, and how it turns
that experience into a loss built from ``distalign.objectives``.

Equation and table numbers refer to arXiv 2506.01523 v2. Three kinds of experience exist:
``pairs`` (offline labelled pairs, read from the dataset), ``prompts`` (prompts whose
responses the method samples on-policy) and ``sft`` (prompt/completion text). Experience is a
dict of tensors whose first dimension indexes examples, so the engine can shuffle and slice it
into mini- and micro-batches.

A method sees only its ``algo`` section, the sampling settings ``gen`` and a :class:`Context`
of models; it keeps no state between calls. ``collect`` returns ``(experience, metrics)``;
the engine runs it with dropout off (:func:`~distalign.lm.wrappers.eval_mode`), times it, and
logs the samples it drew. What a method needs done to the dataset once before training (DPO's
precomputed π₀ log-probs) goes through :meth:`Method.prepare_dataset`, so neither the engine nor
``train.setup`` knows any method's options.

Pair batches stack chosen (or first-sample) rows, then rejected (second-sample) rows: ``[2B, ...]``.
Experience holds them as ``[B, 2, ...]`` so that slicing keeps pairs together; the helpers at
the end of this file are the one place that converts between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from distalign.lm.logprobs import token_logprobs
from distalign.lm.pairs import pair_sequence_logprobs
from distalign.methods.config import AlgoConfig

if TYPE_CHECKING:
    from distalign.lm.generation import GenerationConfig, Rollout, Sampler
    from distalign.lm.reference import Reference

Batch = dict[str, Tensor]
Metrics = dict[str, Tensor]
SEQ_KEYS = ("input_ids", "attention_mask", "response_mask")  # a sequence batch's tensors


@dataclass
class Context:
    """Models and services the engine hands to a method (already placed on the device)."""

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
    Config: ClassVar[type[AlgoConfig]]
    trains_scorer: ClassVar[bool] = False  # `reward` trains a sequence scorer, not an LM
    uses_reference: ClassVar[bool] = False
    uses_reward_model: ClassVar[bool] = False
    uses_value_model: ClassVar[bool] = False

    def __init__(self, algo: AlgoConfig, gen: GenerationConfig, ctx: Context) -> None:
        self.algo, self.gen, self.ctx = algo, gen, ctx

    @classmethod
    def needs_reference(cls, algo: AlgoConfig) -> bool:
        return cls.uses_reference

    @classmethod
    def needs_sampler(cls, algo: AlgoConfig) -> bool:
        """Online methods sample; offline ones override this if they do (PMLE's KL term)."""
        return cls.data_kind == "prompts"

    @classmethod
    def generation_config(cls, algo: AlgoConfig, gen: GenerationConfig) -> GenerationConfig:
        """Sampling settings for on-policy responses (the config's ``gen`` by default)."""
        return gen

    @classmethod
    def prepare_dataset(
        cls, algo: AlgoConfig, ds: Any, models: Context, device: Any, batch_size: int
    ) -> tuple[Any, tuple[str, ...]]:
        """Work done once on the tokenised training set before training: returns the dataset
        and the names of the float columns it added, which the collator passes through into
        every batch. ``models`` holds the loaded models, not yet prepared by accelerate (its
        ``accelerator`` is None). Identity by default."""
        return ds, ()

    @property
    def update_epochs(self) -> int:
        return self.algo.update_epochs

    def units(self, exp: Batch) -> float:
        """How many loss units a micro-batch holds; the engine weights micro-batch losses by
        their share so that gradient accumulation reproduces the full mini-batch mean."""
        return float(next(iter(exp.values())).shape[0])

    @torch.no_grad()
    def collect(self, batch: Batch) -> tuple[Batch, Metrics]:
        """Turn a dataloader batch into (experience, metrics of the collection).
        Offline methods read the batch as is."""
        return batch, {}

    def loss(self, exp: Batch) -> tuple[Tensor, Metrics]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> Metrics:
        """Held-out metrics on an eval batch: the collection's and the loss's."""
        exp, metrics = self.collect(batch)
        return {**metrics, **self.loss(exp)[1]}

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

    def policy_pair_logprobs(self, exp: Batch, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """Policy sequence log-probs of (chosen, rejected) for ``[B, 2, ...]`` pairs, from one
        forward pass with the shared prompt computed once."""
        logp = pair_sequence_logprobs(self.ctx.policy, flat_pairs(exp), temperature)
        return logp[:, 0], logp[:, 1]

    def ref_pair_logprobs(self, batch: Batch, temperature: float = 1.0) -> Tensor:
        """``[B, 2]`` ln π₀ sequence sums of a stacked ``[2B, L]`` pair batch (a two-sample
        rollout included), prompt computed once."""
        assert self.ctx.ref is not None, f"{self.name} needs a reference model"
        with self.ctx.ref.module(self.ctx.policy) as m:
            return pair_sequence_logprobs(m, batch, temperature)

    def sampled_pair_logprobs(self, roll: Rollout) -> Tensor:
        """``[B, 2]`` ln π_t sequence sums of a two-sample rollout at the sampling temperature:
        the sampler's own (``gen.record_logprobs``), else one packed forward of π_t."""
        if self.gen.record_logprobs and roll.logprobs is not None:
            return as_pairs(roll.logprobs.sum(-1))
        return pair_sequence_logprobs(self.ctx.policy, rollout_batch(roll), self.gen.temperature)

    def sampled_token_logprobs(self, roll: Rollout) -> Tensor:
        """ln π_t of each response token at the sampling temperature, ``[N, R]`` (0 after the
        mask): the sampler's own when it recorded them (``gen.record_logprobs``), else a
        forward of π_t. Both are raw logits / T, so top-k/top-p truncation is ignored alike."""
        if self.gen.record_logprobs and roll.logprobs is not None:
            return roll.logprobs
        seq = rollout_batch(roll)
        return self.policy_token_logprobs(seq, self.gen.temperature)[:, roll.prompt_length:]

    def sample(self, batch: Batch, num_samples: int) -> Rollout:
        """Draw ``num_samples`` on-policy responses per prompt (sample-major rows)."""
        assert self.ctx.sampler is not None
        return self.ctx.sampler.generate(
            self.ctx.unwrap(self.ctx.policy),
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            num_samples=num_samples,
        )


def split_pairs(x: Tensor) -> tuple[Tensor, Tensor]:
    """``[2B, ...]`` → its chosen (first-sample) rows ``[B, ...]`` and rejected rows."""
    b = x.shape[0] // 2
    return x[:b], x[b:]


def as_pairs(x: Tensor) -> Tensor:
    """``[2B, ...]`` (chosen rows then rejected rows) → ``[B, 2, ...]`` so slicing keeps pairs."""
    return torch.stack(split_pairs(x), dim=1)


def from_pairs(x: Tensor) -> Tensor:
    """Inverse of ``as_pairs``: ``[B, 2, ...]`` → ``[2B, ...]``."""
    return torch.cat([x[:, 0], x[:, 1]], dim=0)


def pair_batch(batch: Batch, keys: tuple[str, ...] = SEQ_KEYS) -> Batch:
    """``as_pairs`` on a stacked batch's sequence tensors."""
    return {k: as_pairs(batch[k]) for k in keys}


def flat_pairs(exp: Batch, keys: tuple[str, ...] = SEQ_KEYS) -> Batch:
    """``from_pairs`` on the sequence tensors of pair experience: one stacked forward batch."""
    return {k: from_pairs(exp[k]) for k in keys}


def rollout_batch(roll: Rollout) -> Batch:
    """The sampled sequences of a rollout as a sequence batch (sample-major rows)."""
    return {k: getattr(roll, k) for k in SEQ_KEYS}


def seq_sum(tok: Tensor, mask: Tensor) -> Tensor:
    return (tok * mask.to(tok.dtype)).sum(-1)
