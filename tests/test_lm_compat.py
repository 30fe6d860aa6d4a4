"""``distalign.lm.compat.kept_logits``: the kept positions' logits whether or not the installed
transformers takes a 2-D ``logits_to_keep`` (>= 5.20 does; ``make test-min`` runs this at the
lowest supported version, where the fallback computes full logits)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from distalign.lm import compat
from distalign.testing import tiny_causal_lm, tiny_tokenizer


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 40, (3, 9), generator=g)
    keep = torch.zeros(3, 9, dtype=torch.bool)
    keep[0, 2:6] = keep[1, 0] = keep[2, 4:9] = True
    return ids, keep


def test_kept_logits_equal_the_full_logits_at_kept_positions():
    model = tiny_causal_lm(tiny_tokenizer(), seed=0)
    ids, keep = _inputs()
    with torch.no_grad():
        want = model(input_ids=ids).logits[keep]
        got = compat.kept_logits(model, keep, input_ids=ids)
    assert got.shape == (int(keep.sum()), model.config.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _OldForward(torch.nn.Module):
    """A model whose forward indexes ``hidden[:, keep]`` like transformers < 5.20."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_causal_lm(tiny_tokenizer(), seed=0)
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, logits_to_keep: object = 0) -> SimpleNamespace:
        self.calls += 1
        hidden = self.inner.model(input_ids=input_ids).last_hidden_state
        if not isinstance(logits_to_keep, int):
            hidden = hidden[:, logits_to_keep, :]  # IndexError for a 2-D mask
        return SimpleNamespace(logits=self.inner.lm_head(hidden))


def test_a_forward_without_2d_keep_falls_back_once_per_class(caplog):
    model, (ids, keep) = _OldForward(), _inputs()
    compat._FULL_LOGITS.discard("_OldForward")
    with torch.no_grad():
        want = model.inner(input_ids=ids).logits[keep]
        first = compat.kept_logits(model, keep, input_ids=ids)
        calls = model.calls
        again = compat.kept_logits(model, keep, input_ids=ids)
    assert calls == 2 and model.calls == 3  # the failed try happens once per model class
    assert "does not take a 2-D logits_to_keep" in caplog.text
    torch.testing.assert_close(first, want)
    torch.testing.assert_close(again, want)
