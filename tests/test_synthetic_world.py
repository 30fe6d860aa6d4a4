"""The synthetic world: π* is a proper distribution on 𝒜, the tokenizer round-trips and agrees
with the engine's data pipeline, and the oracle labels follow the Bradley–Terry probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from distalign.synthetic.labels import (
    bt_probability,
    pair_records,
    preference_loglik,
    sample_pairs,
    sft_records,
)
from distalign.synthetic.lm import world_tokenizer
from distalign.synthetic.metrics import encode_sequence
from distalign.synthetic.world import WorldConfig, build_world, enumerate_responses

HAND = WorldConfig(prompt_len=1, num_content=2, max_len=2, gamma=0.7, seed=3)


def test_enumeration_counts_and_order():
    assert enumerate_responses(2, 2) == [(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]
    world = build_world()
    assert (world.num_prompts, world.num_responses) == (9, 39)
    assert world.responses[:4] == ["a", "b", "c", "a a"]
    assert len(set(world.responses)) == world.num_responses


@pytest.mark.parametrize("config", [WorldConfig(), HAND, WorldConfig(max_len=4, seed=7)])
def test_target_and_sft_distributions_sum_to_one_per_prompt(config):
    world = build_world(config)
    for logp in (world.logp_star(), world.logp_sft()):
        assert torch.isfinite(logp).all()
        ones = torch.ones(world.num_prompts, dtype=logp.dtype)
        torch.testing.assert_close(logp.exp().sum(-1), ones)


def _brute_logp(table: torch.Tensor, x: int, resp: tuple[int, ...], max_len: int) -> float:
    """ln π(resp|x) by walking the chain with explicit per-step softmaxes (no vectorisation)."""
    eos = table.shape[-1] - 1
    total, prev = 0.0, 0
    for k in range(len(resp) + 1):
        logits = table[x, k, prev].tolist()
        allowed = [i for i in range(eos + 1) if (i != eos or k > 0) and (i == eos or k < max_len)]
        z = math.log(sum(math.exp(logits[i]) for i in allowed))
        nxt = resp[k] if k < len(resp) else eos
        total += logits[nxt] - z
        prev = nxt + 1 if nxt != eos else prev
    return total


def test_chain_logprobs_match_step_by_step_walk():
    world = build_world(HAND)
    ls = world.logp_star()
    for x in range(world.num_prompts):
        for j, resp in enumerate(world.response_tokens):
            assert ls[x, j].item() == pytest.approx(_brute_logp(world.star_table, x, resp, 2))


def test_sft_is_a_flatter_noisy_target():
    world = build_world()
    ls, lsft = world.logp_star(), world.logp_sft()
    h = lambda lp: -(lp.exp() * lp).sum(-1).mean().item()  # noqa: E731
    assert h(lsft) > h(ls)  # tempered by sft_temper < 1
    kl = (ls.exp() * (ls - lsft)).sum(-1).mean().item()
    assert 0.05 < kl < 1.0  # "different but nearby"


def test_tokenizer_round_trips_and_matches_the_data_pipeline():
    from datasets import Dataset

    from distalign.lm.data import DataConfig, prepare

    world = build_world()
    tok = world_tokenizer(world)
    assert tok.eos_token_id == tok.pad_token_id == 0 and len(tok) == 4
    for text in (*world.prompts, *world.responses):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    rows = pair_records(world, sample_pairs(world, world.logp_star(), 16, seed=0))
    ds, report = prepare(Dataset.from_list(rows), tok, DataConfig(path="x.jsonl"), "pairs")
    for row, enc in zip([r for r in rows if r["chosen"] != r["rejected"]], ds, strict=True):
        ids, plen = encode_sequence(tok, row["prompt"], row["chosen"])
        assert enc["prompt_ids"] == ids[:plen] and enc["chosen_ids"] == ids[plen:]
    assert report.rows_kept + report.skipped.get("identical", 0) == 16


def test_world_save_load_round_trip(tmp_path):
    world = build_world(HAND)
    again = type(world).load(world.save(tmp_path / "world.json"))
    torch.testing.assert_close(again.logp_star(), world.logp_star())


def test_oracle_labels_follow_bradley_terry():
    world = build_world(HAND)  # 2 prompts × 6 responses: 72 ordered (x, a, b) cells
    n = 200_000
    pairs = sample_pairs(world, world.logp_sft(), n, seed=1)
    # undo the (chosen, rejected) ordering: count how often the *smaller index* wins
    lo = torch.minimum(pairs.chosen, pairs.rejected)
    hi = torch.maximum(pairs.chosen, pairs.rejected)
    lo_won = pairs.chosen == lo
    checked = 0
    for x in range(world.num_prompts):
        for a in range(world.num_responses):
            for b in range(a + 1, world.num_responses):
                cell = (pairs.x == x) & (lo == a) & (hi == b)
                m = int(cell.sum())
                if m < 500:
                    continue
                p = bt_probability(world, torch.tensor(x), torch.tensor(a), torch.tensor(b)).item()
                rate = lo_won[cell].float().mean().item()
                assert abs(rate - p) < 4.5 * math.sqrt(p * (1 - p) / m), (x, a, b, rate, p, m)
                checked += 1
    assert checked >= 20
    # aggregate calibration over all pairs: mean P(lo ≻ hi) equals the observed win frequency
    # (identical pairs excluded: there "lo won" is true by construction)
    distinct = lo != hi
    p_lo = bt_probability(world, pairs.x[distinct], lo[distinct], hi[distinct])
    sd = math.sqrt((p_lo * (1 - p_lo)).sum().item()) / len(p_lo)
    assert abs(lo_won[distinct].double().mean().item() - p_lo.mean().item()) < 4.5 * sd


def test_pairs_draw_responses_from_mu_and_nest_by_size():
    world = build_world(HAND)
    mu = world.logp_sft()
    pairs = sample_pairs(world, mu, 60_000, seed=2)
    counts = torch.zeros(world.num_prompts, world.num_responses, dtype=torch.float64)
    for col in (pairs.chosen, pairs.rejected):
        ones = torch.ones_like(col, dtype=torch.float64)
        counts.index_put_((pairs.x, col), ones, accumulate=True)
    emp = counts / counts.sum(-1, keepdim=True)
    torch.testing.assert_close(emp, mu.exp(), atol=0.01, rtol=0)
    small = pairs.subset(100)
    assert torch.equal(small.chosen, pairs.chosen[:100]) and len(small) == 100


def test_preference_loglik_by_hand():
    world = build_world(HAND)
    pairs = sample_pairs(world, world.logp_star(), 50, seed=4)
    table = torch.randn(world.num_prompts, world.num_responses, dtype=torch.float64)
    want = sum(
        math.log(1 / (1 + math.exp(-0.7 * (table[x, c] - table[x, r]).item())))
        for x, c, r in zip(pairs.x, pairs.chosen, pairs.rejected, strict=True)
    ) / 50
    assert preference_loglik(table, pairs, 0.7) == pytest.approx(want)


def test_sft_records_are_plain_text_rows():
    world = build_world()
    rows = sft_records(world, world.logp_sft(), 5, seed=0)
    assert all(r["prompt"] in world.prompts and r["completion"] in world.responses for r in rows)
