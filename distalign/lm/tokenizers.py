"""Tokenizer compatibility: models that exchange token ids must agree on what they mean.

A reward, value or reference model scores the *policy's* token ids. If its tokenizer maps ids
to other strings, every score is silently wrong; a ``vocab_size >= len(tokenizer)`` check does
not see that (SmolLM2's 49k vocabulary "fits" a 130-token policy), so compare the maps.
"""

from __future__ import annotations

from typing import Any

from distalign.errors import ConfigError

_SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id")


def tokenizer_difference(a: Any, b: Any) -> str | None:
    """Why ids of ``a`` do not mean the same as ids of ``b``, or None when they do.

    Compared: the full token→id map (added tokens included) and the BOS/EOS ids. Pad ids may
    differ (padding is marked by masks in this library, never by id).
    """
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        return f"vocabulary sizes differ ({len(va)} vs {len(vb)} tokens)"
    if va != vb:
        diff = next(t for t in sorted(va) if vb.get(t) != va[t])
        return f"token {diff!r} has id {va[diff]} in one and {vb.get(diff)} in the other"
    for name in _SPECIAL[:2]:
        ia, ib = getattr(a, name, None), getattr(b, name, None)
        if ia is not None and ib is not None and ia != ib:
            return f"{name} differs ({ia} vs {ib})"
    return None


def check_same_tokenizer(a: Any, b: Any, what_a: str, what_b: str) -> None:
    """Raise a one-line :class:`ConfigError` when ``b`` cannot score ``a``'s token ids."""
    why = tokenizer_difference(a, b)
    if why is not None:
        raise ConfigError(
            f"{what_b} does not share the tokenizer of {what_a}: {why}; "
            "use models trained from the same base (same tokenizer)"
        )
