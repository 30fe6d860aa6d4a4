"""One raw row → token ids: the validation and tokenisation that :func:`distalign.lm.data.prepare`
maps over a dataset (see that module for the policies). Row and line numbers in messages count
from 1, like an editor's.
"""

from __future__ import annotations

from typing import Any

from distalign.errors import DataError

HH_ASSISTANT = "\n\nAssistant:"
OUT = {"pairs": ("prompt_ids", "chosen_ids", "rejected_ids"), "prompts": ("prompt_ids",),
        "sft": ("prompt_ids", "completion_ids")}


def split_hh(text: str) -> tuple[str, str]:
    """Split an Anthropic HH transcript at its last ``"\\n\\nAssistant:"`` into (prompt, response),
    with ``prompt + response == text``; ValueError when there is no assistant turn."""
    cut = text.rindex(HH_ASSISTANT) + len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def where(i: int, lines: list[int] | None = None) -> str:
    """``row N`` for the 0-based index ``i``, counted from 1 like lines, with the line of a
    JSON Lines file when known: ``row 3 (line 4)`` after a blank line."""
    line = f" (line {lines[i]})" if lines is not None and i < len(lines) else ""
    return f"row {i + 1}{line}"


class Skip(Exception):
    """Raised inside a row to skip it; ``args[0]`` is the reason counted in the report."""


