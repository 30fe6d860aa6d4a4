"""A policy's measures in a tilted world against exact values by enumeration: tiny Llamas with
L = 2, where the response space (EOS; one token + EOS; two tokens, cut) has ~18k replies."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from distalign.errors import ConfigError, DataError
from distalign.eval.prompts import load_prompt_set
from distalign.testing import save_tiny_checkpoint
from distalign.tilted.build import build_world
from distalign.tilted.evaluate import check_sampling, measure_policy
from distalign.tilted.oracle import oracle_judge
from distalign.tilted.pi0 import load_pi0
from distalign.tilted.world import TiltedConfig, TiltedWorld

BETA = 0.5


def short_words(prompt: str, reply: str) -> float:
    """The share of the reply's words with at most 2 letters (0 for an empty reply)."""
    words = reply.split()
    return sum(len(w) <= 2 for w in words) / len(words) if words else 0.0


short_words.bounds = (0.0, 1.0)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tilted-eval")
    rows = [{"chosen": f"\n\nHuman: {w}\n\nAssistant: yes", "rejected": f"\n\nHuman: {w}\n\n"
             "Assistant: no"} for w in ("the dog is", "how was your day", "my house is big",
                                        "you are good", "who is that man", "what can i do")]
    (root / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pi0 = save_tiny_checkpoint(root / "pi0", seed=0, initializer_range=0.3)
    pi_hat = save_tiny_checkpoint(root / "pi_hat", seed=1, initializer_range=0.3)
    cfg = TiltedConfig(pi0=str(pi0), prompts=str(root / "hh.jsonl"), heldout=3, beta_star=BETA,
                       gamma=1.0, max_new_tokens=2, gold="test_tilted_evaluate:short_words")
    path = build_world(cfg, root / "world", progress=False, log=lambda *_: None)
    return path, pi0, pi_hat


@torch.no_grad()
def space_logprobs(model, prompt: list[int], eos: int, vocab: int) -> torch.Tensor:
    """ln π of every reply of the L = 2 space, from one forward of the prompt and one of the
    prompt + each first token (independent of ``reply_logprobs``): ``[V, V]`` where row a
    column b is the reply [a, b] (b ≠ EOS, cut at L), column EOS the reply [a, EOS], and row
    EOS holds the reply [EOS] (in every column)."""
    first = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].double(), -1)
    rows = torch.tensor([[*prompt, a] for a in range(vocab)])
    second = torch.log_softmax(model(input_ids=rows).logits[:, -1].double(), -1)
    table = first[:, None] + second
    table[eos, :] = first[eos]
    return table


@pytest.fixture(scope="module")
def tables(setup):
    """ln π₀, ln π̂, ln π* and r over the whole space of each held-out prompt (flattened:
    the replies [EOS], [a, EOS] and [a, b] for a, b ≠ EOS)."""
    path, _, pi_hat = setup
    world = TiltedWorld.load(path)
    pi0, tok = world.load_pi0()
    hat = load_pi0(str(pi_hat))[0]
    pset = load_prompt_set(str(world.file("prompts/heldout.jsonl")), tok, fmt="hh",
                           max_prompt_length=96)
    eos, V = tok.eos_token_id, len(tok)
    keep = torch.ones(V, V, dtype=torch.bool)
    keep[eos, :] = False
    keep[eos, eos] = True  # [EOS] once
    # r from each token's text: the tiny tokenizer decodes a reply as its words joined by spaces
    words = [tok.decode([t], skip_special_tokens=True) for t in range(V)]
    short = torch.tensor([len(w) <= 2 for w in words], dtype=torch.float64)
    real = torch.tensor([bool(w) for w in words], dtype=torch.float64)
    real[eos] = 0
    num = short[:, None] * real[:, None] + (short * real)[None, :] * (torch.arange(V) != eos)
    den = real[:, None] + real[None, :] * (torch.arange(V) != eos)
    r = torch.where(den > 0, num / den.clamp_min(1), torch.zeros(()))
    for a, b in ((5, 6), (7, eos), (0, 9), (eos, eos)):  # checked against the decoded text
        ids = [a] if a == eos else [a, b]
        assert r[a, b] == short_words("", tok.decode(ids, skip_special_tokens=True))
    out = []
    for p in pset.prompts:
        l0, lh = (space_logprobs(m, p.token_ids, eos, V)[keep] for m in (pi0, hat))
        out.append((l0, lh, torch.log_softmax(l0 + r[keep] / BETA, 0), r[keep]))
        assert float(torch.logsumexp(l0, 0)) == pytest.approx(0, abs=1e-9)
    return out


def exact(tables, policy: str) -> dict[str, float]:
    """Every measure of π̂ (``policy`` "hat") or π₀ ("pi0") by summing over the space; the
    win probability against π₀ by 20k exact draws of each side."""
    out: dict[str, list[float]] = {k: [] for k in ("fwd", "rev", "gold", "ref", "win")}
    gen = torch.Generator().manual_seed(0)
    for l0, lh, ls, r in tables:
        lq = lh if policy == "hat" else l0
        qs, ps = lq.exp(), ls.exp()
        out["fwd"].append(float((ps * (ls - lq)).sum()))
        out["rev"].append(float((qs * (lq - ls)).sum()))
        out["gold"].append(float((qs * r).sum()))
        out["ref"].append(float((qs * (lq - l0)).sum()))
        a = torch.multinomial(qs, 20000, replacement=True, generator=gen)
        b = torch.multinomial(l0.exp(), 20000, replacement=True, generator=gen)
        out["win"].append(float(torch.sigmoid(ls[a] - ls[b]).mean()))  # γ = 1
    return {k: float(np.mean(v)) for k, v in out.items()}


