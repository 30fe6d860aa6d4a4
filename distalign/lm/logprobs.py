"""Masked token log-probabilities of HF causal LMs.

Batches are ``input_ids``/``attention_mask`` of shape ``[B, L]`` (left- or right-padded) plus a
``response_mask`` marking the tokens whose log-probs count. Outputs are aligned with
``input_ids``: position t holds ln p(input_ids[t] | input_ids[<t]); position 0 holds 0.

Memory: the model runs up to its final hidden states only (its LM head is bypassed for the
call), and :class:`HeadLogprobs` projects them through the head chunk by chunk of positions,
taking each chunk's logsumexp and target logit at once. At most one chunk of full-vocabulary
logits exists at a time, in the forward and in the backward pass (which recomputes the chunk's
logits instead of keeping them): for SmolLM2 (49k tokens) a 64 × 181-token batch would
otherwise hold 2.3 GB of logits, plus as much again per temporary and for their gradient.
Models whose logits are not exactly ``head(hidden)`` (soft-capping, logit scales) keep the
plain path; a one-off probe per model class checks this.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distalign.lm.wrappers import eval_mode, is_peft_model, unwrap_model

log = logging.getLogger("distalign")
_NO_KEEP: set[str] = set()  # model classes whose forward rejected a boolean logits_to_keep
_HEAD_OK: dict[str, bool] = {}  # model class -> its logits are head(final hidden state)
# logits per chunk of the head (64 MiB in float32): one chunk is SmolLM2's 341 positions
CHUNK_ELEMENTS = 1 << 24
# config fields of models that transform the head's output (the chunked path would skip it)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "output_multiplier", "lm_head_multiplier", "output_logits_scaling")


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def forward_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, keep: Tensor | None = None
) -> Tensor:
    """Logits ``[B, L, V]``; with a boolean ``keep [B, L]``, only the kept positions' logits,
    flattened to ``[N, V]`` (transformers' ``logits_to_keep`` mask: the LM head never runs on
    the other positions, which saves its FLOPs and the ``[B, L, V]`` activation)."""
    kwargs = {} if keep is None else {"logits_to_keep": keep}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )
    return out.logits


def _upcast(x: Tensor) -> Tensor:
    """Log-softmax in at least float32 (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _logprobs(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    logits = _upcast(logits)
    if temperature != 1.0:
        logits = logits / temperature
    # logsumexp + gather avoids materialising a full log_softmax copy
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def logits_to_token_logprobs(
    logits: Tensor, input_ids: Tensor, temperature: float = 1.0
) -> Tensor:
    """Aligned token log-probs from logits ``[B, L, V]``; logits are divided by the sampling
    temperature so that ln π matches the distribution the samples came from."""
    tok = _logprobs(logits[:, :-1], input_ids[:, 1:], temperature)
    return torch.nn.functional.pad(tok, (1, 0), value=0.0)


# ------------------------------------------------------------------ chunked LM head
def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    logits = _upcast(F.linear(h, weight, bias))  # the head in the model's dtype, as unchunked
    return logits / temperature if temperature != 1.0 else logits


class HeadLogprobs(torch.autograd.Function):
    """``ln softmax(F.linear(hidden, weight, bias) / T)[targets]`` per row of ``hidden [N, H]``,
    ``rows`` rows at a time. Saves only the inputs and the ``[N]`` logsumexps (and the logits
    when they fit in one chunk); backward recomputes each chunk's logits and turns them in
    place into the logits' gradient ``g·(onehot − softmax)/T``, so its peak is one chunk too."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                temperature: float, rows: int) -> Tensor:
        n = hidden.shape[0]
        out = hidden.new_empty(n, dtype=torch.float64 if hidden.dtype == torch.float64
                               else torch.float32)
        lse = torch.empty_like(out)
        logits = None
        for s in range(0, n, rows):
            logits = _chunk_logits(hidden[s : s + rows], weight, bias, temperature)
            lse[s : s + rows] = torch.logsumexp(logits, -1)
            out[s : s + rows] = logits.gather(-1, targets[s : s + rows, None])[:, 0]
        out -= lse
        # a single chunk is kept for backward (at most one chunk either way): no recomputation
        kept = logits if n <= rows and any(ctx.needs_input_grad[:3]) else None
        ctx.save_for_backward(hidden, weight, bias, targets, lse, kept)
        ctx.temperature, ctx.rows = temperature, rows
        dev = hidden.device.type  # recompute under the forward's autocast state
        ctx.amp = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse, kept = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        t, rows = ctx.temperature, ctx.rows
        acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        gb = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        dev, enabled, dtype = ctx.amp
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            for s in range(0, hidden.shape[0], rows):
                h, g_out = hidden[s : s + rows], grad[s : s + rows, None].to(lse.dtype)
                if kept is None:
                    g = _chunk_logits(h, weight, bias, t).sub_(lse[s : s + rows, None])
                else:  # out of place: the saved logits stay intact (retain_graph)
                    g = kept - lse[:, None]
                g.exp_().mul_(-g_out)  # −g·softmax
                g.scatter_add_(-1, targets[s : s + rows, None], g_out)  # + g·onehot
                if t != 1.0:
                    g.div_(t)
                g = g.to(weight.dtype)
                if gh is not None:
                    gh[s : s + rows] = (g @ weight).to(hidden.dtype)
                if gw is not None:
                    gw.addmm_(g.t().to(acc), h.to(acc))
                if gb is not None:
                    gb += g.sum(0).to(acc)
        cast = lambda x: None if x is None else x.to(weight.dtype)  # noqa: E731
        return gh, cast(gw), cast(gb), None, None, None


def head_logprobs(hidden: Tensor, head: nn.Linear, targets: Tensor, temperature: float = 1.0,
                  chunk_elements: int | None = None) -> Tensor:
    """``[N]`` log-probs of ``targets`` under ``head`` applied to ``hidden [N, H]`` at
    ``temperature``, never holding more than ``chunk_elements`` logits at once."""
    vocab = head.weight.shape[0]
    rows = max(1, (chunk_elements or CHUNK_ELEMENTS) // vocab)
    return HeadLogprobs.apply(hidden, head.weight, head.bias, targets, temperature, rows)


@contextmanager
def _head_bypassed(head: nn.Module) -> Iterator[None]:
    """The model's forward returns what its head receives (the final hidden states)."""
    saved = head.__dict__.get("forward")
    head.forward = lambda x: x  # an instance attribute shadows nn.Linear.forward
    try:
        yield
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The model's LM head when its logits are exactly ``head(final hidden)``, else None."""
    inner = unwrap_model(model)
    base = inner.get_base_model() if is_peft_model(inner) else inner
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    config = getattr(base, "config", None)
    # FSDP2 (fully_shard) re-classes wrapped modules and leaves parameters sharded (DTensor)
    # outside the model's forward, where the chunked head would use them
    if (type(head) is not nn.Linear or hasattr(head, "_hf_hook") or config is None
            or type(head.weight).__name__ == "DTensor"
            or any(getattr(config, k, None) not in (None, 1.0) for k in _LOGIT_TRANSFORMS)):
        return None
    return head


@torch.no_grad()
def _probe(model: nn.Module, head: nn.Linear, input_ids: Tensor) -> bool:
    """Once per model class: do the model's logits equal ``head(hidden)``?"""
    model = unwrap_model(model)  # no DDP forward for a pass that never backpropagates
    ids = input_ids[:1, -4:]
    attn = torch.ones_like(ids)
    with eval_mode(model):
        want = forward_logits(model, ids, attn).float()
        with _head_bypassed(head):
            hidden = forward_logits(model, ids, attn)
        got = F.linear(hidden, head.weight, head.bias).float()
    tol = 1e-5 if head.weight.dtype in (torch.float32, torch.float64) else 1e-2
    return got.shape == want.shape and torch.allclose(got, want, rtol=tol, atol=tol)


def chunkable_head(model: nn.Module, input_ids: Tensor) -> nn.Linear | None:
    """The head :func:`kept_outputs` may bypass, or None (plain path)."""
    head = _plain_head(model)
    if head is None:
        return None
    name = type(unwrap_model(model)).__name__
    if name not in _HEAD_OK:
        _HEAD_OK[name] = _probe(model, head, input_ids)
        if not _HEAD_OK[name]:
            log.info("%s: logits are not head(hidden); log-probs use full logits", name)
    return head if _HEAD_OK[name] else None


def kept_outputs(model: nn.Module, inputs: dict[str, Tensor],
                 keep: Tensor) -> tuple[Tensor, nn.Linear | None]:
    """The model's outputs at the positions a boolean ``keep`` selects, row-major: ``(hidden
    [N, H], head)`` when the head can be bypassed (score them with :func:`score_outputs`),
    else ``(logits [N, V], None)``. ``inputs`` are the model's keyword arguments.

    Only kept positions reach the head (transformers' boolean ``logits_to_keep``); models whose
    forward does not take a boolean ``logits_to_keep`` compute every position, and the kept
    ones are selected here.
    """
    name = type(unwrap_model(model)).__name__
    head = chunkable_head(model, inputs["input_ids"])
    kwargs = dict(inputs, use_cache=False)
    if name not in _NO_KEEP:
        kwargs["logits_to_keep"] = keep
    with _head_bypassed(head) if head is not None else _null():
        try:
            out = model(**kwargs).logits
        except (TypeError, IndexError) as err:  # no (boolean) logits_to_keep support
            if name in _NO_KEEP:
                raise
            _NO_KEEP.add(name)  # remembered: one failed forward per model class, not per call
            log.warning("%s does not take a boolean logits_to_keep (%s: %s); computing full "
                        "logits (slower, same values)", name, type(err).__name__, err)
            kwargs.pop("logits_to_keep")
            out = model(**kwargs).logits
    return (out[keep] if out.dim() == 3 else out), head


def score_outputs(out: Tensor, head: nn.Linear | None, targets: Tensor,
                  temperature: float = 1.0) -> Tensor:
    """``[N]`` log-probs of ``targets`` from :func:`kept_outputs`' ``(out, head)``."""
    if head is None:
        return _logprobs(out, targets, temperature)
    return head_logprobs(out, head, targets, temperature)


def kept_logprobs(model: nn.Module, inputs: dict[str, Tensor], keep: Tensor, targets: Tensor,
                  temperature: float = 1.0) -> Tensor:
    """``[N]``: ln p(targets[i] | the i-th kept position's prefix), row-major over ``keep``."""
    out, head = kept_outputs(model, inputs, keep)
    return score_outputs(out, head, targets, temperature)


@contextmanager
def _null() -> Iterator[None]:
    yield


# ------------------------------------------------------------------------- public
def token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    temperature: float = 1.0,
    response_mask: Tensor | None = None,
) -> Tensor:
    """ln π(token_t | prefix) for every position, ``[B, L]`` (position 0 is 0).

    With ``response_mask``, only positions where it is 1 are computed (the others are 0): the
    LM head then runs on response positions only (see :func:`kept_logprobs`).
    """
    if response_mask is None:
        want = torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    else:
        want = response_mask[:, 1:].bool()
    keep = F.pad(want, (0, 1), value=False)  # logits at t-1 predict token t
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "position_ids": position_ids_from_mask(attention_mask)}
    tok = kept_logprobs(model, inputs, keep, input_ids[:, 1:][want], temperature)
    at = F.pad(want, (1, 0), value=False)
    return tok.new_zeros(input_ids.shape).masked_scatter(at, tok)


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """ln π(response | prompt) = Σ over response tokens, ``[B]``."""
    tok = token_logprobs(model, input_ids, attention_mask, temperature, response_mask)
    return (tok * response_mask.to(tok.dtype)).sum(-1)
