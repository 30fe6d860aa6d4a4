"""Sampling, EOS handling and temperature-consistent log-probs (distalign.lm.generation)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from distalign.errors import ConfigError
from distalign.lm.generation import (
    GenerationConfig,
    HFSampler,
    make_sampler,
    truncate_after_eos,
)
from distalign.lm.logprobs import token_logprobs
from distalign.lm.models import LoraConfig, apply_lora
from distalign.testing import add_logit_bias, left_pad, tiny_causal_lm, tiny_tokenizer

TOK = tiny_tokenizer()
PAD, EOS = TOK.pad_token_id, TOK.eos_token_id
PROMPTS = ["what is a good name for a cat", "the dog", "how are you"]


def _prompts():
    return left_pad([TOK(p).input_ids for p in PROMPTS], PAD)


def _eos_model(seed=0, bias=3.0):
    """A tiny LM that ends ~15% of the time per step, so a batch has ended and unended rows."""
    return add_logit_bias(tiny_causal_lm(TOK, seed=seed), {EOS: bias})


def test_truncate_after_eos_masks_and_pads():
    resp = torch.tensor(
        [
            [5, 1, 7, 1],  # EOS at 1: keep it, pad the rest (HF kept sampling after it)
            [5, 6, 7, 8],  # never ended
            [1, 9, 9, 9],  # EOS first
            [5, 6, 9, 2],  # ends with the second EOS id
        ]
    )
    out, mask, ended = truncate_after_eos(resp, eos_ids=[1, 2], pad_id=0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert out.tolist() == [[5, 1, 0, 0], [5, 6, 7, 8], [1, 0, 0, 0], [5, 6, 9, 2]]
    assert ended.tolist() == [True, False, True, True]


def test_rollout_layout_eos_and_sample_major_order():
    ids, attn = _prompts()
    b, p = ids.shape
    k = 4
    sampler = HFSampler(TOK, GenerationConfig(max_new_tokens=12, temperature=1.0))
    torch.manual_seed(0)
    r = sampler.generate(_eos_model(), ids, attn, num_samples=k)
    n = b * k
    assert r.input_ids.shape[0] == n and r.prompt_length == p and r.num_samples == k
    # sample-major: rows [j*B:(j+1)*B] are sample j of prompts 0..B-1
    for j in range(k):
        assert torch.equal(r.input_ids[j * b : (j + 1) * b, :p], ids)
        assert torch.equal(r.sample(j).attention_mask[:, :p], attn)
    assert not torch.equal(r.sample(0).responses, r.sample(1).responses)  # distinct samples
    assert 0 < int(r.ended.sum()) < n  # the EOS bias gives both kinds of rows

    resp, rmask = r.responses, r.response_mask[:, p:]
    assert torch.equal(r.response_mask[:, :p], torch.zeros_like(attn.repeat(k, 1)))
    assert torch.equal(r.attention_mask[:, p:], rmask)
    assert torch.equal(r.response_lengths, rmask.sum(-1))
    for i in range(n):
        length = int(r.response_lengths[i])
        real = resp[i, :length].tolist()
        assert rmask[i, :length].all() and not rmask[i, length:].any()  # a prefix mask
        assert (resp[i, length:] == PAD).all()
        if r.ended[i]:
            assert real[-1] == EOS and EOS not in real[:-1]  # up to and including first EOS
        else:
            assert EOS not in real and length == resp.shape[1] == 12  # hit max_new_tokens


def test_model_generation_config_is_ignored_and_restored():
    model = tiny_causal_lm(TOK, seed=1)
    model.generation_config.top_k = 1  # would make sampling greedy if HF used it
    model.generation_config.repetition_penalty = 5.0
    model.train()
    ids, attn = _prompts()
    sampler = HFSampler(TOK, GenerationConfig(max_new_tokens=1, temperature=1.0))
    torch.manual_seed(0)
    r = sampler.generate(model, ids[:1], attn[:1], num_samples=64)
    assert len(set(r.responses[:, 0].tolist())) > 5
    assert model.generation_config.top_k == 1 and model.generation_config.repetition_penalty == 5
    assert model.training  # generation runs in eval mode and restores the mode


def test_checkpoint_stop_tokens_also_end_responses():
    dot = TOK.convert_tokens_to_ids(".")
    model = add_logit_bias(tiny_causal_lm(TOK, seed=6), {dot: 3.0})
    model.generation_config.eos_token_id = [EOS, dot]  # e.g. end-of-turn + end-of-text
    ids, attn = _prompts()
    torch.manual_seed(0)
    r = HFSampler(TOK, GenerationConfig(max_new_tokens=10)).generate(model, ids, attn, 8)
    last = r.responses.gather(1, (r.response_lengths - 1)[:, None])[:, 0]
    assert (last[r.ended] == dot).any()
    assert all(int(t) in (EOS, dot) for t in last[r.ended])
    assert (r.responses[r.response_mask[:, r.prompt_length :] == 0] == PAD).all()


def test_top_k_and_greedy_are_forwarded():
    model = tiny_causal_lm(TOK, seed=2, initializer_range=0.2)
    ids, attn = _prompts()
    with torch.no_grad():
        logits = model(input_ids=ids[:1], attention_mask=attn[:1]).logits[0, -1]
    torch.manual_seed(0)
    r = HFSampler(TOK, GenerationConfig(max_new_tokens=1, temperature=1.0, top_k=3)).generate(
        model, ids[:1], attn[:1], num_samples=200
    )
    assert set(r.responses[:, 0].tolist()) <= set(logits.topk(3).indices.tolist())
    greedy = HFSampler(TOK, GenerationConfig(max_new_tokens=1, temperature=0.0))
    assert greedy.generate(model, ids[:1], attn[:1]).responses[0, 0] == logits.argmax()


def test_generate_through_peft_and_data_parallel_wrappers():
    policy = apply_lora(_eos_model(seed=3), LoraConfig(enabled=True, r=2))
    ids, attn = _prompts()
    torch.manual_seed(0)
    sampler = HFSampler((PAD, EOS), GenerationConfig(max_new_tokens=5))
    r = sampler.generate(torch.nn.DataParallel(policy), ids, attn, num_samples=2)
    assert r.input_ids.shape == (6, ids.shape[1] + r.responses.shape[1])


@pytest.mark.parametrize("temperature", [0.7, 1.6])
def test_sampling_frequencies_match_token_logprobs_at_temperature(temperature):
    """For top_k=0, top_p=1 the first response token is drawn from exp(token_logprobs at T).

    Bound: each empirical frequency f̂_v of n draws has sd sqrt(p_v(1-p_v)/n); we allow
    5 sd + 1/n per token (a union bound over the vocabulary keeps a false alarm < 1e-4). The
    test has power: the same bound rejects the log-probs at temperature 1.
    """
    model = tiny_causal_lm(TOK, seed=4, initializer_range=0.5)
    ids, attn = _prompts()  # rows 1 and 2 are left-padded
    n = 1000
    torch.manual_seed(1234)
    r = HFSampler(TOK, GenerationConfig(max_new_tokens=1, temperature=temperature)).generate(
        model, ids, attn, num_samples=n
    )
    first = r.responses[:, 0].view(n, len(PROMPTS))  # sample-major → [n, B]
    vocab = len(TOK)

    def probs(t: float, i: int) -> torch.Tensor:
        # score "prompt + v" for every v and read the last position's log-prob
        cand = torch.arange(vocab)[:, None]
        full = torch.cat([ids[i].expand(vocab, -1), cand], 1)
        mask = torch.cat([attn[i].expand(vocab, -1), torch.ones_like(cand)], 1)
        with torch.no_grad():
            return token_logprobs(model, full, mask, temperature=t)[:, -1].exp()

    def within_bound(p: torch.Tensor, counts: torch.Tensor) -> bool:
        freq = counts / n
        bound = 5 * (p * (1 - p) / n).sqrt() + 1 / n
        return bool(((freq - p).abs() <= bound).all())

    for i in range(len(PROMPTS)):
        counts = torch.bincount(first[:, i], minlength=vocab).float()
        p = probs(temperature, i)
        assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-5)
        assert within_bound(p, counts), f"prompt {i}"
        assert not within_bound(probs(1.0, i), counts)  # the wrong temperature is detected


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_left_padding_does_not_change_logprobs(attn_implementation):
    model = tiny_causal_lm(TOK, seed=5, attn_implementation=attn_implementation)
    seq = TOK("what is the name of the dog ? the name is sun").input_ids
    alone = token_logprobs(model, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
    ids, attn = left_pad([seq, seq + [4, 5, 6, 7]], PAD)  # row 0 gets 4 pads on the left
    padded = token_logprobs(model, ids, attn, temperature=1.0)
    # every token with a real predecessor; position 0 has no conditional (it is 0 by convention)
    torch.testing.assert_close(padded[0, 5:], alone[0, 1:], rtol=0, atol=1e-5)


def test_make_sampler_registry():
    assert isinstance(make_sampler(GenerationConfig(), TOK), HFSampler)
    if importlib.util.find_spec("vllm") is None:  # the vLLM venv has it (tests/test_vllm.py)
        with pytest.raises(ConfigError, match="vllm.*not available"):
            make_sampler(GenerationConfig(backend="vllm"), TOK)
    with pytest.raises(ConfigError, match="unknown"):
        make_sampler(GenerationConfig(backend="nope"), TOK)
    with pytest.raises(ConfigError, match="min_new_tokens"):
        HFSampler(TOK, GenerationConfig(max_new_tokens=2, min_new_tokens=3))
    with pytest.raises(ConfigError, match="top_p"):
        HFSampler(TOK, GenerationConfig(top_p=0.0))


def test_record_logprobs_with_vllm_refuses_truncated_sampling() -> None:
    from distalign.lm.rollout import check_generation_config

    check_generation_config(GenerationConfig(record_logprobs=True, top_k=5, top_p=0.9))
    check_generation_config(GenerationConfig(backend="vllm", record_logprobs=True))
    for trunc in ({"top_k": 5}, {"top_p": 0.9}):
        with pytest.raises(ConfigError, match="record_logprobs with backend=vllm needs top_k=0"):
            check_generation_config(GenerationConfig(backend="vllm", record_logprobs=True,
                                                     **trunc))
