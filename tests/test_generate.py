"""``distalign generate``: the generations file and sidecar (the evaluation contract), EOS
handling and greedy decoding against a hand-rolled loop on the plain HF model, seeded resume
(torn line, ``kill -9``), refusal of mismatched reruns, AlpacaEval outputs, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CHOSEN, PROMPTS
from transformers import AutoModelForCausalLM, AutoTokenizer

from distalign.cli import main
from distalign.errors import ConfigError
from distalign.eval.generate import generate, read_generations, sidecar_path
from distalign.eval.prompts import prompt_set_digest
from distalign.lm.generation import GenerationConfig

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ROW_KEYS = {"prompt_id", "prompt", "output", "reference", "generator", "sample", "num_tokens",
            "ended", "prompt_token_ids", "output_token_ids", "output_logprob"}
META_KEYS = {"model", "model_path", "gguf_file", "tokenizer_path", "generator", "prompts",
             "format", "prompt_set", "num_prompts", "num_samples", "seed", "chat_template",
             "max_prompt_length", "gen", "distalign_version"}


def _by_key(rows):
    return {(r["prompt_id"], r["sample"]): r for r in rows}


@pytest.fixture(scope="module")
def eos_policy(tiny, tmp_path_factory) -> Path:
    """The tiny policy with the lm_head rows of EOS and of the greedy 2nd token after
    PROMPTS[0] swapped: greedy decoding then ends some responses early, by construction."""
    model = AutoModelForCausalLM.from_pretrained(tiny.policy).eval()
    tok = AutoTokenizer.from_pretrained(tiny.policy)
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        first = model(input_ids=ids).logits[0, -1].argmax()
        second = int(model(input_ids=torch.cat([ids, first.view(1, 1)], 1)).logits[0, -1].argmax())
        w = model.lm_head.weight
        w[[second, tok.eos_token_id]] = w[[tok.eos_token_id, second]]
    out = tmp_path_factory.mktemp("eos_policy")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@torch.no_grad()
def _hand_greedy(model_dir: Path, prompt_ids: list[int], max_new: int) -> list[int]:
    """Greedy decoding written out: one unpadded forward per step, stop at the first EOS."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    ids, new = list(prompt_ids), []
    for _ in range(max_new):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        new.append(nxt)
        if nxt == eos:
            break
    return new


def test_rows_and_sidecar_follow_the_contract(tiny, tmp_path):
    out = tmp_path / "gens.jsonl"
    gen = GenerationConfig(max_new_tokens=6, temperature=1.0)
    path = generate(str(tiny.policy), str(tiny.pairs), out, limit=5, gen=gen, num_samples=2,
                    batch_size=2, seed=3, progress=False)
    assert path == out
    rows = read_generations(out)
    tok = AutoTokenizer.from_pretrained(tiny.policy)
    assert len(rows) == 10 and len(_by_key(rows)) == 10
    assert {(r["prompt_id"], r["sample"]) for r in rows} == {
        (str(i), s) for i in range(5) for s in range(2)}
    for r in rows:
        assert set(r) == ROW_KEYS
        i = int(r["prompt_id"])
        assert r["prompt"] == PROMPTS[i] and r["reference"] == CHOSEN[i]
        assert r["prompt_token_ids"] == tok(PROMPTS[i])["input_ids"]
        assert r["generator"] == "policy" and r["num_tokens"] == len(r["output_token_ids"])
    meta = json.loads(sidecar_path(out).read_text())
    assert out.with_name("gens.meta.json") == sidecar_path(out)
    assert set(meta) >= META_KEYS
    assert meta["prompt_set"] == prompt_set_digest((str(i), PROMPTS[i]) for i in range(5))
    assert meta["model_path"] == str(tiny.policy.resolve()) and meta["num_prompts"] == 5
    assert meta["gen"] == {"max_new_tokens": 6, "min_new_tokens": 0, "temperature": 1.0,
                           "top_k": 0, "top_p": 1.0, "backend": "hf"}
    assert (meta["num_samples"], meta["seed"], meta["format"]) == (2, 3, "prompt")
    assert not out.with_name("model_outputs.json").exists()