def test_measures_of_a_policy_match_the_exact_values(setup, tables):
    path, pi0, pi_hat = setup
    want = exact(tables, "hat")
    got = measure_policy(str(path), str(pi_hat), limit=3, n=512, proposals=1024, progress=False)
    assert got["tilted/prompts"] == 3
    assert 0.5 < got["tilted/ess_per_sample"] < 1
    # estimates within their own SE (over 3 prompts) and close in absolute terms
    for key, name in (("fwd", "kl_fwd"), ("rev", "kl_rev"), ("gold", "gold_reward"),
                      ("ref", "kl_ref")):
        est, se = got[f"tilted/{name}"], got[f"tilted/{name}_se"]
        assert abs(est - want[key]) < max(se, 0.03), (name, est, want[key], se)
    # the rejection estimates: on π₀'s samples used by SNIS, and on fresh proposals
    assert got["tilted/kl_fwd_rs"] == pytest.approx(want["fwd"], abs=0.1)
    assert got["tilted/fresh_kl_fwd_rs"] == pytest.approx(want["fwd"], abs=0.1)
    assert got["tilted/fresh_prompts_without_draws"] == 0
    assert 0 < got["tilted/fresh_accept_rate"] < 1
    assert got["tilted/oracle_win"] == pytest.approx(want["win"], abs=0.03)


def test_pi0_against_itself(setup, tables):
    path, pi0, _ = setup
    want = exact(tables, "pi0")
    got = measure_policy(str(path), None, limit=3, n=512, proposals=256, progress=False)
    assert got["tilted/kl_ref"] == pytest.approx(0, abs=1e-5)
    assert got["tilted/oracle_win"] == pytest.approx(0.5)  # the same replies on both sides
    assert got["tilted/kl_fwd"] == pytest.approx(want["fwd"], abs=max(got["tilted/kl_fwd_se"],
                                                                       0.03))
    assert want["fwd"] > 0.05 and math.isfinite(got["tilted/kl_rev"])


def test_judge_measure_checks_the_sampling_settings(setup):
    path, pi0, _ = setup
    judge = oracle_judge(str(path))
    rows = [{"prompt_id": "0", "prompt": "x", "prompt_token_ids": [5], "output_token_ids": [6, 7],
             "output_logprob": -1.0}]
    with pytest.raises(ConfigError, match="max_new_tokens"):
        judge.measure(rows, rows, meta={"gen": {"temperature": 1.0, "max_new_tokens": 32}})
    with pytest.raises(ConfigError, match="temperature"):
        check_sampling(judge.world, {"temperature": 0.7}, "π₀'s generations")
    with pytest.raises(DataError, match="output_logprob"):
        judge.measure([{k: v for k, v in rows[0].items() if k != "output_logprob"}], rows)
    with pytest.raises(DataError, match="reply tokens > L"):
        judge.measure([{**rows[0], "output_token_ids": [6, 7, 8]}], rows)


def test_eval_with_the_world_oracle_and_pi0s_generations_adds_the_measures(setup, tmp_path):
    # the user's path: generate π₀ and π̂ at the world's sampling settings, then one eval
    import os
    import subprocess
    import sys

    path, pi0, pi_hat = setup
    world = TiltedWorld.load(path)
    prompts = path.parent / "prompts" / "heldout.jsonl"
    if not prompts.is_file():
        prompts = next(path.parent.rglob("heldout*.jsonl"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "distalign", *args], capture_output=True,
                              text=True, env=env, timeout=300)

    gen = ["-n", "16", "gen.temperature=1", "gen.top_k=0", "gen.top_p=1",
           f"gen.max_new_tokens={world.max_new_tokens}", "--no-progress"]
    for name, model in (("pi0", pi0), ("pi_hat", pi_hat)):
        made = cli("generate", str(model), "--prompts", str(prompts), "--out",
                   str(tmp_path / name / "g.jsonl"), *gen)
        assert made.returncode == 0, made.stderr
    ev = cli("eval", str(tmp_path / "pi_hat" / "g.jsonl"), "--judge", f"oracle:{path}",
             "--ref-model", str(pi0), "--base-generations", str(tmp_path / "pi0" / "g.jsonl"),
             "--no-progress")
    assert ev.returncode == 0, ev.stderr
    m = json.loads((tmp_path / "pi_hat" / "eval" / "eval.json").read_text())["metrics"]
    tilted = {k: v for k, v in m.items() if k.startswith("tilted/")}
    assert tilted, m
    assert all(math.isfinite(v) for v in tilted.values() if isinstance(v, float))
    # π̂ ≠ π₀: its forward KL to π* is positive, and π₀'s own KL(π₀‖π₀) is not among them
    assert any(k.startswith("tilted/kl_fwd") and v > 0 for k, v in tilted.items()), tilted
    # π₀ of another fingerprint is refused in one line
    other = cli("eval", str(tmp_path / "pi_hat" / "g.jsonl"), "--judge", f"oracle:{path}",
                "--ref-model", str(pi_hat), "--out", str(tmp_path / "other"), "--no-progress")
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr
