"""``distalign eval``: RM score, KL(π‖π₀) and judge win-rates of a generations file.

Input: a generations JSONL written by ``distalign generate`` (one row per sample, with the exact
``prompt_token_ids``/``output_token_ids``) and its ``<stem>.meta.json`` sidecar. Output:
``eval.json`` (``{"metrics": {...}, ...details}``, the keys ``distalign report`` reads) and,
with a judge, ``annotations.json`` in AlpacaEval's schema (baseline = the reference).

- **RM score**: R̂ at the last real token of prompt + output (eq. (1)), batched; outputs that
  hit the length limit (no EOS) are counted separately and also averaged on their own.
- **KL(π‖π₀)** (Table 2's column): per sample, ln π(y|x) − ln π₀(y|x) with *both* log-probs
  recomputed by forward passes (never the sampler's). k1 is that difference's mean; k3 is the
  mean of r − 1 − ln r with r = π₀(y|x)/π(y|x), non-negative per sample and also unbiased.
  Log-probs are taken at the sampling temperature T of the sidecar (T = 1 for greedy), so the
  estimate is of KL(π_T‖π₀_T), the distribution the samples came from; top-k/top-p truncation
  makes it approximate (``kl_exact`` says so). The same forwards give ``eval/entropy``, the
  mean of −ln π(y|x): π_T's entropy per response in nats, estimated without bias.
- **Win-rate** (a judge): 100 · mean P(output ≻ reference), discrete win-rate (ties = ½), SE,
  bootstrap CI, flip rate, unparsed count, mean lengths of both sides.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from distalign.errors import ConfigError, DataError
from distalign.eval.annotations import write_annotations
from distalign.eval.genfile import numbered_rows, sidecar_path
from distalign.eval.judges.base import Pair
from distalign.eval.judges.cache import JudgeCache
from distalign.eval.judges.reward import resolve_model_dir
from distalign.eval.measures import kl_estimates, rm_scores
from distalign.eval.stats import bootstrap_ci, cluster_bootstrap_ci, winrate
from distalign.eval.worlds import world_measures
from distalign.jsonsafe import json_safe

REQUIRED = {"prompt_id": str, "prompt": str, "output": str, "prompt_token_ids": list,
            "output_token_ids": list, "ended": bool}


def read_generations(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (checked field by field) and the sidecar (``{}`` when absent)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such generations file")
    rows = []
    for i, row in numbered_rows(path):
        for key, kind in REQUIRED.items():
            if key not in row:
                raise DataError(f"{path} row {i}: missing field {key!r}")
            if not isinstance(row[key], kind):
                raise DataError(f"{path} row {i}: field {key!r} is not a {kind.__name__}")
        row["_line"] = i
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no generations")
    meta: dict[str, Any] = {}
    side = sidecar_path(path)
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{side}: invalid JSON ({exc.msg})") from exc
    return rows, meta


def prompt_pairs(rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(str(r["prompt_id"]), r["prompt"]) for r in rows}


def check_complete(rows: list[dict[str, Any]], path: Path, meta: dict[str, Any]) -> None:
    """The rows must cover exactly the sidecar's prompt set (a partial or mixed file would
    silently evaluate other prompts than the ones compared against)."""
    from distalign.eval.prompts import prompt_set_digest

    want = meta.get("prompt_set")
    if want and prompt_set_digest(prompt_pairs(rows)) != want:
        have = len(prompt_pairs(rows))
        raise DataError(f"{path}: its prompts do not match its sidecar's prompt_set (field "
                        f"'prompt_set'; {have} of {meta.get('num_prompts', '?')} prompts here): "
                        "finish or rerun `distalign generate`")


def check_prompt_set(rows: list[dict[str, Any]], path: Path, other: str | Path,
                     meta: dict[str, Any], policy_model: str | None = None) -> None:
    """Stop unless ``other`` names the same prompts: a sha256 digest, another generations file
    (the other side of a comparison) or the prompts data file (read like ``generate`` did)."""
    from distalign.eval.prompts import load_prompt_set, prompt_set_digest

    ours = prompt_pairs(rows)
    text = str(other)
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        same, what = prompt_set_digest(ours) == text, f"digest {text[:12]}…"
    elif text.endswith(".jsonl") and _is_generations(Path(text)):
        same, what = ours == prompt_pairs(read_generations(text)[0]), text
    else:
        tok = _policy_tokenizer(meta, policy_model)  # prompts are read as generate read them
        pset = load_prompt_set(text, tok, fmt=meta.get("format") or "auto",
                               limit=meta.get("num_prompts") or None)
        same, what = prompt_set_digest(ours) == pset.digest, text
    if not same:
        raise DataError(f"{path}: generated from a different prompt set than {what} (fields "
                        "'prompt_id', 'prompt')")


def _is_generations(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as f:
            first = json.loads(f.readline() or "{}")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(first, dict) and "output_token_ids" in first


def _policy_tokenizer(meta: dict[str, Any], policy_model: str | None) -> Any:
    from distalign.lm.models import ModelConfig, load_tokenizer

    path = policy_model or meta.get("tokenizer_path") or meta.get("model_path")
    if not path:
        raise ConfigError("the generations have no sidecar naming the policy; pass policy_model")
    gguf = meta.get("gguf_file") if not policy_model else None
    return load_tokenizer(ModelConfig(name_or_path=resolve_model_dir(path), gguf_file=gguf))


def _pairs(rows: list[dict[str, Any]], path: Path, text_judge: bool) -> list[Pair]:
    """One judge pair per row. An empty output (a policy that ends at once) is a real answer
    and is judged as one; ``empty_outputs`` in eval.json counts them."""
    pairs = []
    for r in rows:
        ref = r.get("reference")
        if not isinstance(ref, str) or (text_judge and not ref.strip()):
            raise DataError(f"{path} row {r['_line']}: field 'reference' is missing or empty; "
                            "a judge compares each output with its reference")
        pairs.append(Pair(r["prompt"], r["output"], ref, r["prompt_token_ids"],
                          r["output_token_ids"]))
    return pairs


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2) + "\n")  # eval.json: strict JSON
    tmp.replace(path)


def judge_label(judge_id: str) -> str:
    """A judge's short name for column titles and file names: its kind and the last part of
    its argument (``reward:/x/runs/rm`` → ``reward:rm``)."""
    kind, _, arg = judge_id.partition(":")
    name = Path(arg.split("@")[0].rstrip("/")).name if arg else ""
    if name in ("final", "world.json"):  # a run's final/ or a world's file: name the folder
        name = Path(arg.split("@")[0].rstrip("/")).parent.name
    return f"{kind}:{name}" if name else kind


def judge_winrate(rows: list[dict[str, Any]], path: Path, out_dir: Path, judge_spec: str,
                  judge: Any, meta: dict[str, Any], progress: bool,
                  annotations_name: str = "annotations.json") -> dict[str, Any]:
    # an LLM judge needs a reference text to compare with; an empty OUTPUT is judged like any
    # other (an RL policy that learned to stop at once must lose for it, not crash the eval)
    pairs = _pairs(rows, path, judge_spec.split(":")[0] in ("hf", "openai"))
    if hasattr(judge, "chat"):
        judge.chat = bool(meta.get("chat_template"))
    t0 = time.perf_counter()
    verdicts = judge.judge(pairs, progress=progress)
    seconds = time.perf_counter() - t0
    prefs = [None if v.p is None else 1.0 + v.p for v in verdicts]
    st = winrate(prefs)
    flips = [v.flipped for v in verdicts if v.flipped is not None]
    generator = meta.get("generator") or (rows[0].get("generator") or "model")
    ann = [{"instruction": p.prompt, "output_1": p.reference, "generator_1": "reference",
            "output_2": p.output, "generator_2": r.get("generator") or generator,
            "annotator": judge.id, "preference": pref, "prompt_id": r["prompt_id"],
            "sample": r.get("sample", 0)}
           for p, r, pref in zip(pairs, rows, prefs, strict=True)]
    write_annotations(ann, out_dir / annotations_name)
    return {
        "metrics": {"eval/win_rate": st["win_rate"], "eval/win_rate_se": st["standard_error"],
                    "eval/win_rate_discrete": st["discrete_win_rate"]},
        "judge": judge.id, "template": judge.template_id, "judge_calls": judge.calls,
        "judge_seconds": seconds, "wins": st["n_wins"], "losses": st["n_wins_base"],
        "ties": st["n_draws"], "unparsed": st["n_dropped"], "judged": st["n_total"],
        "win_rate_ci95": [st["ci_low"], st["ci_high"]],
        "win_rate_ci95_by_prompt": _by_prompt_ci(rows, prefs),
        "flip_rate": sum(flips) / len(flips) if flips else None,
        # single-order answers without a verdict (the pair keeps its other order's)
        "unparsed_answers": sum((v.p_first is None) + (v.p_second is None) for v in verdicts)
        if getattr(judge, "template_id", None) else 0,
        "both_orders": sum(v.p_first is not None or v.p_second is not None for v in verdicts),
        "mean_length_output": _mean_len(p.output for p in pairs),
        "mean_length_reference": _mean_len(p.reference for p in pairs),
    }


def judge_subset(rows: list[dict[str, Any]], prompts: int) -> list[dict[str, Any]]:
    """The rows of the ``prompts`` smallest prompt ids (as strings): the same subset for
    every generations file of one prompt set, whatever its row order."""
    if prompts < 1:
        raise ConfigError(f"judge_prompts must be >= 1, got {prompts}")
    keep = set(sorted({str(r["prompt_id"]) for r in rows})[:prompts])
    return [r for r in rows if str(r["prompt_id"]) in keep]


def _by_prompt_ci(rows: list[dict[str, Any]], prefs: list[float | None]) -> list[float] | None:
    """With several samples per prompt: the 95 % CI resampling prompts, not rows."""
    kept = [(str(r["prompt_id"]), 100 * (p - 1)) for r, p in zip(rows, prefs, strict=True)
            if p is not None]
    if len({g for g, _ in kept}) == len(kept):
        return None  # one sample per prompt: the row bootstrap already is this one
    lo, hi = cluster_bootstrap_ci([v for _, v in kept], [g for g, _ in kept])
    return [lo, hi]


def _mean_len(texts: Any) -> float:
    lengths = [len(t) for t in texts]
    return sum(lengths) / len(lengths)


def evaluate(
    generations: str | Path,
    out_dir: str | Path,
    *,
    judge: str | None = None,
    reward_model: str | None = None,
    ref_model: str | None = None,
    policy_model: str | None = None,
    template: str | None = None,
    batch_size: int = 16,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    judge_url: str | None = None,
    prompt_set: str | Path | None = None,
    judge_options: dict[str, Any] | None = None,
    judge_prompts: int | None = None,
    base_generations: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a generations file; writes ``out_dir/eval.json`` and returns its content.

    ``base_generations``: π₀'s generations on the same prompts; with an oracle judge of a world
    that measures policies (the tilted world), its measures (forward KL to π*, gold reward, …)
    are added as ``<world>/*`` metrics.
    ``prompt_set``: the prompt set these generations must come from: a sha256 digest, another
    generations file (e.g. the other side of a comparison) or the prompts data file. Each part
    is written as soon as it is done, so an error in a later part keeps the earlier ones (and
    judge answers stay cached).
    ``judge_options``: extra settings of the judge (openai: concurrency, timeout,
    max_retries). ``judge_prompts``: the judge sees only the samples of the first N prompt
    ids (sorted, so every model of a comparison is judged on the same prompts); RM score and
    KL still use every row."""
    path, out = Path(generations), Path(out_dir)
    if not (judge or reward_model or ref_model):
        raise ConfigError("nothing to evaluate: give a judge, a reward model or a ref model")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create it ({exc.strerror})") from exc
    rows, meta = read_generations(path)
    check_complete(rows, path, meta)
    if prompt_set is not None:
        check_prompt_set(rows, path, prompt_set, meta, policy_model)
    lengths = [len(r["output_token_ids"]) for r in rows]
    result = _earlier(out / "eval.json", path, meta)
    result.update({
        "metrics": {**result.get("metrics", {}), "eval/n": len(rows),
                    "eval/length": sum(lengths) / len(lengths)},
        "weights": meta.get("weights"),
        "generations": str(path), "prompt_set": meta.get("prompt_set"),
        "num_prompts": len({r["prompt_id"] for r in rows}),
        "no_eos": sum(not r["ended"] for r in rows), "model": meta.get("model"),
        "empty_outputs": sum(not r["output"].strip() for r in rows),
    })
    policy_tok = None
    if reward_model or ref_model or (judge or "").startswith("reward:"):
        policy_tok = _policy_tokenizer(meta, policy_model)

    def save(part: dict[str, Any]) -> None:
        label = part.pop("judge_label", None)
        first = result.get("judge")
        if label is None or first is None or judge_label(first) == label:
            result["metrics"].update(part.pop("metrics"))
            result.update(part)
        else:  # another judge than the file's first: its own keys, never the first's
            result["metrics"].update({f"{k}@{label}": v for k, v in part.pop("metrics").items()})
            result.setdefault("judges", {})[label] = part
        _write_json(out / "eval.json", result)

    # one cache for the evaluation: judge answers, and RM scores shared by the RM-score column,
    # the RM judge and (with a shared cache_dir) every model's references
    cache = JudgeCache(Path(cache_dir or out) / "judge_cache.sqlite")
    try:
        _evaluate_parts(rows, path, out, meta, cache, save, policy_tok, judge=judge,
                        reward_model=reward_model, ref_model=ref_model,
                        policy_model=policy_model, batch_size=batch_size, progress=progress,
                        judge_prompts=judge_prompts, base_generations=base_generations,
                        judge_kw={
                            "judge_url": judge_url, "template": template,
                            "batch_size": batch_size, **(judge_options or {})})
    finally:
        cache.close()
    return result


