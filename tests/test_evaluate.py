"""``distalign eval`` on tiny models: RM score, KL(π‖π₀) and the reward judge against
independent, unbatched computations; eval.json/annotations.json per the contract; bad input.

Generation files are written here in the contract's schema (sampling with
``distalign.lm.generation.make_sampler``), independently of ``distalign generate``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, row_scores, row_token_logps
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from distalign.errors import ConfigError, DataError
from distalign.eval.evaluate import _pairs, evaluate, read_generations, sidecar_path
from distalign.eval.prompts import prompt_set_digest
from distalign.lm.generation import GenerationConfig, make_sampler
from distalign.testing import left_pad, save_tiny_checkpoint

REFS = ["the cat is good", "a good dog", "it was a great day", "yes it is", "the moon is there",
        "thank you"]
T = 0.7


def write_generations(path: Path, policy: Path, prompts: list[str], refs: list[str] | None,
                      samples: int = 2, seed: int = 0, max_new_tokens: int = 6) -> Path:
    """A generations file + sidecar in the evaluation contract's schema."""
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=T)
    p_ids = [tok(p)["input_ids"] for p in prompts]
    ids, attn = left_pad(p_ids, tok.pad_token_id)
    torch.manual_seed(seed)
    ro = make_sampler(cfg, tok).generate(model, ids, attn, samples)
    rows = []
    for n in range(ro.input_ids.shape[0]):
        j, b = divmod(n, len(prompts))
        out = ro.responses[n][ro.response_mask[n, ro.prompt_length:] == 1].tolist()
        rows.append({
            "prompt_id": str(b), "prompt": prompts[b],
            "output": tok.decode(out, skip_special_tokens=True),
            "reference": refs[b] if refs else None, "generator": "tiny", "sample": j,
            "num_tokens": len(out), "ended": bool(ro.ended[n]),
            "prompt_token_ids": p_ids[b], "output_token_ids": out,
        })
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"model": str(policy), "model_path": str(policy), "gguf_file": None,
            "tokenizer_path": str(policy), "generator": "tiny", "chat_template": False,
            "num_samples": samples, "seed": seed, "num_prompts": len(prompts),
            "prompt_set": prompt_set_digest((str(i), p) for i, p in enumerate(prompts)),
            "gen": {"max_new_tokens": max_new_tokens, "min_new_tokens": 0, "temperature": T,
                    "top_k": 0, "top_p": 1.0, "backend": "hf"}}
    sidecar_path(path).write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="module")
