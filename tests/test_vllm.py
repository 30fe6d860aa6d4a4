"""The vLLM sampler on vLLM's CPU build: weight sync, HF equivalence, online runs and resume.

Runs in the vLLM venv (`make test-vllm`); skipped where `vllm` is not importable. The tiny
Llama here has hidden size 64 (head size 32): the CPU attention kernels have no head size 16,
which the project's default tiny model uses (that case is the unsupported-model test below).
One engine per architecture is built for the whole module (the sampler caches engines), so
most tests pay only for sampling.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (make vllm-venv; docs/vllm.md)")

from conftest import base_config, rows_by_step  # noqa: E402

from distalign.errors import ConfigError  # noqa: E402
from distalign.lm.generation import GenerationConfig, HFSampler, make_sampler  # noqa: E402
from distalign.lm.logprobs import token_logprobs  # noqa: E402
from distalign.lm.models import LoraConfig, apply_lora  # noqa: E402
from distalign.lm.vllm_sampler import VLLMSampler, _Stamp  # noqa: E402
from distalign.testing import left_pad, save_tiny, tiny_causal_lm, tiny_tokenizer  # noqa: E402
from distalign.train import load_config, train  # noqa: E402
from distalign.train.engine import Trainer  # noqa: E402

TOK = tiny_tokenizer()
PROMPTS = ["what is a good name for a cat", "the dog", "how are you", "where is the moon"]
HIDDEN = 64  # 2 heads of 32


def _model(seed: int = 0) -> torch.nn.Module:
    return tiny_causal_lm(TOK, seed=seed, hidden_size=HIDDEN, initializer_range=0.5)


def _eos_model(eos_logit: float) -> torch.nn.Module:
    """A model whose EOS logit is about ``eos_logit`` at every position (others near 0).

    No head bias in vLLM's Llama, so the constant comes from hidden unit 0: every embedding
    has 1 there, no layer writes to it, and only EOS reads it (the final norm scales it to
    about sqrt(hidden))."""
    m = tiny_causal_lm(TOK, seed=0, hidden_size=HIDDEN)
    with torch.no_grad():
        m.model.embed_tokens.weight[:, 0] = 1.0
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        m.lm_head.weight[:, 0] = 0.0
        m.lm_head.weight[TOK.eos_token_id] = 0.0
        m.lm_head.weight[TOK.eos_token_id, 0] = eos_logit / HIDDEN**0.5
    return m


def _prompts():
    return left_pad([TOK(p).input_ids for p in PROMPTS], TOK.pad_token_id)


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    """A LoRA policy whose adapter is not the identity (peft initialises B = 0)."""
    pm = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("vllm_policy")
    save_tiny(TOK, d)
    return save_tiny(_model(), d)


# ------------------------------------------------------------------------ sampler level
@pytest.mark.parametrize("lora", [False, True])
def test_greedy_tokens_equal_hf(lora):
    model = _lora(_model()) if lora else _model()
    ids, attn = _prompts()
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.0, backend="vllm")
    got = make_sampler(cfg, TOK).generate(model, ids, attn, num_samples=2)
    want = HFSampler(TOK, cfg).generate(model, ids, attn, num_samples=2)
    assert isinstance(make_sampler(cfg, TOK), VLLMSampler)
    for name in ("input_ids", "attention_mask", "response_mask", "ended", "response_lengths"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.prompt_length == want.prompt_length and got.num_samples == 2


def test_lora_merge_leaves_base_weights_untouched():
    model = _lora(_model())
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids, attn = _prompts()
    VLLMSampler(TOK, GenerationConfig(max_new_tokens=4, backend="vllm")).generate(model, ids, attn)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # bit-identical: π₀ (adapter off) unchanged


def test_sampling_seeded_by_torch_and_eos_truncation():
    """Same torch seed → same samples; EOS rows end there exactly like HF's truncation."""
    model = _eos_model(2.0)  # EOS ~5% per step: rows end at different lengths, some never
    ids, attn = _prompts()
    s = VLLMSampler(TOK, GenerationConfig(max_new_tokens=30, temperature=1.0, backend="vllm"))
    torch.manual_seed(5)
    a = s.generate(model, ids, attn, num_samples=3)
    torch.manual_seed(5)
    b = s.generate(model, ids, attn, num_samples=3)
    torch.manual_seed(6)
    c = s.generate(model, ids, attn, num_samples=3)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert a.ended.any() and not a.ended.all() and len(set(a.response_lengths.tolist())) > 2
    # sample-major: row j*B + i is prompt i
    assert torch.equal(a.input_ids[:4, : a.prompt_length], a.input_ids[8:, : a.prompt_length])
    resp, mask = a.responses, a.response_mask[:, a.prompt_length :]
    for r in range(resp.shape[0]):
        n = int(mask[r].sum())
        assert int(a.response_lengths[r]) == n
        assert bool(a.ended[r]) == (resp[r, n - 1] == TOK.eos_token_id)
        assert (resp[r, n:] == TOK.pad_token_id).all()
        assert not (resp[r, : n - 1] == TOK.eos_token_id).any()


