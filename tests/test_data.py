"""Datasets and collators: formats, exact prompt/response splits, validation, counts, loading."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from datasets import Dataset
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from distalign.errors import ConfigError, DataError
from distalign.lm.collators import PairCollator, PromptCollator, SFTCollator
from distalign.lm.data import (
    DataConfig,
    build_dataset,
    build_eval_dataset,
    load_rows,
    prepare,
    split_hh,
)

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_HH = (
    Path(__file__).resolve().parents[2]
    / "shared/data/hh-rlhf-harmless-test/harmless-base-test.jsonl.gz"
)
# "\n" is an expression because HF renders templates with trim_blocks=True.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """Byte-level BPE (exact decode of any text) that prepends <s> to plain text, like Llama."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(["the capital of France is Paris", "Human: hi Assistant: ok"], trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    t = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=special[3:], clean_up_tokenization_spaces=False,
    )
    t.chat_template = TEMPLATE
    return t


def cfg(**kw) -> DataConfig:
    return DataConfig(path=kw.pop("path", "mem.jsonl"), **kw)


def text_pairs(n: int = 3) -> list[dict]:
    return [
        {"prompt": f"Question {i}: is {i} even?", "chosen": f" {'yes' if i % 2 == 0 else 'no'}, "
         "since parity is checked mod 2.", "rejected": f" maybe{'!' * i}"}
        for i in range(n)
    ]


def masked_text(tok, ids, mask) -> str:
    return tok.decode([t for t, m in zip(ids.tolist(), mask.tolist(), strict=True) if m])


def test_pair_collator_masks_cover_exactly_the_responses(tok):
    rows = text_pairs(4)
    ds, report = prepare(Dataset.from_list(rows), tok, cfg(), "pairs")
    assert (report.rows_read, report.rows_kept, report.skipped) == (4, 4, {})
    batch = PairCollator(tok.pad_token_id, pad_to_multiple_of=8)(list(ds))
    b = len(rows)
    assert batch["input_ids"].shape[0] == 2 * b and batch["input_ids"].shape[1] % 8 == 0
    for i, row in enumerate(rows):
        for j, key in ((i, "chosen"), (b + i, "rejected")):
            ids, attn = batch["input_ids"][j], batch["attention_mask"][j]
            resp = batch["response_mask"][j]
            assert masked_text(tok, ids, resp) == row[key] + "</s>"
            assert masked_text(tok, ids, attn) == "<s>" + row["prompt"] + row[key] + "</s>"
            assert bool((resp <= attn).all()) and attn[: int(attn.sum())].all()  # right-padded
        p_ids, p_attn = batch["prompt_input_ids"][i], batch["prompt_attention_mask"][i]
        assert masked_text(tok, p_ids, p_attn) == "<s>" + row["prompt"]
        assert p_attn[-1] == 1  # left-padded: every prompt ends in the last column


def test_collators_mask_eos_when_pad_equals_eos():
    eos = 2
    pair = PairCollator(pad_token_id=eos)([
        {"prompt_ids": [5], "chosen_ids": [6, eos], "rejected_ids": [7, 8, 9, eos]},
        {"prompt_ids": [5, 5], "chosen_ids": [eos], "rejected_ids": [eos]},
    ])
    assert pair["response_mask"].sum(1).tolist() == [2, 1, 4, 1]
    sft = SFTCollator(pad_token_id=eos)([{"prompt_ids": [5], "completion_ids": [eos]},
                                         {"prompt_ids": [5, 6, 7], "completion_ids": [8, eos]}])
    assert sft["response_mask"].tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 1, 1]]
    with pytest.raises(ConfigError, match="pad token"):
        PromptCollator(pad_token_id=None)


