"""``openai:MODEL`` with ``--judge-url URL``: any OpenAI-compatible chat-completions server.

vLLM's ``vllm serve``, llama.cpp's server and OpenAI itself all speak this protocol; the
official ``openai`` client does the HTTP work. Per single-order request:

- **Logprob-weighted preference** (AlpacaEval's weighted annotator): when the server returns
  ``top_logprobs`` for the first answer token, P(A ≻ B) = p(A) / (p(A) + p(B)) over the top
  tokens that spell A or B.
- Otherwise the **parsed verdict** of the answer text (1 for A, 0 for B); an answer that names
  neither is *unparseable*: counted and reported, never replaced by a coin flip.
- Bounded concurrency (a thread pool of ``concurrency`` requests), a per-request ``timeout``,
  and the client's retries with exponential backoff on connection errors, 408, 409, 429 and
  5xx (honouring ``Retry-After``).
- The API key is read from ``DISTALIGN_JUDGE_API_KEY`` (else ``OPENAI_API_KEY``; local servers
  accept any key, so a placeholder is sent when neither is set). It is never logged.
"""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from distalign.errors import ConfigError
from distalign.eval.judges.base import PairwiseJudge, Template

API_KEY_ENV = ("DISTALIGN_JUDGE_API_KEY", "OPENAI_API_KEY")
_VERDICT = re.compile(
    r"^[\s\"'*#(\[]*(?:(?:response|output|summary|answer|verdict)\s*[:\-]?\s*)?"
    r"\(?([AB])(?![A-Za-z])", re.IGNORECASE
)


def parse_verdict(text: str | None) -> float | None:
    """1.0 if the answer picks A, 0.0 if B, None if it names neither (or starts elsewhere)."""
    if not text:
        return None
    m = _VERDICT.match(text)
    if m is None or m.group(1) not in "AB":  # the letter itself must be a capital
        return None
    return 1.0 if m.group(1) == "A" else 0.0


def preference_from_logprobs(top: list[Any] | None) -> float | None:
    """P(A ≻ B) from the first token's top log-probs, or None when neither letter is there.
    Tokens count for a letter when they spell it up to spaces and quoting (" A", "**A")."""
    mass = {"A": 0.0, "B": 0.0}
    for entry in top or []:
        token = (getattr(entry, "token", None) or "").strip().strip("*\"'(")
        if token in mass:
            mass[token] += math.exp(entry.logprob)
    total = mass["A"] + mass["B"]
    return mass["A"] / total if total > 0 else None


def api_key() -> str:
    for name in API_KEY_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return "EMPTY"


class OpenAIJudge(PairwiseJudge):
    def __init__(
        self,
        model: str,
        url: str,
        template: Template,
        cache: Any = None,
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 5,
        top_logprobs: int = 10,
        max_tokens: int = 5,
    ) -> None:
        super().__init__(cache, batch_size=max(concurrency * 4, 1))
        from openai import OpenAI

        self.model, self.url = model, url
        self.id = f"openai:{model}@{url}"
        self.template, self.template_id = template, template.id
        self.client = OpenAI(base_url=url, api_key=api_key(), timeout=timeout,
                             max_retries=max_retries)
        self.concurrency, self.top_logprobs, self.max_tokens = concurrency, top_logprobs, max_tokens

    def _one(self, item: tuple[str, str, str]) -> tuple[float | None, str]:
        import openai

        messages = [{"role": "user", "content": self.template.render(*item)}]
        try:
            resp = self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=self.max_tokens,
                temperature=0.0, logprobs=True, top_logprobs=self.top_logprobs,
            )
        except openai.APIConnectionError as exc:  # includes timeouts, after the retries
            raise ConfigError(f"judge URL {self.url} is unreachable ({type(exc).__name__}); "
                              "answers so far are cached") from exc
        except openai.APIStatusError as exc:
            raise ConfigError(f"judge {self.url} answered HTTP {exc.status_code} for model "
                              f"{self.model!r}; answers so far are cached") from exc
        if not resp.choices:
            return None, ""
        choice = resp.choices[0]
        text = (choice.message.content or "") if choice.message else ""
        content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
        if content:
            p = preference_from_logprobs(content[0].top_logprobs)
            if p is not None:
                return p, text
        return parse_verdict(text), text

    def _compare(self, items: list[tuple[str, str, str]]) -> list[tuple[float | None, str]]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, items))
