"""Prompt sets for evaluation: read a file (or hub dataset), pick the prompt and reference of
each row, and render the prompt to the token ids the policy is fed.

Formats (``auto`` picks the first whose columns are present):

* ``prompt``: a ``prompt`` column, plain text or a conversation (``{role, content}`` list,
  rendered with the chat template); the reference is ``reference``, else TRL's ``chosen``.
* ``alpaca_eval``: AlpacaEval's ``instruction`` column (rendered as one user turn with the chat
  template when the tokenizer has one); the reference is ``reference``, else ``output``.
* ``hh``: Anthropic HH ``chosen`` dialogues; the prompt is the text up to and including the
  last ``"\\n\\nAssistant:"`` and the reference is the chosen reply after it.
* ``messages``: a conversation; a final assistant message is the reference, the rest the prompt.

Token ids come from :func:`distalign.lm.data.prepare` (kind ``prompts``), so evaluation feeds
exactly the ids that training's sampler sees for the same prompt. Overlong prompts are
truncated from the left (a leading BOS kept) and counted, as in training.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distalign.errors import ConfigError, DataError
from distalign.lm.data import HH_ASSISTANT, DataConfig, load_rows, prepare, split_hh
from distalign.lm.sources import did_you_mean, looks_local, parse_source

FORMATS = ("auto", "prompt", "alpaca_eval", "hh", "messages")
_ID_COLUMNS = ("id", "prompt_id")
# Prompt lengths are unbounded unless max_prompt_length is given (DataConfig needs a bound).
_NO_LIMIT = 10**9


@dataclass
class Prompt:
    """One prompt of the set: its id, text for humans/judges, reference reply and token ids."""

    prompt_id: str
    prompt: str  # as a judge reads it (last user message of a conversation)
    reference: str | None
    dataset: str | None  # AlpacaEval's ``dataset`` column, when present
    render: str | list[dict[str, Any]]  # what is tokenised: text, or messages (chat template)
    token_ids: list[int] | None = None


@dataclass
class PromptSet:
    source: str
    format: str  # the resolved format
    prompts: list[Prompt]
    chat_template: bool  # whether any prompt was rendered with the chat template
    truncated: int = 0  # prompts cut to max_prompt_length

    @property
    def digest(self) -> str:
        return prompt_set_digest((p.prompt_id, p.prompt) for p in self.prompts)


def prompt_set_digest(pairs: Any) -> str:
    """sha256 hex over the sorted ``(prompt_id, prompt)`` pairs, serialised as a JSON list of
    ``[id, prompt]`` lists (``ensure_ascii=False``, UTF-8): order-free and cheap to recompute."""
    blob = json.dumps(sorted([str(i), str(p)] for i, p in pairs), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- reading rows
def _open_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.lower().endswith(".gz") else data


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} line {lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                        f"{e.start + 1})") from e


def _read_jsonl(path: Path, data: bytes, limit: int | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if limit is not None and len(rows) >= limit:
            break
        text = _decode_line(raw, path, lineno).strip()
        if not text:
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}: bad JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(row, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object, got "
                            f"{type(row).__name__}")
        rows.append(row)
    return rows


def _read_json(path: Path, data: bytes, limit: int | None) -> list[dict[str, Any]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {lineno}: not UTF-8 (byte 0x{data[e.start]:02x})") from e
    if text.lstrip().startswith("{"):  # JSON Lines under a .json name (as HF writes them)
        return _read_jsonl(path, data, limit)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: bad JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
    rows = rows[:limit] if limit is not None else rows
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {i}: expected a JSON object, got {type(row).__name__}")
    return rows


def read_rows(source: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a .json/.jsonl[.gz] file (read here, so errors carry line numbers), a parquet or
    csv file, or a hub dataset ``NAME`` / ``NAME:SPLIT`` (the parser of ``data.path``)."""
    path = Path(source)
    name = path.name.lower().removesuffix(".gz")
    where = parse_source(source)[0]
    if not os.path.exists(where) and looks_local(where):  # a typo: no hub round trip for it
        raise DataError(f"prompts file not found: {where}{did_you_mean(where)}")
    if name.endswith((".json", ".jsonl")) and path.is_file():
        data = _open_bytes(path)
        return (_read_jsonl if name.endswith(".jsonl") else _read_json)(path, data, limit)
    return load_rows(DataConfig(path=source, max_rows=limit)).to_list()


# ------------------------------------------------------------------------ picking columns
def detect_format(rows: list[dict[str, Any]], source: str) -> str:
    cols = set(rows[0])
    if "prompt" in cols:
        return "prompt"
    if "instruction" in cols:
        return "alpaca_eval"
    if "chosen" in cols and isinstance(rows[0]["chosen"], str):
        return "hh"
    if "messages" in cols:
        return "messages"
    raise DataError(f"{source}: no prompt column; found columns {sorted(cols)}; expected "
                    "'prompt', 'instruction' (alpaca_eval), 'chosen' HH dialogues (hh) or "
                    "'messages'")