def test_seeded_sampling_past_one_step_of_prompt_tokens():
    """More prompt tokens than vLLM schedules in one step (4096 on CPU), sampled with seeds:
    no prompt may be split over steps (its seeded generator cannot be rolled back on CPU),
    and every row still gets its tokens."""
    row = TOK("the dog " * 60).input_ids[:120]
    ids, attn = left_pad([row] * 40, TOK.pad_token_id)  # 4800 prompt tokens
    cfg = GenerationConfig(max_new_tokens=3, min_new_tokens=3, temperature=1.0, backend="vllm")
    torch.manual_seed(0)
    r = VLLMSampler(TOK, cfg).generate(_model(), ids, attn)
    assert int(ids.ne(TOK.pad_token_id).sum()) > 4096
    assert r.response_lengths.tolist() == [3] * 40


def test_min_new_tokens_blocks_eos():
    model = _eos_model(20.0)  # EOS is the argmax everywhere
    ids, attn = _prompts()
    cfg = GenerationConfig(max_new_tokens=8, min_new_tokens=5, temperature=0.0, backend="vllm")
    r = VLLMSampler(TOK, cfg).generate(model, ids, attn)
    assert r.response_lengths.tolist() == [6] * 4 and r.ended.all()
    assert torch.equal(r.input_ids, HFSampler(TOK, cfg).generate(model, ids, attn).input_ids)


def test_a_new_model_is_always_synced():
    """A freed model's id() and version counters can come back on the next run's policy; the
    engine must not mistake the new weights for the ones it holds."""
    import gc

    ids, attn = _prompts()
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.0, backend="vllm")
    sampler = VLLMSampler(TOK, cfg)
    for seed in (1, 2, 3):
        model = _model(seed)
        got = sampler.generate(model, ids, attn)
        assert torch.equal(got.input_ids, HFSampler(TOK, cfg).generate(model, ids, attn).input_ids)
        assert not sampler.sync(model)  # unchanged weights: no second push
        del model, got
        gc.collect()


# --------------------------------------------------------- weight sync after training steps
def _online_cfg(tiny, policy_dir, tmp_path, method, *over):
    cfg = base_config(tiny, method, tmp_path / method)
    cfg["model"]["name_or_path"] = str(policy_dir)
    cfg["gen"].update(backend="vllm", max_new_tokens=8, temperature=0.7)
    return load_config(method, cfg, list(over))


@pytest.mark.parametrize("lora", [False, True])
def test_logprobs_equal_policy_after_training_steps(tiny, policy_dir, tmp_path, lora):
    over = ["run.max_steps=3", "optim.lr=1e-2", "data.max_prompt_length=64"] + (
        ["model.lora.enabled=true"] if lora else [])
    cfg = _online_cfg(tiny, policy_dir, tmp_path, "rebel", *over)
    trainer = Trainer(cfg)
    trainer.fit()
    sampler, policy = trainer.ctx.sampler, trainer.acc.unwrap_model(trainer.ctx.policy)
    engine = sampler.engine
    assert engine.syncs >= 3  # one push per training step (each followed an update)
    # the engine's context is sized from the data (64 + 8), not the model's 256 positions
    assert engine.max_model_len == 72 < policy.config.max_position_embeddings
    ids, attn = _prompts()

    @torch.no_grad()
    def gap() -> float:
        torch.manual_seed(0)
        r = sampler.generate(policy, ids, attn, num_samples=2)
        lp = token_logprobs(policy, r.input_ids, r.attention_mask, 0.7, r.response_mask)
        return float((lp[:, r.prompt_length :] - r.logprobs).abs().max())

    # the engine still holds the weights of the last *sample* (before the last update):
    # pretending they are current (a skipped sync) must show up in the log-probs
    engine.synced = _Stamp(policy)
    assert gap() > 1e-3
    engine.synced = None
    assert gap() < 1e-4


