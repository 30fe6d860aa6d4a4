"""Building what a run needs from its config: models, data loaders, optimiser, schedule."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from transformers import get_scheduler

from distalign.errors import ConfigError
from distalign.lm.collators import PairCollator, PromptCollator, SFTCollator
from distalign.lm.data import build_dataset, build_eval_dataset
from distalign.lm.generation import make_sampler
from distalign.lm.logprobs import token_logprobs
from distalign.lm.models import Reference, apply_lora, load_policy, load_scorer, load_tokenizer
from distalign.methods.base import Method
from distalign.train.config import TrainConfig

log = logging.getLogger("distalign")


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, so the data order is a function of (seed, epoch) and a
    resumed run sees exactly the batches the uninterrupted one would have."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


COLLATORS = {"pairs": PairCollator, "prompts": PromptCollator, "sft": SFTCollator}


def make_collator(kind: str, pad_id: int, extra: tuple[str, ...] = ()) -> Any:
    base = COLLATORS[kind](pad_id)

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = base(features)
        for key in extra:  # precomputed columns (e.g. π₀ log-probs) ride along
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
        return batch

    return collate


@dataclass
class Models:
    tokenizer: Any
    model: nn.Module  # the trained model
    ref: Reference | None
    reward_model: nn.Module | None
    value_model: nn.Module | None


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def _check_vocab(name: str, model: nn.Module, tokenizer: Any) -> None:
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and vocab < len(tokenizer):
        raise ConfigError(
            f"{name} has vocab_size {vocab} < tokenizer size {len(tokenizer)}; "
            "reward/value models must share the policy's tokenizer"
        )


def _trainable_scorer(path: str, mc: Any) -> nn.Module:
    """A scorer to train (reward model, PPO value model) with the policy's memory settings:
    gradient checkpointing and, when LoRA is on, a SEQ_CLS adapter that also trains the head."""
    model = load_scorer(path, mc)
    if mc.gradient_checkpointing:  # non-reentrant works with LoRA
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mc.lora.enabled:
        model = apply_lora(model, mc.lora, "SEQ_CLS")
    return model


def build_models(cfg: TrainConfig, method_cls: type[Method]) -> Models:
    mc, algo = cfg.model, cfg.algo
    tokenizer = load_tokenizer(mc)
    trained = _trainable_scorer if method_cls.trains_scorer else None
    model = trained(mc.name_or_path, mc) if trained else load_policy(mc)
    ref = Reference.from_config(model, mc) if method_cls.needs_reference(algo) else None
    reward_model = value_model = None
    if method_cls.uses_reward_model:
        if not mc.reward_model:
            raise ConfigError(f"method {cfg.method!r} needs model.reward_model (a scorer path)")
        reward_model = _frozen(load_scorer(mc.reward_model, mc))
        _check_vocab("model.reward_model", reward_model, tokenizer)
    if method_cls.uses_value_model:
        value_path = mc.value_model or mc.reward_model
        if not value_path:
            raise ConfigError(f"method {cfg.method!r} needs model.value_model or reward_model")
        value_model = _trainable_scorer(value_path, mc)
        _check_vocab("model.value_model", value_model, tokenizer)
    return Models(tokenizer, model, ref, reward_model, value_model)


def build_sampler(cfg: TrainConfig, method_cls: type[Method], tokenizer: Any) -> Any:
    if not method_cls.needs_sampler(cfg.algo):
        return None
    return make_sampler(method_cls.generation_config(cfg), tokenizer)


@torch.no_grad()
def precompute_reference(ds: Any, models: Models, cfg: TrainConfig, device: Any) -> Any:
    """Add π₀'s sequence log-probs of chosen/rejected as a ``ref_logp`` column (one pass)."""
    collate = make_collator("pairs", models.tokenizer.pad_token_id)
    policy = models.model.to(device)
    values: list[list[float]] = []
    bs = max(cfg.run.batch_size, 1)
    for start in range(0, len(ds), bs):
        batch = collate([ds[i] for i in range(start, min(start + bs, len(ds)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        assert models.ref is not None
        values.extend(models.ref.pair_logprobs(policy, batch).tolist())
    return ds.add_column("ref_logp", values)


def build_data(cfg: TrainConfig, method_cls: type[Method], models: Models, device: Any):
    """Datasets and loaders; returns (train_loader, sampler, eval_loader | None, report)."""
    kind = method_cls.data_kind
    ds, report = build_dataset(cfg.data, models.tokenizer, kind)
    eval_ds = build_eval_dataset(cfg.data, models.tokenizer, kind)
    extra: tuple[str, ...] = ()
    if getattr(cfg.algo, "precompute_ref", False):
        ds = precompute_reference(ds, models, cfg, device)
        extra = ("ref_logp",)
    pad = models.tokenizer.pad_token_id
    sampler = EpochSampler(len(ds), cfg.run.seed)
    loader = DataLoader(
        ds,
        batch_size=cfg.run.batch_size,
        sampler=sampler,
        collate_fn=make_collator(kind, pad, extra),
        drop_last=True,  # PPO-style mini-batching needs full batches; the remainder is logged
        # each new pass draws a base seed from this generator, not from the global RNG, so a
        # resumed run (which opens a pass mid-epoch) samples exactly as an uninterrupted one
        generator=torch.Generator().manual_seed(cfg.run.seed),
    )
    eval_loader = None
    if eval_ds is not None and len(eval_ds) > 0:
        eval_loader = DataLoader(
            eval_ds, batch_size=cfg.run.batch_size, collate_fn=make_collator(kind, pad)
        )
    return loader, sampler, eval_loader, report


def build_optimizer(cfg: TrainConfig, trainables: list[nn.Module], total_updates: int):
    params = [p for m in trainables for p in m.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("no trainable parameters (check model.lora settings)")
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
        weight_decay=o.weight_decay,
    )
    name = "constant_with_warmup" if o.scheduler == "constant" else o.scheduler
    scheduler = get_scheduler(name, optimizer, o.warmup_steps, max(total_updates, 1))
    return optimizer, scheduler


def sequence_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that pass through the policy for this batch (throughput accounting)."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0


__all__ = [
    "EpochSampler",
    "Models",
    "build_data",
    "build_models",
    "build_optimizer",
    "build_sampler",
    "token_logprobs",
]