class RowEncoder:
    """Validates and tokenises one raw row: a picklable callable for ``Dataset.map``."""

    def __init__(self, tokenizer: Any, cfg: Any, fmt: str, kind: str, layout: tuple[str, ...],
                 source: str, row_ids: list[int] | None, missing: dict[int, frozenset[str]],
                 lines: list[int] | None = None) -> None:
        self.tok, self.cfg, self.fmt, self.kind = tokenizer, cfg, fmt, kind
        self.layout, self.source, self.row_ids = layout, source, row_ids
        self.missing = missing  # row -> keys absent from the file (not null: absent)
        self.lines = lines  # row -> its line in a JSON Lines file
        # ids the tokenizer puts before plain text (BOS for Llama, none for GPT-2): located as
        # the bare encoding's offset inside the full one, so a trailing EOS is never taken
        full, bare = (tokenizer("a", add_special_tokens=a)["input_ids"] for a in (True, False))
        starts = [s for s in range(len(full) - len(bare) + 1) if full[s : s + len(bare)] == bare]
        self.prefix = list(full[: starts[0]]) if starts else []
        self.eos, self.bos = tokenizer.eos_token_id, tokenizer.bos_token_id

    def __call__(self, row: dict[str, Any], idx: int) -> dict[str, Any]:
        i = int(self.row_ids[idx]) if self.row_ids is not None else idx
        try:
            absent = [f for f in self.layout if f in self.missing.get(i, ())]
            if absent:  # not "empty": on_empty=skip would hide a broken file
                raise self._fail(i, f"field {absent[0]!r} is missing")
            if self.fmt == "tokens":
                return self._token_row(row, i)
            pfield, prompt, responses = self._extract(row, i)
            if isinstance(prompt, str) and any(isinstance(r, list) for _, r in responses):
                prompt, responses = self._strip_prompt_turn(prompt, responses, i)
            for f, v in [(pfield, prompt), *responses]:
                self._check(v, f, i)
                if isinstance(v, str) != isinstance(prompt, str):
                    raise self._fail(i, f"fields {pfield!r} and {f!r} mix text and message lists")
            if self.kind == "pairs" and responses[0][1] == responses[1][1]:
                raise Skip("identical")
            p_ids, r_ids = self._tokenise(prompt, responses, i)
            p_ids, r_ids, trunc = self._fit(pfield, p_ids, [f for f, _ in responses], r_ids, i)
            if self.kind == "pairs" and r_ids[0] == r_ids[1]:
                raise Skip("identical_after_truncation")
        except Skip as s:  # empty id lists keep the schema; the row is filtered out later
            return {**{c: [] for c in OUT[self.kind]}, "_skip": s.args[0], "_trunc": ""}
        ids = dict(zip(OUT[self.kind], [p_ids, *r_ids], strict=True))
        return {**ids, "_skip": "", "_trunc": ",".join(trunc)}

    def _token_row(self, row: dict[str, Any], i: int) -> dict[str, Any]:
        """A row of exact ids (format ``tokens``): checked, cut to the lengths, no EOS added."""
        ids = [self._id_list(row[f], f, i) for f in self.layout]
        p_ids, r_ids, trunc = self._fit(self.layout[0], ids[0], list(self.layout[1:]), ids[1:], i)
        if self.kind == "pairs" and r_ids[0] == r_ids[1]:
            raise Skip("identical")
        return {**dict(zip(OUT[self.kind], [p_ids, *r_ids], strict=True)), "_skip": "",
                "_trunc": ",".join(trunc)}

    def _id_list(self, value: Any, f: str, i: int) -> list[int]:
        vocab = len(self.tok)
        if not isinstance(value, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise self._fail(i, f"field {f!r} must be a list of token ids (format tokens)")
        if not value:
            if self.cfg.on_empty == "error":
                raise self._fail(i, f"field {f!r} is empty (set data.on_empty=skip to skip)")
            raise Skip(f"empty:{f}")
        bad = next((t for t in value if not 0 <= t < vocab), None)
        if bad is not None:
            raise self._fail(i, f"field {f!r} holds token id {bad}, outside the tokenizer's "
                             f"vocabulary of {vocab} (ids of another tokenizer?)")
        return list(value)

    def _fail(self, i: int, msg: str) -> DataError:
        return DataError(f"{self.source} {where(i, self.lines)}: {msg}")

    def _strip_prompt_turn(self, prompt: str, responses: list[tuple[str, Any]],
                           i: int) -> tuple[list[dict], list[tuple[str, Any]]]:
        """TRL's UltraFeedback layout: a text prompt, and responses that are whole
        conversations repeating it as their user turn. The shared turns (the prompt's, and any
        system message before it) become the prompt; each response keeps what follows."""
        heads, tails = [], []
        for f, r in responses:
            self._check(r, f, i)
            if not isinstance(r, list):
                raise self._fail(i, f"fields 'prompt' and {f!r} mix text and message lists")
            cut = next((k for k, m in enumerate(r) if m["role"] == "assistant"), len(r))
            head = r[:cut]
            if not head or head[-1]["role"] != "user" or (
                    str(head[-1]["content"]).strip() != prompt.strip()):
                raise self._fail(i, f"field {f!r} is a conversation but does not start with the "
                                 "text of 'prompt' as its user turn (TRL's UltraFeedback layout)")
            heads.append(head)
            tails.append((f, list(r[cut:])))
        if any(h != heads[0] for h in heads[1:]):
            raise self._fail(i, "the conversations in "
                             f"{' and '.join(f for f, _ in responses)} start with different turns")
        return list(heads[0]), tails

    def _extract(self, row: dict[str, Any], i: int) -> tuple[str, Any, list[tuple[str, Any]]]:
        """(prompt field, prompt, [(response field, response)]) in the row's own form."""
        lay, want = self.layout, self.kind != "prompts"
        if lay[0] == "prompt":
            return "prompt", row["prompt"], [(f, row[f]) for f in lay[1:]]
        if lay[0] == "messages":  # prompt = every turn before the final assistant message
            prompt, last = self._split_transcript(row["messages"], "messages", i)
            return "messages", prompt, ([("messages", last)] if want else [])
        parts = [(f, self._split_transcript(row[f], f, i)) for f in lay]
        prompt = parts[0][1][0]
        if any(p != prompt for _, (p, _) in parts[1:]):
            raise Skip("prompt_mismatch")
        return lay[0], prompt, ([(f, r) for f, (_, r) in parts] if want else [])

    def _split_transcript(self, value: Any, f: str, i: int) -> tuple[Any, Any]:
        """A full dialogue → (prompt, final response): HH text, or a message list."""
        self._check(value, f, i)
        if self.fmt == "hh":
            if not isinstance(value, str) or HH_ASSISTANT not in value:
                raise self._fail(i, f"field {f!r} is not text with a {HH_ASSISTANT!r} turn (hh)")
            return split_hh(value)
        if not isinstance(value, list):
            raise self._fail(i, f"field {f!r} must be a list of messages here (for Anthropic HH "
                                "text transcripts set data.format=hh)")
        if value[-1]["role"] != "assistant":
            raise self._fail(i, f"field {f!r} must end with an assistant message")
        return list(value[:-1]), list(value[-1:])

    def _check(self, value: Any, f: str, i: int) -> None:
        """Type-check one field, and apply on_empty when it has no content (null or blank)."""
        if isinstance(value, list):
            for j, m in enumerate(value):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m):
                    raise self._fail(i, f"field {f!r} message {j + 1} needs 'role' and 'content' "
                                     "keys")
            # content may be a list of parts (multimodal): only blank or null text is empty
            empty = not any(isinstance(m["content"], list) or str(m["content"] or "").strip()
                            for m in value)
        elif value is None or isinstance(value, str):
            empty = value is None or not value.strip()
        else:
            kind = type(value).__name__
            raise self._fail(i, f"field {f!r} must be a string or a list of messages, got {kind}")
        if empty and self.cfg.on_empty == "error":
            raise self._fail(i, f"field {f!r} is empty (set data.on_empty=skip to skip)")
        if empty:
            raise Skip(f"empty:{f}")

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _render(self, messages: list[dict], gen_prompt: bool, i: int) -> str:
        try:  # a tokenizer without a chat template raises here too
            return self.tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=gen_prompt)
        except Exception as e:  # jinja errors: report the row, not a template traceback
            raise self._fail(i, f"chat template failed: {type(e).__name__}: {e}") from e

    def _with_eos(self, ids: list[int], templated: bool) -> list[int]:
        if self.cfg.add_eos and templated and self.eos in ids:  # cut text after the end of turn
            return ids[: len(ids) - ids[::-1].index(self.eos)]
        return ids if not self.cfg.add_eos or ids[-1:] == [self.eos] else [*ids, self.eos]

    def _tokenise(self, prompt: Any, responses: list[tuple[str, Any]], i: int):
        if isinstance(prompt, str):
            r_ids = [self._with_eos(self._ids(r), False) for _, r in responses]
            return self.prefix + self._ids(prompt), r_ids
        p_text, r_ids = self._render(prompt, True, i), []
        for f, r in responses:
            # the response is the text the full conversation adds after the generation prompt
            full = self._render([*prompt, *r], False, i)
            if not full.startswith(p_text):
                msg = f"the chat template does not render the prompt as a prefix of prompt+{f!r}"
                raise self._fail(i, msg)
            r_ids.append(self._with_eos(self._ids(full[len(p_text) :]), True))
        return self._ids(p_text), r_ids

    def _fit(self, pfield, p_ids, rfields, r_ids, i):
        """Apply max_prompt_length, then max_length, according to on_overlong."""
        cfg, trunc = self.cfg, []
        if len(p_ids) > cfg.max_prompt_length:
            self._overlong(i, "prompt", f"field {pfield!r} has {len(p_ids)} tokens > "
                           f"data.max_prompt_length={cfg.max_prompt_length}")
            head = p_ids[:1] if p_ids[0] == self.bos else []
            p_ids = head + p_ids[len(p_ids) - (cfg.max_prompt_length - len(head)) :]
            trunc.append("prompt")
        budget = cfg.max_length - len(p_ids)
        over = [(f, len(r)) for f, r in zip(rfields, r_ids, strict=True) if len(r) > budget]
        if over:
            self._overlong(i, "response", f"field {over[0][0]!r}: prompt+response has "
                           f"{len(p_ids) + over[0][1]} tokens > data.max_length={cfg.max_length}")
            r_ids = [r[:budget] for r in r_ids]
            trunc.append("response")
        return p_ids, r_ids, trunc

    def _overlong(self, i: int, what: str, msg: str) -> None:
        if self.cfg.on_overlong == "error":
            raise self._fail(i, f"{msg} (set data.on_overlong=skip or truncate)")
        if self.cfg.on_overlong == "skip":
            raise Skip(f"too_long:{what}")


