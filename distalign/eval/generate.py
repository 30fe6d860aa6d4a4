"""``distalign generate``: responses y ~ π(·|x) of a policy to a prompt set, as resumable JSONL.

One row per (prompt, sample) with the exact prompt and response token ids, so that evaluation
recomputes ln π, ln π₀ and R̂ without re-tokenising; the settings go in a sidecar
``<stem>.meta.json``. Crash safety and resume rest on two choices:

* Batches are fixed by the whole prompt set (sorted by prompt length, longest first, then cut
  every ``batch_size`` prompts) and each batch seeds the RNG from (seed, its prompt ids). A rerun
  regenerates a batch with any row missing and appends only the missing rows, which are
  therefore the rows an uninterrupted run would have written (same batch_size and device).
* Rows are appended and flushed once per batch, so a ``kill -9`` loses at most that batch; a
  torn last line (killed while writing) is cut off the file on the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from distalign.errors import ConfigError
from distalign.eval.genfile import read_generations, sidecar_path
from distalign.eval.prompts import Prompt, PromptSet, load_prompt_set
from distalign.jsonsafe import cut_torn_line
from distalign.lm.collators import pad_sequences
from distalign.lm.fingerprint import short, weights_fingerprint
from distalign.lm.generation import GenerationConfig, HFSampler, make_sampler
from distalign.lm.models import ModelConfig, load_policy, load_tokenizer
from distalign.lm.sources import did_you_mean, looks_local, resolve_model_path
from distalign.locks import file_lock
from distalign.progress import StepProgress

# Sidecar fields that must match for a rerun to append to an existing file.
COMPARED = ("weights", "model_path", "gguf_file", "tokenizer_path", "dtype", "generator",
            "prompt_set", "num_samples", "seed", "chat_template", "max_prompt_length", "gen")
# The sidecar's ``gen``: the fields that shape the sampling distribution (engine sizing such as
# vLLM's memory share goes to ``gen_engine`` and may change between resumed runs).
SAMPLING_FIELDS = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "backend")
MODEL_OUTPUTS = "model_outputs.json"  # what `alpaca_eval evaluate --model_outputs` reads


def gen_config(overrides: list[str], base: GenerationConfig | None = None) -> GenerationConfig:
    """``gen.KEY=VALUE`` overrides (as for ``distalign train``) applied to ``base``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    keys = [f.name for f in fields(GenerationConfig)]
    dotlist = []
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key.startswith("gen.") or key[4:] not in keys:
            raise ConfigError(f"override {item!r}: expected gen.KEY=VALUE with KEY one of "
                              f"{', '.join(keys)}")
        dotlist.append(f"{key[4:]}={value}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base or GenerationConfig()),
                                 OmegaConf.from_dotlist(dotlist))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"gen overrides {' '.join(overrides)}: {first}") from e


def resolve_model(model: str, gguf_file: str | None) -> tuple[str, str | None, str]:
    """(directory or hub id to load, GGUF file name, default generator name) for ``model``: a
    run directory (its ``final/``), a model directory, a ``.gguf`` file, or a hub id."""
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        if gguf_file and gguf_file != p.name:
            raise ConfigError(f"--gguf-file {gguf_file!r} differs from the model file {model!r}")
        return str(p.parent.resolve()), p.name, p.stem
    if p.is_dir():
        final = resolve_model_path(str(p))
        if final != str(p):  # a run directory: its final/, named after the run
            return str(Path(final).resolve()), gguf_file, p.resolve().name
        if gguf_file and not (p / gguf_file).is_file():
            raise ConfigError(f"--gguf-file {gguf_file!r} not found in {model}")
        if not gguf_file and not (p / "config.json").is_file():
            raise ConfigError(f"{model}: neither a run directory (no final/config.json) nor a "
                              "model directory (no config.json); for GGUF pass --gguf-file")
        return str(p.resolve()), gguf_file, Path(gguf_file).stem if gguf_file else p.resolve().name
    if p.exists() or looks_local(model):
        raise ConfigError(f"model path not found: {model}{did_you_mean(model)}")
    return model, gguf_file, Path(gguf_file).stem if gguf_file else model.rsplit("/", 1)[-1]


