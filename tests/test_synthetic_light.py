"""The light reward class (``--reward-class light``, Assumption 5): a linear scorer over π*'s
Markov features that realises γ·ln π* exactly, and that the engine trains like any reward model."""

from __future__ import annotations

import math

import pytest
import torch

from distalign.synthetic.labels import pair_records, sample_pairs, write_jsonl
from distalign.synthetic.light import (
    LightRewardModel,
    light_reward_model,
    save_light_init,
    set_to_log_star,
)
from distalign.synthetic.lm import world_tokenizer
from distalign.synthetic.metrics import ExactEvaluator, ExactMetricsCallback, reward_metrics
from distalign.synthetic.world import WorldConfig, build_world


@pytest.mark.parametrize("cfg", [WorldConfig(), WorldConfig(prompt_len=1, num_content=2,
                                                            max_len=2, seed=3)])
def test_light_class_realises_gamma_log_pi_star_up_to_a_per_prompt_constant(cfg):
    world = build_world(cfg)
    tok = world_tokenizer(world)
    model = light_reward_model(world, tok)
    n_weights = sum(p.numel() for p in model.parameters())
    states = world.num_prompts * (cfg.max_len + 1) * (cfg.num_content + 1) ** 2
    assert n_weights == states + world.num_prompts  # one weight per (x, k, prev, next), + b[x]
    gamma = 2.5
    set_to_log_star(model, world, gamma)
    with torch.no_grad():
        model.light.bias.copy_(torch.arange(world.num_prompts, dtype=torch.float32))
    scores = ExactEvaluator(world, tok).reward_scores(model)
    diff = scores - gamma * world.logp_star()
    # equal to γ ln π* up to the per-prompt offset b[x] (here b[x] = x), to float32 rounding
    assert diff.std(-1).max().item() < 1e-5
    assert diff.mean(-1) == pytest.approx(torch.arange(world.num_prompts).double(), abs=1e-5)
    # so the induced π̃ ∝ exp(R̂/γ) is π* itself: the reward metrics' KL is 0
    m = reward_metrics(scores, world.logp_star(), gamma)
    assert m["rm_kl_fwd"] == pytest.approx(0.0, abs=1e-6) and m["rm_corr"] > 0.999999


def test_light_scorer_reads_left_padded_batches_and_round_trips_through_auto_classes(tmp_path):
    from distalign.lm.models import ModelConfig, load_reward_model
    from distalign.lm.scoring import sequence_scores, token_scores

    world = build_world()
    tok = world_tokenizer(world)
    path = save_light_init(world, tok, tmp_path / "light")
    model = load_reward_model(ModelConfig(name_or_path=str(path), reward_model=str(path)))
    assert isinstance(model, LightRewardModel)
    set_to_log_star(model, world, 1.0)
    ls = world.logp_star()
    # prompt "b a" (index 3), response "c a" + EOS, right- and left-padded
    ids = [2, 1, 3, 1, 0]
    right = torch.tensor([ids + [0, 0]])
    left = torch.tensor([[0, 0] + ids])
    amask_r = torch.tensor([[1] * 5 + [0, 0]])
    amask_l = torch.tensor([[0, 0] + [1] * 5])
    want = ls[3, world.index_of("c a")].item()
    for x, a in ((right, amask_r), (left, amask_l)):
        assert sequence_scores(model, x, a).item() == pytest.approx(want, abs=1e-5)
    # as a PPO value model: partial sums, 0 on the prompt, the full score at the EOS
    v = token_scores(model, right, amask_r)[0]
    assert v[:2].abs().max().item() == 0.0 and v[4].item() == pytest.approx(want, abs=1e-5)


def test_engine_trains_the_light_class_to_a_small_exact_rm_kl(tmp_path):
    from distalign.train import load_config, train

    world = build_world(WorldConfig(prompt_len=1, num_content=2, max_len=2, seed=3))
    tok = world_tokenizer(world)
    init = save_light_init(world, tok, tmp_path / "init")
    ev = ExactEvaluator(world, tok)
    mu = world.logp_sft()  # responses from π_sft: every response has mass
    pairs = sample_pairs(world, mu, 4096, seed=1)
    val = sample_pairs(world, mu, 512, seed=2)
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records(world, pairs))
    callback = ExactMetricsCallback(ev, val)
    cfg = load_config("reward", {
        "model": {"name_or_path": str(init)}, "data": {"path": str(data)},
        "run": {"name": "rm", "output_dir": str(tmp_path), "batch_size": 128, "epochs": 4,
                "progress": False, "log_every": 32, "eval_every": 32},
        "optim": {"lr": 0.1, "scheduler": "cosine"}, "algo": {"center_coef": 0.01},
    })
    run_dir = train(cfg, callbacks=[callback])
    first, last = callback.history[0], callback.history[-1]
    # step 0, the zero scorer: π̃ is uniform on 𝒜, so KL(π*‖π̃) = ln |𝒜| − H(π*)
    ls = world.logp_star()
    uniform = math.log(world.num_responses) + (ls.exp() * ls).sum(-1).mean().item()
    assert first["synthetic/rm_kl_fwd"] == pytest.approx(uniform, abs=1e-6)
    # 4096 pairs over 4 prompts × 6 responses: the convex class fits π* closely
    assert last["synthetic/rm_kl_fwd"] < 0.02, last
    assert last["synthetic/rm_corr"] > 0.95
    # final/ reloads as the same class and scores the same
    from transformers import AutoModelForSequenceClassification

    again = AutoModelForSequenceClassification.from_pretrained(run_dir / "final")
    assert isinstance(again, LightRewardModel)
    m = reward_metrics(ev.reward_scores(again), world.logp_star(), world.gamma)
    assert m["rm_kl_fwd"] == pytest.approx(last["synthetic/rm_kl_fwd"], abs=1e-6)


def test_a_fresh_distalign_eval_process_loads_a_saved_light_reward_model(tmp_path):
    # the type is registered at load time (entry point), not by some earlier import
    import json
    import os
    import subprocess
    import sys

    from distalign.synthetic.lm import save_policy, world_policy

    world = build_world()
    tok = world_tokenizer(world)
    light = save_light_init(world, tok, tmp_path / "light")
    policy = save_policy(world_policy(tok), tok, tmp_path / "pi")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in world.prompts[:3]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    gens = tmp_path / "g.jsonl"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "distalign", *args], capture_output=True,
                              text=True, env=env, timeout=300)

    made = cli("generate", str(policy), "--prompts", str(prompts), "--out", str(gens),
               "gen.max_new_tokens=4", "--no-progress")
    assert made.returncode == 0, made.stderr
    ev = cli("eval", str(gens), "--reward-model", str(light), "--no-progress")
    assert ev.returncode == 0, ev.stderr
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    # the untrained light scorer: 0 on reachable features, −10 per unreachable one
    assert math.isfinite(result["metrics"]["eval/rm_score"])
