"""Exact samples of π*: the reference row that shows what is reachable in a tilted world.

Rejection from π₀: a proposal y ~ π₀(·|x) is kept with probability exp((r − r_max)/β*), which
leaves an exact draw of π* = π₀·exp(r/β*)/Z (r is bounded, so the ratio is). Proposals come in
rounds per prompt until ``n`` are kept or ``max_rounds`` is spent; a prompt with fewer keeps
what it has (counted). The rows are a generations file of the evaluation contract, so
``distalign eval`` measures them like any policy's; ``output_logprob`` is ln π*(y|x) = ln π₀ +
r/β* − ln Z(x), with ln Z from that prompt's proposals (independent of π₀'s eval samples).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from distalign.tilted.measures import acceptance_prob, rejection_accept
from distalign.tilted.world import SAMPLING, TiltedWorld


def sample_pi_star(world_path: str | Path, out: str | Path, *, limit: int | None = None,
                   n: int = 4, per_round: int = 16, max_rounds: int = 12, seed: int = 0,
                   max_prompt_length: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Write ``out`` (generations.jsonl) and its sidecar with up to ``n`` exact draws of π* on
    the first ``limit`` held-out prompts of the world; returns the acceptance counts."""
    from distalign.eval.genfile import sidecar_path
    from distalign.eval.prompts import load_prompt_set, prompt_set_digest
    from distalign.tilted.space import sample_replies

    world = TiltedWorld.load(world_path)
    pi0, tok = world.load_pi0()
    gold = world.gold_reward()
    cut = max_prompt_length or world.data.get("prompts", {}).get("max_prompt_length")
    pset = load_prompt_set(str(world.file("prompts/heldout.jsonl")), tok, fmt="hh", limit=limit,
                           max_prompt_length=cut)
    L, b = world.max_new_tokens, world.beta_star
    rng = np.random.default_rng([seed, 7])
    kept: list[list[dict[str, Any]]] = [[] for _ in pset.prompts]
    proposed = np.zeros(len(pset.prompts), np.int64)
    accept_p_sum = np.zeros(len(pset.prompts), np.float64)
    r_max_term = world.r_max / b
    accepted = np.zeros(len(pset.prompts), np.int64)
    for k in range(max_rounds):
        todo = [i for i in range(len(pset.prompts)) if len(kept[i]) < n]
        if not todo:
            break
        reps = sample_replies(pi0, tok, [pset.prompts[i].token_ids for i in todo], per_round, L,
                              seed=seed * 1000 + k, progress=progress)
        pidx = [todo[j] for j in reps.prompt_index]
        texts = reps.texts(tok)
        r = np.asarray(gold.score([pset.prompts[i].prompt for i in pidx], texts,
                                  [pset.prompts[i].token_ids for i in pidx], reps.reply_ids))
        keep = rejection_accept(r, world.r_max, b, rng)
        prob = acceptance_prob(r, world.r_max, b)
        for row, i in enumerate(pidx):
            proposed[i] += 1
            accept_p_sum[i] += prob[row]
            accepted[i] += int(keep[row])
            if keep[row] and len(kept[i]) < n:
                kept[i].append({"ids": reps.reply_ids[row], "ended": reps.ended[row],
                                "text": texts[row], "logp0": reps.logp[row], "r": float(r[row])})
    # ln Z(x) = r_max/β* + ln E_π₀[acceptance probability], the mean over every proposal
    # (Rao-Blackwellised): the count of accepts would carry the stopping rule's bias (a
    # prompt stops at its n-th accept, so accepted/proposed overstates the rate)
    log_z = r_max_term + np.log(np.maximum(accept_p_sum, 1e-300) / np.maximum(proposed, 1))
    rows = []
    for i, p in enumerate(pset.prompts):
        for s, y in enumerate(kept[i]):
            rows.append({"prompt_id": p.prompt_id, "prompt": p.prompt, "output": y["text"],
                         "reference": p.reference, "generator": "pi-star", "sample": s,
                         "num_tokens": len(y["ids"]), "ended": bool(y["ended"]),
                         "prompt_token_ids": p.token_ids, "output_token_ids": y["ids"],
                         "output_logprob": float(y["logp0"] + y["r"] / b - log_z[i]),
                         "gold_reward": y["r"]})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = {"proposed": int(proposed.sum()), "accepted": int(accepted.sum()),
             "accept_rate": float(accepted.sum() / max(proposed.sum(), 1)),
             "prompts_short": int(sum(len(x) < n for x in kept)),
             "prompts_without_draws": int(sum(not x for x in kept)), "rows": len(rows)}
    meta = {"model": "pi-star", "model_path": None, "tokenizer_path": world.pi0_spec,
            "generator": "pi-star", "prompts": str(world.file("prompts/heldout.jsonl")),
            "format": pset.format, "num_prompts": len({r["prompt_id"] for r in rows}),
            # the prompts with at least one draw (a prompt whose replies π* almost never
            # keeps may have none: counted in ``rejection``)
            "prompt_set": prompt_set_digest({(str(r["prompt_id"]), r["prompt"]) for r in rows}),
            "num_samples": n, "seed": seed, "chat_template": pset.chat_template,
            "max_prompt_length": cut, "gen": {**SAMPLING, "max_new_tokens": L},
            "weights": None, "rejection": {**stats, "per_round": per_round,
                                           "max_rounds": max_rounds, "world": str(world.path)}}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                   encoding="utf-8")
    os.replace(tmp, out)
    sidecar_path(out).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return stats
