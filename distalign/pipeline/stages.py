"""What each pipeline stage does: the same library calls users make directly.

Every function takes JSON-able arguments (so the runner can hand it to a child process or
``accelerate launch``), writes into its own directory and returns a small JSON-able result
that the runner keeps in the stage's done marker.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path
from typing import Any

from distalign.errors import ConfigError, DataError
from distalign.pipeline.data import normalise


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {i + 1}: invalid JSON ({exc.msg})") from None
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return hashlib.sha256(text.encode()).hexdigest()


def split_pairs(source: str, out: str, seed: int, heldout: int, train: int | None = None,
                format: str = "hh") -> dict[str, Any]:
    """Shuffle the rows with ``seed``; the first ``heldout`` are held out (their prompts are
    generated from and their chosen replies are the references, and the reward model's
    held-out pair accuracy is measured on them), the next ``train`` (default: all the rest)
    are the training pairs. Each row keeps its position in the source as ``id``; ``format``
    (:mod:`distalign.pipeline.data`) says how rows are read and normalised."""
    kept, dropped = normalise(_read_jsonl(Path(source)), format, source)
    if heldout < 1 or heldout >= len(kept):
        raise DataError(f"{source}: data.split.heldout={heldout} must be in [1, {len(kept) - 1}]"
                        f" ({len(kept)} usable rows)")
    idx = list(range(len(kept)))
    random.Random(seed).shuffle(idx)
    held = sorted(idx[:heldout])
    rest = idx[heldout:]
    tr = sorted(rest if train is None else rest[:train])
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)

    def rows(which: list[int]) -> list[dict[str, Any]]:
        return [{"id": str(kept[i][0]), **kept[i][1]} for i in which]

    sha = {"heldout": _write_jsonl(d / "heldout.jsonl", rows(held)),
           "train": _write_jsonl(d / "train.jsonl", rows(tr))}
    result = {"source_rows": len(kept) + dropped, "heldout": len(held), "train": len(tr),
              "sha256": sha}
    if dropped:
        result["prompt_mismatch"] = dropped
    return result


def export_model(model: dict[str, Any], out: str) -> dict[str, Any]:
    """Load π₀ once (e.g. de-quantise a GGUF file to fp32) and save it as a plain HF model
    directory, which every later stage loads in a fraction of the time."""
    from distalign.lm.models import ModelConfig, load_policy, load_tokenizer

    cfg = ModelConfig(**model)
    # the load is silent for a while (a 135M GGUF: ~20 s on a CPU); say what it is doing
    what = f"de-quantising {cfg.gguf_file} to {cfg.dtype}" if cfg.gguf_file else "loading"
    print(f"base: {what} from {cfg.name_or_path} (once; later stages load {out})", flush=True)
    tok, policy = load_tokenizer(cfg), load_policy(cfg)
    policy.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in policy.parameters())}


def world_run(config: dict[str, Any], out: str,
              residual_init: str | None = None) -> dict[str, Any]:
    """Build a tilted world from π₀ (``distalign tilted build``) into ``out``, and write its
    gold reward as a reward-model folder (``out/gold-scorer``) and, for the residual reward
    class, the untrained residual scorer. A killed build resumes from its sampling journal."""
    from distalign.tilted.build import build_world
    from distalign.tilted.goldscorer import save_gold_scorer
    from distalign.tilted.residual import save_residual_init
    from distalign.tilted.world import TiltedConfig

    bounds = config.get("gold_bounds")
    cfg = TiltedConfig(**{**config, "gold_bounds": tuple(bounds) if bounds else None})
    d = Path(out)
    path = d / "world.json"
    if not path.is_file():
        build_world(cfg, d, progress=True)
    save_gold_scorer(path, d / "gold-scorer")
    if residual_init:
        save_residual_init(cfg.pi0, cfg.gamma, residual_init)
    record = json.loads(path.read_text())
    return {"world": str(path), "pairs": {k: {m: v[m] for m in ("pairs", "bayes_acc", "pi0_acc",
                                                              "share_logp0") if m in v}
                                          for k, v in record.get("pairs", {}).items()}}


def pistar_run(world: str, out: str, limit: int, n: int, seed: int) -> dict[str, Any]:
    """Exact draws of π* by rejection from π₀ (:mod:`distalign.tilted.reference`)."""
    from distalign.tilted.reference import sample_pi_star

    return sample_pi_star(world, out, limit=limit, n=n, seed=seed)


def claims_run(**kwargs: Any) -> dict[str, Any]:
    """A world pipeline's claims.md, RM statistics and frontier plot
    (:mod:`distalign.tilted.summary`)."""
    from distalign.tilted.summary import write_summary

    return write_summary(**kwargs)


def train_run(method: str, config: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
    """``distalign train METHOD``: ``load_config`` + ``train``. A run that already finished
    with this very config (killed before its marker was written) is not trained again. With
    ``overwrite`` (``distalign pipeline --overwrite``), a run directory holding a run with
    another config is replaced (``run.overwrite``) instead of stopping the pipeline; a
    partial run of this config still resumes."""
    import yaml

    from distalign.train import load_config, train
    from distalign.train.config import to_yaml
    from distalign.train.rundir import SUMMARY_NAME, is_finished, plan_run

    cfg = load_config(method, config)
    text = to_yaml(cfg)
    if not is_finished(cfg.run_dir, text):
        if overwrite:
            try:
                plan_run(cfg.run_dir, yaml.safe_load(text), cfg.run.resume, False)
            except ConfigError:  # it holds another run, or a finished one it cannot extend
                cfg.run.overwrite = True
        train(cfg)
    return json.loads((cfg.run_dir / SUMMARY_NAME).read_text()).get("metrics", {})


def generate_run(gen: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """``distalign generate`` (resumes a partial file by prompt id)."""
    from distalign.eval.generate import gen_config, generate

    cfg = gen_config([f"gen.{k}={v}" for k, v in gen.items() if v is not None])
    path = generate(gen=cfg, **kwargs)
    rows = sum(1 for line in Path(path).read_text().splitlines() if line.strip())
    return {"generations": str(path), "rows": rows}


def eval_run(judge_url: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """``distalign eval``: writes ``out_dir/eval.json``; returns its metrics."""
    from distalign.eval.evaluate import evaluate

    if judge_url:
        kwargs["judge_url"] = judge_url
    return dict(evaluate(**kwargs).get("metrics", {}))


def report_run(**kwargs: Any) -> dict[str, Any]:
    """The Table-2-style report with the π₀ row (see :mod:`distalign.pipeline.report`)."""
    from distalign.pipeline.report import write_report

    return write_report(**kwargs)


def curves_run(run_dir: str) -> dict[str, Any]:
    """One plot per online run: R̂, KL(π‖π₀) and entropy of its rollouts against the step,
    from ``metrics.jsonl`` (written to ``curves.png`` in the run directory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distalign.pipeline.report import CURVES
    from distalign.train.rundir import read_metrics

    rows = read_metrics(run_dir)  # a torn last line (a kill mid-write) is skipped
    keys = [k for k in CURVES if any(k in r for r in rows)]
    if not keys:
        return {}
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.0), layout="constrained")
    axes = [axes] if len(keys) == 1 else list(axes)
    last = {}
    for ax, key in zip(axes, keys, strict=True):
        pts = [(r["step"], r[key]) for r in rows if key in r and r.get("step", 0) > 0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        last[key] = pts[-1][1] if pts else None
    fig.suptitle(Path(run_dir).name, fontsize=9)
    fig.savefig(Path(run_dir) / "curves.png", dpi=110)
    plt.close(fig)
    return {"plot": str(Path(run_dir) / "curves.png"), "last": last}