def batch_seed(seed: int, prompt_ids: list[str]) -> int:
    """The RNG seed of one batch: a hash of (seed, its prompt ids), so that it does not depend
    on which batches ran before (resume) or on the process."""
    digest = hashlib.sha256(json.dumps([seed, prompt_ids]).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _write_json(path: Path, obj: Any) -> None:
    """Atomic write (a kill leaves the old file or the new one, never half of one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _check_meta(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    for key in COMPARED:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "gen" and isinstance(a, dict):
            sub = next(k for k in sorted({*a, *b}) if a.get(k) != b.get(k))
            key, a, b = f"gen.{sub}", a.get(sub), b.get(sub)
        if key == "prompt_set":
            what = f"a different prompt set (sha256 {str(a)[:12]}…, now {str(b)[:12]}…)"
        elif key == "weights":  # same path, new weights: a retrained or extended run
            what = (f"other weights (fingerprint {short(a)}, the model now has {short(b)}; "
                    "it was trained again)" if a else "weights it did not record")
        else:
            what = f"{key}={a!r} (now {b!r})"
        raise ConfigError(f"{out} was generated with {what}; pass --overwrite to replace it or "
                          "choose another --out")


def _version() -> str:
    try:
        return metadata.version("distalign")
    except metadata.PackageNotFoundError:
        return "unknown"


def _rows(batch: list[Prompt], roll: Any, tok: Any, generator: str,
          done: set[tuple[str, int]], recorded: bool = False) -> list[dict[str, Any]]:
    """The missing rows of one batch (the Rollout is sample-major: row r = sample r // B)."""
    responses = roll.responses.cpu()
    # only the HF sampler's are ln π at the sampling temperature (vLLM reports its own kind)
    logprobs = roll.logprobs.double().cpu() if recorded and roll.logprobs is not None else None
    lengths, ended = roll.response_lengths.cpu().tolist(), roll.ended.cpu().tolist()
    rows = []
    for r in range(responses.shape[0]):
        sample, b = divmod(r, len(batch))
        p = batch[b]
        if (p.prompt_id, sample) in done:
            continue
        out_ids = responses[r, : lengths[r]].tolist()
        rows.append({
            "prompt_id": p.prompt_id, "prompt": p.prompt,
            "output": tok.decode(out_ids, skip_special_tokens=True),
            "reference": p.reference, "generator": generator, "sample": sample,
            "num_tokens": len(out_ids), "ended": bool(ended[r]),
            "prompt_token_ids": p.token_ids, "output_token_ids": out_ids,
        })
        if logprobs is not None:  # ln π_T(y|x), summed over the response (EOS included)
            rows[-1]["output_logprob"] = float(logprobs[r, : lengths[r]].sum())
    return rows


def write_model_outputs(out: Path, pset: PromptSet, generator: str) -> Path:
    """AlpacaEval's ``model_outputs.json`` (instruction, output, generator, dataset) next to
    ``out``: sample 0 of every prompt, in the data's order."""
    first = {r["prompt_id"]: r["output"] for r in read_generations(out) if int(r["sample"]) == 0}
    dataset = Path(pset.source).name.split(".")[0] or pset.source
    records = [{"instruction": p.prompt, "output": first[p.prompt_id], "generator": generator,
                "dataset": p.dataset or dataset} for p in pset.prompts]
    path = out.with_name(MODEL_OUTPUTS)
    _write_json(path, records)
    return path


def generate(model: str, prompts: str, out: str | Path, *, fmt: str = "auto",
             gguf_file: str | None = None, limit: int | None = None,
             gen: GenerationConfig | None = None, num_samples: int = 1, seed: int = 0,
             batch_size: int = 16, max_prompt_length: int | None = None,
             generator: str | None = None, alpaca_eval: bool = False, progress: bool = True,
             dtype: str = "float32", chat_template: bool | None = None,
             overwrite: bool = False) -> Path:
    """Sample ``num_samples`` responses per prompt of ``prompts`` into ``out`` (JSONL) and its
    sidecar; resumes a partial ``out`` written with the same settings. Returns ``out``."""
    out, gen = Path(out), gen or GenerationConfig()
    if num_samples < 1 or batch_size < 1:
        raise ConfigError(f"need --num-samples >= 1 and --batch-size >= 1, got {num_samples} "
                          f"and {batch_size}")
    model_path, gguf_file, default_name = resolve_model(model, gguf_file)
    with file_lock(out):  # one writer per generations file
        return _generate_locked(
            model, model_path, gguf_file, default_name, prompts, Path(out), gen, fmt=fmt,
            limit=limit, num_samples=num_samples, seed=seed, batch_size=batch_size,
            max_prompt_length=max_prompt_length, generator=generator, alpaca_eval=alpaca_eval,
            progress=progress, dtype=dtype, chat_template=chat_template, overwrite=overwrite)


def _generate_locked(model: str, model_path: str, gguf_file: str | None, default_name: str,
                     prompts: str, out: Path, gen: GenerationConfig, *, fmt: str,
                     limit: int | None, num_samples: int, seed: int, batch_size: int,
                     max_prompt_length: int | None, generator: str | None, alpaca_eval: bool,
                     progress: bool, dtype: str, chat_template: bool | None,
                     overwrite: bool) -> Path:
    mcfg = ModelConfig(name_or_path=model_path, gguf_file=gguf_file, dtype=dtype)
    tok = load_tokenizer(mcfg)
    sampler = make_sampler(gen, tok)  # validates the gen settings before the model loads
    if isinstance(sampler, HFSampler):
        sampler.record_logprobs = True  # eval's KL(π‖π₀) reuses them (one forward saved)
    pset = load_prompt_set(prompts, tok, fmt=fmt, limit=limit,
                           max_prompt_length=max_prompt_length, chat_template=chat_template)
    generator = generator or default_name
    meta = {
        "model": model, "model_path": model_path, "gguf_file": gguf_file,
        "weights": weights_fingerprint(model_path, gguf_file),
        "tokenizer_path": model_path, "dtype": dtype, "generator": generator,
        "prompts": prompts, "format": pset.format, "prompt_set": pset.digest,
        "num_prompts": len(pset.prompts), "num_samples": num_samples, "seed": seed,
        "chat_template": pset.chat_template, "max_prompt_length": max_prompt_length,
        "gen": {k: v for k, v in asdict(gen).items() if k in SAMPLING_FIELDS},
        "gen_engine": {k: v for k, v in asdict(gen).items() if k not in SAMPLING_FIELDS},
        "batch_size": batch_size, "truncated_prompts": pset.truncated,
        "distalign_version": _version(),
    }
    meta_path = sidecar_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in (out, meta_path, out.with_name(MODEL_OUTPUTS)):
            path.unlink(missing_ok=True)
    torn = 0
    if out.exists() and out.stat().st_size > 0:
        if not meta_path.is_file():
            raise ConfigError(f"{out} exists without its sidecar {meta_path.name}, so its "
                              "settings are unknown; pass --overwrite to replace it")
        _check_meta(out, json.loads(meta_path.read_text(encoding="utf-8")), meta)
        torn = cut_torn_line(out)
    done = {(str(r["prompt_id"]), int(r["sample"])) for r in
            (read_generations(out) if out.exists() else [])}
    _write_json(meta_path, meta)

    ps = pset.prompts
    order = sorted(range(len(ps)), key=lambda i: -len(ps[i].token_ids or []))  # stable
    batches = [[ps[i] for i in order[s : s + batch_size]] for s in range(0, len(ps), batch_size)]
    todo = [b for b in batches
            if any((p.prompt_id, j) not in done for p in b for j in range(num_samples))]
    bar = StepProgress("generate", total=len(batches), completed=len(batches) - len(todo),
                       enabled=progress)
    with bar:
        cut = (f", {pset.truncated} cut to --max-prompt-length={max_prompt_length}"
               if max_prompt_length else "")
        bar.note(f"prompts {pset.source} (format={pset.format}): {len(ps)} prompts{cut}; "
                 f"{len(done)} rows already in {out}"
                 + (f" (dropped a torn last line of {torn} bytes)" if torn else ""))
        if todo:
            try:
                _run(todo, batches, mcfg, tok, sampler, out, meta, done, bar)
            finally:  # interrupted before the first batch: leave no empty file behind
                if out.exists() and out.stat().st_size == 0:
                    out.unlink()
                    meta_path.unlink(missing_ok=True)
    if alpaca_eval or pset.format == "alpaca_eval":
        write_model_outputs(out, pset, generator)
    return out


def _run(todo: list[list[Prompt]], batches: list[list[Prompt]], mcfg: ModelConfig, tok: Any,
         sampler: Any, out: Path, meta: dict[str, Any], done: set[tuple[str, int]],
         bar: StepProgress) -> None:
    """Load π and generate the batches in ``todo``, appending rows per batch."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bar.note(f"loading {mcfg.name_or_path}"  # silent for a while (a GGUF: ~20 s on a CPU)
             + (f" (de-quantising {mcfg.gguf_file})" if mcfg.gguf_file else "")
             + f"; then {len(todo)} batches: progress shows after each batch")
    policy = load_policy(mcfg).to(device).eval()
    devices = [device.index or 0] if device.type == "cuda" else []
    new_rows = new_tokens = not_ended = 0
    with out.open("a", encoding="utf-8") as f:
        for k, batch in enumerate(todo):
            ids, attn = pad_sequences([p.token_ids or [] for p in batch], tok.pad_token_id, "left")
            with torch.random.fork_rng(devices=devices):  # leave the caller's RNG untouched
                torch.manual_seed(batch_seed(meta["seed"], [p.prompt_id for p in batch]))
                roll = sampler.generate(policy, ids.to(device), attn.to(device),
                                        meta["num_samples"])
            rows = _rows(batch, roll, tok, meta["generator"], done,
                         getattr(sampler, "record_logprobs", False))
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
            new_rows += len(rows)
            new_tokens += sum(r["num_tokens"] for r in rows)
            not_ended += sum(not r["ended"] for r in rows)
            bar.update(len(batches) - len(todo) + k + 1, info=f"rows={new_rows} "
                       f"tokens={new_tokens}")
    bar.note(f"wrote {new_rows} rows to {out} ({new_tokens} tokens; {not_ended} without EOS)")