def gens(tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gens")
    return write_generations(root / "gens.jsonl", tiny.policy, PROMPTS[:6], REFS)


def _batch(rows: list[dict], key: str, pad: int):
    """Right-padded prompt + response rows and the response mask (independent of the library)."""
    seqs = [r["prompt_token_ids"] + r[key] for r in rows]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad)
    attn, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (s, r) in enumerate(zip(seqs, rows, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        resp[i, len(r["prompt_token_ids"]) : len(s)] = 1
    return ids, attn, resp


def test_judge_prompts_judges_the_same_prompt_subset_and_keeps_every_row_elsewhere(
        tiny, gens, tmp_path):
    full = evaluate(gens, tmp_path / "full", judge=f"reward:{tiny.reward}",
                    reward_model=str(tiny.reward), batch_size=5, progress=False)
    part = evaluate(gens, tmp_path / "part", judge=f"reward:{tiny.reward}",
                    reward_model=str(tiny.reward), batch_size=5, progress=False,
                    judge_prompts=2)
    rows, _ = read_generations(gens)
    keep = sorted({str(r["prompt_id"]) for r in rows})[:2]
    ann = json.loads((tmp_path / "full" / "annotations.json").read_text())
    prefs = [a["preference"] - 1 for a in ann if str(a["prompt_id"]) in keep]
    assert part["judge_prompts"] == 2 and part["judged"] == len(prefs) < len(rows)
    assert part["metrics"]["eval/win_rate"] == pytest.approx(100 * sum(prefs) / len(prefs))
    # the RM score and the row count are over every row, as without the subset
    for key in ("eval/n", "eval/rm_score"):
        assert part["metrics"][key] == full["metrics"][key]


def test_rm_score_kl_and_reward_judge_equal_hand_computation(tiny, gens, tmp_path):
    out = tmp_path / "ev"
    result = evaluate(gens, out, judge=f"reward:{tiny.reward}", reward_model=str(tiny.reward),
                      ref_model=str(tiny.ref), batch_size=5, progress=False)
    rows, _ = read_generations(gens)
    tok = AutoTokenizer.from_pretrained(tiny.policy)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny.reward).eval()
    ids, attn, resp = _batch(rows, "output_token_ids", tok.pad_token_id)
    r_out = row_scores(rm, ids, attn, resp)
    # the reference reply as the reward model saw responses in training: its words + EOS
    ref_rows = [{**r, "ref_ids": tok(r["reference"])["input_ids"] + [tok.eos_token_id]}
                for r in rows]
    r_ref = row_scores(rm, *_batch(ref_rows, "ref_ids", tok.pad_token_id))
    m = result["metrics"]
    assert m["eval/rm_score"] == pytest.approx(r_out.mean().item(), abs=1e-5)
    assert m["eval/rm_score_se"] == pytest.approx(r_out.std().item() / math.sqrt(len(rows)),
                                                  rel=1e-4)
    assert result["no_eos"] == sum(not r["ended"] for r in rows)
    p = torch.sigmoid(r_out - r_ref)
    assert m["eval/win_rate"] == pytest.approx(100 * p.mean().item(), abs=1e-4)
    assert m["eval/win_rate_discrete"] == pytest.approx(100 * (p > 0.5).float().mean().item())
    lo, hi = result["win_rate_ci95_by_prompt"]  # 2 samples per prompt: prompts resampled
    assert lo <= m["eval/win_rate"] <= hi
    # KL: log-probs of both models at the sampling temperature, one unpadded row at a time
    pi = AutoModelForCausalLM.from_pretrained(tiny.policy).eval()
    pi0 = AutoModelForCausalLM.from_pretrained(tiny.ref).eval()
    d = ((row_token_logps(pi, ids, attn, T) - row_token_logps(pi0, ids, attn, T)) * resp).sum(-1)
    assert m["eval/kl_ref"] == pytest.approx(d.mean().item(), abs=1e-4)
    assert m["eval/kl_ref_k3"] == pytest.approx((torch.expm1(-d) + d).mean().item(), abs=1e-4)
    h = -(row_token_logps(pi, ids, attn, T) * resp).sum(-1)  # −ln π_T(y|x) per sample
    assert m["eval/entropy"] == pytest.approx(h.mean().item(), abs=1e-4)
    assert m["eval/entropy_se"] == pytest.approx(h.std().item() / math.sqrt(len(rows)), rel=1e-3)
    assert result["kl_temperature"] == T and result["kl_exact"] is True
    # the contract's keys, as distalign report reads them
    saved = json.loads((out / "eval.json").read_text())
    for key in ("eval/win_rate", "eval/win_rate_se", "eval/win_rate_discrete", "eval/rm_score",
                "eval/rm_score_se", "eval/kl_ref", "eval/kl_ref_se", "eval/kl_ref_k3",
                "eval/kl_ref_k3_se", "eval/length", "eval/n"):
        assert key in saved["metrics"], key
    assert saved["metrics"]["eval/n"] == len(rows) == 12
    ann = json.loads((out / "annotations.json").read_text())
    assert ann[0]["output_1"] == rows[0]["reference"] and ann[0]["output_2"] == rows[0]["output"]
    assert ann[0]["preference"] == pytest.approx(1 + p[0].item(), abs=1e-5)
    assert {k for k in ann[0]} >= {"instruction", "generator_1", "generator_2", "annotator"}


def test_rm_scores_are_cached_across_models_and_the_self_kl_is_skipped(tiny, gens, tmp_path):
    """A shared cache scores each reference once for every model, and the RM judge reuses the
    RM-score column's output scores; the numbers equal an uncached evaluation's."""
    import shutil

    rows, _ = read_generations(gens)
    plain = evaluate(gens, tmp_path / "plain", judge=f"reward:{tiny.reward}",
                     reward_model=str(tiny.reward), batch_size=5, progress=False)
    other = write_generations(tmp_path / "other.jsonl", tiny.policy, PROMPTS[:6], REFS, seed=1)
    kw = {"judge": f"reward:{tiny.reward}", "reward_model": str(tiny.reward), "batch_size": 5,
          "progress": False, "cache_dir": tmp_path / "cache"}
    first = evaluate(gens, tmp_path / "a", **kw)
    assert first["judge_calls"] == len(rows)  # the references only: outputs were just scored
    for key in ("eval/rm_score", "eval/win_rate"):
        assert first["metrics"][key] == pytest.approx(plain["metrics"][key], abs=1e-5)
    second = evaluate(other, tmp_path / "b", **kw)
    others, _ = read_generations(other)
    assert second["judge_calls"] == 0  # its outputs were scored by its own RM-score column
    fresh = evaluate(other, tmp_path / "c", judge=f"reward:{tiny.reward}", batch_size=5,
                     progress=False)
    assert second["metrics"]["eval/win_rate"] == pytest.approx(
        fresh["metrics"]["eval/win_rate"], abs=1e-5)
    assert fresh["judge_calls"] == 2 * len(others)
    # a reward model retrained in place is scored afresh
    moved = tmp_path / "rm"
    shutil.copytree(tiny.reward, moved)
    kw["judge"], kw["reward_model"] = f"reward:{moved}", str(moved)
    assert evaluate(gens, tmp_path / "d", **kw)["judge_calls"] == len(rows)
    weights = next(moved.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # same weights, new mtime: a new fingerprint
    assert evaluate(gens, tmp_path / "e", **kw)["judge_calls"] == len(rows)
    # π evaluated against itself: KL is exactly 0 from one forward, entropy as with a copy
    same = evaluate(gens, tmp_path / "f", ref_model=str(tiny.policy), batch_size=5,
                    progress=False)
    copy = tmp_path / "policy-copy"
    shutil.copytree(tiny.policy, copy)
    two = evaluate(gens, tmp_path / "g", ref_model=str(copy), batch_size=5, progress=False)
    assert same["metrics"]["eval/kl_ref"] == 0.0 == same["metrics"]["eval/kl_ref_k3"]
    assert two["metrics"]["eval/kl_ref"] == pytest.approx(0.0, abs=1e-5)
    assert same["metrics"]["eval/entropy"] == pytest.approx(two["metrics"]["eval/entropy"],
                                                            abs=1e-5)


def test_bad_input_one_line_errors(tiny, gens, tmp_path):
    rows = [json.loads(x) for x in gens.read_text().splitlines()]

    def variant(name: str, change) -> Path:
        p = tmp_path / f"{name}.jsonl"
        new = [dict(r) for r in rows]
        change(new)
        p.write_text("".join(json.dumps(r) + "\n" for r in new))
        sidecar_path(p).write_text(sidecar_path(gens).read_text())
        return p

    no_ref = variant("noref", lambda rs: rs[3].pop("reference"))
    with pytest.raises(DataError, match=r"noref.jsonl row 3: field 'reference' is missing"):
        evaluate(no_ref, tmp_path / "a", judge=f"reward:{tiny.reward}", progress=False)
    empty = variant("empty", lambda rs: rs[2].update(output=" "))
    # an empty output is an answer (a policy that stops at once): judged and counted, no error
    pairs = _pairs([json.loads(x) | {"_line": 1} for x in empty.read_text().splitlines()],
                   empty, text_judge=True)
    assert [p.output for p in pairs].count(" ") == 1 and len(pairs) == len(rows)
    res = evaluate(empty, tmp_path / "b", judge=f"reward:{tiny.reward}", progress=False)
    assert res["empty_outputs"] == 1
    no_ids = variant("noids", lambda rs: rs[5].pop("output_token_ids"))
    with pytest.raises(DataError, match=r"noids.jsonl row 5: missing field 'output_token_ids'"):
        read_generations(no_ids)
    other = variant("other", lambda rs: [r.update(prompt="a different prompt") for r in rs
                                         if r["prompt_id"] == "0"])
    with pytest.raises(DataError, match=r"different prompt set than .*other.jsonl"):
        evaluate(gens, tmp_path / "c", reward_model=str(tiny.reward), prompt_set=other,
                 progress=False)
    # the prompts file the generations were made from, and its digest, are accepted
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:6]))
    digest = json.loads(sidecar_path(gens).read_text())["prompt_set"]
    for ok in (prompts_file, digest, gens):
        evaluate(gens, tmp_path / "c", reward_model=str(tiny.reward), prompt_set=ok,
                 progress=False)
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[1:7]))
    with pytest.raises(DataError, match=r"different prompt set than .*prompts.jsonl"):
        evaluate(gens, tmp_path / "c", reward_model=str(tiny.reward), prompt_set=prompts_file,
                 progress=False)
    # a partial file (a prompt's rows missing) does not match its own sidecar
    partial = variant("partial", lambda rs: [rs.remove(r) for r in list(rs)
                                             if r["prompt_id"] == "5"])
    with pytest.raises(DataError, match=r"partial.jsonl: its prompts do not match its sidecar"):
        evaluate(partial, tmp_path / "g", reward_model=str(tiny.reward), progress=False)
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate(gens, tmp_path / "d")


