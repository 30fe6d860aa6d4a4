"""A policy's measures in a tilted world, from its samples and π₀'s (LM glue over
:mod:`.measures`).

Two entry points:

- :func:`generation_measures`: from generations files of the evaluation contract (π̂'s rows
  and π₀'s rows on the same prompts, both sampled at T = 1 with L = the world's
  ``max_new_tokens``; ``output_logprob`` recorded by the sampler). Eval reaches it through the
  oracle judge (:meth:`TiltedOracleJudge.measure`), so it never imports this package.
- :func:`measure_policy`: samples π₀ and π̂ itself on the world's held-out prompts, and
  cross-checks the importance-sampling forward KL against rejection samples of π* drawn from
  *fresh* π₀ proposals on the same prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from distalign.errors import ConfigError, DataError
from distalign.tilted.measures import (
    forward_kl,
    log_partition,
    log_partition_from_acceptance,
    oracle_win_prob,
    policy_stats,
    rejection_accept,
    rejection_forward_kl,
    reverse_kl,
)
from distalign.tilted.world import SAMPLING, TiltedWorld


def check_sampling(world: TiltedWorld, gen: dict[str, Any] | None, what: str) -> None:
    """Samples must come from the world's space: T = 1, top-k/top-p off, L = max_new_tokens."""
    if not gen:
        return
    want = {**SAMPLING, "max_new_tokens": world.max_new_tokens}
    for key, value in want.items():
        if key in gen and float(gen[key]) != float(value):
            raise ConfigError(f"{what} were sampled with gen.{key}={gen[key]!r}; the tilted world "
                              f"{world.path} needs {key}={value!r} (its response space)")


def _grouped(rows: Sequence[dict[str, Any]], values: Sequence[float]) -> dict[str, np.ndarray]:
    by: dict[str, list[float]] = {}
    for r, v in zip(rows, values, strict=True):
        by.setdefault(str(r["prompt_id"]), []).append(float(v))
    return {k: np.asarray(v) for k, v in by.items()}


def score_rows(world: TiltedWorld, pi0: Any, tok: Any, gold: Any,
               rows: Sequence[dict[str, Any]], batch_size: int = 16,
               recorded: bool = False) -> tuple[list, list]:
    """(ln π₀, r) of each generations row's exact ids (longer than L: refused). ``recorded``:
    the rows are π₀'s own samples, so their ``output_logprob`` is ln π₀ (no forward)."""
    from distalign.tilted.space import reply_logprobs

    L = world.max_new_tokens
    for k, r in enumerate(rows):
        if len(r["output_token_ids"]) > L:
            raise DataError(f"row {k} (prompt {r['prompt_id']}): {len(r['output_token_ids'])} "
                            f"reply tokens > L = {L} of the tilted world {world.path}")
    pids = [r["prompt_token_ids"] for r in rows]
    ids = [r["output_token_ids"] for r in rows]
    if recorded and all("output_logprob" in r for r in rows):
        lp0 = [float(r["output_logprob"]) for r in rows]
    else:
        lp0 = reply_logprobs(pi0, pids, ids, tok.pad_token_id, batch_size)
    texts = [tok.decode(i, skip_special_tokens=True) for i in ids]
    return lp0, gold.score([r["prompt"] for r in rows], texts, pids, ids)


