"""Building a tilted world on a tiny π₀, its oracle judge, and the one-line refusals."""

from __future__ import annotations

import json
import math
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest

from distalign.errors import ConfigError, DataError
from distalign.eval.judges.base import Pair
from distalign.testing import save_tiny_checkpoint
from distalign.tilted.build import build_world
from distalign.tilted.gold import check_gold_spec, make_gold_reward
from distalign.tilted.labels import preference_prob
from distalign.tilted.oracle import oracle_judge
from distalign.tilted.pi0 import fingerprint, load_pi0
from distalign.tilted.space import reply_logprobs
from distalign.tilted.world import TiltedConfig, TiltedWorld, split_prompts

WORDS = ["what is a good name for a cat", "the dog is", "how was your day", "my house is big",
         "where is the moon", "you are good", "who is that man", "what can i do"]


def length_reward(prompt: str, reply: str) -> float:
    """A MODULE:FUNCTION gold reward with its bound stated."""
    return min(len(reply.split()), 4) / 4


length_reward.bounds = (0.0, 1.0)  # type: ignore[attr-defined]


def unbounded_reward(prompt: str, reply: str) -> float:
    return float(len(reply))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tilted")
    rows = [{"chosen": f"\n\nHuman: {WORDS[i % 8]} {i % 3}\n\nAssistant: the cat is good",
             "rejected": f"\n\nHuman: {WORDS[i % 8]} {i % 3}\n\nAssistant: no"} for i in range(24)]
    prompts = root / "hh.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pi0 = save_tiny_checkpoint(root / "pi0", seed=0, initializer_range=0.3)
    other = save_tiny_checkpoint(root / "other", seed=1, initializer_range=0.3)
    cfg = TiltedConfig(pi0=str(pi0), prompts=str(prompts), heldout=6, beta_star=0.2, gamma=0.5,
                       max_new_tokens=3, pairs_per_prompt=2, seed=1)
    path = build_world(cfg, root / "world", progress=False, log=lambda *_: None)
    return path, pi0, other, prompts


def test_world_json_and_pairs_follow_eq3(world):
    path, pi0, _, _ = world
    data = json.loads(path.read_text())
    assert data["kind"] == "tilted" and data["version"] == 1
    assert (data["beta_star"], data["gamma"], data["max_new_tokens"]) == (0.2, 0.5, 3)
    assert data["gold_reward"]["spec"] == "vader" and data["gold_reward"]["bounds"] == [-1, 1]
    assert data["sampling"] == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_new_tokens": 0}
    model, tok = load_pi0(str(pi0))
    assert data["pi0"]["fingerprint"] == fingerprint(model, tok)
    rows = [json.loads(x) for x in (path.parent / "pairs-train.jsonl").read_text().splitlines()]
    assert len(rows) == 18 * 2 and data["pairs"]["train"]["pairs"] == 36
    assert len((path.parent / "pairs-heldout.jsonl").read_text().splitlines()) == 6 * 2
    assert {"prompt", "chosen", "rejected", "p_chosen"} <= set(rows[0])
    vader = make_gold_reward("vader")
    for row in rows:
        for side in ("chosen", "rejected"):
            ids = row[f"{side}_ids"]
            assert len(ids) <= 3 and (ids[-1] == tok.eos_token_id) == row[f"ended_{side}"]
            assert tok.decode(ids, skip_special_tokens=True) == row[side]
            assert row[f"r_{side}"] == vader.score([""], [row[side]])[0]
        lp = reply_logprobs(model, [row["prompt_ids"]] * 2, [row["chosen_ids"],
                                                             row["rejected_ids"]],
                            tok.pad_token_id)
        assert lp == pytest.approx([row["logp0_chosen"], row["logp0_rejected"]], abs=1e-4)
        p = preference_prob(row["logp0_chosen"], row["r_chosen"], row["logp0_rejected"],
                            row["r_rejected"], 0.2, 0.5)
        assert row["p_chosen"] == pytest.approx(float(p), abs=1e-12)
        assert row["logit"] == pytest.approx(math.log(p / (1 - p)), abs=1e-9)
    stats = data["pairs"]["train"]
    assert stats["bayes_acc"] == pytest.approx(
        np.mean([max(r["p_chosen"], 1 - r["p_chosen"]) for r in rows]))


def test_split_is_the_pipelines_split(world, tmp_path):
    from distalign.pipeline.stages import split_pairs

    _, _, _, prompts = world
    split_prompts(str(prompts), tmp_path / "a", seed=3, heldout=5)
    split_pairs(str(prompts), str(tmp_path / "b"), seed=3, heldout=5)
    for name in ("train", "heldout"):
        a, b = ([json.loads(x)["id"] for x in (tmp_path / d / f"{name}.jsonl").read_text()
                 .splitlines()] for d in ("a", "b"))
        assert a == b


