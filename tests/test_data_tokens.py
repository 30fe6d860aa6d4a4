"""Rows of exact token ids (format ``tokens``): used as given, never re-tokenised, no EOS added;
a tilted world's pairs train on the very replies that were labelled."""

from __future__ import annotations

import pytest
from datasets import Dataset

from distalign.errors import DataError
from distalign.lm.data import DataConfig, prepare
from distalign.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def rows(tok) -> list[dict]:
    eos = tok.eos_token_id
    return [  # a cut reply (no EOS), an ended one, and text columns that disagree with the ids
        {"prompt": "x", "chosen": "text is ignored", "rejected": "r",
         "prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, eos]},
        {"prompt": "y", "chosen": "a", "rejected": "b",
         "prompt_ids": [5], "chosen_ids": [11, 12, 13], "rejected_ids": [11, 12, 13]},
    ]


def test_auto_prefers_ids_and_keeps_them_exactly(tok):
    ds, report = prepare(Dataset.from_list(rows(tok)), tok, DataConfig(path="m.jsonl"), "pairs")
    assert report.format == "tokens"
    assert report.skipped == {"identical": 1} and len(ds) == 1
    assert ds[0]["prompt_ids"] == [5, 6, 7]
    assert ds[0]["chosen_ids"] == [8, 9]  # no EOS appended to a reply cut at L
    assert ds[0]["rejected_ids"] == [10, tok.eos_token_id]  # nor a second one to an ended one
    prompts, _ = prepare(Dataset.from_list(rows(tok)), tok,
                         DataConfig(path="m.jsonl", format="tokens"), "prompts")
    assert prompts["prompt_ids"] == [[5, 6, 7], [5]]


def test_truncation_applies_to_ids(tok):
    cfg = DataConfig(path="m.jsonl", max_prompt_length=2, max_length=3)
    ds, report = prepare(Dataset.from_list(rows(tok)[:1]), tok, cfg, "pairs")
    assert ds[0]["prompt_ids"] == [6, 7] and ds[0]["chosen_ids"] == [8]
    assert report.truncated == {"prompt": 1, "response": 1}


@pytest.mark.parametrize("bad, pattern", [
    ({"chosen_ids": "8 9"}, r"row 1: field 'chosen_ids' must be a list of token ids"),
    ({"rejected_ids": [10, 10**6]}, r"row 1: field 'rejected_ids' holds token id 1000000, "
                                    r"outside the tokenizer's vocabulary"),
    ({"prompt_ids": []}, r"row 1: field 'prompt_ids' is empty"),
])
def test_bad_ids_name_row_and_field(tok, bad, pattern):
    row = {**rows(tok)[0], **bad}
    with pytest.raises(DataError, match=pattern):
        prepare(Dataset.from_list([row]), tok, DataConfig(path="m.jsonl"), "pairs")
