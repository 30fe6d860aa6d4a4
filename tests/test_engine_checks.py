"""Set-up checks that turn silently wrong runs into one-line errors: foreign tokenizers,
model kinds with random heads, unvalidated values, missing trackers; data counts in
summary.json; the CPU launch warning."""

from __future__ import annotations

import json
import math

import pytest

from distalign.errors import ConfigError
from distalign.testing import save_tiny, tiny_tokenizer
from distalign.train import load_config, train
from distalign.train.setup import launch_mismatch


@pytest.fixture(scope="module")
def foreign_rm(tiny, tmp_path_factory):
    """The tiny reward model saved with a tokenizer whose ids mean other words."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path_factory.mktemp("foreign")
    tok = tiny_tokenizer()
    vocab = tok.get_vocab()
    a, b = vocab["cat"], vocab["dog"]
    tok.add_tokens(["zebra"])  # one more token: the vocabularies differ
    save_tiny(tok, out)
    save_tiny(AutoModelForSequenceClassification.from_pretrained(tiny.reward), out)
    assert a != b
    return out


def test_a_reward_model_with_another_tokenizer_is_refused(make_config, tmp_path, foreign_rm):
    with pytest.raises(ConfigError, match="model.reward_model .* does not share the tokenizer"):
        train(make_config("rebel", tmp_path / "r", f"model.reward_model={foreign_rm}"))
    assert not (tmp_path / "r").exists()  # nothing written before the models load


def test_a_causal_lm_as_reward_model_is_refused(make_config, tmp_path, tiny):
    with pytest.raises(ConfigError, match="model.reward_model .* no trained 'score' head"):
        train(make_config("rebel", tmp_path / "r", f"model.reward_model={tiny.policy}"))


def test_a_reward_checkpoint_as_policy_is_refused(make_config, tmp_path, tiny):
    with pytest.raises(ConfigError, match="policy .* no trained 'lm_head' head"):
        train(make_config("dpo", tmp_path / "r", f"model.name_or_path={tiny.reward}"))


def test_a_missing_model_directory_is_named(make_config, tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(ConfigError, match="no such directory"):
        train(make_config("dpo", tmp_path / "r", f"model.name_or_path={missing}"))


BAD_VALUES = [
    ("run.epochs=0", "run.epochs"), ("run.save_every=-1", "run.save_every"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"), ("optim.max_grad_norm=-1", "max_grad_norm"),
    ("optim.lr=inf", "optim.lr must be a finite"), ("optim.lr=nan", "optim.lr must be a finite"),
    ("optim.weight_decay=-0.1", "weight_decay"), ("optim.adam_beta1=1.0", "adam_beta1"),
    ("run.log_every=0", "run.log_every"), ("run.report_to=[bogus]", "unknown tracker 'bogus'"),
    ("model.lora.bias=maybe", "model.lora.bias='maybe'"), ("run.mixed_precision=fp7", "fp7"),
    ("model.dtype=float8", "model.dtype"), ("gen.top_p=0", "gen.top_p"),
    ("run.name=a/b", "run.name"),
]


@pytest.mark.parametrize(("override", "needle"), BAD_VALUES)
def test_invalid_values_are_one_line_errors(make_config, tmp_path, override, needle):
    with pytest.raises(ConfigError, match=None) as err:
        make_config("dpo", tmp_path / "r", override)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("override", "needle"), [
    ("algo.clip_range=-0.1", "algo.clip_range"), ("algo.vf_coef=-1", "algo.vf_coef"),
    ("algo.beta=inf", "algo.beta must be a finite"),
])
def test_invalid_ppo_values(make_config, tmp_path, override, needle):
    with pytest.raises(ConfigError, match=needle):
        make_config("rlhf", tmp_path / "r", override)


def test_yaml_no_means_no_mixed_precision(tiny, tmp_path):
    from conftest import base_config

    cfg = base_config(tiny, "dpo", tmp_path / "r")
    path = tmp_path / "c.yaml"
    import yaml

    text = yaml.safe_dump(cfg) + "method: dpo\n"
    path.write_text(text.replace("run:\n", "run:\n  mixed_precision: no\n", 1))
    assert load_config("dpo", path).run.mixed_precision == "no"


def test_a_missing_tracker_package_is_named(make_config, tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    cfg = make_config("dpo", tmp_path / "r", "run.report_to=[tensorboard]")  # loads (recipes)
    with pytest.raises(ConfigError, match=r"distalign\[tensorboard\]"):
        train(cfg)  # training refuses before loading anything
    assert not (tmp_path / "r").exists()


def test_summary_records_the_data_counts(make_config, tmp_path, tiny):
    run_dir = train(make_config("dpo", tmp_path / "r", "data.max_length=8",
                                "data.max_prompt_length=4", f"data.eval_path={tiny.pairs}"))
    data = json.loads((run_dir / "summary.json").read_text())["data"]
    assert data["train"]["rows_read"] == 12 and data["eval"]["rows_read"] == 12
    kept, skipped = data["train"]["rows_kept"], sum(data["train"]["skipped"].values())
    assert kept + skipped == 12
    assert data["train"]["truncated"]["prompt"] > 0 and data["train"]["truncated"]["response"] > 0


def test_fp16_nan_names_pure_fp16_as_the_cause(make_config, tmp_path, monkeypatch):
    from distalign.methods.dpo import DPO

    real = DPO.loss

    def nan_loss(self, exp):
        loss, metrics = real(self, exp)
        return loss * math.nan, metrics

    monkeypatch.setattr(DPO, "loss", nan_loss)
    with pytest.raises(Exception, match="pure fp16"):
        train(make_config("dpo", tmp_path / "r", "model.dtype=float16"))


def test_cpu_launch_with_one_process_is_detected(monkeypatch, tmp_path):
    fake = tmp_path / "cmdline"
    fake.write_bytes(b"/x/bin/python\0/x/bin/accelerate\0launch\0--cpu\0--num_processes\0"
                     b"2\0-m\0distalign\0train\0")
    real_path = type(fake)

    def fake_path(p, *a):
        return fake if str(p).startswith("/proc/") else real_path(p, *a)

    monkeypatch.setattr("distalign.train.setup.Path", fake_path)
    assert "--multi_gpu" in (launch_mismatch(1) or "")
    assert launch_mismatch(2) is None


def test_reference_with_same_tokenizer_is_accepted(make_config, tmp_path, tiny):
    # the tiny reference checkpoint shares the policy's tokenizer: no error
    run_dir = train(make_config("dpo", tmp_path / "r", f"model.ref_model={tiny.ref}",
                                "run.max_steps=1"))
    assert (run_dir / "final").is_dir()
