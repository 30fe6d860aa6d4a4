"""The typed method seam: every method's ``algo`` section is an ``AlgoConfig`` whose checks are
rule tables; unknown keys keep OmegaConf's "did you mean" (plus the hints a method declares);
methods add dataset columns through ``prepare_dataset``; pair helpers round-trip."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
import yaml
from conftest import base_config

from distalign.cli import main
from distalign.errors import ConfigError
from distalign.methods import METHODS, AlgoConfig, get_method
from distalign.methods.base import (
    as_pairs,
    flat_pairs,
    from_pairs,
    pair_batch,
    split_pairs,
)
from distalign.train import load_config
from distalign.train.config import TrainConfig


def _load(method: str, *overrides: str):
    return load_config(method, None, list(overrides), require_paths=False)


def _error(method: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        _load(method, *overrides)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("method", METHODS)
def test_every_algo_section_is_an_algo_config_with_its_tables(method):
    algo = _load(method).algo
    cls = get_method(method).Config
    assert type(algo) is cls and issubclass(cls, AlgoConfig) and algo.update_epochs >= 1
    names = {f.name for f in dataclasses.fields(cls)}
    assert {k for k, _, _ in cls.rules()} <= names and {k for k, _ in cls.choices()} <= names
    assert cls.rules()[0][0] == "update_epochs"  # the base's rule, first and never dropped
    assert all(wrong not in names for wrong, _, _ in cls._table("HINTS"))
    assert typing.get_type_hints(TrainConfig)["algo"] is AlgoConfig


# the one-line messages the methods' former validate() raised, kept word for word where the
# rule shape allows it (choices name the allowed values as the other sections' choices do)
MESSAGES = [
    ("dpo", "algo.gamma=0", "algo.gamma must be > 0, got 0.0"),
    ("pmle", "algo.gamma=-1", "algo.gamma must be > 0, got -1.0"),
    ("pmle", "algo.beta=-1", "algo.beta must be >= 0, got -1.0"),
    ("pmle", "algo.kl_samples=0", "algo.kl_samples must be >= 1, got 0"),
    ("reward", "algo.center_coef=-1", "algo.center_coef must be >= 0, got -1.0"),
    ("rebel", "algo.eta=0", "algo.eta must be > 0, got 0.0"),
    ("rebel", "algo.update_epochs=0", "algo.update_epochs must be >= 1, got 0"),
    ("rebel", "algo.form=pi", "algo.form='pi': expected one of pi_t, pi_0"),
    ("distill", "algo.gamma=0", "algo.gamma must be > 0, got 0.0"),
    ("distill", "algo.beta=-1", "algo.beta must be >= 0, got -1.0"),
    ("rlhf", "algo.kl_estimator=k2", "algo.kl_estimator='k2': expected one of k1, k3"),
    ("rlhf", "algo.gae_lambda=1.5", "algo.gae_lambda must be in [0, 1], got 1.5"),
    ("rlhf", "algo.discount=-0.5", "algo.discount must be in [0, 1], got -0.5"),
    ("rlhf", "algo.clip_range=0", "algo.clip_range must be > 0, got 0.0"),
    ("rlhf", "algo.value_clip=-1", "algo.value_clip must be >= 0, got -1.0"),
    ("rlhf", "algo.vf_coef=-1", "algo.vf_coef must be >= 0, got -1.0"),
    ("rkl", "algo.gamma=-1", "algo.gamma must be >= 0, got -1.0"),
    ("rkl", "algo.clip_range=0", "algo.clip_range must be > 0, got 0.0"),  # RLHF's, inherited
    ("sft", "algo.update_epochs=0", "algo.update_epochs must be >= 1, got 0"),
]


@pytest.mark.parametrize(("method", "override", "message"), MESSAGES)
def test_rule_tables_give_the_one_line_messages(method, override, message):
    assert _error(method, override) == message


def test_dpo_beta_points_to_gamma_and_typos_still_get_did_you_mean(tmp_path):
    msg = _error("dpo", "algo.beta=0.1")
    assert msg.startswith("config key 'algo.beta': Key 'beta' not in 'DPOConfig'")
    assert "Did you mean: 'algo.gamma'?" in msg and "eq. (6)" in msg
    # the same from a YAML file
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump({"algo": {"beta": 0.1}}))
    with pytest.raises(ConfigError, match=r"Did you mean: 'algo\.gamma'\?"):
        load_config("dpo", path, require_paths=False)
    assert _error("dpo", "algo.gama=0.1").endswith("Did you mean: 'gamma'?")
    assert _error("rlhf", "algo.betta=0.1").endswith("Did you mean: 'beta'?")
    assert "Did you mean" not in _error("dpo", "algo.bogus=1")
    assert _load("rebel", "algo.beta=0.1").algo.beta == 0.1  # β is a real key elsewhere


def test_print_config_and_dotted_overrides(tiny, tmp_path, capsys):
    path = tmp_path / "rkl.yaml"
    path.write_text(yaml.safe_dump({"method": "rkl", **base_config(tiny, "rkl", tmp_path)}))
    main(["train", "rkl", "--config", str(path), "--print-config", "algo.beta=0.1",
          "algo.update_epochs=2"])
    algo = yaml.safe_load(capsys.readouterr().out)["algo"]
    assert algo["beta"] == 0.1 and algo["update_epochs"] == 2 and algo["gamma"] == 0.01
    main(["train", "sft", "--print-config"])  # no config file: the defaults
    assert yaml.safe_load(capsys.readouterr().out)["algo"] == {"update_epochs": 1}


def test_a_method_adds_columns_through_prepare_dataset(make_config, tmp_path, monkeypatch):
    """train.setup knows no method option: any method's hook reaches the batches."""
    from distalign.methods.sft import SFT
    from distalign.train import Trainer

    def prepare(cls, algo, ds, models, device, batch_size):
        assert models.policy is not None and batch_size == 4
        return ds.add_column("weight", [float(i) for i in range(len(ds))]), ("weight",)

    monkeypatch.setattr(SFT, "prepare_dataset", classmethod(prepare))
    trainer = Trainer(make_config("sft", tmp_path / "r", "algo.update_epochs=2"))
    batch = next(iter(trainer.loader))
    assert batch["weight"].dtype == torch.float32 and batch["weight"].shape == (4,)
    assert trainer.method.update_epochs == 2


def test_dpo_prepare_dataset_is_identity_without_precompute():
    from distalign.methods.dpo import DPO, DPOConfig

    ds = object()
    assert DPO.prepare_dataset(DPOConfig(), ds, None, "cpu", 4) == (ds, ())


def test_pair_helpers_round_trip():
    x = torch.arange(12).view(6, 2)  # rows 0-2 chosen, 3-5 rejected
    chosen, rejected = split_pairs(x)
    assert torch.equal(chosen, x[:3]) and torch.equal(rejected, x[3:])
    pairs = as_pairs(x)
    assert pairs.shape == (3, 2, 2) and torch.equal(pairs[:, 1], x[3:])
    assert torch.equal(from_pairs(pairs), x)
    batch = {"input_ids": x, "attention_mask": x + 1, "response_mask": x + 2, "other": x}
    exp = pair_batch(batch)
    assert set(exp) == {"input_ids", "attention_mask", "response_mask"}
    assert all(torch.equal(v, batch[k]) for k, v in flat_pairs(exp).items())
