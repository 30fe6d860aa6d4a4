"""``hf:DIR``: a local causal LM as a pairwise judge, P("A") against P("B") from its logits.

The template is sent as one user message (through the model's chat template when it has one),
and the judge's next-token distribution is read at the start of its answer: P(A ≻ B) =
p(A) / (p(A) + p(B)), where p(A) sums the probabilities of the tokens that spell "A" (with or
without a leading space). Every answer is therefore parseable. Prompts are left-padded and
judged in batches, sorted by length; the LM head runs on the last position only.
"""

from __future__ import annotations

from typing import Any

import torch

from distalign.eval.judges.base import PairwiseJudge, Template
from distalign.lm.collators import pad_sequences
from distalign.lm.logprobs import position_ids_from_mask


def letter_ids(tok: Any, letter: str) -> list[int]:
    """Ids of the single tokens that spell ``letter`` (``"A"``, ``" A"``) in this vocabulary."""
    ids = set()
    for text in (letter, " " + letter):
        enc = tok(text, add_special_tokens=False)["input_ids"]
        # an unknown-word token also "encodes" A in one id: require that it decodes back
        if len(enc) == 1 and tok.decode(enc).strip() == letter:
            ids.add(enc[0])
    if not ids:
        raise ValueError(f"the judge's tokenizer has no single token for {letter!r}")
    return sorted(ids)


class HFJudge(PairwiseJudge):
    def __init__(self, path: str, gguf_file: str | None, template: Template, cache: Any = None,
                 batch_size: int = 8, max_length: int = 2048) -> None:
        super().__init__(cache, batch_size)
        from distalign.lm.models import ModelConfig, load_policy, load_tokenizer

        cfg = ModelConfig(name_or_path=path, gguf_file=gguf_file)
        self.tok = load_tokenizer(cfg)
        self.model = load_policy(cfg).eval().requires_grad_(False)
        self.id = f"hf:{path}" + (f"@{gguf_file}" if gguf_file else "")
        self.template, self.template_id = template, template.id
        self.a_ids, self.b_ids = letter_ids(self.tok, "A"), letter_ids(self.tok, "B")
        self.max_length = max_length

    def encode(self, prompt: str, first: str, second: str) -> list[int]:
        text = self.template.render(prompt, first, second)
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": text}],
                                                tokenize=False, add_generation_prompt=True)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tok(text + "\nAnswer:")["input_ids"]
        return list(ids)[-self.max_length :]  # keep the question at the end if too long

    @torch.no_grad()
    def _compare(self, items: list[tuple[str, str, str]]) -> list[tuple[float | None, str]]:
        enc = [self.encode(*it) for it in items]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        ids, attn = pad_sequences([enc[i] for i in order], self.tok.pad_token_id, "left")
        out = self.model(input_ids=ids, attention_mask=attn,
                         position_ids=position_ids_from_mask(attn), use_cache=False,
                         logits_to_keep=1)
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        la = torch.logsumexp(logp[:, self.a_ids], -1)
        lb = torch.logsumexp(logp[:, self.b_ids], -1)
        p_a = torch.sigmoid(la - lb).tolist()
        result: list[tuple[float | None, str]] = [(None, "")] * len(items)
        for row, i in enumerate(order):
            mass = float(torch.exp(torch.logaddexp(la[row], lb[row])))
            result[i] = (p_a[row], f"p(A)+p(B)={mass:.3f}")
        return result
