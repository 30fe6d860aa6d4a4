"""The residual reward class R̂ = γ ln π₀(y|x) + f_θ: exact at f = 0, saved and reloaded as an
ordinary reward model, only f_θ trainable, and f_θ learns a tilt from eq. (3) labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distalign.eval.judges.reward import score_sequences
from distalign.lm.models import ModelConfig, load_scorer
from distalign.testing import save_tiny, tiny_causal_lm, tiny_tokenizer
from distalign.tilted.labels import draw_labels, preference_prob
from distalign.tilted.residual import ResidualRewardModel, residual_reward_model
from distalign.tilted.space import reply_logprobs, sample_replies

GAMMA = 0.7


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def setup(request, tmp_path_factory):
    tok = tiny_tokenizer()
    pi0 = tiny_causal_lm(tok, seed=0, initializer_range=0.3,
                         tie_word_embeddings=request.param)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in
               ("the dog is", "how was your day", "what can i do")]
    reps = sample_replies(pi0, tok, prompts, n=8, max_new_tokens=4, seed=0)
    d = tmp_path_factory.mktemp("residual")
    model = residual_reward_model(pi0, GAMMA)
    save_tiny(model, d)
    save_tiny(tok, d)
    return tok, pi0, prompts, reps, d


def test_untrained_residual_is_gamma_ln_pi0(setup):
    tok, pi0, prompts, reps, d = setup
    # loaded back the way the engine loads a reward model
    rm = load_scorer(str(d), ModelConfig(name_or_path=str(d)), head="error").eval()
    assert isinstance(rm, ResidualRewardModel)
    pids = [prompts[i] for i in reps.prompt_index]
    seqs = list(zip(pids, reps.reply_ids, strict=True))
    scores = np.asarray(score_sequences(rm, seqs, tok.pad_token_id, batch_size=5))
    lp = np.asarray(reply_logprobs(pi0, pids, reps.reply_ids, tok.pad_token_id))
    # R̂ is γ ln π₀(y|x) exactly: the reply's tokens only, no per-prompt constant (a PPO
    # return would carry one from prompt to prompt)
    np.testing.assert_allclose(scores, GAMMA * lp, atol=1e-4)
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert trainable == ["score.linear.weight", "score.linear.bias"]


def test_f_learns_the_tilt_from_labels(setup):
    """Labels from eq. (3) for a reward r = [the reply ends in "good"] (a feature of the last
    hidden state, so f_θ can express γ r/β*): Bradley–Terry training of f_θ alone raises the
    held-out log-likelihood of the labels above that of γ ln π₀ (f = 0), towards the Bayes
    value, and leaves π₀ untouched."""
    from distalign.lm.collators import pad_sequences
    from distalign.lm.scoring import gather_last, sequence_scores

    tok, pi0, prompts, _, _ = setup
    if pi0.config.tie_word_embeddings:
        pytest.skip("the tie is checked above; learning f_θ does not depend on it")
    good, beta, n = tok.convert_tokens_to_ids("good"), 0.25, 600
    model = residual_reward_model(pi0, GAMMA).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(3, (n,), generator=gen).tolist()
    ab = torch.randint(4, 120, (n, 2, 3), generator=gen)
    ab[:, :, 2] = torch.where(torch.rand(n, 2, generator=gen) < 0.5, good, ab[:, :, 2])
    a, b = ab[:, 0].tolist(), ab[:, 1].tolist()
    lp = np.asarray(reply_logprobs(pi0, [prompts[i] for i in x] * 2, a + b, tok.pad_token_id))
    ra, rb = ((ab[:, k, 2] == good).double().numpy() for k in (0, 1))
    p = preference_prob(lp[:n], ra, lp[n:], rb, beta, GAMMA)
    wins = draw_labels(p, np.random.default_rng(0))
    chosen = [u if w else v for u, v, w in zip(a, b, wins, strict=True)]
    rejected = [v if w else u for u, v, w in zip(a, b, wins, strict=True)]
    ids, attn = pad_sequences([[*prompts[i], *y] for i, y in zip(x + x, chosen + rejected,
                                                                  strict=True)],
                              tok.pad_token_id, "right")

    # π₀ is frozen, so its part of the forward is computed once: the head trains on it
    with torch.no_grad():
        feats = gather_last(model.residual(ids, attn).last_hidden_state, attn)  # [2n, H + 1]

    def margins(rows: slice) -> torch.Tensor:
        s = model.score(feats).squeeze(-1)
        return s[:n][rows] - s[n:][rows]

    def held_loglik() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.logsigmoid(margins(slice(400, n))).mean())

    before = held_loglik()
    opt = torch.optim.Adam(model.score.parameters(), lr=0.02)
    for _ in range(60):
        loss = -torch.nn.functional.logsigmoid(margins(slice(0, 400))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_loglik()
    pc = np.where(wins, p, 1 - p)[400:]
    bayes = float(np.mean(np.log(pc)))
    assert before < after <= bayes + 0.05, (before, after, bayes)
    assert after - before > 0.3 * (bayes - before)  # a good part of the way
    # the whole model gives the same scores, and its gradient reaches f_θ only
    model.zero_grad()
    full = sequence_scores(model, ids[:8], attn[:8])
    assert torch.allclose(full, model.score(feats[:8]).squeeze(-1), atol=1e-4)
    full.sum().backward()
    assert [n_ for n_, q in model.named_parameters() if q.grad is not None] == [
        "score.linear.weight", "score.linear.bias"]
    for (name, q), q0 in zip(model.residual.lm.named_parameters(), pi0.parameters(), strict=True):
        assert torch.equal(q, q0), name
