"""The light reward class of ``--reward-class light``: a linear scorer over π*'s Markov features.

The generator–verifier gap (the paper's Assumption 5) asks for a reward class ℛ much smaller
than the policy class Π that still contains the true reward γ·ln π*. In this world π* is a
prompt-conditioned Markov chain (``world.py``), so

    γ·ln π*(a|x) = Σ_k γ·ln p*(a_k | x, k, a_{k-1})

is *linear* in one-hot features (x, position k, previous token, token): one weight per state
and next token, the per-state normaliser folded into the weight. The scorer here is exactly
that linear class, R̂(x, a) = b[x] + Σ_k w[x, k, prev_k, a_k] (the sum includes the final EOS),
≈ 600 weights against the transformer policy's ≈ 70 k. b[x] is a per-prompt offset that
Bradley–Terry cannot see; it lets the same class serve as a PPO value model (V(s_t) is the
partial sum up to token t, which telescopes to any function of the Markov state).

It is an ordinary ``transformers`` sequence classifier, registered with the Auto classes by
:func:`register`, which ``distalign.lm.models`` calls (entry point ``distalign.model_types``)
in any process that loads a saved one, so the engine trains, saves, reloads and scores it like
any reward model:
``distalign.lm.scoring`` applies the head ``score`` to the backbone's per-position output and
reads it at the last real token, which is the full sum.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

from distalign.lm.logprobs import position_ids_from_mask
from distalign.lm.scoring import gather_last
from distalign.synthetic.world import World

# Structural entries no data can reach (EOS at k = 0: the empty response; a content token
# at k = max_len: a response that does not stop) start at the engine's missing-EOS penalty, −10,
# instead of 0 (a 0 would rank the empty response near the average valid one).
UNREACHABLE_INIT = -10.0


class LightRewardConfig(PretrainedConfig):
    model_type = "distalign_light_reward"

    def __init__(
        self,
        num_content: int = 3,
        prompt_len: int = 2,
        max_len: int = 3,
        num_labels: int = 1,
        **kwargs: Any,
    ) -> None:
        self.num_content = num_content
        self.prompt_len = prompt_len
        self.max_len = max_len
        super().__init__(num_labels=num_labels, **kwargs)

    @property
    def num_prompts(self) -> int:
        return self.num_content**self.prompt_len


class LightFeatures(nn.Module):
    """Partial sums of the Markov-feature weights along the sequence: ``[B, T, 1]``.

    Token ids follow ``lm.world_tokenizer``: 0 = EOS (also pad), content c = c + 1. So a
    previous-token index (0 = start, c + 1 = content c) equals the previous token's id.
    """

    def __init__(self, config: LightRewardConfig) -> None:
        super().__init__()
        self.config = config
        c, L = config.num_content, config.max_len
        self.weight = nn.Parameter(torch.zeros(config.num_prompts, L + 1, c + 1, c + 1))
        self.bias = nn.Parameter(torch.zeros(config.num_prompts))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        **_: Any,
    ) -> BaseModelOutput:
        cfg = self.config
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        real = mask.bool()
        if position_ids is None:  # positions over real tokens, so left padding is harmless
            position_ids = position_ids_from_mask(mask)
        pos = position_ids
        # the prompt's index: its tokens at positions 0..prompt_len-1, base num_content
        x = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        for j in range(cfg.prompt_len):
            tok = (input_ids * (real & (pos == j))).sum(-1) - 1
            x = x * cfg.num_content + tok.clamp(0, cfg.num_content - 1)
        k = (pos - cfg.prompt_len).clamp(0, cfg.max_len)
        prev = torch.nn.functional.pad(input_ids, (1, 0))[:, :-1]
        prev = torch.where(pos == cfg.prompt_len, torch.zeros_like(prev), prev)
        nxt = torch.where(input_ids == 0, cfg.num_content, input_ids - 1)
        in_resp = real & (pos >= cfg.prompt_len)
        w = self.weight[x[:, None], k, prev.clamp(0, cfg.num_content), nxt]
        step = w * in_resp + self.bias[x][:, None] * (real & (pos == cfg.prompt_len - 1))
        return BaseModelOutput(last_hidden_state=step.cumsum(-1)[..., None])


class LightRewardModel(PreTrainedModel):
    """R̂(x, a) = b[x] + Σ_k w[x, k, a_{k-1}, a_k]; ``score`` is the identity head."""

    config_class = LightRewardConfig
    base_model_prefix = "light"
    _no_split_modules: list[str] = []

    def __init__(self, config: LightRewardConfig) -> None:
        super().__init__(config)
        self.light = LightFeatures(config)
        self.score = nn.Identity()
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Zero weights, except the unreachable entries (see ``UNREACHABLE_INIT``)."""
        if isinstance(module, LightFeatures):
            with torch.no_grad():
                module.weight.zero_()
                module.bias.zero_()
                module.weight[:, 0, :, -1] = UNREACHABLE_INIT
                module.weight[:, module.config.max_len, :, :-1] = UNREACHABLE_INIT

    def get_output_embeddings(self) -> None:
        return None  # a scorer, not an LM (``metrics.is_scorer``)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        hidden = self.light(input_ids, attention_mask, position_ids).last_hidden_state
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return SequenceClassifierOutput(logits=gather_last(self.score(hidden), mask))


def register() -> None:
    """Make ``AutoModelForSequenceClassification`` load saved light scorers (idempotent)."""
    AutoConfig.register(LightRewardConfig.model_type, LightRewardConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(LightRewardConfig, LightRewardModel,
                                                exist_ok=True)


def light_reward_model(world: World, tokenizer: Any) -> LightRewardModel:
    """A fresh light scorer for ``world`` (token ids of ``lm.world_tokenizer``)."""
    cfg = world.config
    return LightRewardModel(LightRewardConfig(
        num_content=cfg.num_content, prompt_len=cfg.prompt_len, max_len=cfg.max_len,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )).eval()


def set_to_log_star(model: LightRewardModel, world: World, scale: float) -> None:
    """w ← scale · ln p*(next | x, k, prev): then R̂ = scale · ln π* on 𝒜 (Assumption 5)."""
    from distalign.synthetic.world import _masked_logsoftmax

    table = _masked_logsoftmax(world.star_table, world.config.max_len)
    table = torch.where(torch.isfinite(table), table, torch.full_like(table, UNREACHABLE_INIT))
    with torch.no_grad():
        model.light.weight.copy_(scale * table.float())


def save_light_init(world: World, tokenizer: Any, directory: str | Path) -> Path:
    """The untrained light scorer and the world tokenizer in one folder: the ``reward`` run's
    ``model.name_or_path`` in the light variant."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    light_reward_model(world, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
