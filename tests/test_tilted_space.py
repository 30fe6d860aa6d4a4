"""The tilted world's response space: replies of at most L tokens at T = 1, a reply cut at L
has its prefix's probability, and π₀ and π̂ are scored by the same convention (tiny Llamas)."""

from __future__ import annotations

import itertools
import math

import pytest

from distalign.testing import add_logit_bias, tiny_causal_lm, tiny_tokenizer
from distalign.tilted.space import Replies, eos_ids, reply_logprobs, sample_replies, to_response

PROMPTS = ["what is a good name for a cat", "the dog is", "how was your day"]


@pytest.fixture(scope="module")
def models():
    tok = tiny_tokenizer()
    # EOS-biased heads (in memory) so that replies of a few tokens both end and get cut
    pi0 = add_logit_bias(tiny_causal_lm(tok, seed=0, initializer_range=0.3), {1: 2.5})
    pi_hat = add_logit_bias(tiny_causal_lm(tok, seed=1, initializer_range=0.3), {1: 1.5})
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    return tok, pi0, pi_hat, ids


def test_to_response_cuts_after_eos_then_at_l():
    assert to_response([5, 6, 1, 7], [1], 8) == ([5, 6, 1], True)
    assert to_response([5, 6, 7, 8], [1], 3) == ([5, 6, 7], False)
    assert to_response([5, 6, 7, 1], [1], 3) == ([5, 6, 7], False)  # EOS after L: cut
    assert to_response([1], [1], 1) == ([1], True)


@pytest.mark.parametrize("which", ["pi0", "pi_hat"])
def test_sampler_logprobs_are_the_scorer_logprobs_for_ended_and_cut_replies(models, which):
    tok, pi0, pi_hat, ids = models
    model = pi0 if which == "pi0" else pi_hat
    reps = sample_replies(model, tok, ids, n=24, max_new_tokens=4, seed=3, rows_per_batch=16)
    assert len(reps) == 72 and reps.prompt_index[:24] == [0] * 24  # prompt-major
    assert 0 < sum(reps.ended) < len(reps)  # both kinds are present
    assert all(len(r) <= 4 for r in reps.reply_ids)
    for r, e in zip(reps.reply_ids, reps.ended, strict=True):
        assert (r[-1] == tok.eos_token_id) == e and tok.eos_token_id not in r[:-1]
    pids = [ids[i] for i in reps.prompt_index]
    scored = reply_logprobs(model, pids, reps.reply_ids, tok.pad_token_id, batch_size=8)
    for a, b in zip(reps.logp, scored, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    # the same seed gives the same replies
    again = sample_replies(model, tok, ids, n=24, max_new_tokens=4, seed=3, rows_per_batch=16)
    assert again.reply_ids == reps.reply_ids


def test_the_space_is_a_distribution_for_every_model(models):
    """Σ over every reply of at most L = 2 tokens (ended ones with EOS, cut ones without) of
    exp(reply_logprobs) is 1, for π₀ and π̂ alike."""
    tok, pi0, pi_hat, ids = models
    eos, vocab = tok.eos_token_id, range(len(tok))
    space = [[eos]] + [[t, eos] for t in vocab if t != eos]
    space += [[a, b] for a, b in itertools.product(vocab, vocab) if eos not in (a, b)]
    for model in (pi0, pi_hat):
        lp = reply_logprobs(model, [ids[1]] * len(space), space, tok.pad_token_id, 4096)
        total = math.fsum(math.exp(v) for v in lp)
        assert total == pytest.approx(1.0, abs=1e-4)


def test_a_cut_draw_is_a_draw_of_the_smaller_space(models):
    tok, pi0, _, ids = models
    reps = sample_replies(pi0, tok, ids, n=16, max_new_tokens=5, seed=4)
    small = reps.cut(2, eos_ids(tok, pi0))
    assert all(len(r) <= 2 for r in small.reply_ids)
    assert any(not e and len(r) == 2 for r, e in zip(small.reply_ids, small.ended, strict=True))
    pids = [ids[i] for i in small.prompt_index]
    scored = reply_logprobs(pi0, pids, small.reply_ids, tok.pad_token_id)
    for a, b in zip(small.logp, scored, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    groups = small.groups(small.logp)
    assert [g.size for g in groups] == [16, 16, 16]
    with pytest.raises(ValueError):
        _ = Replies([0], [[5]], [False]).logp


def test_a_killed_sampling_resumes_from_its_journal(models, tmp_path, monkeypatch):
    from distalign.lm.generation import HFSampler

    tok, pi0, _, ids = models
    ref = sample_replies(pi0, tok, ids, n=8, max_new_tokens=4, seed=5, rows_per_batch=8)
    journal = tmp_path / "sample.jsonl"
    full = sample_replies(pi0, tok, ids, n=8, max_new_tokens=4, seed=5, rows_per_batch=8,
                          journal=journal, key="pi0")
    lines = journal.read_text().splitlines()
    assert len(lines) == 3  # one prompt per batch
    calls = []
    generate = HFSampler.generate
    monkeypatch.setattr(HFSampler, "generate",
                        lambda self, *a: calls.append(1) or generate(self, *a))
    journal.write_text(lines[0] + "\n" + lines[1][:25])  # killed while writing batch 2
    again = sample_replies(pi0, tok, ids, n=8, max_new_tokens=4, seed=5, rows_per_batch=8,
                           journal=journal, key="pi0")
    assert len(calls) == 2  # batches 2 and 3 only
    for reps in (full, again):
        assert reps.reply_ids == ref.reply_ids and reps.ended == ref.ended
        assert reps.prompt_index == ref.prompt_index and reps.logp == ref.logp
    assert len(journal.read_text().splitlines()) == 3
    sample_replies(pi0, tok, ids, n=8, max_new_tokens=4, seed=5, rows_per_batch=8,
                   journal=journal, key="another model")
    assert len(calls) == 5  # another key starts over
