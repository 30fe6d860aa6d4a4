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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from distalign.errors import ConfigError
from distalign.lm.models import is_peft_model, unwrap_model


@dataclass
class GenerationConfig:
    """Sampling settings. ``temperature=0`` means greedy decoding (evaluation only)."""

    max_new_tokens: int = 53
    min_new_tokens: int = 0
    temperature: float = 0.7
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0
    backend: str = "hf"  # hf | vllm (docs/vllm.md)
    # vLLM engine sizing (backend=vllm only). On a GPU the engine reserves `vllm_memory` of
    # the device's memory (weights + KV cache) next to training; `vllm_kv_cache_gb` instead
    # fixes the KV cache size (default 1 GiB on CPU, where the fraction means host memory).
    vllm_memory: float = 0.3
    vllm_kv_cache_gb: float | None = None
    vllm_max_model_len: int | None = None  # default: the model's max_position_embeddings


@dataclass
class Rollout:
    """Prompts followed by sampled responses, ``N = B * num_samples`` rows (sample-major).

    ``input_ids``/``attention_mask``/``response_mask`` are ``[N, P + R]``: the left-padded prompt
    (``P = prompt_length`` columns) then the right-padded response. ``response_mask`` is 1 on
    response tokens up to and including the first EOS and 0 after it; tokens after the first
    EOS are replaced by pad. ``ended[n]`` says whether row n emitted EOS; ``response_lengths``
    counts the masked response tokens (EOS included).
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_length: int
    ended: Tensor
    response_lengths: Tensor
    num_samples: int = 1
    # ln μ of each response token as the sampler computed it, ``[N, R]`` (0 after the mask);
    # vLLM reports it, HF does not. Diagnostics only: the losses recompute ln π themselves.
    logprobs: Tensor | None = None

    @property
    def responses(self) -> Tensor:
        """Response columns only, ``[N, R]`` (pad after the first EOS)."""
        return self.input_ids[:, self.prompt_length :]

    def sample(self, j: int) -> Rollout:
        """Rows of sample ``j`` for every prompt (``[j*B:(j+1)*B]``)."""
        b = self.input_ids.shape[0] // self.num_samples
        rows = slice(j * b, (j + 1) * b)
        return Rollout(
            self.input_ids[rows],
            self.attention_mask[rows],
            self.response_mask[rows],
            self.prompt_length,
            self.ended[rows],
            self.response_lengths[rows],
            1,
            None if self.logprobs is None else self.logprobs[rows],
        )

    def to(self, device: torch.device | str) -> Rollout:
        return Rollout(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
            self.prompt_length,
            self.ended.to(device),
            self.response_lengths.to(device),
            self.num_samples,
            None if self.logprobs is None else self.logprobs.to(device),
        )


class Sampler(Protocol):
    """Anything that turns left-padded prompts into a :class:`Rollout`."""

    def generate(
        self,
        model: nn.Module,
        prompt_input_ids: Tensor,
        prompt_attention_mask: Tensor,
        num_samples: int = 1,
    ) -> Rollout: ...


def truncate_after_eos(
    responses: Tensor, eos_ids: Sequence[int], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(responses with pad after the first EOS, response_mask incl. that EOS, ended).

    Batched generation keeps appending tokens to rows that already finished (pad, or —
    with some stopping setups — more samples); only the prefix up to the first EOS is μ's
    response, so everything after it is padded and masked out.
    """
    is_eos = torch.isin(responses, torch.tensor(list(eos_ids), device=responses.device))
    ended = is_eos.any(-1)
    # index of the first EOS; rows without one keep every column
    width = responses.shape[1]
    no_eos = torch.full_like(ended, width, dtype=torch.long)
    first = torch.where(ended, is_eos.long().argmax(-1), no_eos)
    cols = torch.arange(width, device=responses.device)
    mask = (cols[None, :] <= first[:, None]).long()
    return responses.masked_fill(mask == 0, pad_id), mask, ended


def check_generation_config(c: GenerationConfig) -> None:
    """One-line ConfigErrors for settings no backend can honour."""
    if c.max_new_tokens < 1 or not 0 <= c.min_new_tokens <= c.max_new_tokens:
        raise ConfigError(
            f"generation: need max_new_tokens >= 1 and 0 <= min_new_tokens <= max_new_tokens,"
            f" got {c.min_new_tokens} and {c.max_new_tokens}"
        )
    if c.temperature < 0 or not 0 < c.top_p <= 1 or c.top_k < 0:
        raise ConfigError("generation: need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")


def stop_token_ids(eos_ids: list[int], model_gen_cfg: Any) -> list[int]:
    """The tokenizer's EOS plus the checkpoint's own stop tokens (chat models often list
    several, e.g. end-of-turn and end-of-text): a response ends at whichever comes first."""
    extra = getattr(model_gen_cfg, "eos_token_id", None)
    extra = [extra] if isinstance(extra, int) else list(extra or [])
    return eos_ids + [int(e) for e in extra if int(e) not in eos_ids]


def _token_ids(tokenizer_or_ids: Any) -> tuple[int, list[int]]:
    """(pad_id, eos_ids) from a tokenizer, or from a ``(pad_id, eos_id | [eos_ids])`` pair."""
    if isinstance(tokenizer_or_ids, tuple | list):
        pad, eos = tokenizer_or_ids
    else:
        pad, eos = tokenizer_or_ids.pad_token_id, tokenizer_or_ids.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not eos_ids:
        raise ConfigError("the tokenizer has no EOS token; responses could never end")
    if pad is None:
        pad = eos_ids[0]
    return int(pad), [int(e) for e in eos_ids]


class HFSampler:
    """Sampling with HF ``model.generate`` (the default backend).

    Only the settings of :class:`GenerationConfig` shape the distribution: the model's own
    ``generation_config`` (repetition penalties, suppressed tokens, top-k=50 defaults, …) is
    set aside for the call, since any of it would make ln μ ≠ ``token_logprobs`` at T.
    """

    def __init__(self, tokenizer_or_ids: Any, cfg: GenerationConfig | None = None) -> None:
        self.cfg = cfg or GenerationConfig()
        self.pad_id, self.eos_ids = _token_ids(tokenizer_or_ids)
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
        try:
            # generate() fills every unset field from model.generation_config; an empty one
            # leaves only HF's global defaults, all of which our config sets explicitly.
            hf.generation_config = HFGenerationConfig()
            out = model.generate(
                input_ids=ids,
                attention_mask=attn,
                generation_config=self._hf_config(own_cfg, eos_ids),
            )
        finally:
            hf.generation_config = own_cfg
            model.train(was_training)
        responses, response_mask, ended = truncate_after_eos(
            out[:, prompt_len:], eos_ids, self.pad_id
        )
        return Rollout(
            input_ids=torch.cat([ids, responses], dim=1),
            attention_mask=torch.cat([attn.long(), response_mask], dim=1),
            response_mask=torch.cat([torch.zeros_like(attn, dtype=torch.long), response_mask], 1),
            prompt_length=prompt_len,
            ended=ended,
            response_lengths=response_mask.sum(-1),
            num_samples=num_samples,
        )


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
        import distalign.lm.vllm_sampler  # noqa: F401  (registers "vllm")
    if cfg.backend not in SAMPLERS:
        raise ConfigError(
            f"generation.backend={cfg.backend!r} is unknown; choose one of {sorted(SAMPLERS)}"
        )
    return SAMPLERS[cfg.backend](cfg, tokenizer)
