"""Building what a run needs from its config: models, data loaders, optimiser, schedule."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from transformers import get_scheduler

from distalign.errors import ConfigError
from distalign.lm.collators import PairCollator, PromptCollator, SFTCollator
from distalign.lm.data import build_dataset, eval_dataset_and_report
from distalign.lm.generation import make_sampler
from distalign.lm.models import (
    load_policy,
    load_reward_model,
    load_tokenizer,
    load_value_model,
    trainable_scorer,
)
from distalign.lm.reference import Reference
from distalign.lm.tokenizers import check_same_tokenizer
from distalign.methods.base import Context, Method
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


def _check_vocab(name: str, model: nn.Module, tokenizer: Any) -> None:
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and vocab < len(tokenizer):
        raise ConfigError(
            f"{name} has vocab_size {vocab} < tokenizer size {len(tokenizer)}; "
            "reward/value models must share the policy's tokenizer"
        )


def _check_tokenizer(what: str, path: str, model: nn.Module, tokenizer: Any, mc: Any) -> None:
    """``path``'s model reads the policy's token ids: its tokenizer must map ids the same way
    (a vocabulary that merely fits is not enough)."""
    _check_vocab(what, model, tokenizer)
    if path == (mc.tokenizer or mc.name_or_path):
        return
    from transformers import AutoTokenizer

    try:
        other = AutoTokenizer.from_pretrained(path, trust_remote_code=mc.trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        log.warning("%s %s has no tokenizer to compare with the policy's (%s); only its "
                    "vocabulary size was checked", what, path, str(err).splitlines()[0][:80])
        return
    check_same_tokenizer(tokenizer, other, "the policy", f"{what} {path!r}")


def launch_mismatch(world_size: int) -> str | None:
    """A warning when ``accelerate launch --num_processes N`` started a 1-process run.

    With ``--cpu``, accelerate's simple launcher runs a single process whatever N says (it
    sets no process count for us to read), so look at the launcher's own command line.
    """
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace")
    except OSError:  # not Linux, or no parent: nothing to compare
        return None
    args = argv.split("\0")
    if "launch" not in args or not any(a.endswith("accelerate") for a in args[:3]):
        return None
    asked = None
    for i, a in enumerate(args):
        if a in ("--num_processes", "--num-processes") and i + 1 < len(args):
            asked = args[i + 1]
        elif a.startswith(("--num_processes=", "--num-processes=")):
            asked = a.split("=", 1)[1]
    if asked is None or not asked.isdigit() or int(asked) <= world_size:
        return None
    return (f"accelerate launch asked for {asked} processes but this run has {world_size}; "
            f"on CPU launch with `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            f"--num_processes {asked} -m distalign train ...` (--cpu runs one process)")


def read_data(cfg: TrainConfig, method_cls: type[Method], tokenizer: Any) -> tuple:
    """The training and eval rows, validated and tokenised before any model loads: a bad row
    stops the run in seconds, not after a minute of loading. (train, report, eval, report)."""
    kind = method_cls.data_kind
    ds, report = build_dataset(cfg.data, tokenizer, kind)
    eval_ds, eval_report = eval_dataset_and_report(cfg.data, tokenizer, kind)
    return ds, report, eval_ds, eval_report


def build_models(cfg: TrainConfig, method_cls: type[Method], tokenizer: Any = None) -> Models:
    mc = cfg.model
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(mc)
    if method_cls.trains_scorer:  # `reward` starts a new score head on an SFT backbone
        model = trainable_scorer(mc.name_or_path, mc, "model.name_or_path", head="new-ok")
    else:
        model = load_policy(mc)
    ref = None
    if method_cls.needs_reference(cfg.algo):
        ref = Reference.from_config(model, mc)
        if ref.model is not None:
            _check_tokenizer("model.ref_model", mc.ref_model or mc.name_or_path, ref.model,
                             tokenizer, mc)
    reward_model = value_model = None
    if method_cls.uses_reward_model:
        if not mc.reward_model:
            raise ConfigError(f"method {cfg.method!r} needs model.reward_model (a scorer path)")
        reward_model = load_reward_model(mc)
        _check_tokenizer("model.reward_model", mc.reward_model, reward_model, tokenizer, mc)
    if method_cls.uses_value_model:
        if not (mc.value_model or mc.reward_model):
            raise ConfigError(f"method {cfg.method!r} needs model.value_model or reward_model")
        value_model = load_value_model(mc)
        _check_tokenizer("model.value_model", mc.value_model or mc.reward_model,
                         value_model, tokenizer, mc)
    return Models(tokenizer, model, ref, reward_model, value_model)


def build_sampler(cfg: TrainConfig, method_cls: type[Method], tokenizer: Any,
                  model_config: Any = None) -> Any:
    if not method_cls.needs_sampler(cfg.algo):
        return None
    gen = method_cls.generation_config(cfg.algo, cfg.gen)
    if gen.backend == "vllm" and gen.vllm_max_model_len is None:
        # prompts are cut at data.max_prompt_length: the engine's context (and the buffers
        # vLLM sizes from it) need be no longer than that plus the reply, nor the model's own
        need = cfg.data.max_prompt_length + gen.max_new_tokens
        most = getattr(model_config, "max_position_embeddings", None)
        gen = replace(gen, vllm_max_model_len=min(need, most) if most else need)
    return make_sampler(gen, tokenizer)


def build_data(cfg: TrainConfig, method_cls: type[Method], models: Models, device: Any,
               data: tuple):
    """Loaders over :func:`read_data`'s rows; returns (train_loader, sampler, eval_loader |
    None, (train report, eval report | None))."""
    kind = method_cls.data_kind
    ds, report, eval_ds, eval_report = data
    # the method's one-off pass over the data (e.g. DPO's precomputed π₀ log-probs)
    loaded = Context(accelerator=None, tokenizer=models.tokenizer, policy=models.model,
                     ref=models.ref, reward_model=models.reward_model,
                     value_model=models.value_model)
    ds, extra = method_cls.prepare_dataset(cfg.algo, ds, loaded, device, cfg.run.batch_size)
    pad = models.tokenizer.pad_token_id
    sampler = EpochSampler(len(ds), cfg.run.seed)
    loader = DataLoader(
        ds,
        batch_size=cfg.run.batch_size,
        sampler=sampler,
        collate_fn=make_collator(kind, pad, extra),
        drop_last=True,  # PPO-style mini-batching needs full batches (remainder logged below)
        # each new pass draws a base seed from this generator, not from the global RNG, so a
        # resumed run (which opens a pass mid-epoch) samples exactly as an uninterrupted one
        generator=torch.Generator().manual_seed(cfg.run.seed),
    )
    if left := len(ds) % cfg.run.batch_size:
        log.info("%d of %d training rows do not fill a batch (run.batch_size=%d) and are left "
                 "out of each epoch (other rows each time: every epoch is reshuffled)",
                 left, len(ds), cfg.run.batch_size)
    eval_loader = None
    if eval_ds is not None and len(eval_ds) > 0:
        eval_loader = DataLoader(
            eval_ds, batch_size=cfg.run.batch_size, collate_fn=make_collator(kind, pad)
        )
    return loader, sampler, eval_loader, (report, eval_report)


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
    "read_data",
    "build_models",
    "build_optimizer",
    "build_sampler",
]
