"""Judges: templates, verdict parsing, the cache, both orders, and the openai judge against a
small OpenAI-compatible server started on 127.0.0.1 in the test (stdlib http.server)."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from distalign.errors import ConfigError, DataError
from distalign.eval.judges import Pair, Verdict, load_template, make_judge
from distalign.eval.judges.cache import JudgeCache
from distalign.eval.judges.openai import OpenAIJudge, parse_verdict, preference_from_logprobs

MAX_REQUESTS = 400  # the server refuses more: a runaway retry loop fails the test


class _Server:
    """Answers chat completions like a judge that prefers the response containing "good".

    ``mode``: ``logprobs`` (top_logprobs with P(good side) = 0.8), ``verdict`` (text only),
    ``garbage`` (an answer naming neither letter), ``429`` / ``500`` (that status once, then
    as ``logprobs``)."""

    def __init__(self, mode: str = "logprobs") -> None:
        self.mode, self.requests, self.prompts = mode, 0, []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    n, mode = server.requests, server.mode
                    server.prompts.append(body["messages"][0]["content"])
                if n > MAX_REQUESTS:
                    return self._send(503, {"error": "too many requests for this test"})
                if mode in ("429", "500") and n == 1:
                    return self._send(int(mode), {"error": {"message": "busy"}},
                                      {"retry-after-ms": "10"})
                self._send(200, server.answer(body))

            def _send(self, code: int, obj: dict, headers: dict | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, body: dict) -> dict:
        text = body["messages"][0]["content"]
        a = text.split("# Response A")[1].split("# Response B")[0]
        p_a = 0.8 if "good" in a else 0.2
        message = {"role": "assistant", "content": "A" if p_a > 0.5 else "B"}
        choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
        if self.mode == "garbage":
            message["content"] = "I cannot decide between them."
        elif self.mode != "verdict":
            top = [{"token": "A", "logprob": math.log(p_a * 0.9), "bytes": None},
                   {"token": " B", "logprob": math.log((1 - p_a) * 0.9), "bytes": None},
                   {"token": "The", "logprob": math.log(0.1), "bytes": None}]
            choice["logprobs"] = {"content": [{"token": message["content"], "bytes": None,
                                               "logprob": top[0]["logprob"],
                                               "top_logprobs": top}]}
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [choice]}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


PAIRS = [Pair("name a pet", "a good cat", "a dog"), Pair("say hi", "hi", "a good hello"),
         Pair("why", "because it is good", "no")]


def _judge(server: _Server, tmp_path: Path, **kw) -> OpenAIJudge:
    cache = JudgeCache(tmp_path / "cache.sqlite")
    return OpenAIJudge("judge-model", server.url, load_template("chat"), cache=cache,
                       concurrency=2, timeout=5, max_retries=2, **kw)


def test_openai_logprob_preference_both_orders_and_cache(server, tmp_path):
    judge = _judge(server, tmp_path)
    verdicts = judge.judge(PAIRS, progress=False)
    # A = output: P(A) from renormalised top logprobs; B = output: 1 − P(A)
    assert [v.p for v in verdicts] == pytest.approx([0.8, 0.2, 0.8])
    assert [v.p_first for v in verdicts] == pytest.approx([0.8, 0.2, 0.8])
    assert [v.p_second for v in verdicts] == pytest.approx([0.8, 0.2, 0.8])
    assert server.requests == 6 and judge.calls == 6  # both orders of 3 pairs
    # both orders were asked: each output appears once as Response A and once as Response B
    firsts = sorted(p.split("# Response A")[1].split("# Response B")[0].strip()
                    for p in server.prompts)
    assert firsts == sorted([x for p in PAIRS for x in (p.output, p.reference)])
    # a rerun (new judge object, same cache file) makes zero requests and gives the same
    again = _judge(server, tmp_path).judge(PAIRS, progress=False)
    assert server.requests == 6
    assert [v.p for v in again] == [v.p for v in verdicts]


def test_openai_parsed_verdicts_without_logprobs(server, tmp_path):
    server.mode = "verdict"
    verdicts = _judge(server, tmp_path).judge(PAIRS, progress=False)
    assert [v.p for v in verdicts] == [1.0, 0.0, 1.0] and not any(v.flipped for v in verdicts)


@pytest.mark.parametrize("mode", ["429", "500"])
def test_openai_retries_then_succeeds(server, tmp_path, mode):
    server.mode = mode
    verdicts = _judge(server, tmp_path).judge(PAIRS[:1], progress=False)
    assert verdicts[0].p == pytest.approx(0.8)
    assert server.requests == 3  # the failed one, then both orders


def test_openai_garbage_is_counted_never_coin_flipped(server, tmp_path):
    server.mode = "garbage"
    judge = _judge(server, tmp_path)
    with pytest.raises(DataError, match=r"6 of 6 answers are unparseable.*cached"):
        judge.judge(PAIRS, progress=False)
    assert len(judge.cache) == 6  # what was asked is kept: a rerun asks nothing
    judge.max_unparsed = 1.0
    verdicts = judge.judge(PAIRS, progress=False)
    assert server.requests == 6 and all(v.p is None for v in verdicts)


def test_openai_unreachable_url_is_one_line(tmp_path):
    judge = OpenAIJudge("m", "http://127.0.0.1:9/v1", load_template("chat"), max_retries=0,
                        timeout=2)
    with pytest.raises(ConfigError, match=r"judge URL http://127.0.0.1:9/v1 is unreachable"):
        judge.judge(PAIRS[:1], progress=False)


def test_api_key_comes_from_env_and_is_not_in_the_id(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTALIGN_JUDGE_API_KEY", "sk-secret-123")
    judge = _judge(server, tmp_path)
    assert judge.client.api_key == "sk-secret-123" and "secret" not in judge.id


def test_parse_verdict_and_logprob_rules():
    assert parse_verdict("A") == 1.0 and parse_verdict(" **B**") == 0.0
    assert parse_verdict("Response A is better") == 1.0 and parse_verdict("Output (B)") == 0.0
    for bad in ("", None, "a", "Both are fine", "Neither", "AB testing"):
        assert parse_verdict(bad) is None
    Tok = type("Tok", (), {})

    def tok(t: str, p: float):
        e = Tok()
        e.token, e.logprob = t, math.log(p)
        return e
    assert preference_from_logprobs([tok("A", 0.3), tok(" A", 0.1), tok("B", 0.4)]) == \
        pytest.approx(0.4 / 0.8)
    assert preference_from_logprobs([tok("The", 0.9)]) is None


def test_verdict_combines_orders_and_flip():
    from distalign.eval.judges.base import _combine

    v = _combine(0.9, 0.7)  # output as A: 0.9; output as B: P(A = ref) = 0.7 → 0.3
    assert v.p == pytest.approx(0.6) and v.flipped is True
    assert _combine(None, 0.2).p == pytest.approx(0.8) and _combine(None, None).p is None
    assert Verdict(0.5).flipped is None


def test_templates(tmp_path):
    t = load_template("tldr")
    assert t.id == "tldr" and "{instruction}" in t.text
    assert "x {y}" in t.render("x {y}", "a", "b")  # braces in text are not format fields
    own = tmp_path / "mine.txt"
    own.write_text("Q {instruction} A {output_1} B {output_2}")
    assert load_template(str(own)).id.startswith("file:mine.txt:")
    own.write_text("no placeholders")
    with pytest.raises(ConfigError, match="lacks the placeholder"):
        load_template(str(own))
    with pytest.raises(ConfigError, match="neither a shipped template"):
        load_template("nope")
    with pytest.raises(ConfigError, match="needs --judge-url"):
        make_judge("openai:gpt")
    with pytest.raises(ConfigError, match="unknown kind"):
        make_judge("gpt4:x")


# ----------------------------------------------------------------------------- hf judge
def _letter_tokenizer():
    """The tiny word-level tokenizer plus the capital letters A and B."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from distalign.testing import LETTERS, SPECIAL_TOKENS, WORDS

    vocab: dict[str, int] = {}
    for t in (*SPECIAL_TOKENS, *WORDS, *LETTERS, "A", "B", "#"):
        vocab.setdefault(t, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def test_hf_judge_equals_unbatched_logits_both_orders_cached(tmp_path):
    from distalign.eval.judges.hf import HFJudge
    from distalign.testing import save_tiny, tiny_causal_lm

    tok = _letter_tokenizer()
    model = tiny_causal_lm(tok, seed=3, initializer_range=0.5)
    save_tiny(tok, tmp_path / "judge")
    save_tiny(model, tmp_path / "judge")
    cache = JudgeCache(tmp_path / "c.sqlite")
    template = load_template("chat")
    judge = HFJudge(str(tmp_path / "judge"), None, template, cache=cache, batch_size=4)
    pairs = [Pair("what is a good name", "the cat", "a dog is good"),
             Pair("how was your day", "it was a great day", "bad"),
             Pair("why", "yes", "no")]
    verdicts = judge.judge(pairs, progress=False)
    a, b = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")

    @torch.no_grad()
    def p_a(prompt: str, first: str, second: str) -> float:  # one unpadded row at a time
        ids = tok(template.render(prompt, first, second) + "\nAnswer:")["input_ids"]
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        return torch.softmax(logits[[a, b]], -1)[0].item()

    for v, p in zip(verdicts, pairs, strict=True):
        fwd, bwd = p_a(p.prompt, p.output, p.reference), 1 - p_a(p.prompt, p.reference, p.output)
        assert v.p_first == pytest.approx(fwd, abs=1e-5)
        assert v.p_second == pytest.approx(bwd, abs=1e-5)
        assert v.p == pytest.approx((fwd + bwd) / 2, abs=1e-5)
    assert judge.calls == 6
    rerun = HFJudge(str(tmp_path / "judge"), None, template, cache=cache)
    assert [v.p for v in rerun.judge(pairs, progress=False)] == [v.p for v in verdicts]
    assert rerun.calls == 0


def test_hf_judge_needs_letter_tokens(tiny):
    from distalign.eval.judges.hf import letter_ids
    from distalign.testing import tiny_tokenizer

    with pytest.raises(ValueError, match="no single token for 'A'"):
        letter_ids(tiny_tokenizer(), "A")


def test_cache_shared_by_two_processes(tmp_path):
    """Two evaluations writing one cache file concurrently (the pipeline shares one)."""
    import subprocess
    import sys

    code = ("import sys; from distalign.eval.judges.cache import JudgeCache\n"
            "c = JudgeCache(sys.argv[1]); w = sys.argv[2]\n"
            "for i in range(200): c.put_many('j', 't', [(w, str(i), 'b', 0.5, 'A')])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "c.sqlite"), w])
             for w in ("x", "y")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    cache = JudgeCache(tmp_path / "c.sqlite")
    assert len(cache) == 400 and cache.get("j", "t", "y", "199", "b") == (0.5, "A")