@pytest.mark.parametrize("method", ["rebel", "rlhf"])
def test_recorded_logprobs_stand_in_for_the_policy_forward(tiny, policy_dir, tmp_path, method):
    """``gen.record_logprobs`` with vLLM: collection takes ln π_t from the engine (after a
    training step, so the synced weights are the ones that count) and runs no forward of
    π_t; the values equal an independent per-row forward at T."""
    over = ("gen.record_logprobs=true", "run.max_steps=1", "optim.lr=1e-2")
    trainer = Trainer(_online_cfg(tiny, policy_dir, tmp_path, method, *over))
    trainer.fit()
    m = trainer.method
    policy = trainer.acc.unwrap_model(trainer.ctx.policy)

    def no_forward(*args, **kwargs):
        raise AssertionError("collection ran a forward of π_t")

    m.policy_token_logprobs = no_forward  # type: ignore[method-assign]
    with torch.no_grad():
        torch.manual_seed(0)
        exp, _ = m.collect(next(iter(trainer.loader)))
        ids, attn, resp = exp["input_ids"], exp["attention_mask"], exp["response_mask"]
        if method == "rebel":  # [B, 2, L] pairs → [2B, L]; old_logp holds sequence sums
            flat = lambda k: torch.cat([exp[k][:, 0], exp[k][:, 1]], 0)  # noqa: E731
            ids, attn, resp = flat("input_ids"), flat("attention_mask"), flat("response_mask")
            want = (token_logprobs(policy, ids, attn, 0.7, resp) * resp).sum(-1)
            got = flat("old_logp")
        else:
            p = int(exp["prompt_length"][0])
            want = token_logprobs(policy, ids, attn, 0.7, resp)[:, p:] * resp[:, p:]
            got = exp["old_logp"] * resp[:, p:]
    assert resp.sum() > 0
    torch.testing.assert_close(got.float(), want.float(), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------- online runs, exact resume
METHODS = {
    "rebel": (),
    "distill": ("algo.beta=0.1",),
    "rlhf": ("algo.update_epochs=2", "run.mini_batch_size=2"),
    "rkl": (),
    "pmle": ("algo.beta=0.1", "algo.kl_samples=2"),
}
VOLATILE = ("step_time", "tokens_per_s", "time")  # wall-clock values


@pytest.mark.parametrize("method", sorted(METHODS))
def test_online_method_runs_and_resumes_exactly(tiny, policy_dir, tmp_path, method):
    # constant lr: extending max_steps 1 → 3 must not change the schedule of step 1
    over = (*METHODS[method], "run.max_steps=3", "optim.scheduler=constant")
    ref_dir = train(_online_cfg(tiny, policy_dir, tmp_path / "ref", method, *over))
    run = tmp_path / "run"
    train(_online_cfg(tiny, policy_dir, run, method, *over, "run.max_steps=1",
                      "run.save_every=1"))
    got_dir = train(_online_cfg(tiny, policy_dir, run, method, *over, "run.save_every=1"))
    ref, got = rows_by_step(ref_dir), rows_by_step(got_dir)
    assert sorted(got) == [0, 1, 2, 3]
    for step in (1, 2, 3):
        keys = [k for k in ref[step] if k not in VOLATILE and not k.startswith("time/")]
        assert keys and "loss" in keys
        for k in keys:
            assert got[step][k] == ref[step][k], f"{method} step {step} {k}"


# --------------------------------------------------------------------------- bad input
def test_unsupported_model_is_a_config_error():
    small_heads = tiny_causal_lm(TOK, seed=0)  # head size 16: no CPU attention kernel
    ids, attn = _prompts()
    sampler = VLLMSampler(TOK, GenerationConfig(max_new_tokens=4, backend="vllm"))
    with pytest.raises(ConfigError, match="vLLM cannot serve LlamaForCausalLM"):
        sampler.generate(small_heads, ids, attn)


def test_too_long_and_too_little_memory_are_config_errors():
    ids, attn = _prompts()
    cfg = GenerationConfig(max_new_tokens=8, backend="vllm", vllm_max_model_len=12)
    with pytest.raises(ConfigError, match="exceeds the engine's max length 12"):
        VLLMSampler(TOK, cfg).generate(_model(), ids, attn)
    tiny_kv = GenerationConfig(max_new_tokens=8, backend="vllm", vllm_kv_cache_gb=1e-6)
    with pytest.raises(ConfigError, match="vllm_kv_cache_gb"):
        VLLMSampler(TOK, tiny_kv).generate(_model(), ids, attn)
    with pytest.raises(ConfigError, match="vllm_memory"):
        VLLMSampler(TOK, GenerationConfig(backend="vllm", vllm_memory=1.5))