def test_oracle_judge_gives_the_exact_preference(world):
    path, pi0, other, _ = world
    (ep,) = [e for e in entry_points(group="distalign.oracles") if e.name == "tilted"]
    assert ep.load() is oracle_judge
    judge = oracle_judge(str(path), ref_model=str(pi0))
    w = TiltedWorld.load(path)
    model, tok = load_pi0(str(pi0))
    rows = [json.loads(x) for x in (path.parent / "pairs-heldout.jsonl").read_text().splitlines()]
    pairs = [Pair(r["prompt"], r["chosen"], "the cat is good day", r["prompt_ids"],
                  r["chosen_ids"]) for r in rows]
    verdicts = judge.judge(pairs, progress=False)
    assert judge.calls == len(pairs) and judge.id.startswith("oracle:")
    ref_ids = tok("the cat is", add_special_tokens=False)["input_ids"]  # cut at L = 3
    vader = make_gold_reward("vader")
    for r, v in zip(rows, verdicts, strict=True):
        lp = reply_logprobs(model, [r["prompt_ids"]] * 2, [r["chosen_ids"], ref_ids],
                            tok.pad_token_id)
        rr = vader.score(["", ""], [r["chosen"], "the cat is"])
        want = preference_prob(lp[0], rr[0], lp[1], rr[1], w.beta_star, w.gamma)
        assert v.p == pytest.approx(float(want), abs=1e-6)
    assert judge.cut == len(pairs)  # every reference was longer than L
    # the labels' own exact P is what the judge says for (chosen, rejected)
    pr = [Pair(r["prompt"], r["chosen"], r["rejected"], r["prompt_ids"], r["chosen_ids"])
          for r in rows]
    a, b = judge.log_tilts(pr)
    got = [1 / (1 + math.exp(-w.gamma * (x - y))) for x, y in zip(a, b, strict=True)]
    assert got == pytest.approx([r["p_chosen"] for r in rows], abs=1e-5)
    with pytest.raises(DataError, match="not a prompt of the tilted world"):
        judge.judge([Pair("\n\nHuman: the sun is\n\nAssistant:", "yes", "no", [5], [6])])


def test_oracle_judge_refuses_another_pi0(world, tmp_path):
    path, _, other, _ = world
    with pytest.raises(ConfigError, match="fingerprint mismatch"):
        oracle_judge(str(path), ref_model=str(other))
    data = json.loads(path.read_text())
    data["pi0"]["fingerprint"]["weights"] = "0" * 64  # a world built on another π₀
    bad = tmp_path / "world.json"
    bad.write_text(json.dumps(data))
    for sub in ("prompts",):
        (tmp_path / sub).symlink_to(path.parent / sub)
    with pytest.raises(ConfigError, match="fingerprint mismatch") as err:
        oracle_judge(str(bad))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no default"):
        oracle_judge(None)
    with pytest.raises(ConfigError, match="not a tilted world"):
        (tmp_path / "w2.json").write_text(json.dumps({**data, "kind": "synthetic"}))
        TiltedWorld.load(tmp_path / "w2.json")


@pytest.mark.parametrize("change, message", [
    ({"gold": "sentiment"}, "unknown gold reward 'sentiment'"),
    ({"gold": "no_such_module_xyz:f"}, "unknown gold reward"),
    ({"gold": "test_tilted_world:unbounded_reward"}, "has no stated bound"),
    ({"gold": "reward:/tmp/rm"}, "has no stated bound"),
    ({"gold": "reward:/tmp/rm", "gold_bounds": (1.0, -1.0)}, "lo < hi"),
    ({"beta_star": 0.0}, "beta_star"),
    ({"beta_star": float("nan")}, "beta_star"),
    ({"beta_star": "x"}, "not a number"),
    ({"gamma": -1.0}, "gamma"),
    ({"gamma": float("inf")}, "gamma"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_input_is_refused_before_any_model_loads(tmp_path, change, message):
    # π₀ does not exist: reaching the model would give another error than the one expected
    cfg = TiltedConfig(pi0=str(tmp_path / "missing"), **change)
    with pytest.raises(ConfigError, match=message) as err:
        build_world(cfg, tmp_path / "w", progress=False, log=lambda *_: None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "w").exists()


def test_gold_rewards_by_spec():
    assert check_gold_spec("test_tilted_world:length_reward") == (0.0, 1.0)
    assert check_gold_spec("test_tilted_world:unbounded_reward", (0, 100)) == (0.0, 100.0)
    fn = make_gold_reward("test_tilted_world:length_reward")
    assert fn.score(["x", "x"], ["a b", "a b c d e f"]) == [0.5, 1.0]
    out = make_gold_reward("test_tilted_world:unbounded_reward", (0, 3))
    with pytest.raises(DataError, match="outside its stated bounds"):
        out.score(["x"], ["abcd"])
    v = make_gold_reward("vader")
    good, bad = v.score(["", ""], ["this is great and good", "this is bad"])
    assert -1 <= bad < 0 < good <= 1
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        check_gold_spec("vader", (0, 5))


def test_world_json_with_bad_numbers_is_refused(world, tmp_path):
    path = world[0]
    data = json.loads(path.read_text())
    for key, value in (("beta_star", 0), ("gamma", None), ("beta_star", "nan")):
        (tmp_path / "world.json").write_text(json.dumps({**data, key: value}))
        with pytest.raises(ConfigError, match=key):
            TiltedWorld.load(Path(tmp_path))


def test_a_killed_build_resumes_to_the_same_pairs(world, tmp_path, monkeypatch):
    from distalign.lm.generation import HFSampler

    path, pi0, _, prompts = world
    cfg = TiltedConfig(pi0=str(pi0), prompts=str(prompts), heldout=6, beta_star=0.2, gamma=0.5,
                       max_new_tokens=3, pairs_per_prompt=2, seed=1)
    calls: list[int] = []
    generate = HFSampler.generate

    def dies_on_third(self, *a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed during the third training batch
        return generate(self, *a)

    monkeypatch.setattr(HFSampler, "generate", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_world(cfg, tmp_path / "w", progress=False, log=lambda *_: None)
    assert not (tmp_path / "w" / "world.json").exists()
    calls.clear()
    monkeypatch.setattr(HFSampler, "generate",
                        lambda self, *a: calls.append(1) or generate(self, *a))
    again = build_world(cfg, tmp_path / "w", progress=False, log=lambda *_: None)
    assert len(calls) == 2  # the last training batch and the held-out one
    for name in ("pairs-train.jsonl", "pairs-heldout.jsonl"):
        assert (again.parent / name).read_text() == (path.parent / name).read_text()
    assert not (again.parent / ".build").exists()
