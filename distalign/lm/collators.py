"""Collators: rows of token ids (from :func:`distalign.lm.data.prepare`) → padded torch batches.

Batch conventions (every method and the engine rely on them): sequence batches are right-padded
``input_ids``/``attention_mask``/``response_mask`` with ``response_mask`` = 1 exactly on the
response tokens (terminal EOS included); pair batches stack all chosen rows, then all rejected
rows, in ONE ``[2B, L]`` tensor so that a single forward pass gives ln π(a|x) and ln π(b|x) for
the preference log-ratio γ·ln π(a|x)/π(b|x) (preference model (2)/(3)). Prompt batches are
left-padded, so that generation appends to the last column of every row.

Masks are built from lengths, never by comparing token ids with ``pad_token_id``: a tokenizer
whose pad token is its EOS would otherwise lose the terminal EOS from the response mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from distalign.errors import ConfigError

Feature = Mapping[str, Sequence[int]]


def pad_sequences(
    seqs: Sequence[Sequence[int]],
    pad_token_id: int,
    side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Pad token-id lists into ``(ids [N, L], attention_mask [N, L])`` (both ``long``).

    >>> ids, mask = pad_sequences([[5, 6, 7], [8]], pad_token_id=0, side="left")
    >>> ids
    tensor([[5, 6, 7],
            [0, 0, 8]])
    >>> mask
    tensor([[1, 1, 1],
            [0, 0, 1]])
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    length = max((len(s) for s in seqs), default=0)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(seqs), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def _sequence_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    pad_to_multiple_of: int | None,
) -> dict[str, Tensor]:
    """Right-padded prompt+response rows with a response mask on the response positions."""
    ids, attn = pad_sequences(
        [[*p, *r] for p, r in zip(prompts, responses, strict=True)],
        pad_token_id,
        "right",
        pad_to_multiple_of,
    )
    response_mask = torch.zeros_like(attn)
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        response_mask[row, len(p) : len(p) + len(r)] = 1
    return {"input_ids": ids, "attention_mask": attn, "response_mask": response_mask}


def _columns(features: Sequence[Feature], keys: tuple[str, ...], who: str) -> list[list]:
    if not features:
        raise ValueError(f"{who}: empty batch")
    missing = [k for k in keys if k not in features[0]]
    if missing:
        raise KeyError(f"{who} needs features with {keys}; missing {missing}")
    return [[f[k] for f in features] for k in keys]


@dataclass
class _Collator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ConfigError(
                "the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the EOS token)"
            )


@dataclass
class PairCollator(_Collator):
    """Preference pairs → one stacked sequence batch plus the left-padded prompts.

    Rows ``0..B-1`` of ``input_ids`` are prompt+chosen, rows ``B..2B-1`` prompt+rejected.
    ``prompt_input_ids`` / ``prompt_attention_mask`` (``[B, P]``, left-padded) let a method
    sample fresh responses for the same prompts.

    >>> collate = PairCollator(pad_token_id=0)
    >>> batch = collate([
    ...     {"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]},
    ...     {"prompt_ids": [5], "chosen_ids": [3, 2], "rejected_ids": [4, 2]},
    ... ])
    >>> batch["input_ids"]
    tensor([[5, 6, 7, 2, 0],
            [5, 3, 2, 0, 0],
            [5, 6, 8, 9, 2],
            [5, 4, 2, 0, 0]])
    >>> batch["attention_mask"]
    tensor([[1, 1, 1, 1, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 0, 0]])
    >>> batch["response_mask"]
    tensor([[0, 0, 1, 1, 0],
            [0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1],
            [0, 1, 1, 0, 0]])
    >>> batch["prompt_input_ids"]
    tensor([[5, 6],
            [0, 5]])
    >>> batch["prompt_attention_mask"]
    tensor([[1, 1],
            [0, 1]])
    """

    def __call__(self, features: Sequence[Feature]) -> dict[str, Tensor]:
        prompts, chosen, rejected = _columns(
            features, ("prompt_ids", "chosen_ids", "rejected_ids"), "PairCollator"
        )
        batch = _sequence_batch(
            prompts + prompts, chosen + rejected, self.pad_token_id, self.pad_to_multiple_of
        )
        p_ids, p_attn = pad_sequences(prompts, self.pad_token_id, "left", self.pad_to_multiple_of)
        return {**batch, "prompt_input_ids": p_ids, "prompt_attention_mask": p_attn}


@dataclass
class PromptCollator(_Collator):
    """Prompts → left-padded ``prompt_input_ids`` / ``prompt_attention_mask`` for sampling.

    >>> collate = PromptCollator(pad_token_id=0, pad_to_multiple_of=4)
    >>> batch = collate([{"prompt_ids": [5, 6, 7]}, {"prompt_ids": [8]}])
    >>> batch["prompt_input_ids"]
    tensor([[0, 5, 6, 7],
            [0, 0, 0, 8]])
    >>> batch["prompt_attention_mask"]
    tensor([[0, 1, 1, 1],
            [0, 0, 0, 1]])
    """

    def __call__(self, features: Sequence[Feature]) -> dict[str, Tensor]:
        (prompts,) = _columns(features, ("prompt_ids",), "PromptCollator")
        ids, attn = pad_sequences(prompts, self.pad_token_id, "left", self.pad_to_multiple_of)
        return {"prompt_input_ids": ids, "prompt_attention_mask": attn}


@dataclass
class SFTCollator(_Collator):
    """Prompt/completion rows → right-padded sequence batch; the loss sees only completions.

    >>> collate = SFTCollator(pad_token_id=0)
    >>> batch = collate([
    ...     {"prompt_ids": [5, 6], "completion_ids": [7, 2]},
    ...     {"prompt_ids": [5], "completion_ids": [2]},
    ... ])
    >>> batch["input_ids"]
    tensor([[5, 6, 7, 2],
            [5, 2, 0, 0]])
    >>> batch["response_mask"]
    tensor([[0, 0, 1, 1],
            [0, 1, 0, 0]])
    """

    def __call__(self, features: Sequence[Feature]) -> dict[str, Tensor]:
        prompts, completions = _columns(
            features, ("prompt_ids", "completion_ids"), "SFTCollator"
        )
        return _sequence_batch(prompts, completions, self.pad_token_id, self.pad_to_multiple_of)
