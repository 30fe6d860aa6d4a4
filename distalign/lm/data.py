"""Datasets for alignment: load, validate and tokenise preference, prompt and SFT rows.

:func:`load_rows` (hub name, dir, or .json/.jsonl/.parquet/.csv[.gz] file) → :func:`prepare`
(validate, tokenise) → id columns that :mod:`distalign.lm.collators` pads. ``kind`` is what a
method consumes: ``pairs`` (a ≻ b | x for PMLE/DPO, preference model (2)/(3)), ``prompts``
(online methods sample from x) or ``sft`` (x, y). Columns follow TRL, as text or conversational
(``{"role", "content"}`` lists, rendered with the chat template). Rows in messages are counted
from 1 in the loaded file or split (with the line of a JSON Lines file, also from 1); skips and
truncations are counted by reason in the :class:`DataReport`, never silent. Policies:

* ``chosen == rejected`` is skipped (``identical``, ``identical_after_truncation``): the paper's
  model gives P(a ≻ a) = ½, so the label says nothing and the pair's PMLE/DPO gradient is zero;
  kept, it would only dilute batch means. Transcript pairs whose prompts differ (5 HH-RLHF
  harmless test rows) are skipped as ``prompt_mismatch``: there is no common x.
* Prompt and response are tokenised separately: the split is exact by construction and the
  prompt ids are those the sampler sees. With ``add_eos`` a response ends in one EOS; template
  text after the final EOS (e.g. a newline) is dropped, as generation stops at EOS.
* Prompt truncation keeps a leading BOS and the last tokens; responses are cut from the right.
* ``tokens`` rows carry the ids themselves (``prompt_ids``, ``chosen_ids``, ``rejected_ids``):
  used as given, no template and no EOS added (a sampled reply keeps exactly the ids it was
  sampled as); ids outside the vocabulary are an error naming the row. ``auto`` prefers them.
* A text prompt with whole-conversation responses (TRL's UltraFeedback layout) is read as the
  conversation form: the shared user turn, which must be the prompt's text, is the prompt.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset, Features, Sequence, Value
from omegaconf import MISSING

from distalign.errors import ConfigError, DataError
from distalign.lm.datafiles import builder_for as _builder_for
from distalign.lm.datafiles import check_columns, load_rows, missing_fields, row_lines
from distalign.lm.rows import HH_ASSISTANT, OUT, RowEncoder, split_hh
from distalign.lm.sources import parse_source

__all__ = ["FORMATS", "HH_ASSISTANT", "DataConfig", "DataReport", "build_dataset",
           "build_eval_dataset", "eval_dataset_and_report", "load_rows", "prepare", "split_hh"]

logger = logging.getLogger(__name__)

FORMATS = ("auto", "preference", "prompt", "sft", "hh", "tokens")
_CHOICES = {"format": FORMATS, "on_overlong": ("error", "skip", "truncate"),
            "on_empty": ("error", "skip")}
# exact token ids win over the text beside them (a tilted world's pairs: a reply cut at L has
# no EOS, and re-tokenising its text with one appended would train on another reply)
_AUTO = [("tokens", ("prompt_ids", "chosen_ids", "rejected_ids")),
         ("preference", ("prompt", "chosen", "rejected")), ("hh", ("chosen", "rejected")),
         ("sft", ("prompt", "completion")), ("sft", ("messages",)), ("prompt", ("prompt",))]
# Columns read per (format, kind), by preference; absent = incompatible. The first holds the
# prompt ("prompt", "messages", or transcripts sharing it as a prefix); the rest are responses.
_LAYOUTS: dict[tuple[str, str], list[tuple[str, ...]]] = {
    ("preference", "pairs"): [("prompt", "chosen", "rejected"), ("chosen", "rejected")],
    ("preference", "prompts"): [("prompt",), ("chosen",)],
    ("preference", "sft"): [("prompt", "chosen"), ("chosen",)],
    ("hh", "pairs"): [("chosen", "rejected")], ("hh", "prompts"): [("chosen",)],
    ("hh", "sft"): [("chosen",)], ("prompt", "prompts"): [("prompt",)],
    ("tokens", "pairs"): [("prompt_ids", "chosen_ids", "rejected_ids")],
    ("tokens", "prompts"): [("prompt_ids",)],
    ("sft", "prompts"): [("prompt",), ("messages",)],
    ("sft", "sft"): [("prompt", "completion"), ("messages",), ("prompt", "chosen")],
}


@dataclass
class DataConfig:
    """Where the rows come from and how they become token ids (``data.*`` in a run config)."""

    # HF hub dataset NAME or NAME:SPLIT (as `generate --prompts`), a local dir, or a
    # .json/.jsonl/.parquet/.csv[.gz] file
    path: str = MISSING
    split: str = "train"  # split to train on (a single local file only has "train")
    # the hub dataset's config (`load_dataset(path, name=subset)`, e.g. "en"), for data.path
    # only; the one way to give it (a path is NAME or NAME:SPLIT, never NAME:SUBSET:SPLIT)
    subset: str | None = None
    eval_path: str | None = None  # separate eval data (hub NAME or NAME:SPLIT, dir or file)
    eval_split: str | None = None  # eval split of eval_path (default "test") or else of path
    eval_fraction: float = 0.0  # hold out this fraction of the train rows (seeded) for eval
    format: str = "auto"  # auto | preference | prompt | sft | hh (Anthropic HH transcripts)
    max_prompt_length: int = 512  # prompt tokens
    max_length: int = 1024  # prompt + response tokens
    on_overlong: str = "truncate"  # error | skip | truncate (prompt from the left, then response)
    on_empty: str = "error"  # error | skip, for empty or null fields
    max_rows: int | None = None  # read only the first N rows of each file/split
    seed: int = 0  # seed of the eval_fraction split
    num_proc: int | None = None  # worker processes for tokenisation
    add_eos: bool = True  # end every response with the tokenizer's EOS token
    columns: dict[str, str] = field(default_factory=dict)  # our name -> file column (TRL-style)

    def __post_init__(self) -> None:
        self.validate(require_path=False)

    def validate(self, require_path: bool = True) -> None:
        """Raise ConfigError naming the first invalid field."""
        for name, allowed in _CHOICES.items():
            if (value := getattr(self, name)) not in allowed:
                raise ConfigError(f"data.{name}={value!r}: expected one of {', '.join(allowed)}")
        if require_path and self.path in (None, "", MISSING):
            raise ConfigError("data.path is required (a hub dataset name or a local file)")
        if not 1 <= self.max_prompt_length < self.max_length:
            raise ConfigError(f"data.max_prompt_length={self.max_prompt_length} must be >= 1 and "
                              f"< data.max_length={self.max_length} (responses need room)")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} must be in [0, 1)")
        if self.eval_fraction > 0 and (self.eval_path or self.eval_split):
            raise ConfigError("data.eval_fraction cannot be combined with eval_path/eval_split")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"data.max_rows={self.max_rows} must be >= 1")
        check_columns(self.columns)
        self._split_sources()

    def _split_sources(self) -> None:
        """Move a ``:SPLIT`` of ``path`` / ``eval_path`` into ``split`` / ``eval_split``."""
        for key, split_key, default in (("path", "split", "train"),
                                        ("eval_path", "eval_split", None)):
            value = getattr(self, key)
            if not isinstance(value, str) or value in ("", MISSING):
                continue
            name, split = parse_source(value)
            if split is None:
                continue
            if getattr(self, split_key) not in (default, split):
                raise ConfigError(f"data.{key}={value!r} names split {split!r} but "
                                  f"data.{split_key}={getattr(self, split_key)!r}; give one")
            setattr(self, key, name)
            setattr(self, split_key, split)


@dataclass
class DataReport:
    """What :func:`prepare` did to the rows: nothing is dropped without being counted here."""

    source: str
    kind: str
    format: str
    rows_read: int = 0
    rows_kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    truncated: dict[str, int] = field(default_factory=dict)  # "prompt"/"response" -> rows
    examples: dict[str, list[int]] = field(default_factory=dict)  # reason -> first rows (from 1)

    def summary(self) -> str:
        """One line for the run log."""
        line = (f"data {self.source} (format={self.format}, kind={self.kind}): "
                f"{self.rows_read} rows read, {self.rows_kept} kept")
        if self.skipped:
            parts = [f"{k}={v} (e.g. row {self.examples[k][0]})" for k, v in self.skipped.items()]
            line += f"; skipped {sum(self.skipped.values())}: {', '.join(sorted(parts))}"
        if self.truncated:
            line += "; truncated rows: " + ", ".join(f"{k}={v}" for k, v in self.truncated.items())
        return line


def _layout(ds: Dataset, cfg: DataConfig, kind: str, source: str) -> tuple[str, tuple[str, ...]]:
    """(format, columns to read) for ``kind``, or a DataError listing found/expected columns."""
    cols, fmt = sorted(ds.column_names), cfg.format
    if fmt == "auto":  # TRL's column names decide; bare chosen/rejected text is HH transcripts
        fmt = next((f for f, need in _AUTO if set(need) <= set(cols)), None)
        if fmt == "hh" and not isinstance(ds[0]["chosen"], str):
            fmt = "preference"  # conversational chosen/rejected with an implicit prompt
        if fmt is None:
            raise DataError(f"{source}: cannot infer data.format from columns {cols}; expected "
                            + ", ".join(f"{'/'.join(n)} ({f})" for f, n in _AUTO))
    options = _LAYOUTS.get((fmt, kind))
    if options is None:
        raise DataError(f"{source}: format {fmt!r} has no responses to build kind {kind!r} "
                        f"from (columns: {cols})")
    layout = next((o for o in options if set(o) <= set(cols)), None)
    if layout is None:
        raise DataError(f"{source}: missing column(s) {sorted(set(options[0]) - set(cols))} for "
                        f"format {fmt!r}, kind {kind!r}; found columns: {cols}; expected: "
                        + " or ".join("/".join(o) for o in options))
    return fmt, layout


def prepare(ds: Dataset, tokenizer: Any, cfg: DataConfig, kind: str, *, source: str | None = None,
            row_ids: list[int] | None = None,
            missing: dict[int, frozenset[str]] | None = None,
            lines: list[int] | None = None) -> tuple[Dataset, DataReport]:
    """Validate and tokenise raw rows into the id columns of ``kind``: ``pairs`` → ``prompt_ids``,
    ``chosen_ids``, ``rejected_ids``; ``prompts`` → ``prompt_ids``; ``sft`` → ``prompt_ids``,
    ``completion_ids`` (response ids include the EOS). ``source`` names the data in messages;
    ``row_ids[k]`` is the file row number of ``ds[k]`` when ``ds`` is a subset; ``missing`` maps
    file row numbers to the keys they lack (:func:`distalign.lm.datafiles.missing_fields`) and
    ``lines`` to their lines in a JSON Lines file (:func:`distalign.lm.datafiles.row_lines`)."""
    if kind not in OUT:
        raise ConfigError(f"unknown data kind {kind!r}: expected one of {', '.join(OUT)}")
    cfg.validate(require_path=False)
    source = source or (cfg.path if cfg.path not in (None, MISSING) else "<dataset>")
    if len(ds) == 0:
        raise DataError(f"{source}: the dataset has no rows")
    fmt, layout = _layout(ds, cfg, kind, source)
    if cfg.add_eos and kind != "prompts" and fmt != "tokens" and tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos_token; set one or set data.add_eos=false")
    # Skips travel as a column rather than a counter so that they survive num_proc workers.
    features = {c: Sequence(Value("int32")) for c in OUT[kind]}
    features |= {"_skip": Value("string"), "_trunc": Value("string")}
    encoder = RowEncoder(tokenizer, cfg, fmt, kind, layout, source, row_ids, missing or {}, lines)
    out = ds.map(encoder, with_indices=True, remove_columns=ds.column_names, num_proc=cfg.num_proc,
                 features=Features(features), desc=f"tokenising {kind}")
    report = DataReport(source=source, kind=kind, format=fmt, rows_read=len(ds))
    report.truncated = dict(Counter(t for x in out["_trunc"] for t in x.split(",") if t))
    skips = list(out["_skip"])
    report.skipped = dict(Counter(filter(None, skips)))
    for k, reason in enumerate(skips):
        if reason and len(report.examples.setdefault(reason, [])) < 3:
            report.examples[reason].append((int(row_ids[k]) if row_ids is not None else k) + 1)
    if report.skipped:
        out = out.filter(lambda s: s == "", input_columns="_skip", num_proc=cfg.num_proc)
    out = out.remove_columns(["_skip", "_trunc"])
    report.rows_kept = len(out)
    if report.rows_kept == 0:
        raise DataError(f"{source}: every row was skipped ({report.summary()})")
    return out, report


def _load(cfg: DataConfig, path: str, split: str, part: str | None):
    """Rows of (path, split), their file row numbers and a name for messages. ``part`` picks
    "train" or "eval" of the seeded ``eval_fraction`` split (disjoint, file order kept)."""
    ds, row_ids = load_rows(cfg, split, path=path), None
    if part is not None:
        n, n_eval = len(ds), max(1, round(len(ds) * cfg.eval_fraction))
        if n_eval >= n:
            raise ConfigError(f"data.eval_fraction={cfg.eval_fraction} leaves no train rows of {n}")
        perm = np.random.default_rng(cfg.seed).permutation(n)
        row_ids = sorted((perm[:n_eval] if part == "eval" else perm[n_eval:]).tolist())
        ds = ds.select(row_ids)
    return ds, row_ids, (path if _builder_for(path) is not None else f"{path}[{split}]")


def build_dataset(cfg: DataConfig, tokenizer: Any, kind: str,
                  split: str | None = None) -> tuple[Dataset, DataReport]:
    """Training rows of ``cfg`` (split ``split`` or ``cfg.split``), minus the ``eval_fraction``
    hold-out, tokenised for ``kind``. The engine logs ``report.summary()``."""
    cfg.validate()
    split = split or cfg.split
    part = "train" if cfg.eval_fraction > 0 and split == cfg.split else None
    ds, row_ids, source = _load(cfg, cfg.path, split, part)
    return prepare(ds, tokenizer, cfg, kind, source=source, row_ids=row_ids,
                   missing=missing_fields(cfg.path, cfg.columns), lines=row_lines(cfg.path))


def build_eval_dataset(cfg: DataConfig, tokenizer: Any, kind: str) -> Dataset | None:
    """Eval rows or None. In order: ``eval_path`` (split ``eval_split``, default "test"; a file
    is used whole), ``eval_split`` of ``path``, or the seeded ``eval_fraction`` hold-out (disjoint
    from :func:`build_dataset`'s rows). Its report summary is logged here."""
    out, report = eval_dataset_and_report(cfg, tokenizer, kind)
    if report is not None:
        (logger.warning if report.skipped else logger.info)(report.summary())
    return out


def eval_dataset_and_report(cfg: DataConfig, tokenizer: Any,
                            kind: str) -> tuple[Dataset | None, DataReport | None]:
    """:func:`build_eval_dataset` with its :class:`DataReport` (for the run's summary)."""
    cfg.validate()
    if cfg.eval_path:  # a single file has only "train"; a hub dataset or dir defaults to "test"
        file_split = "train" if _builder_for(cfg.eval_path) else "test"
        args = (cfg.eval_path, cfg.eval_split or file_split, None)
    elif cfg.eval_split:
        args = (cfg.path, cfg.eval_split, None)
    elif cfg.eval_fraction > 0:
        args = (cfg.path, cfg.split, "eval")
    else:
        return None, None
    ds, row_ids, source = _load(cfg, *args)
    return prepare(ds, tokenizer, cfg, kind, source=f"eval {source}", row_ids=row_ids,
                   missing=missing_fields(args[0], cfg.columns), lines=row_lines(args[0]))
