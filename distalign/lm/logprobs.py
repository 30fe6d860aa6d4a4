"""Masked token log-probabilities of HF causal LMs.

Batches are ``input_ids``/``attention_mask`` of shape ``[B, L]`` (left- or right-padded) plus a
``response_mask`` marking the tokens whose log-probs count. Outputs are aligned with
``input_ids``: position t holds ln p(input_ids[t] | input_ids[<t]); position 0 holds 0.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

log = logging.getLogger("distalign")
_NO_KEEP: set[str] = set()  # model classes whose forward rejected a boolean logits_to_keep


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def forward_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, keep: Tensor | None = None
) -> Tensor:
    """Logits ``[B, L, V]``; with a boolean ``keep [B, L]``, only the kept positions' logits,
    flattened to ``[N, V]`` (transformers' ``logits_to_keep`` mask: the LM head never runs on
    the other positions, which saves its FLOPs and the ``[B, L, V]`` activation)."""
    kwargs = {} if keep is None else {"logits_to_keep": keep}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )
    return out.logits


def _logprobs(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    # logsumexp + gather avoids materialising a full log_softmax copy
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def logits_to_token_logprobs(
    logits: Tensor, input_ids: Tensor, temperature: float = 1.0
) -> Tensor:
    """Aligned token log-probs from logits ``[B, L, V]``; logits are divided by the sampling
    temperature so that ln π matches the distribution the samples came from."""
    tok = _logprobs(logits[:, :-1], input_ids[:, 1:], temperature)
    return torch.nn.functional.pad(tok, (1, 0), value=0.0)


def token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    temperature: float = 1.0,
    response_mask: Tensor | None = None,
) -> Tensor:
    """ln π(token_t | prefix) for every position, ``[B, L]`` (position 0 is 0).

    With ``response_mask``, only positions where it is 1 are computed (the others are 0): the
    LM head then runs on response positions only (see :func:`forward_logits`). Models whose
    forward does not take a boolean ``logits_to_keep`` fall back to full logits.
    """
    if response_mask is None:
        return logits_to_token_logprobs(
            forward_logits(model, input_ids, attention_mask), input_ids, temperature
        )
    want = response_mask[:, 1:].bool()
    keep = torch.nn.functional.pad(want, (0, 1), value=False)  # logits at t-1 predict token t
    name = type(model).__name__
    if name in _NO_KEEP:
        logits = forward_logits(model, input_ids, attention_mask)
    else:
        try:
            logits = forward_logits(model, input_ids, attention_mask, keep)
        except (TypeError, IndexError) as err:  # no (boolean) logits_to_keep support
            _NO_KEEP.add(name)  # remembered: one failed forward per model class, not per call
            log.warning("%s does not take a boolean logits_to_keep (%s: %s); computing full "
                        "logits (slower, same values)", name, type(err).__name__, err)
            logits = forward_logits(model, input_ids, attention_mask)
    at = torch.nn.functional.pad(want, (1, 0), value=False)
    if logits.dim() != 2:
        return logits_to_token_logprobs(logits, input_ids, temperature) * at
    tok = _logprobs(logits, input_ids[:, 1:][want], temperature)
    return tok.new_zeros(input_ids.shape).masked_scatter(at, tok)


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """ln π(response | prompt) = Σ over response tokens, ``[B]``."""
    tok = token_logprobs(model, input_ids, attention_mask, temperature, response_mask)
    return (tok * response_mask.to(tok.dtype)).sum(-1)
