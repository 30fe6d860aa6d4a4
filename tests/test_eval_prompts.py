"""Prompt sets for ``distalign generate``: formats, ids, references, rendering and bad input.

Token ids are checked against direct tokenizer calls (the tiny tokenizer adds no BOS to plain
text, and its chat template starts with ``<bos>``), not against distalign's own encoder."""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest

from distalign.errors import ConfigError, DataError
from distalign.eval.prompts import load_prompt_set, prompt_set_digest
from distalign.testing import tiny_tokenizer

TOK = tiny_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def _chat_ids(messages) -> list[int]:
    return _ids(TOK.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def test_plain_prompts_ids_references_and_digest(tmp_path):
    rows = [{"prompt": "the dog is", "chosen": "a good dog", "rejected": "no"},
            {"prompt": "where is the moon", "reference": "there", "chosen": "x"},
            {"prompt": "you are good", "chosen": "thank you"}]
    pset = load_prompt_set(_jsonl(tmp_path / "p.jsonl", rows), TOK, limit=2)
    assert pset.format == "prompt" and not pset.chat_template and pset.truncated == 0
    assert [p.prompt_id for p in pset.prompts] == ["0", "1"]  # row index; limit keeps 2
    assert [p.reference for p in pset.prompts] == ["a good dog", "there"]  # reference > chosen
    assert [p.token_ids for p in pset.prompts] == [_ids("the dog is"), _ids("where is the moon")]
    blob = json.dumps([["0", "the dog is"], ["1", "where is the moon"]], ensure_ascii=False)
    assert pset.digest == hashlib.sha256(blob.encode()).hexdigest()
    assert prompt_set_digest([("1", "where is the moon"), ("0", "the dog is")]) == pset.digest


def test_id_column_and_conversation_prompt_use_the_chat_template(tmp_path):
    conv = [{"role": "user", "content": "how was your day"},
            {"role": "assistant", "content": "it was good"},
            {"role": "user", "content": "what did she have"}]
    rows = [{"id": 17, "prompt": conv, "chosen": [{"role": "assistant", "content": "food"}]}]
    pset = load_prompt_set(_jsonl(tmp_path / "c.jsonl", rows), TOK)
    (p,) = pset.prompts
    assert pset.chat_template and p.prompt_id == "17"
    assert p.prompt == "what did she have" and p.reference == "food"
    assert p.token_ids == _chat_ids(conv)
    assert p.token_ids[0] == TOK.bos_token_id and p.token_ids[-2:] == _ids("assistant :")


def test_alpaca_eval_list_and_plain_fallback(tmp_path):
    rows = [{"instruction": "what is a good name for a cat", "output": "the cat",
             "generator": "gpt4", "dataset": "helpful_base"}]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    pset = load_prompt_set(str(path), TOK)
    (p,) = pset.prompts
    assert pset.format == "alpaca_eval" and p.reference == "the cat"
    assert p.dataset == "helpful_base"
    assert p.token_ids == _chat_ids([{"role": "user", "content": rows[0]["instruction"]}])
    plain = load_prompt_set(str(path), TOK, chat_template=False)
    assert plain.prompts[0].token_ids == _ids(rows[0]["instruction"])
    assert not plain.chat_template


def test_hh_prompt_is_the_dialogue_up_to_the_last_assistant_turn(tmp_path):
    chosen = "\n\nHuman: is the water good\n\nAssistant: yes\n\nHuman: why\n\nAssistant: it is"
    rows = [{"chosen": chosen, "rejected": chosen.replace("it is", "no")}]
    path = tmp_path / "hh.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    pset = load_prompt_set(str(path), TOK)
    (p,) = pset.prompts
    assert pset.format == "hh"
    assert p.prompt == chosen[: -len(" it is")] and p.prompt.endswith("\n\nAssistant:")
    assert p.reference == " it is" and p.prompt + p.reference == chosen
    assert p.token_ids == _ids(p.prompt)


def test_long_prompts_are_cut_from_the_left_and_counted(tmp_path):
    rows = [{"prompt": "why is the world so big"}, {"prompt": "the sun is"}]
    pset = load_prompt_set(_jsonl(tmp_path / "p.jsonl", rows), TOK, max_prompt_length=3)
    assert pset.truncated == 1
    assert [p.token_ids for p in pset.prompts] == [_ids("world so big"), _ids("the sun is")]
    assert pset.prompts[0].prompt == "why is the world so big"  # the text stays whole


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        (b'{"text": "a"}\n', "p.jsonl", r"p\.jsonl: no prompt column; found columns \['text'\]"),
        (b"", "p.jsonl", r"p\.jsonl: no rows \(empty file\)"),
        (b'{"prompt": "a"}\n{"prompt": "b\xff"}\n', "p.jsonl", r"p\.jsonl line 2: not UTF-8"),
        (b'{"prompt": "a"}\n\n{"prompt": \n', "p.jsonl", r"p\.jsonl line 3: bad JSON"),
        (b'[{"prompt": "a"},\n {"prompt" "b"}]', "p.json", r"p\.json line 2: bad JSON"),
        (b'{"prompt": "a"}\n{"prompt": "  "}\n', "p.jsonl", r"p\.jsonl row 1: the prompt is"),
        (b'{"id": 1, "prompt": "a"}\n{"id": "1", "prompt": "b"}\n', "p.jsonl",
         r"row 1: duplicate prompt id '1' \(also row 0\)"),
        (b'{"prompt": "a"}\n{"question": "b"}\n', "p.jsonl", r"row 1: missing field 'prompt'"),
        (b'{"chosen": "no turn here", "rejected": "x"}\n', "p.jsonl",
         r"row 0 field 'chosen': not text with a"),
    ],
)
def test_bad_prompt_files_fail_with_one_line(tmp_path, content, name, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as err:
        load_prompt_set(str(path), TOK)
    assert "\n" not in str(err.value)


def test_bad_options(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(ConfigError, match="--format 'tldr' is unknown"):
        load_prompt_set(path, TOK, fmt="tldr")
    with pytest.raises(DataError, match="prompts file not found"):
        load_prompt_set(str(tmp_path / "missing.jsonl"), TOK)
    with pytest.raises(ConfigError, match="--limit must be >= 1"):
        load_prompt_set(path, TOK, limit=0)


def test_messages_rows_and_parquet(tmp_path):
    from datasets import Dataset

    conv = [{"role": "user", "content": "who is that man"},
            {"role": "assistant", "content": "he is my first man"}]
    path = tmp_path / "m.parquet"
    Dataset.from_list([{"prompt_id": "a", "messages": conv}]).to_parquet(str(path))
    pset = load_prompt_set(str(path), TOK)
    (p,) = pset.prompts
    assert pset.format == "messages" and p.prompt_id == "a"
    assert p.prompt == "who is that man" and p.reference == "he is my first man"
    assert p.token_ids == _chat_ids(conv[:1])


def test_chat_template_flag_on_plain_prompts(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "the dog is"}])
    pset = load_prompt_set(path, TOK, chat_template=True)
    assert pset.chat_template and pset.prompts[0].prompt == "the dog is"
    assert pset.prompts[0].token_ids == _chat_ids([{"role": "user", "content": "the dog is"}])
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ConfigError, match="the tokenizer has no chat template"):
        load_prompt_set(path, bare, chat_template=True)
    conv = _jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "a"}]}])
    with pytest.raises(DataError, match="row 0: a conversation prompt needs a tokenizer with"):
        load_prompt_set(conv, bare)
