"""The gold reward r of a tilted world as a reward model the engine can load.

``rlhf`` trained on r itself at β = β* has π* as its exact optimum (π₀·exp(r/β*)/Z), so its
distance to π* measures the engine's own optimisation error in this world: the reference row
that says what a method could reach. The engine loads reward models with
``AutoModelForSequenceClassification`` and reads them with
:func:`distalign.lm.scoring.sequence_scores`; this model reads text instead of a scalar head,
so it offers ``sequence_scores`` itself (decode the reply ids, call r). It has no weights: its
folder holds the gold reward's spec and bound, and π₀'s tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)


class GoldScorerConfig(PretrainedConfig):
    model_type = "distalign_tilted_gold"

    def __init__(self, gold: str = "vader", bounds: list[float] | None = None,
                 **kwargs: Any) -> None:
        self.gold, self.bounds = gold, list(bounds) if bounds is not None else None
        super().__init__(**kwargs)


class GoldScorer(PreTrainedModel):
    """r(x, y) of the world's gold reward on the response part of each row."""

    config_class = GoldScorerConfig
    base_model_prefix = "gold"
    _no_split_modules: list[str] = []

    def __init__(self, config: GoldScorerConfig) -> None:
        super().__init__(config)
        # the bound as a frozen parameter: transformers expects a model to hold one
        self.bounds = torch.nn.Parameter(torch.tensor(config.bounds or [0.0, 0.0]),
                                         requires_grad=False)
        self.reward: Any = None
        self.tokenizer: Any = None
        self.post_init()

    @classmethod
    def from_pretrained(cls, path: Any, *args: Any, **kwargs: Any) -> Any:
        from distalign.tilted.gold import make_gold_reward

        out = super().from_pretrained(path, *args, **kwargs)
        model = out[0] if isinstance(out, tuple) else out
        model.tokenizer = AutoTokenizer.from_pretrained(path)
        model.reward = make_gold_reward(model.config.gold, model.config.bounds)
        return out

    def _init_weights(self, module: Any) -> None:
        pass  # nothing to initialise: the bound is the config's

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("the gold scorer reads text: call sequence_scores(input_ids, "
                        "attention_mask, response_mask)")

    @torch.no_grad()
    def sequence_scores(self, input_ids: Tensor, attention_mask: Tensor,
                        response_mask: Tensor | None) -> Tensor:
        """r of each row's response (``response_mask``), with its prompt (the rest of the
        attention mask), decoded as the world decodes replies."""
        if response_mask is None:
            raise TypeError("the gold scorer needs the response mask (which tokens are the reply)")
        ids, att, resp = (t.cpu().tolist() for t in (input_ids, attention_mask, response_mask))
        pids = [[t for t, a, m in zip(i, a_, m_, strict=True) if a and not m]
                for i, a_, m_ in zip(ids, att, resp, strict=True)]
        rids = [[t for t, m in zip(i, m_, strict=True) if m]
                for i, m_ in zip(ids, resp, strict=True)]
        dec = self.tokenizer.decode
        r = self.reward.score([dec(p, skip_special_tokens=True) for p in pids],
                              [dec(y, skip_special_tokens=True) for y in rids], pids, rids)
        return torch.tensor(r, dtype=torch.float32, device=input_ids.device)


def register() -> None:
    """Make the Auto classes load saved gold scorers (idempotent; entry point
    ``distalign.model_types``)."""
    AutoConfig.register(GoldScorerConfig.model_type, GoldScorerConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(GoldScorerConfig, GoldScorer, exist_ok=True)


def save_gold_scorer(world_path: str | Path, directory: str | Path) -> Path:
    """The world's gold reward as a reward-model folder (spec, bound, π₀'s tokenizer): the
    ``model.reward_model`` of ``rlhf`` on r at β = β*."""
    from distalign.lm.models import load_tokenizer
    from distalign.tilted.pi0 import model_config
    from distalign.tilted.world import TiltedWorld

    world = TiltedWorld.load(world_path)
    gold = world.gold_reward()
    tok = load_tokenizer(model_config(world.pi0_spec))
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    cfg = GoldScorerConfig(gold=gold.spec, bounds=list(gold.bounds),
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    GoldScorer(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
