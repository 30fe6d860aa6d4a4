"""Sequence log-probs of preference pairs with the shared prompt computed once.

A pair batch stacks prompt+chosen rows then prompt+rejected rows, so the prompt x goes through
the model twice. Here each pair becomes ONE packed row ``[x, a⁺, a⁻]`` with a custom 4-D
attention mask in which a⁻ attends to x and to itself but not to a⁺, and a⁻'s position ids
restart after x. Every token then sees exactly the context it has in the stacked layout, so
ln π(a⁺|x) and ln π(a⁻|x) are unchanged (up to float reassociation) while the model processes
|x| + |a⁺| + |a⁻| tokens per pair instead of 2|x| + |a⁺| + |a⁻|. The LM head runs only on the
positions that predict response tokens, chunked (:func:`distalign.lm.logprobs.kept_outputs`).

The same layout serves offline pairs (right-padded rows) and on-policy sample pairs (rollouts:
a left-padded prompt, then two sampled responses); left padding is dropped when packing.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from distalign.lm.logprobs import kept_outputs, score_outputs, token_logprobs
from distalign.lm.wrappers import unwrap_model

log = logging.getLogger("distalign")
_warned: set[str] = set()

_SUPPORTED_ATTN = ("sdpa", "eager")


def _inner_config(model: nn.Module):
    inner = unwrap_model(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return base.config


def _split(batch: dict[str, Tensor]) -> list[tuple[int, int, int, int]] | None:
    """(prompt start, response start, chosen length, rejected length) per pair, or None if a
    pair's rows do not share one prompt (then the stacked path is used). The prompt is the
    real tokens before the response (left padding excluded); responses are contiguous."""
    ids, resp = batch["input_ids"], batch["response_mask"].bool()
    attn = batch["attention_mask"].bool()
    b = ids.shape[0] // 2
    p = resp.int().argmax(-1).tolist()
    s = attn.int().argmax(-1).tolist()  # first real token (left padding before it)
    n = resp.sum(-1).tolist()
    out = []
    for i in range(b):
        j = b + i
        if (p[i] != p[j] or s[i] != s[j] or p[i] <= s[i]
                or not torch.equal(ids[i, s[i] : p[i]], ids[j, s[i] : p[i]])
                or not bool(attn[i, s[i] : p[i]].all())):
            return None
        out.append((s[i], p[i], int(n[i]), int(n[j])))
    return out


def pair_sequence_logprobs(
    model: nn.Module, batch: dict[str, Tensor], temperature: float = 1.0
) -> Tensor:
    """``[B, 2]`` = (ln π(a⁺|x), ln π(a⁻|x)) for a stacked ``[2B, L]`` pair batch."""
    cfg = _inner_config(model)
    lens = _split(batch)
    impl = getattr(cfg, "_attn_implementation", None)
    width = max((p - s + c + r for s, p, c, r in lens), default=0) if lens else 0
    window = getattr(cfg, "sliding_window", None)
    if lens is None or impl not in _SUPPORTED_ATTN or (window and width > window):
        why = ("pairs without one shared prompt prefix" if lens is None else
               f"attention {impl!r}" if impl not in _SUPPORTED_ATTN else "a sliding window")
        if why not in _warned:  # once per reason: slower (prompt computed twice), not wrong
            _warned.add(why)
            log.info("pair log-probs: packed fast path off (%s); using stacked rows", why)
        tok = token_logprobs(
            model, batch["input_ids"], batch["attention_mask"], temperature,
            batch["response_mask"],
        )
        seq = (tok * batch["response_mask"].to(tok.dtype)).sum(-1)
        half = seq.shape[0] // 2
        return torch.stack([seq[:half], seq[half:]], dim=1)

    ids = batch["input_ids"]
    b, dev = len(lens), ids.device
    packed = torch.zeros((b, width), dtype=ids.dtype, device=dev)
    pos = torch.zeros((b, width), dtype=torch.long, device=dev)
    seg = torch.full((b, width), -1, dtype=torch.long, device=dev)  # 0 x, 1 a⁺, 2 a⁻, -1 pad
    src_rows, src_cols, tgt, which = [], [], [], []
    for i, (s, p, c, r) in enumerate(lens):
        x = p - s  # real prompt tokens
        packed[i, :x] = ids[i, s:p]
        packed[i, x : x + c] = ids[i, p : p + c]
        packed[i, x + c : x + c + r] = ids[b + i, p : p + r]
        pos[i, : x + c] = torch.arange(x + c, device=dev)
        pos[i, x + c : x + c + r] = torch.arange(x, x + r, device=dev)
        seg[i, :x], seg[i, x : x + c], seg[i, x + c : x + c + r] = 0, 1, 2
        # token at column j is predicted from column j-1, except a⁻'s first token: from x's last
        chosen_src = list(range(x - 1, x + c - 1))
        rejected_src = [x - 1, *range(x + c, x + c + r - 1)] if r else []
        src_rows += [i] * (c + r)
        src_cols += chosen_src + rejected_src
        tgt += packed[i, x : x + c + r].tolist()
        which += [2 * i] * c + [2 * i + 1] * r

    q = torch.arange(width, device=dev)
    allowed = (q[:, None] >= q[None, :])[None] & (seg >= 0)[:, None, :]
    allowed &= ~((seg[:, :, None] == 2) & (seg[:, None, :] == 1))
    allowed |= torch.eye(width, dtype=torch.bool, device=dev)[None]  # pad rows: no empty softmax
    dtype = next(p for p in model.parameters()).dtype
    mask = allowed[:, None] if impl == "sdpa" else torch.zeros(
        allowed[:, None].shape, dtype=dtype, device=dev
    ).masked_fill(~allowed[:, None], torch.finfo(dtype).min)

    keep = torch.zeros((b, width), dtype=torch.bool, device=dev)
    rows_t = torch.tensor(src_rows, device=dev, dtype=torch.long)
    cols_t = torch.tensor(src_cols, device=dev, dtype=torch.long)
    keep[rows_t, cols_t] = True
    out, head = kept_outputs(model, {"input_ids": packed, "attention_mask": mask,
                                     "position_ids": pos}, keep)
    # x's last column predicts both responses' first tokens: its output is used twice
    row_of = (keep.flatten().cumsum(0) - 1).view(b, width)[rows_t, cols_t]
    tok = score_outputs(out[row_of], head, torch.tensor(tgt, device=dev), temperature)
    res = tok.new_zeros(2 * b).index_add(0, torch.tensor(which, device=dev), tok)
    return res.view(b, 2)