def test_reward_model_with_another_tokenizer_is_refused(tiny, gens, tmp_path):
    from distalign.synthetic import build_world, world_tokenizer

    other = tmp_path / "other_rm"
    save_tiny_checkpoint(other, seed=4, reward=True)
    world_tokenizer(build_world()).save_pretrained(other)  # a different vocabulary
    with pytest.raises(ConfigError, match="does not share the tokenizer of the policy"):
        evaluate(gens, tmp_path / "e", reward_model=str(other), progress=False)
    with pytest.raises(ConfigError, match="has no trained .score. head"):
        evaluate(gens, tmp_path / "e", reward_model=str(tiny.policy), progress=False)


def test_partial_results_are_kept(tiny, gens, tmp_path):
    """The RM score is written before a later part (the judge) fails."""
    out = tmp_path / "f"
    with pytest.raises(ConfigError, match="unreachable"):
        evaluate(gens, out, reward_model=str(tiny.reward), judge="openai:m",
                 judge_url="http://127.0.0.1:9/v1", judge_options={"max_retries": 0},
                 progress=False)
    assert "eval/rm_score" in json.loads((out / "eval.json").read_text())["metrics"]


def test_cli_eval_subprocess_output_to_file(tiny, gens, tmp_path):
    log = tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "distalign", "eval", str(gens), "--reward-model",
           str(tiny.reward), "--judge", f"reward:{tiny.reward}", "--out", str(tmp_path / "ev")]
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=f).returncode
    text = log.read_text()
    assert rc == 0, text
    assert "win-rate" in text and "RM score" in text and "\x1b[" not in text
    assert (tmp_path / "ev" / "eval.json").is_file()
    # an unreachable judge: one line, exit 2, and the RM score computed before it is kept
    res = subprocess.run([sys.executable, "-m", "distalign", "eval", str(gens), "--out",
                          str(tmp_path / "ev2"), "--reward-model", str(tiny.reward), "--judge",
                          "openai:m", "--judge-url", "http://127.0.0.1:9/v1", "--max-retries",
                          "0", "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert res.stderr.startswith("error: judge URL http://127.0.0.1:9/v1 is unreachable")
    kept = json.loads((tmp_path / "ev2" / "eval.json").read_text())["metrics"]
    assert "eval/rm_score" in kept and "eval/win_rate" not in kept


def test_openai_judge_end_to_end_rerun_makes_zero_calls(gens, tmp_path):
    from test_judges import _Server

    server = _Server()
    try:
        rows, _ = read_generations(gens)
        out = tmp_path / "oa"
        first = evaluate(gens, out, judge="openai:judge-model", judge_url=server.url,
                         progress=False)
        assert server.requests == 2 * len(rows) and first["judge_calls"] == 2 * len(rows)

        def p_a(a: str) -> float:  # the test server's judge: the side containing "good"
            return 0.8 if "good" in a else 0.2
        want = [(p_a(r["output"]) + 1 - p_a(r["reference"])) / 2 for r in rows]
        assert first["metrics"]["eval/win_rate"] == pytest.approx(100 * sum(want) / len(want))
        # with "good" on neither side the server says B in both orders: a position flip
        flips = [(p_a(r["output"]) > 0.5) != (1 - p_a(r["reference"]) > 0.5) for r in rows]
        assert first["flip_rate"] == pytest.approx(sum(flips) / len(flips))
        assert first["unparsed"] == first["unparsed_answers"] == 0
        ann = json.loads((out / "annotations.json").read_text())
        assert [a["preference"] for a in ann] == pytest.approx([1 + w for w in want])
        again = evaluate(gens, out, judge="openai:judge-model", judge_url=server.url,
                         progress=False)
        assert server.requests == 2 * len(rows) and again["judge_calls"] == 0
        assert again["metrics"]["eval/win_rate"] == first["metrics"]["eval/win_rate"]
    finally:
        server.close()


def test_contract_with_distalign_generate(tiny, tmp_path):
    """`distalign generate`'s own file and sidecar evaluate as they are (prompt-set digest,
    model path, temperature), and --prompt-set accepts the prompts file it read."""
    from distalign.eval.generate import generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n"
                               for p, r in zip(PROMPTS[:3], REFS[:3], strict=True)))
    gen = GenerationConfig(max_new_tokens=5, temperature=T)
    out = generate(str(tiny.policy), str(prompts), tmp_path / "gens.jsonl", gen=gen,
                   num_samples=2, progress=False)
    result = evaluate(out, tmp_path / "ev", judge=f"reward:{tiny.reward}",
                      ref_model=str(tiny.ref), prompt_set=prompts, progress=False)
    m = result["metrics"]
    assert m["eval/n"] == 6 and result["kl_temperature"] == T and result["prompt_set"]
    assert 0 <= m["eval/win_rate"] <= 100 and math.isfinite(m["eval/kl_ref"])


