"""The per-row measures of ``distalign eval``: RM score and KL(π‖π₀) with π's entropy (the
definitions are in :mod:`distalign.eval.evaluate`'s docstring)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from distalign.eval.judges.reward import length_batches, resolve_model_dir, split_gguf
from distalign.eval.stats import mean_se


def _load_lm(spec: str, gguf: str | None = None) -> tuple[Any, Any]:
    from distalign.lm.models import ModelConfig, load_policy, load_tokenizer

    path, own = split_gguf(spec)  # DIR@FILE.gguf
    cfg = ModelConfig(name_or_path=resolve_model_dir(path), gguf_file=own or gguf)
    return load_policy(cfg).eval().requires_grad_(False), load_tokenizer(cfg)


def _same_model(policy: str, gguf: str | None, ref_model: str) -> bool:
    a, own = split_gguf(policy)
    b, ref_gguf = split_gguf(ref_model)
    return ((own or gguf) == ref_gguf
            and Path(resolve_model_dir(a)).resolve() == Path(resolve_model_dir(b)).resolve())


def _progress(name: str, total: int, enabled: bool) -> Any:
    from distalign.progress import StepProgress

    return StepProgress(name, total, enabled=enabled, every=max(total // 10, 1))


def rm_scores(rows: list[dict[str, Any]], reward_model: str, policy_tok: Any, batch_size: int,
              progress: bool, cache: Any = None) -> dict[str, Any]:
    from distalign.eval.judges.reward import cached_scores, load_scorer_dir, model_fingerprint
    from distalign.lm.tokenizers import check_same_tokenizer

    model, tok = load_scorer_dir(reward_model)
    check_same_tokenizer(policy_tok, tok, "the policy", f"reward model {reward_model}")
    seqs = [(r["prompt_token_ids"], r["output_token_ids"]) for r in rows]
    done = 0
    with _progress("rm score", len(rows), progress) as bar:
        def step(n: int) -> None:
            nonlocal done
            done += n
            bar.update(done)
        scores, _ = cached_scores(model, seqs, tok.pad_token_id, batch_size, cache,
                                  model_fingerprint(reward_model), step)
    mean, se = mean_se(scores)
    ended = [s for s, r in zip(scores, rows, strict=True) if r["ended"]]
    cut = [s for s, r in zip(scores, rows, strict=True) if not r["ended"]]
    return {"scores": scores, "metrics": {"eval/rm_score": mean, "eval/rm_score_se": se},
            "rm_score_ended": mean_se(ended)[0], "rm_score_no_eos": mean_se(cut)[0],
            "no_eos": len(cut), "reward_model": reward_model}


def _load_tok(spec: str, gguf: str | None = None) -> Any:
    from distalign.lm.models import ModelConfig, load_tokenizer

    path, own = split_gguf(spec)
    return load_tokenizer(ModelConfig(name_or_path=resolve_model_dir(path), gguf_file=own or gguf))


@torch.no_grad()
def kl_estimates(rows: list[dict[str, Any]], policy: str, gguf: str | None, ref_model: str,
                 temperature: float, batch_size: int, progress: bool,
                 recorded: list[float] | None = None) -> dict[str, Any]:
    """k1, k3 and entropy from ln π_T and ln π₀_T of each row's response. ``recorded`` is ln π_T
    as the sampler computed it while generating (``output_logprob``): then π is not run again,
    and π₀'s own row (the base model against itself) needs no forward at all."""
    from distalign.lm.logprobs import sequence_logprobs
    from distalign.lm.tokenizers import check_same_tokenizer

    same = _same_model(policy, gguf, ref_model)
    need_pi = recorded is None
    pi, pi_tok = _load_lm(policy, gguf) if need_pi else (None, _load_tok(policy, gguf))
    need_pi0 = not same
    pi0, pi0_tok = _load_lm(ref_model) if need_pi0 else (pi, pi_tok)
    check_same_tokenizer(pi_tok, pi0_tok, f"the policy {policy}", f"reference model {ref_model}")
    seqs = [(r["prompt_token_ids"], r["output_token_ids"]) for r in rows]
    lp = list(recorded) if recorded is not None else [math.nan] * len(rows)
    lr = list(lp) if same else [math.nan] * len(rows)
    with _progress("kl", len(rows), progress) as bar:
        done = 0
        batches = (length_batches(seqs, pi_tok.pad_token_id, batch_size)
                   if need_pi or need_pi0 else [])
        for idx, ids, attn, resp in batches:
            a = sequence_logprobs(pi, ids, attn, resp, temperature).tolist() if need_pi else None
            b = sequence_logprobs(pi0, ids, attn, resp, temperature).tolist() if need_pi0 else a
            for k, i in enumerate(idx):
                if a is not None:
                    lp[i] = a[k]
                lr[i] = b[k] if b is not None else lp[i]
            done += len(idx)
            bar.update(done)
        bar.update(len(rows))
    k1 = [x - y for x, y in zip(lp, lr, strict=True)]
    k3 = [math.expm1(-d) + d for d in k1]  # r − 1 − ln r with ln r = −d
    (m1, s1), (m3, s3) = mean_se(k1), mean_se(k3)
    # −ln π_T(y|x) over y ~ π_T is an unbiased estimate of π_T's entropy per response: the
    # column that tells a distribution learner (RKL) from a mode seeker (RLHF) at equal KL
    mh, sh = mean_se([-x for x in lp])
    return {"k1": k1, "metrics": {"eval/kl_ref": m1, "eval/kl_ref_se": s1,
                                  "eval/kl_ref_k3": m3, "eval/kl_ref_k3_se": s3,
                                  "eval/entropy": mh, "eval/entropy_se": sh},
            "policy_model": policy, "ref_model": ref_model}
