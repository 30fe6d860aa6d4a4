"""Per-token and per-sequence scores of reward / value models.

The score R̂(x, y) of eq. (1)/(15) is read at the **last real token** of the response: the
EOS for a response that ended, the last generated token for one that hit the length limit,
and never a pad after EOS. HF's ``*ForSequenceClassification`` pooling finds "the last
non-pad token" by comparing ids with ``pad_token_id``, which is wrong when pad == EOS (it
skips the EOS) — so we apply the scalar head to every position and index with masks.
PPO values V(s_t) are :func:`token_scores` of the value model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distalign.lm.logprobs import position_ids_from_mask
from distalign.lm.wrappers import is_peft_model, unwrap_model

# Names of the per-token scalar head in HF *ForSequenceClassification / *ForTokenClassification
# models: Llama, Mistral, Qwen2, Gemma, GPT-2, GPT-NeoX all call it `score`.
HEAD_NAMES = ("score", "classifier", "v_head")


def _split_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone, head) of a scorer, seen through DDP/compile and peft wrappers.

    peft injects LoRA layers in place and wraps a trained head in ``ModulesToSaveWrapper``,
    so calling the inner HF model's backbone and head uses the adapted weights.
    """
    hf = unwrap_model(model)
    if is_peft_model(hf):
        hf = hf.get_base_model()
    head = next(
        (getattr(hf, n) for n in HEAD_NAMES if isinstance(getattr(hf, n, None), nn.Module)), None
    )
    prefix = getattr(hf, "base_model_prefix", "")
    backbone = getattr(hf, prefix, None) if prefix else None
    if head is None or backbone is None:
        raise TypeError(
            f"{type(hf).__name__} has no scalar head named one of {HEAD_NAMES} on a "
            f"'{prefix}' backbone; load it with distalign.lm.models.load_scorer"
        )
    return backbone, head


def token_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The scalar head on every position's final hidden state: ``[B, L]`` (float32).

    With ``num_labels > 1`` the result is ``[B, L, num_labels]``. Positions come from the
    attention mask, so left padding does not shift them (as in :mod:`distalign.lm.logprobs`).
    Values at padded positions are meaningless; mask them.
    """
    backbone, head = _split_head(model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        # go through DDP's own forward so its reducer all-reduces the scorer's gradients
        full = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            output_hidden_states=True,
            use_cache=False,
        )
        scores = head(full.hidden_states[-1]).float()
        return scores.squeeze(-1) if scores.shape[-1] == 1 else scores
    out = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    scores = head(hidden).float()
    return scores.squeeze(-1) if scores.shape[-1] == 1 else scores


def gather_last(values: Tensor, mask: Tensor) -> Tensor:
    """``values[b, last index where mask[b] == 1]`` for ``values`` of shape ``[B, L, ...]``."""
    cols = torch.arange(mask.shape[-1], device=mask.device)
    idx = (mask.bool() * (cols + 1)).argmax(-1)  # the largest column holding a 1
    return values[torch.arange(values.shape[0], device=values.device), idx]


def sequence_scores(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor | None = None,
) -> Tensor:
    """R̂(x, y): the score at the last real token, ``[B]`` (eq. (1): reward on the final token).

    The last 1 of ``response_mask`` if given (a terminal EOS is part of the response, padding
    after it is not), else the last 1 of ``attention_mask``. A scorer that reads text rather
    than a scalar head (a tilted world's gold reward) offers ``sequence_scores`` itself.
    """
    own = getattr(unwrap_model(model), "sequence_scores", None)
    if callable(own):
        return own(input_ids, attention_mask, response_mask)
    scores = token_scores(model, input_ids, attention_mask)
    return gather_last(scores, response_mask if response_mask is not None else attention_mask)