@pytest.mark.parametrize("fixture", ["chat_prefs_tiny.jsonl", "orca_dpo_sample.jsonl"])
def test_chat_template_split_is_exact(tok, fixture):
    c = cfg(path=str(FIXTURES / fixture), max_prompt_length=4000, max_length=8000)
    ds, report = build_dataset(c, tok, "pairs")
    rows = [json.loads(line) for line in (FIXTURES / fixture).read_text().splitlines()]
    assert report.format == "preference" and report.rows_kept == len(rows) == len(ds)
    for row, out in zip(rows, ds, strict=True):
        prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert tok.decode(out["prompt_ids"]) == prompt
        for key in ("chosen", "rejected"):
            full = tok.apply_chat_template(row["prompt"] + row[key], tokenize=False)
            # the template's newline after </s> is never generated, so it is not in the response
            assert full == prompt + row[key][0]["content"] + "</s>\n"
            whole = tok(full[:-1], add_special_tokens=False)["input_ids"]
            assert out["prompt_ids"] + out[f"{key}_ids"] == whole
            assert tok.decode(out[f"{key}_ids"]) == row[key][0]["content"] + "</s>"


def test_hh_fixture_split_and_skip_counts(tok):
    path = FIXTURES / "hh_rlhf_harmless_sample.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    with pytest.raises(DataError, match=r"row 8 \(line 8\): field 'chosen' is empty"):
        build_dataset(cfg(path=str(path)), tok, "pairs")  # upstream row 86: empty response
    ds, report = build_dataset(cfg(path=str(path), on_empty="skip", max_length=2048), tok, "pairs")
    expected, reasons = [], {}
    for i, r in enumerate(rows):  # independent split, by plain string search
        cut_c = r["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        cut_r = r["rejected"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        prompt, c, rej = r["chosen"][:cut_c], r["chosen"][cut_c:], r["rejected"][cut_r:]
        reason = ("prompt_mismatch" if r["rejected"][:cut_r] != prompt else
                  "empty:chosen" if not c.strip() else "empty:rejected" if not rej.strip() else "")
        if reason:
            reasons[reason] = reasons.get(reason, 0) + 1
        else:
            expected.append((i, prompt, c, rej))
    assert report.format == "hh" and reasons == {"prompt_mismatch": 1, "empty:chosen": 3}
    assert report.skipped == reasons and report.rows_kept == len(expected) == len(rows) - 4
    assert report.examples["prompt_mismatch"] == [35]  # from 1 and "skipped 4" in report.summary()
    for (_, prompt, c, rej), out in zip(expected, ds, strict=True):
        assert prompt.endswith("\n\nAssistant:") and tok.decode(out["prompt_ids"]) == "<s>" + prompt
        assert tok.decode(out["chosen_ids"]) == c + "</s>"
        assert tok.decode(out["rejected_ids"]) == rej + "</s>"


@pytest.mark.skipif(not SHARED_HH.exists(), reason="../shared/data (HH-RLHF harmless test) absent")
def test_split_hh_on_the_full_harmless_test_split():
    with gzip.open(SHARED_HH, "rt") as f:
        rows = [json.loads(line) for line in f]
    mismatch = 0
    for r in rows:
        (pc, c), (pr, _) = split_hh(r["chosen"]), split_hh(r["rejected"])
        assert pc + c == r["chosen"] and pc.endswith("\n\nAssistant:") and "\n\nAssistant:" not in c
        mismatch += pc != pr
    assert len(rows) == 2312 and mismatch == 5


def test_sft_from_messages_prompt_completion_and_preference(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]
    ds, _ = prepare(Dataset.from_list([{"messages": msgs}]), tok, cfg(), "sft")
    prompt = tok.apply_chat_template(msgs[:3], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ds[0]["prompt_ids"]) == prompt
    assert tok.decode(ds[0]["completion_ids"]) == "see you</s>"
    rows = [{"prompt": "Say hi.", "completion": " hi"}]
    ds, _ = prepare(Dataset.from_list(rows), tok, cfg(), "sft")
    batch = SFTCollator(tok.pad_token_id)(list(ds))
    assert masked_text(tok, batch["input_ids"][0], batch["response_mask"][0]) == " hi</s>"
    ds, report = prepare(Dataset.from_list(text_pairs(2)), tok, cfg(), "sft")  # uses chosen
    assert report.format == "preference" and tok.decode(ds[1]["completion_ids"]) == (
        text_pairs(2)[1]["chosen"] + "</s>")


def test_prompts_kind_from_preference_and_prompt_data(tok):
    rows = text_pairs(3)
    for data in (rows, [{"prompt": r["prompt"]} for r in rows]):
        ds, report = prepare(Dataset.from_list(data), tok, cfg(), "prompts")
        assert ds.column_names == ["prompt_ids"] and report.rows_kept == 3
        batch = PromptCollator(tok.pad_token_id)(list(ds))
        for i, r in enumerate(rows):
            ids, attn = batch["prompt_input_ids"][i], batch["prompt_attention_mask"][i]
            assert masked_text(tok, ids, attn) == "<s>" + r["prompt"] and attn[-1] == 1


@pytest.mark.parametrize(
    ("rows", "kw", "kind", "pattern"),
    [
        ([{"prompt": "a", "chosen": "b"}], {"format": "preference"}, "pairs",
         r"missing column\(s\) \['rejected'\].*found columns: \['chosen', 'prompt'\].*expected: "
         r"prompt/chosen/rejected"),
        ([{"text": "a"}], {}, "pairs",
         r"mem\.jsonl: cannot infer data.format from columns \['text'\]"),
        ([{"prompt": "a", "completion": "b"}], {}, "pairs", r"format 'sft' has no responses"),
        ([{"prompt": "p", "chosen": 1, "rejected": 2}] * 2, {}, "pairs",
         r"mem\.jsonl row 1: field 'chosen' must be a string or a list of messages, got int"),
        ([{"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}],
           "rejected": [{"role": "assistant", "content": "r"}]}], {}, "pairs",
         r"row 1: field 'chosen' is a conversation but does not start with the text of "
         r"'prompt' as its user turn"),
        ([{"prompt": "p", "chosen": "c", "rejected": [{"role": "assistant", "content": "r"}]}],
         {}, "pairs", r"row 1: fields 'prompt' and 'chosen' mix text and message lists"),
        ([{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c",
          "rejected": " "}], {}, "pairs", r"mem\.jsonl row 2: field 'rejected' is empty"),
        ([{"prompt": [{"role": "user", "content": "p"}], "chosen": [{"content": "c"}],
           "rejected": [{"role": "assistant", "content": "r"}]}], {}, "pairs",
         r"row 1: field 'chosen' message 1 needs 'role' and 'content'"),
        ([{"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: yo"}], {"format": "hh"}, "pairs",
         r"row 1: field 'chosen' is not text with a '\\n\\nAssistant:' turn"),
        ([{"prompt": "a b c d e f g h", "chosen": "x", "rejected": "y"}],
         {"max_prompt_length": 3, "on_overlong": "error"}, "pairs",
         r"row 1: field 'prompt' has \d+ tokens > data.max_prompt_length=3"),
        ([{"prompt": "a", "chosen": "x" * 50, "rejected": "y"}],
         {"max_prompt_length": 3, "max_length": 6, "on_overlong": "error"}, "pairs",
         r"row 1: field 'chosen': prompt\+response has \d+ tokens > data.max_length=6"),
    ],
)
def test_errors_name_file_row_and_field(tok, rows, kw, kind, pattern):
    with pytest.raises(DataError, match=pattern):
        prepare(Dataset.from_list(rows), tok, cfg(**kw), kind)


def test_conversational_rows_need_an_exact_template_prefix(tok):
    rows = [json.loads((FIXTURES / "chat_prefs_tiny.jsonl").read_text().splitlines()[0])]
    odd = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    odd.chat_template = "{% if add_generation_prompt %}GEN {% endif %}" + TEMPLATE
    with pytest.raises(DataError, match=r"row 1: the chat template does not render the prompt"):
        prepare(Dataset.from_list(rows), odd, cfg(), "pairs")
    odd.chat_template = None
    with pytest.raises(DataError, match=r"row 1: chat template failed: "):
        prepare(Dataset.from_list(rows), odd, cfg(), "pairs")


def test_skip_counts_identical_empty_and_overlong(tok):
    rows = text_pairs(3) + [
        {"prompt": "p", "chosen": " same", "rejected": " same"},
        {"prompt": None, "chosen": " a", "rejected": " b"},
        {"prompt": "p", "chosen": " long " * 40, "rejected": " b"},
        {"prompt": "long " * 40, "chosen": " a", "rejected": " b"},
    ]
    ds, report = prepare(
        Dataset.from_list(rows), tok,
        cfg(on_empty="skip", on_overlong="skip", max_prompt_length=64, max_length=128), "pairs")
    assert report.skipped == {"identical": 1, "empty:prompt": 1, "too_long:response": 1,
                              "too_long:prompt": 1}
    assert report.examples["too_long:prompt"] == [7] and report.truncated == {}
    assert report.rows_kept == len(ds) == 3 and "skipped 4:" in report.summary()


def test_truncation_keeps_bos_and_prompt_end_and_counts(tok):
    rows = [{"prompt": "one two three four five six seven", "chosen": " alpha beta gamma delta",
             "rejected": " beta alpha gamma delta"},
            {"prompt": "p", "chosen": " a", "rejected": " b"}]
    c = cfg(max_prompt_length=5, max_length=8)
    ds, report = prepare(Dataset.from_list(rows), tok, c, "pairs")
    full_p = tok(rows[0]["prompt"])["input_ids"]
    full_c = tok(rows[0]["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert full_p[0] == tok.bos_token_id and len(full_p) > 5 and len(full_c) > 3
    assert ds[0]["prompt_ids"] == [tok.bos_token_id] + full_p[-4:]
    assert ds[0]["chosen_ids"] == full_c[:3]
    assert report.truncated == {"prompt": 1, "response": 1} and report.rows_kept == 2
    # responses that only differ after the cut are skipped, not kept as a zero-gradient pair
    rows[0]["rejected"] = rows[0]["chosen"] + "!"
    _, rep = prepare(Dataset.from_list(rows), tok, c, "pairs")
    assert rep.skipped == {"identical_after_truncation": 1}
    assert rep.examples["identical_after_truncation"] == [1]


def _write_all(tmp_path: Path, rows: list[dict]) -> list[Path]:
    paths = [tmp_path / "d.json", tmp_path / "d.jsonl", tmp_path / "d.jsonl.gz",
             tmp_path / "d.parquet"]
    paths[0].write_text(json.dumps(rows))
    paths[1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(paths[2], "wt") as f:
        f.write(paths[1].read_text())
    Dataset.from_list(rows).to_parquet(str(paths[3]))
    return paths


def test_json_jsonl_gz_and_parquet_load_the_same_rows(tmp_path):
    rows = json.loads(json.dumps([json.loads(x) for x in (
        FIXTURES / "chat_prefs_tiny.jsonl").read_text().splitlines()]))
    for p in _write_all(tmp_path, rows):
        assert load_rows(cfg(path=str(p))).to_list() == rows, p.name
        assert len(load_rows(cfg(path=str(p), max_rows=2))) == 2
    with pytest.raises(DataError, match="data file not found"):
        load_rows(cfg(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(ConfigError, match="only split is 'train'"):
        load_rows(cfg(path=str(tmp_path / "d.jsonl")), "test")


def test_eval_fraction_is_seeded_and_disjoint(tok, tmp_path):
    path = _write_all(tmp_path, text_pairs(40))[1]
    c = cfg(path=str(path), eval_fraction=0.25, seed=3)

    def keys(ds):
        return [tuple(r["prompt_ids"]) for r in ds]

    train, report = build_dataset(c, tok, "pairs")
    ev = build_eval_dataset(c, tok, "pairs")
    assert (len(train), len(ev), report.rows_read) == (30, 10, 30)
    assert not set(keys(train)) & set(keys(ev)) and len(set(keys(train)) | set(keys(ev))) == 40
    assert keys(build_eval_dataset(c, tok, "pairs")) == keys(ev)
    assert keys(build_eval_dataset(cfg(path=str(path), eval_fraction=0.25, seed=4), tok,
                                   "pairs")) != keys(ev)
    assert build_eval_dataset(cfg(path=str(path)), tok, "pairs") is None
    ev_file = build_eval_dataset(cfg(path=str(path), eval_path=str(path), max_rows=5), tok, "pairs")
    assert len(ev_file) == 5


def test_eval_fraction_errors_report_original_row_numbers(tok, tmp_path):
    rows = text_pairs(10)
    rows[7]["chosen"] = ""
    path = _write_all(tmp_path, rows)[1]
    c = cfg(path=str(path), eval_fraction=0.5, seed=0)
    errors = []
    for build in (build_dataset, build_eval_dataset):
        try:
            build(c, tok, "pairs")
        except DataError as e:
            errors.append(str(e))
    # row 8 sits in exactly one of the two disjoint splits, and is named by its file row number
    assert len(errors) == 1 and "d.jsonl row 8 (line 8): field 'chosen' is empty" in errors[0]


def test_num_proc_counts_and_errors_survive_workers(tok):
    rows = text_pairs(6) + [{"prompt": "p", "chosen": " s", "rejected": " s"}]
    ds, report = prepare(Dataset.from_list(rows), tok, cfg(num_proc=2), "pairs")
    assert report.skipped == {"identical": 1} and len(ds) == 6
    with pytest.raises(DataError, match="row 7: field 'chosen' is empty"):
        prepare(Dataset.from_list(rows[:6] + [{"prompt": "p", "chosen": "", "rejected": "r"}]),
                tok, cfg(num_proc=2), "pairs")


def test_data_config_is_an_omegaconf_structured_config():
    base = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(["path=x.jsonl", "max_rows=5"]))
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, DataConfig) and obj.max_rows == 5 and obj.eval_path is None
    with pytest.raises(ConfigError, match="data.on_overlong='clip'"):
        OmegaConf.to_object(OmegaConf.merge(merged, {"on_overlong": "clip"}))
    with pytest.raises(ConfigError, match="max_prompt_length=8 must be"):
        DataConfig(path="x", max_prompt_length=8, max_length=8)
    with pytest.raises(ConfigError, match="eval_fraction cannot be combined"):
        DataConfig(path="x", eval_fraction=0.1, eval_split="test")


def test_columns_mapping_renames_and_names_a_missing_column(tmp_path, tok):
    from distalign.lm.data import DataConfig

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "the dog is", "good": "a dog", "bad": "no"}) + "\n")
    cols = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    ds, report = build_dataset(DataConfig(path=str(path), columns=cols), tok, "pairs")
    assert report.rows_kept == 1 and set(ds.column_names) == {"prompt_ids", "chosen_ids",
                                                               "rejected_ids"}
    with pytest.raises(DataError, match="data.columns.prompt='query'.*no column 'query'"):
        build_dataset(DataConfig(path=str(path), columns={**cols, "prompt": "query"}), tok,
                      "pairs")
    with pytest.raises(ConfigError, match="data.columns.answer"):
        DataConfig(path=str(path), columns={"answer": "good"})


def test_a_text_prompt_with_whole_conversations_reads_as_the_conversation_form(tok):
    # TRL's UltraFeedback layout: a text prompt, chosen/rejected repeat it as their user turn
    rows = text_pairs(4)
    user, bot = ({"role": r, "content": ""} for r in ("user", "assistant"))
    uf = [{"prompt": r["prompt"], **{k: [{**user, "content": r["prompt"]},
                                         {**bot, "content": r[k]}] for k in ("chosen", "rejected")}}
          for r in rows]
    plain = [{"prompt": [{**user, "content": r["prompt"]}],
              **{k: [{**bot, "content": r[k]}] for k in ("chosen", "rejected")}} for r in rows]
    for kind in ("pairs", "sft"):
        assert (prepare(Dataset.from_list(uf), tok, cfg(), kind)[0].to_list()
                == prepare(Dataset.from_list(plain), tok, cfg(), kind)[0].to_list()), kind
    uf[2]["rejected"][0]["content"] = "another question"
    with pytest.raises(DataError, match=r"mem\.jsonl row 3: field 'rejected' is a conversation "
                                        r"but does not start with the text of 'prompt'"):
        prepare(Dataset.from_list(uf), tok, cfg(), "pairs")


def test_rows_and_lines_both_count_from_one(tok, tmp_path):
    rows = text_pairs(3)
    rows[2]["chosen"] = ""
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]))
    with pytest.raises(DataError, match=r"gaps\.jsonl row 3 \(line 4\): field 'chosen' is empty"):
        build_dataset(cfg(path=str(path)), tok, "pairs")
