"""Checkpoints without frozen weights (train/checkpoint.py), on a model with tied embeddings:
the state dict names the tied lm_head and the embedding apart, so both must be left out."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from safetensors import safe_open

from distalign.testing import tiny_causal_lm, tiny_tokenizer
from distalign.train.checkpoint import keep_trainable_weights_only


def _lora_model(seed: int) -> torch.nn.Module:
    base = tiny_causal_lm(tiny_tokenizer(), seed=seed, tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return get_peft_model(base, cfg)


def test_tied_lora_checkpoint_holds_lora_weights_and_loads_back(tmp_path) -> None:
    acc = Accelerator(cpu=True)
    keep_trainable_weights_only(acc)
    model = acc.prepare(_lora_model(seed=0))
    with torch.no_grad():  # trained LoRA weights, so that loading them back shows
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    acc.save_state(str(tmp_path / "ckpt"))
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names), [n for n in names if "lora_" not in n]

    acc2 = Accelerator(cpu=True)
    keep_trainable_weights_only(acc2)
    fresh = acc2.prepare(_lora_model(seed=0))  # same base, LoRA at its initialisation
    acc2.load_state(str(tmp_path / "ckpt"))
    want, got = model.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