def _messages(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} messages")
    out = []
    for j, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise DataError(f"{where} message {j}: needs string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _last_user(messages: list[dict[str, Any]]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def _text(value: Any, where: str) -> str | None:
    """A reference: text, or the last message of a conversation (TRL's conversational chosen)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, where)[-1]["content"]
    raise DataError(f"{where}: expected text, got {type(value).__name__}")


def _field(row: dict[str, Any], name: str, where: str) -> Any:
    if name not in row:
        raise DataError(f"{where}: missing field {name!r} (found {sorted(row)})")
    return row[name]


def _extract(row: dict[str, Any], fmt: str, where: str, template: bool | None):
    """(display prompt, what to render, reference) of one row in format ``fmt``."""
    ref = row.get("reference")
    if fmt == "prompt":
        value = _field(row, "prompt", where)
        if ref is None and "chosen" in row:
            ref = row["chosen"]
        if isinstance(value, str):
            render = [{"role": "user", "content": value}] if template else value
            return value, render, _text(ref, f"{where} field 'chosen'")
        msgs = _messages(value, f"{where} field 'prompt'")
        return _last_user(msgs), msgs, _text(ref, f"{where} field 'chosen'")
    if fmt == "alpaca_eval":
        value = _field(row, "instruction", where)
        if not isinstance(value, str):
            raise DataError(f"{where} field 'instruction': expected text")
        ref = ref if ref is not None else row.get("output")
        render = [{"role": "user", "content": value}] if template else value
        return value, render, _text(ref, f"{where} field 'output'")
    if fmt == "hh":
        chosen = _field(row, "chosen", where)
        if not isinstance(chosen, str) or HH_ASSISTANT not in chosen:
            raise DataError(f"{where} field 'chosen': not text with a {HH_ASSISTANT!r} turn (hh)")
        prompt, reply = split_hh(chosen)
        return prompt, prompt, reply if ref is None else _text(ref, f"{where} field 'reference'")
    msgs = _messages(_field(row, "messages", where), f"{where} field 'messages'")
    if msgs[-1]["role"] == "assistant" and len(msgs) > 1:
        ref, msgs = ref if ref is not None else msgs[-1]["content"], msgs[:-1]
    return _last_user(msgs), msgs, _text(ref, f"{where} field 'reference'")


def _prompt_id(row: dict[str, Any], i: int, where: str) -> str:
    for col in _ID_COLUMNS:
        if col in row:
            if row[col] is None or str(row[col]).strip() == "":
                raise DataError(f"{where}: field {col!r} is empty")
            return str(row[col])
    return str(i)


def load_prompt_set(source: str, tokenizer: Any, *, fmt: str = "auto", limit: int | None = None,
                    max_prompt_length: int | None = None,
                    chat_template: bool | None = None) -> PromptSet:
    """The first ``limit`` prompts of ``source`` with their token ids.

    ``chat_template=None`` renders conversations and AlpacaEval instructions with the
    tokenizer's chat template when it has one and plain prompts as they are; ``True`` renders
    every prompt as a user turn; ``False`` renders instructions as plain text.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ConfigError(f"--max-prompt-length must be >= 1, got {max_prompt_length}")
    rows = read_rows(source, limit)
    if not rows:
        raise DataError(f"{source}: no rows (empty file)")
    fmt = detect_format(rows, source) if fmt == "auto" else fmt
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has_template:
        raise ConfigError("--chat-template: the tokenizer has no chat template")
    # plain prompts stay plain unless asked; instructions use the template when there is one
    template = has_template if chat_template is None and fmt == "alpaca_eval" else chat_template
    prompts, seen = [], {}
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        display, render, ref = _extract(row, fmt, where, template)
        if isinstance(render, list) and not has_template:
            raise DataError(f"{where}: a conversation prompt needs a tokenizer with a chat "
                            "template")
        if isinstance(render, list) and chat_template is False:
            raise ConfigError(f"{where}: a conversation prompt cannot be rendered without the "
                              "chat template (drop --no-chat-template)")
        if not display.strip():
            raise DataError(f"{where}: the prompt is empty")
        pid = _prompt_id(row, i, where)
        if pid in seen:
            raise DataError(f"{where}: duplicate prompt id {pid!r} (also row {seen[pid]})")
        seen[pid] = i
        dataset = row.get("dataset") if isinstance(row.get("dataset"), str) else None
        prompts.append(Prompt(pid, display, ref, dataset, render))
    kinds = [isinstance(p.render, list) for p in prompts]
    if any(kinds) and not all(kinds):
        raise DataError(f"{source} row {kinds.index(not kinds[0])}: mixes a plain-text prompt "
                        f"and conversations (row 0 is {'a conversation' if kinds[0] else 'text'})")
    pset = PromptSet(source, fmt, prompts, any(kinds))
    _tokenise(pset, tokenizer, max_prompt_length)
    return pset


def _tokenise(pset: PromptSet, tokenizer: Any, max_prompt_length: int | None) -> None:
    import datasets
    from datasets import Dataset

    limit = max_prompt_length or _NO_LIMIT
    cfg = DataConfig(path=pset.source, format="prompt", max_prompt_length=limit,
                     max_length=limit + 1, on_overlong="truncate", on_empty="error")
    # one column type per Dataset: texts and conversations are never mixed within a set
    ds = Dataset.from_dict({"prompt": [p.render for p in pset.prompts]})
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a bar for a quick tokenisation is noise in a log file
    try:
        out, report = prepare(ds, tokenizer, cfg, "prompts", source=pset.source)
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    for p, ids in zip(pset.prompts, out["prompt_ids"], strict=True):
        p.token_ids = [int(t) for t in ids]
    pset.truncated = report.truncated.get("prompt", 0)
