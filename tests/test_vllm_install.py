"""Without vLLM, ``gen.backend=vllm`` is one ConfigError line that says how to install it."""

from __future__ import annotations

import importlib.util

import pytest

from distalign.errors import ConfigError
from distalign.lm.generation import GenerationConfig, make_sampler
from distalign.testing import tiny_tokenizer


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_vllm_says_how_to_install():
    with pytest.raises(ConfigError) as info:
        make_sampler(GenerationConfig(backend="vllm"), tiny_tokenizer())
    msg = str(info.value)
    assert "\n" not in msg
    assert "pip install 'distalign[vllm]'" in msg and "make vllm-venv" in msg


def test_vllm_settings_are_config_fields():
    """The engine's config loader takes gen.vllm_* like any other key (no vLLM needed)."""
    from distalign.train import load_config

    cfg = load_config("rebel", {"model": {"name_or_path": "m", "reward_model": "r"},
                                "data": {"path": "d.jsonl"}},
                      ["gen.backend=vllm", "gen.vllm_memory=0.5", "gen.vllm_kv_cache_gb=2",
                       "gen.vllm_max_model_len=640"])
    g = cfg.gen
    assert (g.backend, g.vllm_memory, g.vllm_kv_cache_gb, g.vllm_max_model_len) == (
        "vllm", 0.5, 2.0, 640)
