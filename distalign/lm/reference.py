"""The reference policy π₀, queried for log-probs without gradients.

π₀ appears in every objective with a KL-to-reference term (β in eqs. (1), (5), (12), (15) of
arXiv 2506.01523 v2, and the DPO/REBEL baselines (6), (10)). Under LoRA π₀ is the
adapter-disabled policy (the base weights are frozen, so disabling the adapter gives exactly
the initial model) and no second copy is held.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from distalign.lm.logprobs import token_logprobs
from distalign.lm.models import ModelConfig, load_causal_lm
from distalign.lm.pairs import pair_sequence_logprobs
from distalign.lm.wrappers import eval_mode, is_peft_model, unwrap_model


class Reference:
    """The reference policy π₀, queried for per-token log-probs under ``torch.no_grad()``.

    Two modes:

    * adapter-disabled (``is_adapter_disabled=True``): the policy is a peft model and π₀ is its
      base, so ``token_logprobs`` runs the *policy* inside ``disable_adapter()``; no second copy.
    * frozen copy: an eval-mode, ``requires_grad=False`` model held by this object.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model
        if model is not None:
            model.eval()
            model.requires_grad_(False)

    @property
    def is_adapter_disabled(self) -> bool:
        return self.model is None

    @classmethod
    def from_config(cls, policy: nn.Module, cfg: ModelConfig) -> Reference:
        """π₀ for ``policy`` (call this before training starts).

        LoRA policy and no ``ref_model`` → adapter-disabled. Otherwise the copy is loaded from
        ``cfg.ref_model`` or ``cfg.name_or_path``; a policy built in memory (empty
        ``name_or_path``) is deep-copied instead.
        """
        inner = unwrap_model(policy)
        if not cfg.ref_model and is_peft_model(inner):
            return cls(None)
        path = cfg.ref_model or cfg.name_or_path
        if path:
            model = load_causal_lm(path, cfg, "reference model")
        else:
            base = inner.get_base_model() if is_peft_model(inner) else inner
            model = copy.deepcopy(base)
        device = next(inner.parameters()).device
        return cls(model.to(device))

    def to(self, device: torch.device | str) -> Reference:
        if self.model is not None:
            self.model.to(device)
        return self

    @contextmanager
    def module(self, policy: nn.Module | None) -> Iterator[nn.Module]:
        """The module that computes π₀: the frozen copy, or the unwrapped policy in eval mode
        with its adapter disabled (dropout would otherwise perturb π₀; train mode is restored).
        Unwrapped because a DDP forward would register a gradient-sync hook for a pass that
        never backpropagates."""
        if self.model is not None:
            yield self.model
            return
        if policy is None:
            raise ValueError("adapter-disabled reference needs the policy model")
        inner = unwrap_model(policy)
        with eval_mode(inner), inner.disable_adapter():
            yield inner

    @torch.no_grad()
    def token_logprobs(
        self,
        policy: nn.Module | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        temperature: float = 1.0,
        response_mask: Tensor | None = None,
    ) -> Tensor:
        """ln π₀(token_t | prefix), ``[B, L]``, aligned like :func:`token_logprobs`.
        ``policy`` (possibly DDP-wrapped) is needed only in adapter-disabled mode."""
        with self.module(policy) as m:
            return token_logprobs(m, input_ids, attention_mask, temperature, response_mask)

    def sequence_logprobs(
        self,
        policy: nn.Module | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_mask: Tensor,
        temperature: float = 1.0,
    ) -> Tensor:
        """ln π₀(response | prompt) = Σ over response tokens, ``[B]``."""
        tok = self.token_logprobs(policy, input_ids, attention_mask, temperature, response_mask)
        return (tok * response_mask.to(tok.dtype)).sum(-1)

    @torch.no_grad()
    def pair_logprobs(self, policy: nn.Module | None, batch: dict[str, Tensor]) -> Tensor:
        """``[B, 2]`` ln π₀ of (chosen, rejected) for a stacked pair batch, prompt computed once
        (:func:`distalign.lm.pairs.pair_sequence_logprobs`)."""
        with self.module(policy) as m:
            return pair_sequence_logprobs(m, batch)
