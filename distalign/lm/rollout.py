"""What every sampler shares: the sampling settings, the :class:`Rollout` it returns, and EOS
handling (the HF and vLLM backends must agree on all three; see :mod:`distalign.lm.generation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from distalign.errors import ConfigError


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
    # default: data.max_prompt_length + max_new_tokens in training, else the model's
    # max_position_embeddings
    vllm_max_model_len: int | None = None
    # online training: ln π_t of the samples from the sampler's own logits instead of a second
    # forward of π_t (one of collection's 3–4 forwards; HF: :class:`StepLogprobs` holds one
    # step's logits at a time; vLLM: its processed log-probs, from the synced weights in the
    # policy's dtype). Opt-in: decoding with a KV cache (and vLLM's kernels) rounds differently
    # from a full forward, so PPO's first ratio is then 1 up to float error instead of exactly 1.
    record_logprobs: bool = False


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
    # ln μ of each response token as the sampler computed it at T, ``[N, R]`` (0 after the
    # mask); vLLM always reports it, HF when asked; with ``record_logprobs`` collection uses it
    # as ln π_t instead of a second forward.
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


class Sampler(Protocol):
    """Anything that turns left-padded prompts into a :class:`Rollout`."""

    def generate(
        self,
        model: nn.Module,
        prompt_input_ids: Tensor,
        prompt_attention_mask: Tensor,
        num_samples: int = 1,
    ) -> Rollout: ...


class StepLogprobs:
    """ln softmax(logits/T)[sampled token] of every step of HF ``generate``, recorded by a forward
    hook on the model from its raw logits, as ``token_logprobs(..., temperature=T)`` computes
    them (top-k/top-p and min-length masking are not in them, as they are not there; greedy
    decoding, T = 0, is scored at T = 1). Each call's last-position logits are kept until the
    next call, whose input is the token sampled from them, so memory is one step's
    ``N × vocab`` logits, not ``N × steps × vocab`` (transformers' ``output_logits``)."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        self.t = temperature if temperature > 0 else 1.0
        self.steps: list[Tensor] = []
        self.last: Tensor | None = None  # the latest call's logits / T, log-normalised
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _gather(self, tokens: Tensor) -> None:
        if self.last is not None:
            self.steps.append(self.last.gather(-1, tokens[:, None].to(self.last.device))[:, 0])

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._gather(ids[:, -1])  # the token sampled from the previous call's logits
        logits = output.logits[:, -1].float()
        logits = logits / self.t if self.t != 1.0 else logits
        self.last = logits - torch.logsumexp(logits, -1, keepdim=True)

    def finish(self, responses: Tensor) -> Tensor:
        """``[N, steps]`` for the ``responses`` generate returned (its last token included)."""
        self.handle.remove()
        self._gather(responses[:, -1])
        self.last = None
        if not self.steps:
            return responses.new_zeros(responses.shape, dtype=torch.float32)
        return torch.stack(self.steps, 1)[:, : responses.shape[1]]


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
    if c.record_logprobs and c.backend == "vllm" and (c.top_k > 0 or c.top_p < 1):
        # vLLM reports ln μ of the truncated, renormalised distribution; the losses' ln π_t
        # (and HF's recorded values) are of raw logits / T
        raise ConfigError("generation: record_logprobs with backend=vllm needs top_k=0 and "
                          "top_p=1 (vLLM's log-probs are of the truncated distribution)")
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