def _evaluate_parts(rows: list[dict[str, Any]], path: Path, out: Path, meta: dict[str, Any],
                    cache: Any, save: Any, policy_tok: Any, *, judge: str | None,
                    reward_model: str | None, ref_model: str | None, policy_model: str | None,
                    batch_size: int, progress: bool, judge_prompts: int | None,
                    base_generations: str | Path | None, judge_kw: dict[str, Any]) -> None:
    if reward_model:
        part = rm_scores(rows, reward_model, policy_tok, batch_size, progress, cache)
        part.pop("scores")
        save(part)
    if ref_model:
        policy = policy_model or meta.get("model_path")
        if not policy:
            raise ConfigError(f"{sidecar_path(path)}: no model_path; pass --policy-model for KL")
        gen = meta.get("gen") or {}
        t = float(gen.get("temperature", 1.0) or 1.0)
        # ln π_T recorded while sampling is π's own (an explicit --policy-model may differ)
        recorded = None
        if policy_model is None and all("output_logprob" in r for r in rows):
            recorded = [float(r["output_logprob"]) for r in rows]
        part = kl_estimates(rows, policy, None if policy_model else meta.get("gguf_file"),
                            ref_model, t, batch_size, progress, recorded)
        part.pop("k1")
        part["kl_policy_logprobs"] = "recorded while sampling" if recorded else "forward"
        part["kl_temperature"] = t
        part["kl_exact"] = int(gen.get("top_k", 0) or 0) == 0 and float(
            gen.get("top_p", 1.0)) >= 1.0 and int(gen.get("min_new_tokens", 0) or 0) == 0
        save(part)
    if judge:
        judged = rows
        extra: dict[str, Any] = {}
        if judge_prompts is not None:
            judged = judge_subset(rows, judge_prompts)
            extra["judge_prompts"] = len({r["prompt_id"] for r in judged})
        first = _json_or_empty(out / "eval.json").get("judge")
        label = judge_label(judge)
        same = first is None or judge_label(first) == label
        from distalign.eval.judges.factory import make_judge

        # an oracle checks that π₀ is its world's (the tilted world's fingerprint)
        oracle = {"ref_model": ref_model} if judge.startswith("oracle") and ref_model else {}
        judge_obj = make_judge(judge, cache=cache, policy_tokenizer=policy_tok, **judge_kw,
                               **oracle)
        part = judge_winrate(judged, path, out, judge, judge_obj, meta, progress,
                             annotations_name="annotations.json" if same else
                             f"annotations@{label.replace(':', '_')}.json")
        save({**part, **extra, "judge_label": label})
        if base_generations is not None:
            save(world_measures(judge_obj, rows, meta, base_generations, policy_model))


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _earlier(path: Path, generations: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What an earlier evaluation of these very generations (same file, same weights) wrote:
    each evaluation adds its measures (another judge, the RM score) to it. One of another
    file or other weights describes another model and is replaced."""
    old = _json_or_empty(path)
    if old and (old.get("generations") == str(generations)
                and old.get("weights") == meta.get("weights")):
        return old
    return {}


def evaluate_annotations(annotations: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """``distalign eval --annotations``: aggregate an AlpacaEval annotations file, no judge."""
    from distalign.eval.annotations import aggregate_annotations, read_annotations

    out = Path(out_dir)
    result = aggregate_annotations(read_annotations(annotations), str(annotations))
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "eval.json", result)
    return result


__all__ = ["bootstrap_ci", "evaluate", "evaluate_annotations", "read_generations"]
