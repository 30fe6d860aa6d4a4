"""The world's tokenizer and its tiny transformer policies, built locally (no hub access).

The tokenizer is word-level over ``<eos>`` and the world's letters, with whitespace
pre-tokenisation, so text ↔ tokens round-trips exactly: a prompt ``"a c"`` is two tokens, a
response ``"a c b"`` three. ``<eos>`` doubles as pad (the engine builds masks from lengths,
never by comparing ids with pad). There is no BOS and no UNK (unknown words raise), no chat
template, so the data pipeline encodes plain text and appends ``<eos>``; the policy's
vocabulary is exactly the world's, see ``world.py`` for why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from distalign.synthetic.world import EOS, World

# Small enough that a few hundred CPU steps take seconds; big enough (≈70k weights) to
# represent the Markov table of π* (≈200 free logits) comfortably. GPT-2, not Llama: with one
# alphabet and no BOS, a RoPE-only model cannot tell "a" from "a a" (attention over identical
# tokens with relative positions returns the same vector), so it could not know where the
# prompt ends or when EOS is due; GPT-2's learned absolute positions make that trivial.
POLICY_DIMS: dict[str, Any] = dict(n_embd=64, n_layer=2, n_head=4, n_inner=128)


def world_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer: ``<eos>`` (id 0, also pad) then the letters."""
    vocab = {tok: i for i, tok in enumerate((EOS, *world.content_tokens()))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=EOS,
        eos_token=EOS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def world_policy(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides: Any
) -> GPT2LMHeadModel:
    """A freshly initialised tiny GPT-2 for the world (deterministic in ``seed``)."""
    kwargs: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        n_positions=32,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        attn_implementation="eager",
        resid_pdrop=0.0,  # no dropout: π is a deterministic function of its weights
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **POLICY_DIMS,
    )
    kwargs.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(**kwargs))
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    return model.float().eval()


def save_policy(model: Any, tokenizer: Any, directory: str | Path) -> Path:
    """``save_pretrained`` model and tokenizer into one folder (a loadable checkpoint)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
