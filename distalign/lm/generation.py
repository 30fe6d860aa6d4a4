"""Sampling responses y ~ μ(·|x) from a policy, with EOS handling that the losses can trust.

Row order is **sample-major**: for ``B`` prompts and ``k = num_samples``, rows
``[j*B:(j+1)*B]`` hold sample ``j`` of every prompt. A pair split (REBEL, online PMLE,
preference distillation) is therefore ``rows[:B]`` vs ``rows[B:]``, the same layout as the
chosen/rejected stacking of offline pair batches.

Log-probs at the sampling temperature: samples come from softmax(logits / T), so the engine
must score them with ``token_logprobs(model, ..., temperature=cfg.temperature)`` for ln μ to be
the density of the samples (importance ratios and the entropy term of SPEC (15) rely on it).
This holds exactly for ``top_k=0``, ``top_p=1`` and ``min_new_tokens=0``; truncation or a
minimum length changes the sampling distribution and makes ln μ an approximation.

Backends: ``hf`` (``model.generate``, below) and ``vllm`` (an in-process vLLM engine that
receives the policy's weights in place, :mod:`distalign.lm.vllm_sampler`; see docs/vllm.md).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from distalign.errors import ConfigError
from distalign.lm.models import is_peft_model, unwrap_model
from distalign.lm.rollout import (  # re-exported: the public home of the sampling types
    GenerationConfig,
    Rollout,
    Sampler,
    StepLogprobs,
    _token_ids,
    check_generation_config,
    stop_token_ids,
    truncate_after_eos,
)

__all__ = [
    "SAMPLERS", "GenerationConfig", "HFSampler", "Rollout", "Sampler", "check_generation_config",
    "make_sampler", "register_sampler", "stop_token_ids", "truncate_after_eos", "_token_ids",
]


class HFSampler:
    """Sampling with HF ``model.generate`` (the default backend).

    Only the settings of :class:`GenerationConfig` shape the distribution: the model's own
    ``generation_config`` (repetition penalties, suppressed tokens, top-k=50 defaults, …) is
    set aside for the call, since any of it would make ln μ ≠ ``token_logprobs`` at T.
    """

    def __init__(self, tokenizer_or_ids: Any, cfg: GenerationConfig | None = None,
                 record_logprobs: bool = False) -> None:
        self.cfg = cfg or GenerationConfig()
        self.pad_id, self.eos_ids = _token_ids(tokenizer_or_ids)
        # ln π_T of each sampled token from generate's own logits (``Rollout.logprobs``): the
        # evaluation's KL(π‖π₀) and online collection (``gen.record_logprobs``) then need no
        # second forward of π (:class:`~distalign.lm.rollout.StepLogprobs`).
        self.record_logprobs = record_logprobs or self.cfg.record_logprobs
        check_generation_config(self.cfg)

    def _eos_ids(self, model_gen_cfg: Any) -> list[int]:
        return stop_token_ids(self.eos_ids, model_gen_cfg)

    def _hf_config(self, model_gen_cfg: Any, eos_ids: list[int]) -> Any:
        from transformers import GenerationConfig as HFGenerationConfig

        c = self.cfg
        sample = c.temperature > 0
        kwargs: dict[str, Any] = dict(
            do_sample=sample,
            max_new_tokens=c.max_new_tokens,
            min_new_tokens=c.min_new_tokens or None,
            pad_token_id=self.pad_id,
            eos_token_id=eos_ids,
            use_cache=True,
            num_beams=1,
        )
        if sample:
            kwargs.update(temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
        # keep structural (not distributional) settings of the checkpoint
        for name in ("bos_token_id", "decoder_start_token_id", "cache_implementation"):
            value = getattr(model_gen_cfg, name, None)
            if value is not None:
                kwargs[name] = value
        return HFGenerationConfig(**kwargs)

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompt_input_ids: Tensor,
        prompt_attention_mask: Tensor,
        num_samples: int = 1,
    ) -> Rollout:
        """``num_samples`` responses per left-padded prompt, sample-major (see module doc)."""
        from transformers import GenerationConfig as HFGenerationConfig

        model = unwrap_model(model)
        hf = model.get_base_model() if is_peft_model(model) else model
        ids = prompt_input_ids.repeat(num_samples, 1)
        attn = prompt_attention_mask.repeat(num_samples, 1)
        prompt_len = ids.shape[1]
        own_cfg = hf.generation_config
        eos_ids = self._eos_ids(own_cfg)
        was_training = model.training
        model.eval()  # sample from π itself, not from π with dropout
        steps = StepLogprobs(hf, self.cfg.temperature) if self.record_logprobs else None
        try:
            # generate() fills every unset field from model.generation_config; an empty one
            # leaves only HF's global defaults, all of which our config sets explicitly.
            hf.generation_config = HFGenerationConfig()
            out = model.generate(
                input_ids=ids,
                attention_mask=attn,
                generation_config=self._hf_config(own_cfg, eos_ids),
                synced_gpus=_synced_gpus(model),
            )
        finally:
            hf.generation_config = own_cfg
            model.train(was_training)
            if steps is not None:
                steps.handle.remove()
        logprobs = steps.finish(out[:, prompt_len:]) if steps is not None else None
        responses, response_mask, ended = truncate_after_eos(
            out[:, prompt_len:], eos_ids, self.pad_id
        )
        if logprobs is not None:
            logprobs = logprobs * response_mask.to(logprobs.dtype)
        return Rollout(
            input_ids=torch.cat([ids, responses], dim=1),
            attention_mask=torch.cat([attn.long(), response_mask], dim=1),
            response_mask=torch.cat([torch.zeros_like(attn, dtype=torch.long), response_mask], 1),
            prompt_length=prompt_len,
            ended=ended,
            response_lengths=response_mask.sum(-1),
            num_samples=num_samples,
            logprobs=logprobs,
        )


def _synced_gpus(model: nn.Module) -> bool:
    """A sharded (FSDP2) model gathers its weights in every rank's forward at once, so every
    rank must keep stepping until all ranks' samples have ended (transformers' synced_gpus)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def sampled_logprobs(step_logits: tuple[Tensor, ...], tokens: Tensor,
                     temperature: float) -> Tensor:
    """ln softmax(logits/T)[token] per generation step, ``[N, steps]``: the density that
    ``token_logprobs(..., temperature=T)`` gives (raw logits, so top-k/top-p truncation is not
    in it, as it is not there); greedy decoding (T = 0) is scored at T = 1, as eval does."""
    from distalign.lm.logprobs import _logprobs

    t = temperature if temperature > 0 else 1.0
    return _logprobs(torch.stack(step_logits, 1), tokens, t)


SamplerFactory = Callable[[GenerationConfig, Any], Sampler]
SAMPLERS: dict[str, SamplerFactory] = {"hf": lambda cfg, tok: HFSampler(tok, cfg)}


def register_sampler(name: str, factory: SamplerFactory) -> None:
    """Add a backend: ``factory(cfg, tokenizer) -> Sampler``."""
    SAMPLERS[name] = factory


def make_sampler(cfg: GenerationConfig, tokenizer: Any) -> Sampler:
    """The sampler named by ``cfg.backend``."""
    if cfg.backend == "vllm" and "vllm" not in SAMPLERS:
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "gen.backend=vllm is not available: vLLM is not installed (pip install "
                "'distalign[vllm]' on a GPU machine, `make vllm-venv` for the CPU build; "
                "docs/vllm.md), or use gen.backend=hf"
            )
        from distalign.lm.vllm_sampler import VLLMSampler

        register_sampler("vllm", lambda c, tok: VLLMSampler(tok, c))
    if cfg.backend not in SAMPLERS:
        raise ConfigError(
            f"generation.backend={cfg.backend!r} is unknown; choose one of {sorted(SAMPLERS)}"
        )
    return SAMPLERS[cfg.backend](cfg, tokenizer)