def test_logprobs_recorded_while_sampling_equal_a_fresh_forward_and_give_the_same_kl(
        tiny, tmp_path):
    """`distalign generate` (HF) stores ln π_T(y|x) from generate's own logits; eval's KL then
    skips π's forward. Both equal an independent unpadded forward of each row."""
    from distalign.eval.generate import generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n"
                               for p, r in zip(PROMPTS[:4], REFS[:4], strict=True)))
    gen = GenerationConfig(max_new_tokens=6, temperature=T)
    out = generate(str(tiny.policy), str(prompts), tmp_path / "gens.jsonl", gen=gen,
                   num_samples=2, batch_size=3, progress=False)
    rows, _ = read_generations(out)
    model = AutoModelForCausalLM.from_pretrained(tiny.policy).eval()
    for r in rows:
        ids = torch.tensor([r["prompt_token_ids"] + r["output_token_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double() / T, -1)
        p = len(r["prompt_token_ids"])
        want = sum(float(logp[t - 1, ids[0, t]]) for t in range(p, ids.shape[1]))
        assert r["output_logprob"] == pytest.approx(want, abs=1e-4)
    recorded = evaluate(out, tmp_path / "a", ref_model=str(tiny.ref), progress=False)
    forward = evaluate(out, tmp_path / "b", ref_model=str(tiny.ref), progress=False,
                       policy_model=str(tiny.policy))
    assert recorded["kl_policy_logprobs"] == "recorded while sampling"
    assert forward["kl_policy_logprobs"] == "forward"
    for key in ("eval/kl_ref", "eval/kl_ref_k3", "eval/entropy"):
        assert recorded["metrics"][key] == pytest.approx(forward["metrics"][key], abs=1e-4)
    assert abs(recorded["metrics"]["eval/kl_ref"]) > 1e-3  # π and π₀ differ: not a 0 = 0 check
    # π against itself from the recorded log-probs: no forward at all, KL exactly 0
    same = evaluate(out, tmp_path / "c", ref_model=str(tiny.policy), progress=False)
    assert same["metrics"]["eval/kl_ref"] == 0.0
    assert same["metrics"]["eval/entropy"] == pytest.approx(forward["metrics"]["eval/entropy"],
                                                            abs=1e-4)