def test_greedy_and_eos_equal_a_hand_rolled_loop(eos_policy, tiny, tmp_path):
    out = tmp_path / "greedy.jsonl"
    gen = GenerationConfig(max_new_tokens=6, temperature=0.0)
    generate(str(eos_policy), str(tiny.pairs), out, gen=gen, batch_size=5, progress=False)
    rows = read_generations(out)
    tok = AutoTokenizer.from_pretrained(eos_policy)
    assert len(rows) == len(PROMPTS)
    for r in rows:
        want = _hand_greedy(eos_policy, r["prompt_token_ids"], 6)
        assert r["output_token_ids"] == want, r["prompt"]
        ended = want[-1] == tok.eos_token_id
        assert r["ended"] == ended and r["num_tokens"] == len(want)
        assert tok.eos_token_id not in want[:-1]
        assert r["output"] == tok.decode(want, skip_special_tokens=True)
        assert "<eos>" not in r["output"]
    ended = [r["ended"] for r in rows]
    assert any(ended) and not all(ended)  # both cases are exercised


def test_resume_after_a_torn_write_equals_one_run(tiny, tmp_path):
    kw = dict(gen=GenerationConfig(max_new_tokens=5, temperature=1.0), num_samples=2,
              batch_size=3, seed=7, progress=False)
    whole = _by_key(read_generations(generate(str(tiny.policy), str(tiny.pairs),
                                              tmp_path / "a.jsonl", **kw)))
    part = tmp_path / "b.jsonl"
    generate(str(tiny.policy), str(tiny.pairs), part, **kw)
    lines = part.read_bytes().split(b"\n")
    part.write_bytes(b"\n".join(lines[:5]) + b"\n" + lines[5][:20])  # 5 rows + a torn line
    generate(str(tiny.policy), str(tiny.pairs), part, **kw)
    rows = read_generations(part)
    assert len(rows) == len(whole) == 2 * len(PROMPTS)
    assert _by_key(rows) == whole
    # a third run finds nothing to do and leaves the file as it is
    before = part.read_bytes()
    generate(str(tiny.policy), str(tiny.pairs), part, **kw)
    assert part.read_bytes() == before


def test_kill_9_then_rerun_equals_one_run(tiny, tmp_path):
    prompts = tmp_path / "many.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": PROMPTS[i % 12]}) + "\n"
                               for i in range(48)))
    args = ["--batch-size", "1", "-n", "2", "--seed", "5", "gen.max_new_tokens=24",
            "gen.temperature=1.0"]
    out = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "distalign", "generate", str(tiny.policy), "--prompts",
           str(prompts), "--out", str(out), *args]
    with (tmp_path / "log.txt").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 6:
                proc.kill()  # SIGKILL: no cleanup, possibly mid-write
                break
            time.sleep(0.01)
        proc.wait()
    assert proc.returncode == -9, (tmp_path / "log.txt").read_text()
    assert len(read_generations(out)) < 96  # it really stopped part-way
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    # the same settings in one uninterrupted, in-process run
    whole = generate(str(tiny.policy), str(prompts), tmp_path / "whole.jsonl", batch_size=1,
                     num_samples=2, seed=5, progress=False,
                     gen=GenerationConfig(max_new_tokens=24, temperature=1.0))
    got, want = _by_key(read_generations(out)), _by_key(read_generations(whole))
    diff = sorted(k for k in want if got.get(k) != want[k])
    assert not diff and len(got) == 96, (len(got), diff[:3], diff and got.get(diff[0]))


def test_reruns_with_other_settings_are_refused(tiny, tmp_path):
    out = tmp_path / "g.jsonl"
    gen = GenerationConfig(max_new_tokens=3)
    generate(str(tiny.policy), str(tiny.pairs), out, gen=gen, limit=4, progress=False)
    with pytest.raises(ConfigError, match=r"gen\.temperature=0\.7 \(now 0\.0\).*--overwrite"):
        generate(str(tiny.policy), str(tiny.pairs), out, limit=4, progress=False,
                 gen=GenerationConfig(max_new_tokens=3, temperature=0.0))
    with pytest.raises(ConfigError, match="a different prompt set"):
        generate(str(tiny.policy), str(tiny.pairs), out, gen=gen, limit=5, progress=False)
    with pytest.raises(ConfigError, match="seed=0 \\(now 1\\)"):
        generate(str(tiny.policy), str(tiny.pairs), out, gen=gen, limit=4, seed=1, progress=False)
    generate(str(tiny.policy), str(tiny.pairs), out, gen=gen, limit=5, progress=False,
             overwrite=True)
    assert len(read_generations(out)) == 5
    sidecar_path(out).unlink()
    with pytest.raises(ConfigError, match="without its sidecar"):
        generate(str(tiny.policy), str(tiny.pairs), out, gen=gen, limit=5, progress=False)


