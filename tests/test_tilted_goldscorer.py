"""The gold reward as a reward model: loaded by the engine's own loader in a fresh process's
way (the entry point), it scores exactly r of the reply text, whatever the padding."""

from __future__ import annotations

import json

import pytest
import torch

from distalign.lm.models import ModelConfig, load_reward_model
from distalign.lm.scoring import sequence_scores
from distalign.testing import save_tiny_checkpoint
from distalign.tilted.gold import make_gold_reward
from distalign.tilted.goldscorer import save_gold_scorer


def test_gold_scorer_scores_r_of_the_reply(tmp_path):
    pi0 = save_tiny_checkpoint(tmp_path / "pi0", seed=0)
    world = tmp_path / "world.json"  # the fields save_gold_scorer reads
    from distalign.tilted.pi0 import fingerprint, load_pi0

    model, tok = load_pi0(str(pi0))
    world.write_text(json.dumps({"kind": "tilted", "version": 1, "beta_star": 0.2, "gamma": 1.0,
                                 "max_new_tokens": 4, "gold_reward": {"spec": "vader",
                                                                      "bounds": [-1, 1]},
                                 "pi0": {"spec": str(pi0), **fingerprint(model, tok)}}))
    out = save_gold_scorer(world, tmp_path / "gold")
    rm = load_reward_model(ModelConfig(name_or_path=str(pi0), reward_model=str(out)))
    assert not any(p.requires_grad for p in rm.parameters())
    prompts = [tok("the dog is", add_special_tokens=False)["input_ids"],
               tok("how was your day", add_special_tokens=False)["input_ids"]]
    replies = [tok(" good good", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
               tok(" bad", add_special_tokens=False)["input_ids"]]
    width = max(len(p) + len(r) for p, r in zip(prompts, replies, strict=True)) + 1
    ids = torch.full((2, width), tok.pad_token_id)
    att, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, (p, r) in enumerate(zip(prompts, replies, strict=True)):
        seq = p + r
        ids[b, width - len(seq):] = torch.tensor(seq)  # left padded, as the sampler pads
        att[b, width - len(seq):] = 1
        resp[b, width - len(r):] = 1
    got = sequence_scores(rm, ids, att, resp)
    texts = [tok.decode(r, skip_special_tokens=True) for r in replies]
    want = make_gold_reward("vader").score(["", ""], texts, prompts, replies)
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert want[0] > 0.3 and want[1] < -0.3  # VADER reads the words: the check can fail
