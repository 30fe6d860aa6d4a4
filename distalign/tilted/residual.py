"""The residual reward class of the tilted world: R̂(x, y) = γ ln π₀(y|x) + f_θ(x, y).

In the tilted world the Bradley–Terry reward of eq. (3) is γ ln π*(y|x) = γ ln π₀(y|x) +
(γ/β*) r(x, y) − γ ln Z(x): π₀'s own log-likelihood plus a multiple of the gold reward. A
reward model that must learn both from labels spends most of its capacity on the first part
(the probe measures that Δ ln π₀ carries 90–99 % of the label log-odds' variance); this class
is given it exactly, and learns only the residual with a small f_θ, a linear head on π₀'s last
hidden state (its weights start at 0, so R̂ starts as γ ln π₀). It mirrors the synthetic
world's ``--reward-class light`` (a small class that contains the truth where f_θ can express
γ r/β*): the generator–verifier gap of the paper's Assumption 5.

It is an ordinary ``transformers`` sequence classifier (registered with the Auto classes on
import), so ``distalign.lm.scoring`` reads it like any reward model: the backbone returns, at
every position t, π₀'s last hidden state and the running sum γ Σ_{s≤t} ln π₀(token_s | <s)
over real tokens after the first; the head ``score`` adds w·h_t + b to that sum. At the last
real token this is γ ln π₀(y|x) + f_θ plus γ ln π₀(x₂.. | x₁), a per-prompt constant that
Bradley–Terry cannot see. π₀'s weights are frozen (``requires_grad=False``): only f_θ trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

from distalign.lm.logprobs import logits_to_token_logprobs, position_ids_from_mask
from distalign.lm.scoring import gather_last


class ResidualRewardConfig(PretrainedConfig):
    model_type = "distalign_tilted_residual"

    def __init__(self, base: dict[str, Any] | None = None, gamma: float = 1.0,
                 num_labels: int = 1, **kwargs: Any) -> None:
        self.base = base or {}  # π₀'s config (to_dict), rebuilt with AutoConfig.for_model
        self.gamma = gamma
        super().__init__(num_labels=num_labels, **kwargs)

    def base_config(self) -> PretrainedConfig:
        cfg = dict(self.base)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


class ResidualBackbone(nn.Module):
    """π₀ (frozen) returning [last hidden state, γ · running ln π₀] per position."""

    def __init__(self, lm: nn.Module, gamma: float) -> None:
        super().__init__()
        self.lm, self.gamma = lm, gamma
        self.lm.requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, **_: Any) -> BaseModelOutput:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        if position_ids is None:
            position_ids = position_ids_from_mask(mask)
        out = self.lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                      output_hidden_states=True, use_cache=False)
        tok = logits_to_token_logprobs(out.logits, input_ids).float()
        # a token counts when it and its predecessor are real: the first real token (after
        # left padding) has no context to be predicted from
        prev = torch.nn.functional.pad(mask[:, :-1], (1, 0))
        running = self.gamma * (tok * (mask * prev)).cumsum(-1)
        hidden = out.hidden_states[-1].float()
        return BaseModelOutput(last_hidden_state=torch.cat([hidden, running[..., None]], -1))


class ResidualHead(nn.Module):
    """f_θ(h) = w·h + b, added to the running γ ln π₀ (the backbone's last channel)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(h[..., :-1]) + h[..., -1:]


class ResidualRewardModel(PreTrainedModel):
    """R̂ = γ ln π₀(y|x) + f_θ(x, y); ``score`` is the head (read at the last real token)."""

    config_class = ResidualRewardConfig
    base_model_prefix = "residual"
    _no_split_modules: list[str] = []

    def __init__(self, config: ResidualRewardConfig) -> None:
        super().__init__(config)
        base = config.base_config()
        lm = AutoModelForCausalLM.from_config(base)
        if getattr(base, "tie_word_embeddings", False):  # SmolLM2: lm_head is the embedding
            # the inner model's tie, seen from here, so that loading re-ties instead of
            # reporting a missing lm_head
            self._tied_weights_keys = {f"residual.lm.{k}": f"residual.lm.{v}" for k, v in
                                       (getattr(lm, "_tied_weights_keys", None) or {}).items()}
        self.residual = ResidualBackbone(lm, config.gamma)
        self.score = ResidualHead(base.hidden_size)
        self.post_init()
        self._init_weights(self.score)  # post_init leaves custom modules to their own init

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """Loading materialises fresh parameters (all trainable): freeze π₀ again."""
        out = super().from_pretrained(*args, **kwargs)
        (out[0] if isinstance(out, tuple) else out).residual.lm.requires_grad_(False)
        return out

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ResidualHead):  # f_θ = 0: R̂ starts as γ ln π₀
            with torch.no_grad():
                module.linear.weight.zero_()
                module.linear.bias.zero_()

    def get_output_embeddings(self) -> None:
        return None  # a scorer, not an LM

    def sequence_scores(self, input_ids: Tensor, attention_mask: Tensor,
                        response_mask: Tensor | None) -> Tensor:
        """R̂ = γ ln π₀(y|x) + f_θ(h at y's last token), ``[B]``: the sum over the response's
        tokens only, so no per-prompt constant γ ln π₀(x) rides along (Bradley–Terry cannot
        see one, but a PPO return would carry it). How :mod:`distalign.lm.scoring` reads
        this model, in training and in scoring alike."""
        if response_mask is None:
            return self.forward(input_ids, attention_mask).logits.squeeze(-1)
        mask = attention_mask.long()
        out = self.residual.lm(input_ids=input_ids, attention_mask=mask,
                               position_ids=position_ids_from_mask(mask),
                               output_hidden_states=True, use_cache=False)
        tok = logits_to_token_logprobs(out.logits, input_ids).float()
        ll = self.residual.gamma * (tok * response_mask).sum(-1)
        h = gather_last(out.hidden_states[-1].float(), response_mask)
        return ll + self.score.linear(h).squeeze(-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, **_: Any) -> SequenceClassifierOutput:
        hidden = self.residual(input_ids, attention_mask, position_ids).last_hidden_state
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return SequenceClassifierOutput(logits=gather_last(self.score(hidden), mask))


def register() -> None:
    """Make the Auto classes load saved residual scorers (idempotent); ``distalign.lm.models``
    calls it through the ``distalign.model_types`` entry point at every load."""
    AutoConfig.register(ResidualRewardConfig.model_type, ResidualRewardConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(ResidualRewardConfig, ResidualRewardModel,
                                                exist_ok=True)


def residual_reward_model(pi0: nn.Module, gamma: float) -> ResidualRewardModel:
    """A fresh residual scorer around (a copy of the weights of) the loaded π₀."""
    base = pi0.config.to_dict()
    cfg = ResidualRewardConfig(base=base, gamma=gamma, pad_token_id=pi0.config.pad_token_id,
                               eos_token_id=pi0.config.eos_token_id,
                               tie_word_embeddings=bool(base.get("tie_word_embeddings")))
    model = ResidualRewardModel(cfg)
    model.residual.lm.load_state_dict(pi0.state_dict())
    model.residual.lm.requires_grad_(False)
    return model.eval()


def save_residual_init(pi0_spec: str, gamma: float, directory: str | Path) -> Path:
    """The untrained residual scorer of π₀ and π₀'s tokenizer in one folder: the ``reward``
    run's ``model.name_or_path`` (train it with LoRA off: only f_θ is trainable)."""
    from distalign.tilted.pi0 import load_pi0

    pi0, tok = load_pi0(pi0_spec)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    residual_reward_model(pi0, gamma).save_pretrained(path)
    tok.save_pretrained(path)
    return path