def test_run_directory_and_alpaca_eval_outputs(tiny, tmp_path):
    run = tmp_path / "runs" / "dpo-seed0"
    shutil.copytree(tiny.policy, run / "final")
    rows = [{"instruction": p, "output": c, "generator": "gpt4_1106_preview",
             "dataset": "helpful_base" if i % 2 else "koala"}
            for i, (p, c) in enumerate(zip(PROMPTS[:4], CHOSEN[:4], strict=True))]
    data = tmp_path / "alpaca_eval.json"
    data.write_text(json.dumps(rows))
    out = generate(str(run), str(data), tmp_path / "ae" / "gens.jsonl", batch_size=3,
                   gen=GenerationConfig(max_new_tokens=4), progress=False)
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["model_path"] == str((run / "final").resolve())
    assert meta["generator"] == "dpo-seed0" and meta["format"] == "alpaca_eval"
    assert meta["chat_template"] is True
    gens = {r["prompt_id"]: r for r in read_generations(out)}
    outputs = json.loads((out.parent / "model_outputs.json").read_text())
    assert [set(o) for o in outputs] == [{"instruction", "output", "generator", "dataset"}] * 4
    assert [o["instruction"] for o in outputs] == PROMPTS[:4]  # the data's order
    assert [o["dataset"] for o in outputs] == [r["dataset"] for r in rows]
    assert [o["output"] for o in outputs] == [gens[str(i)]["output"] for i in range(4)]
    assert {o["generator"] for o in outputs} == {"dpo-seed0"}
    assert [gens[str(i)]["reference"] for i in range(4)] == CHOSEN[:4]


BAD = [
    (["--format", "tldr"], "--format 'tldr' is unknown"),
    (["gen.temperature=-1"], "need temperature >= 0"),
    (["gen.max_new_tokens=many"], "gen overrides gen.max_new_tokens=many"),
    (["gen.beams=4"], "override 'gen.beams=4': expected gen.KEY=VALUE"),
    (["--limit", "0"], "--limit must be >= 1"),
]


@pytest.mark.parametrize(("extra", "message"), BAD)
def test_bad_cli_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, extra, message):
    argv = ["generate", str(tiny.policy), "--prompts", str(tiny.pairs),
            "--out", str(tmp_path / "g.jsonl"), "--no-progress", *extra]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: ") and "\n" not in err
    assert message in err
    assert not (tmp_path / "g.jsonl").exists()


def test_bad_model_and_data_paths(tiny, tmp_path, capsys):
    for argv, message in [
        ([str(tmp_path / "no" / "such"), "--prompts", str(tiny.pairs)], "model path not found"),
        ([str(tmp_path), "--prompts", str(tiny.pairs)], "neither a run directory"),
        ([str(tiny.policy), "--prompts", str(tmp_path / "x.jsonl")], "prompts file not found"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["generate", *argv, "--out", str(tmp_path / "g.jsonl")])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and message in err and "\n" not in err, err


def test_cli_subprocess_with_output_to_a_file(tiny, tmp_path):
    log, out = tmp_path / "log.txt", tmp_path / "cli.jsonl"
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "distalign", "generate", str(tiny.policy), "--prompts",
             str(tiny.pairs), "--out", str(out), "--batch-size", "4", "gen.max_new_tokens=4"],
            stdout=f, stderr=subprocess.STDOUT, env=ENV, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "Traceback" not in text and "\x1b[" not in text
    for step in (1, 2, 3):
        assert f"generate {step}/3 elapsed" in text, text
    assert "12 prompts" in text and f"generations: {out}" in text
    assert len(read_generations(out)) == 12
    bad = subprocess.run([sys.executable, "-m", "distalign", "generate", str(tiny.policy),
                          "--prompts", str(tiny.sft), "--out", str(out), "gen.top_p=0"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: generation: need")


def test_model_resolution(tmp_path):
    from distalign.eval.generate import resolve_model

    gguf = tmp_path / "models" / "smol-q8.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf), None) == (str(gguf.parent.resolve()), gguf.name, "smol-q8")
    assert resolve_model(str(gguf.parent), gguf.name) == (
        str(gguf.parent.resolve()), gguf.name, "smol-q8")
    with pytest.raises(ConfigError, match="--gguf-file 'other.gguf' not found"):
        resolve_model(str(gguf.parent), "other.gguf")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M", None) == (
        "HuggingFaceTB/SmolLM2-135M", None, "SmolLM2-135M")  # a hub id, resolved by transformers
    with pytest.raises(ConfigError, match="model path not found"):
        resolve_model(str(tmp_path / "models" / "missing"), None)
