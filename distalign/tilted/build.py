"""``build_world``: sample labelled pairs from π₀ and write a tilted world's directory.

Pairs follow the paper's generative story with μ = π₀: x from the prompt split, a, b ~ π₀(·|x)
i.i.d. on the L-token space with ln π₀ recorded by the sampler, r from the gold reward, and
"a ≻ b" drawn with the exact P of eq. (3). The directory holds:

- ``world.json`` (see :mod:`.world`);
- ``prompts/train.jsonl``, ``prompts/heldout.jsonl``: the HH rows of each side of the split
  (``distalign generate --prompts .../heldout.jsonl`` reads them as ``hh``);
- ``pairs-train.jsonl``, ``pairs-heldout.jsonl``: TRL columns ``prompt``/``chosen``/``rejected``
  (text) plus the exact ``p_chosen`` = P(chosen ≻ rejected), its log-odds ``logit``, ln π₀, r,
  ``ended`` and the token ids of each side, so the Bayes-optimal accuracy is known and
  training can use the exact ids (a reply cut at L has no EOS; re-tokenising the text with an
  appended EOS would score another reply).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from distalign.errors import ConfigError
from distalign.tilted.labels import draw_labels, label_stats, preference_logit, preference_prob
from distalign.tilted.world import TiltedConfig, split_prompts, world_record

Log = Any  # a print-like callable


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return hashlib.sha256(text.encode()).hexdigest()


def labelled_pairs(model: Any, tok: Any, prompts: list[Any], gold: Any, cfg: TiltedConfig,
                   seed: int, progress: bool = False, journal: Path | None = None,
                   key: str = "") -> tuple[list[dict[str, Any]], dict]:
    """``pairs_per_prompt`` labelled pairs per prompt (``eval.prompts.Prompt`` objects); the
    sampling resumes from ``journal`` (see :func:`~distalign.tilted.space.sample_replies`)."""
    from distalign.tilted.space import sample_replies

    k = cfg.pairs_per_prompt
    reps = sample_replies(model, tok, [p.token_ids for p in prompts], 2 * k, cfg.max_new_tokens,
                          seed=seed, rows_per_batch=cfg.rows_per_batch, progress=progress,
                          journal=journal, key=key)
    texts = reps.texts(tok)
    pids = [prompts[i].token_ids for i in reps.prompt_index]
    r = gold.score([prompts[i].prompt for i in reps.prompt_index], texts, pids, reps.reply_ids)
    lp = reps.logp
    a, b = np.arange(0, len(reps), 2), np.arange(1, len(reps), 2)  # rows 2m, 2m+1: one prompt
    la, lb, ra, rb = (np.asarray(lp)[a], np.asarray(lp)[b], np.asarray(r)[a], np.asarray(r)[b])
    p = preference_prob(la, ra, lb, rb, cfg.beta_star, cfg.gamma)
    z = preference_logit(la, ra, lb, rb, cfg.beta_star, cfg.gamma)
    a_wins = draw_labels(p, np.random.default_rng([seed, 1]))
    rows = []
    for m in range(len(a)):
        w, l_ = (a[m], b[m]) if a_wins[m] else (b[m], a[m])
        pr = prompts[reps.prompt_index[w]]
        rows.append({
            "prompt_id": pr.prompt_id, "prompt": pr.prompt,
            "chosen": texts[w], "rejected": texts[l_],
            "p_chosen": float(p[m] if a_wins[m] else 1.0 - p[m]),
            "logit": float(z[m] if a_wins[m] else -z[m]),
            "logp0_chosen": lp[w], "logp0_rejected": lp[l_],
            "r_chosen": r[w], "r_rejected": r[l_],
            "ended_chosen": reps.ended[w], "ended_rejected": reps.ended[l_],
            "prompt_ids": pr.token_ids, "chosen_ids": reps.reply_ids[w],
            "rejected_ids": reps.reply_ids[l_],
        })
    stats = label_stats(la - lb, ra - rb, cfg.beta_star, cfg.gamma)
    stats.update(pairs=len(rows), chosen_is_likelier_pi0=float(np.mean(
        [x["logp0_chosen"] > x["logp0_rejected"] for x in rows])) if rows else float("nan"),
        mean_r=float(np.mean(r)), ended=float(np.mean(reps.ended)))
    return rows, stats


def build_world(cfg: TiltedConfig, out: str | Path, progress: bool = True,
                log: Log = print) -> Path:
    """Build the world of ``cfg`` into ``out`` and return the path of its ``world.json``.
    Sampling is journalled per batch under ``out/.build``: a build killed with ``kill -9``
    and rerun samples only what it lacks, and gives the pairs an unkilled build gives."""
    from distalign.eval.prompts import load_prompt_set
    from distalign.tilted.gold import make_gold_reward
    from distalign.tilted.pi0 import fingerprint, load_pi0
    from distalign.tilted.space import eos_ids

    cfg.check()  # every one-line refusal comes before the model loads
    out = Path(out)
    if (out / "world.json").exists():
        raise ConfigError(f"{out}/world.json exists; choose another directory")
    t0 = time.perf_counter()
    counts = split_prompts(cfg.prompts, out / "prompts", cfg.split_seed, cfg.heldout)
    gold = make_gold_reward(cfg.gold, cfg.gold_bounds)
    model, tok = load_pi0(cfg.pi0, cfg.dtype)
    fp = fingerprint(model, tok)
    log(f"π₀ {cfg.pi0}: {fp['parameters']:,} parameters, weights sha256 {fp['weights'][:12]}…; "
        f"prompts {counts['train']} train / {counts['heldout']} held out")
    files: dict[str, Any] = {}
    for split, limit in (("train", cfg.train_prompts), ("heldout", cfg.heldout_prompts)):
        pset = load_prompt_set(str(out / "prompts" / f"{split}.jsonl"), tok, fmt="hh",
                               limit=limit, max_prompt_length=cfg.max_prompt_length)
        t1 = time.perf_counter()
        journal = out / ".build" / f"sample-{split}.jsonl"
        if journal.is_file():  # a rerun after a kill: say so
            log(f"{split}: resuming from {journal} (its finished batches are not sampled again)")
        rows, stats = labelled_pairs(model, tok, pset.prompts, gold, cfg,
                                     seed=cfg.seed + (split == "heldout"), progress=progress,
                                     journal=journal, key=fp["weights"])
        sha = _write_jsonl(out / f"pairs-{split}.jsonl", rows)
        files[split] = {"file": f"pairs-{split}.jsonl", "prompts_file": f"prompts/{split}.jsonl",
                        "prompts": len(pset.prompts), "prompt_set": pset.digest,
                        "truncated_prompts": pset.truncated, "sha256": sha,
                        "seconds": round(time.perf_counter() - t1, 1), **stats}
        log(f"{split}: {len(rows)} pairs in {files[split]['seconds']} s; Bayes-optimal accuracy "
            f"{stats['bayes_acc']:.3f}, π₀-likelihood alone {stats['pi0_acc']:.3f}, share of the "
            f"label log-odds from Δ ln π₀ {stats['share_logp0']:.2f}")
    try:
        version = metadata.version("distalign")
    except metadata.PackageNotFoundError:
        version = "unknown"
    record = world_record(cfg, gold.describe(), fp, eos_ids(tok, model), {
        "prompts": {"source": cfg.prompts, "format": "hh", "split_seed": cfg.split_seed,
                    "heldout": cfg.heldout, "max_prompt_length": cfg.max_prompt_length,
                    **{f"{k}_rows": v for k, v in counts.items()}},
        "pairs": files,
        "built": {"seconds": round(time.perf_counter() - t0, 1), "distalign_version": version},
    })
    path = out / "world.json"
    tmp = path.with_name(".world.json.tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    shutil.rmtree(out / ".build", ignore_errors=True)
    return path
