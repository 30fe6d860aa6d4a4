"""Property-based fuzzing of user input: config values and data rows.

Whatever a user writes, loading ends in one of two ways: it is accepted (data: every row is
kept or counted as a skip), or it raises one ``ConfigError``/``DataError`` line that names the
key (configs) or the file and row/line (data). Any other exception is a bug. Examples are
bounded so that the module runs in seconds on CI.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distalign.errors import ConfigError, DataError
from distalign.lm.data import DataConfig, build_dataset
from distalign.testing import tiny_tokenizer
from distalign.train import load_config

KEYS = [
    "run.batch_size", "run.mini_batch_size", "run.grad_accum", "run.max_steps", "run.epochs",
    "run.log_every", "run.eval_every", "run.save_every", "run.keep_checkpoints",
    "run.mixed_precision", "run.report_to", "run.name", "run.seed", "run.num_samples_logged",
    "optim.lr", "optim.scheduler", "optim.warmup_steps", "optim.weight_decay",
    "optim.max_grad_norm", "optim.adam_beta1", "optim.adam_beta2", "optim.adam_eps",
    "model.dtype", "model.lora.bias", "model.lora.r", "model.lora.dropout",
    "gen.max_new_tokens", "gen.temperature", "gen.top_p", "gen.top_k",
    "data.max_length", "data.max_prompt_length", "data.on_overlong", "data.on_empty",
    "data.eval_fraction", "data.max_rows", "data.format",
    "algo.beta", "algo.clip_range", "algo.vf_coef", "algo.update_epochs", "algo.gae_lambda",
    "algo.kl_estimator", "algo.value_clip", "algo.discount",
]
WORDS = ["no", "yes", "maybe", "", "nan", "-inf", "inf", "bf16", "fp16", "k3", "none", "null",
         "[tensorboard]", "[bogus]", "[]", "linear", "a/b", "float16", "1e-3", "-0.0"]
VALUES = st.one_of(
    st.integers(-3, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(WORDS),
    st.booleans().map(str),
)
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def _one_line(err: Exception) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, repr(msg)
    return msg


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3),
       st.sampled_from(["rlhf", "dpo", "rebel"]))
def test_config_values_are_accepted_or_refused_with_the_key_named(pairs, method):
    base = {"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}}
    pairs = [(k, v) for k, v in pairs if not (k.startswith("algo.") and method == "dpo")]
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        cfg = load_config(method, base, overrides)
    except ConfigError as err:
        msg = _one_line(err)
        assert any(k in msg or k.split(".")[-1] in msg for k, _ in pairs), msg
        return
    # accepted: nothing non-finite or out of range got through
    o, r = cfg.optim, cfg.run
    assert math.isfinite(o.lr) and o.lr > 0 and o.weight_decay >= 0 and 0 <= o.adam_beta1 < 1
    assert r.epochs > 0 and r.log_every >= 1 and r.save_every >= 0 and o.max_grad_norm >= 0
    assert r.mixed_precision in ("no", "bf16", "fp16", "fp8")


TEXT = st.lists(st.sampled_from(["the", "cat", "is", "good", "a", "dog", "?"]), max_size=6).map(
    " ".join)
FIELD = st.one_of(
    TEXT, TEXT, st.none(), st.integers(), st.just("   "),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                    "content": TEXT}), max_size=2),
    st.dictionaries(st.sampled_from(["x", "role"]), TEXT, max_size=1),
)
ROW = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "extra"]), FIELD,
                      min_size=0, max_size=4)
DAMAGE = st.sampled_from(["none", "none", "torn", "bad_byte", "not_object", "blank", "empty"])
FILE_LEVEL = ("the file is empty", "no rows", "cannot infer data.format", "missing column",
              "every row was skipped", "has no responses", "mix text and message lists")


def _write(path: Path, rows: list[dict], damage: str) -> None:
    lines = [json.dumps(r).encode() for r in rows]
    if damage == "torn" and lines:
        lines[-1] = lines[-1][: max(len(lines[-1]) // 2, 1)]
    elif damage == "bad_byte" and lines:
        lines[0] = lines[0][:2] + b"\xff" + lines[0][2:]
    elif damage == "not_object":
        lines.append(b"[1, 2]")
    elif damage == "blank":
        lines.append(b"   ")
    path.write_bytes(b"" if damage == "empty" else b"\n".join(lines) + b"\n")


@FUZZ
@given(st.lists(ROW, min_size=1, max_size=4), DAMAGE,
       st.sampled_from(["error", "skip"]), st.sampled_from(["error", "skip", "truncate"]),
       st.sampled_from(["pairs", "prompts"]))
def test_data_rows_are_kept_counted_or_refused_naming_file_and_row(rows, damage, on_empty,
                                                                  on_overlong, kind):
    tok = _TOK
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        _write(path, rows, damage)
        cfg = DataConfig(path=str(path), on_empty=on_empty, on_overlong=on_overlong,
                         max_prompt_length=4, max_length=8)
        try:
            ds, report = build_dataset(cfg, tok, kind)
        except (DataError, ConfigError) as err:
            msg = _one_line(err)
            assert str(path) in msg, msg
            located = ("line " in msg) or ("row " in msg and "field" in msg)
            assert located or any(p in msg for p in FILE_LEVEL), msg
            return
    assert report.rows_read == len(rows)
    assert report.rows_kept + sum(report.skipped.values()) == report.rows_read == len(ds) + sum(
        report.skipped.values())


_TOK = tiny_tokenizer()
