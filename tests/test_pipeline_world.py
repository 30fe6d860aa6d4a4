"""A pipeline on a tilted world (``world:``), end to end on a tiny π₀: the world is built
from π₀, methods train on its exact token ids, every row is measured against π* through π₀'s
samples, and the reference rows (exact draws of π*, rlhf on the gold reward at β = β*) are
in the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from distalign.testing import save_tiny_checkpoint

WORDS = ["what is a good name for a cat", "the dog is", "how was your day", "my house is big",
         "where is the moon", "you are good", "who is that man", "what can i do"]
SAMPLING = {"max_new_tokens": 4, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
            "min_new_tokens": 0}


def _config(root: Path) -> dict:
    rows = [{"chosen": f"\n\nHuman: {WORDS[i % 8]} {i % 3}\n\nAssistant: the cat is good",
             "rejected": f"\n\nHuman: {WORDS[i % 8]} {i % 3}\n\nAssistant: no"}
            for i in range(24)]
    hh = root / "hh.jsonl"
    hh.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pi0 = save_tiny_checkpoint(root / "pi0", seed=0, initializer_range=0.3)
    return {
        "name": "tw", "output_dir": str(root / "out"), "base": {"name_or_path": str(pi0)},
        "world": {"prompts": str(hh), "heldout": 6, "heldout_prompts": 4, "beta_star": 0.5,
                  "gamma": 1.0, "max_new_tokens": 4, "pairs_per_prompt": 2,
                  "base_samples": 8, "pi_star": 2,
                  "gold_rlhf": {"config": {"algo": {"update_epochs": 1}}}},
        "defaults": {"gen": SAMPLING, "optim": {"lr": 1e-3},
                     "data": {"max_prompt_length": 96, "max_length": 128},
                     "run": {"batch_size": 4, "max_steps": 2, "save_every": 1,
                             "progress": False}},
        "reward": {},
        "methods": {"dpo": {"config": {"algo": {"gamma": 1.0}}},
                    "rlhf": {"config": {"algo": {"beta": 0.5, "update_epochs": 1}}}},
        "seeds": [0],
        "generate": {"batch_size": 8, "num_samples": 2},
        "eval": {"judges": {"oracle": "oracle:{world}"}, "reward_model": "{reward}"},
    }


def _run(path: Path) -> None:
    from distalign.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["pipeline", str(path)])
        raise SystemExit(0)
    assert exc.value.code == 0


def test_tilted_world_pipeline_end_to_end(tmp_path):
    from distalign.tilted.gold import make_gold_reward
    from distalign.tilted.measures import forward_kl

    cfg = _config(tmp_path)
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    _run(path)
    out = Path(cfg["output_dir"])
    report = json.loads((out / "report.json").read_text())
    labels = [r["label"] for r in report["rows"]]
    assert labels[0] == "π₀ (base)" and {"DPO", "RLHF", "rlhf (gold r, β = β*)",
                                         "π* (exact samples)"} <= set(labels)
    assert report["metrics"][0] == "tilted/kl_fwd"
    # DPO trained on the world's exact ids
    summary = json.loads((out / "dpo-s0" / "summary.json").read_text())
    assert summary["data"]["train"]["format"] == "tokens"
    # rlhf-gold: the gold scorer as its reward model, at β = β*
    gold_cfg = yaml.safe_load((out / "rlhf-gold-s0" / "config.yaml").read_text())
    assert gold_cfg["algo"]["beta"] == 0.5
    assert gold_cfg["model"]["reward_model"].endswith("world/gold-scorer")
    # π₀'s row: its forward KL is KL(π*‖π₀), recomputed here from its own samples
    base = json.loads((out / "base" / "eval" / "eval.json").read_text())["metrics"]
    rows = [json.loads(x) for x in (out / "base" / "generations.jsonl").read_text().split("\n")
            if x]
    assert len(rows) == 4 * 8  # base_samples per evaluated prompt
    r = make_gold_reward("vader").score([x["prompt"] for x in rows], [x["output"] for x in rows],
                                        [], [])
    by: dict[str, list[int]] = {}
    for i, x in enumerate(rows):
        by.setdefault(x["prompt_id"], []).append(i)
    keys = sorted(by)
    lp0 = [np.array([rows[i]["output_logprob"] for i in by[k]]) for k in keys]
    rr = [np.array([r[i] for i in by[k]]) for k in keys]
    want = forward_kl(lp0, rr, lp0, 0.5)["kl_fwd"]
    assert base["tilted/kl_fwd"] == pytest.approx(want, rel=1e-9)
    assert base["tilted/kl_fwd"] > 0.0
    assert base["tilted/oracle_win"] == pytest.approx(0.5)  # π₀ against its own replies
    assert base["tilted/kl_ref"] == pytest.approx(0.0, abs=1e-9)
    # π*: exact draws, measured without a model; the rejection counts are recorded
    star = json.loads((out / "pi-star" / "eval" / "eval.json").read_text())["metrics"]
    assert "tilted/kl_fwd" not in star and "tilted/gold_reward" in star
    meta = json.loads((out / "pi-star" / "generations.meta.json").read_text())
    assert meta["rejection"]["accepted"] >= meta["rejection"]["rows"] > 0
    assert meta["gen"]["temperature"] == 1.0 and meta["gen"]["max_new_tokens"] == 4
    # the claims stage: rules and verdicts, the RM against the Bayes-optimal accuracy, a plot
    claims = json.loads((out / "claims.json").read_text())
    world = json.loads((out / "world" / "world.json").read_text())
    assert claims["reward_model"]["bayes_acc"] == pytest.approx(
        world["pairs"]["heldout"]["bayes_acc"], rel=1e-12)
    assert sum(claims["verdicts"].values()) == len(claims["claims"]) >= 10
    assert "RLHF floor" in (out / "claims.md").read_text()
    assert (out / "frontier.png").stat().st_size > 5000


def test_world_pipeline_bad_input_is_one_line(tmp_path, capsys):
    from distalign.cli import main

    cfg = _config(tmp_path)
    for change, message in (
        ({"gold": "nonsense"}, "unknown gold reward"),
        ({"beta_star": 0}, "world.beta_star=0.0 must be a finite number > 0"),
        ({"kind": "flat"}, "world.kind='flat'"),
    ):
        bad = {**cfg, "world": {**cfg["world"], **change}}
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad, allow_unicode=True))
        with pytest.raises(SystemExit) as exc:
            main(["pipeline", str(path), "--dry-run"])
        assert exc.value.code != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    bad = {**cfg, "methods": {"rlhf": {"config": {"gen": {"temperature": 0.7}}}}}
    path.write_text(yaml.safe_dump(bad, allow_unicode=True))
    with pytest.raises(SystemExit):
        main(["pipeline", str(path), "--dry-run"])
    assert "gen.temperature=0.7, but the world's samples use temperature=1.0" in (
        capsys.readouterr().err)