def generation_measures(world: TiltedWorld, pi0: Any, tok: Any, gold: Any,
                        rows: Sequence[dict[str, Any]], base_rows: Sequence[dict[str, Any]],
                        policy: Any = None, seed: int = 0,
                        batch_size: int = 16) -> dict[str, float]:
    """``tilted/*`` metrics of π̂ (``rows``) against π* through π₀'s samples (``base_rows``).

    ``policy`` (the loaded π̂) scores π₀'s samples for the forward KL; without it only the
    measures from π̂'s own samples are returned. ``output_logprob`` of ``rows`` is ln π̂, and
    of ``base_rows`` ln π₀ (forwards are run only where a log-prob is not recorded).
    """
    from distalign.tilted.space import reply_logprobs

    if any("output_logprob" not in r for r in rows):
        raise DataError("the policy's generations have no output_logprob (ln π̂ recorded by "
                        "the sampler); regenerate with `distalign generate` (HF backend)")
    b = world.beta_star
    blp0, br = score_rows(world, pi0, tok, gold, base_rows, batch_size, recorded=True)
    lp0, r = ((blp0, br) if rows is base_rows
              else score_rows(world, pi0, tok, gold, rows, batch_size, recorded=policy is pi0))
    lh = [float(x["output_logprob"]) for x in rows]
    g = {k: _grouped(rows, v) for k, v in (("lh", lh), ("l0", lp0), ("r", r),
                                           ("len", [len(x["output_token_ids"]) for x in rows]))}
    bg = {k: _grouped(base_rows, v) for k, v in (("l0", blp0), ("r", br))}
    prompts = sorted(g["lh"])
    missing = [p for p in prompts if p not in bg["r"]]
    if missing:
        raise DataError(f"π₀'s generations lack prompt {missing[0]!r} ({len(missing)} prompts): "
                        "generate π₀ on the same prompt set")
    log_z = log_partition([bg["r"][p] for p in prompts], b)
    out = {**policy_stats(*([g[k][p] for p in prompts] for k in ("lh", "l0", "r", "len"))),
           **reverse_kl(*([g[k][p] for p in prompts] for k in ("lh", "l0", "r")), b, log_z)}
    n = min(min(g["r"][p].size, bg["r"][p].size) for p in prompts)
    out.update(oracle_win_prob([g["l0"][p][:n] for p in prompts], [g["r"][p][:n] for p in prompts],
                               [bg["l0"][p][:n] for p in prompts],
                               [bg["r"][p][:n] for p in prompts], b, world.gamma))
    if policy is not None:
        blh = bg["l0"] if policy is pi0 else _grouped(base_rows, reply_logprobs(
            policy, [x["prompt_token_ids"] for x in base_rows],
            [x["output_token_ids"] for x in base_rows], tok.pad_token_id, batch_size))
        args = [[bg["l0"][p] for p in prompts], [bg["r"][p] for p in prompts],
                [blh[p] for p in prompts]]
        out.update(forward_kl(*args, b))
        rng = np.random.default_rng(seed)
        keep = [rejection_accept(x, world.r_max, b, rng) for x in args[1]]
        lz = log_partition_from_acceptance([k.sum() for k in keep], [k.size for k in keep],
                                           world.r_max, b)
        out.update(rejection_forward_kl(*([a[i][k] for i, k in enumerate(keep)] for a in args),
                                        b, lz))
    out["prompts"] = len(prompts)
    return {f"tilted/{k}": float(v) for k, v in out.items()}


def measure_policy(world_path: str, policy: str | None = None, *, limit: int = 8, n: int = 16,
                   proposals: int = 64, seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Sample π₀ (n per prompt, plus ``proposals`` fresh ones for rejection) and π̂ (n) on the
    first ``limit`` held-out prompts, and measure π̂ (``policy=None``: π̂ = π₀, whose forward
    KL is KL(π*‖π₀)). ``tilted/kl_fwd_rs`` here uses draws independent of ``tilted/kl_fwd``'s.
    """
    from distalign.eval.prompts import load_prompt_set
    from distalign.tilted.pi0 import load_pi0
    from distalign.tilted.space import reply_logprobs, sample_replies

    world = TiltedWorld.load(world_path)
    pi0, tok = world.load_pi0()
    gold = world.gold_reward()
    model = pi0 if policy is None else load_pi0(policy)[0]
    cfg = world.data.get("prompts", {})
    pset = load_prompt_set(str(world.file("prompts/heldout.jsonl")), tok, fmt="hh", limit=limit,
                           max_prompt_length=cfg.get("max_prompt_length"))
    ids = [p.token_ids for p in pset.prompts]
    L = world.max_new_tokens

    def rows_of(reps: Any) -> list[dict[str, Any]]:
        return [{"prompt_id": pset.prompts[i].prompt_id, "prompt": pset.prompts[i].prompt,
                 "prompt_token_ids": ids[i], "output_token_ids": y, "output_logprob": lp}
                for i, y, lp in zip(reps.prompt_index, reps.reply_ids, reps.logp, strict=True)]

    base = rows_of(sample_replies(pi0, tok, ids, n, L, seed=seed, progress=progress))
    mine = base if policy is None else rows_of(
        sample_replies(model, tok, ids, n, L, seed=seed + 1, progress=progress))
    out = generation_measures(world, pi0, tok, gold, mine, base, policy=model, seed=seed)
    # rejection on fresh proposals: an estimate independent of the SNIS one above
    fresh = rows_of(sample_replies(pi0, tok, ids, proposals, L, seed=seed + 2, progress=progress))
    l0, r = score_rows(world, pi0, tok, gold, fresh, recorded=True)
    lh = l0 if model is pi0 else reply_logprobs(
        model, [x["prompt_token_ids"] for x in fresh], [x["output_token_ids"] for x in fresh],
        tok.pad_token_id)
    rng = np.random.default_rng(seed + 3)
    keys = sorted({x["prompt_id"] for x in fresh})
    g = [_grouped(fresh, v) for v in (l0, r, lh)]
    keep = [rejection_accept(g[1][k], world.r_max, world.beta_star, rng) for k in keys]
    lz = log_partition_from_acceptance([k.sum() for k in keep], [k.size for k in keep],
                                       world.r_max, world.beta_star)
    rs = rejection_forward_kl(*([gi[k][m] for k, m in zip(keys, keep, strict=True)] for gi in g),
                              world.beta_star, lz)
    out.update({f"tilted/fresh_{k}": float(v) for k, v in rs.items()})
    out["tilted/fresh_accept_rate"] = float(np.mean([k.mean() for k in keep]))
    return out
