"""Masked token log-probabilities of HF causal LMs.

Batches are ``input_ids``/``attention_mask`` of shape ``[B, L]`` (left- or right-padded) plus a
``response_mask`` marking the tokens whose log-probs count. Outputs are aligned with
``input_ids``: position t holds ln p(input_ids[t] | input_ids[<t]); position 0 holds 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def forward_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.logits


def logits_to_token_logprobs(
    logits: Tensor, input_ids: Tensor, temperature: float = 1.0
) -> Tensor:
    """Aligned token log-probs from logits ``[B, L, V]``; logits are divided by the sampling
    temperature so that ln π matches the distribution the samples came from."""
    logits = logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, 1:].unsqueeze(-1)
    # logsumexp + gather avoids materialising a full [B, L, V] log_softmax copy
    tok = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.nn.functional.pad(tok, (1, 0), value=0.0)


def token_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """ln π(token_t | prefix) for every position, ``[B, L]`` (position 0 is 0)."""
    logits = forward_logits(model, input_ids, attention_mask)
    return logits_to_token_logprobs(logits, input_ids, temperature)


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """ln π(response | prompt) = Σ over response tokens, ``[B]``."""
    tok = token_logprobs(model, input_ids, attention_mask, temperature)
    return (tok * response_mask.to(tok.dtype)).sum(-1)
