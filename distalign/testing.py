"""Tiny, locally built tokenizers and models for tests (no hub access, CPU, milliseconds).

Every test in the project builds its models here, so the helpers are deterministic:
the same ``seed`` gives bit-identical weights, and the tokenizer never changes.

>>> tok = tiny_tokenizer()
>>> tok.decode(tok("the cat is good").input_ids)
'the cat is good'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")

# ~100 frequent English words: enough for readable prompts like "what is a good name for a cat".
_WORDS_TEXT = (
    "the a an and or but if then so of to in on at by for with from as is are was were be "
    "been it this that these those i you he she we they me him her us them my your his its our "
    "their what which who how why when where yes no not do does did have has had can will "
    "would should could good bad great small big new old first last many more most some any "
    "all one two three cat dog sun moon water food name day time way man woman child people "
    "word thing world life hand house car book ? . , ! : user assistant"
)
WORDS = tuple(_WORDS_TEXT.split())
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")

# <bos> then "user: ...\nassistant: ..." per turn; the generation prompt opens an assistant turn.
# The newline is emitted as an expression because HF renders templates with trim_blocks=True,
# which would swallow a literal newline after "{% endif %}".
# The Whitespace pre-tokenizer splits "user:" into "user" ":", so both are in-vocabulary.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %} {{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _vocab() -> dict[str, int]:
    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, *WORDS, *LETTERS):
        vocab.setdefault(tok, len(vocab))
    return vocab


def tiny_tokenizer(
    padding_side: str = "right", pad_is_eos: bool = False
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over a fixed ~130-token vocabulary.

    Special tokens: ``<pad>`` (0), ``<eos>`` (1), ``<bos>`` (2), ``<unk>`` (3). Encoding does
    *not* add ``<bos>`` automatically (the chat template does), so ``tok(text)`` is exactly the
    words of ``text``. Decoding joins tokens with single spaces and drops special tokens when
    ``skip_special_tokens=True``. ``pad_is_eos=True`` makes ``<eos>`` the pad token too, as in
    many released checkpoints (Llama, GPT-2): the setting where id-based masking goes wrong.
    """
    core = Tokenizer(models.WordLevel(vocab=_vocab(), unk_token="<unk>"))
    # Whitespace splits on \w+|[^\w\s]+ so "cat." → "cat" "." and "user:" → "user" ":".
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins with spaces
    core.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<eos>" if pad_is_eos else "<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _tiny_llama_config(tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> LlamaConfig:
    kwargs: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        attn_implementation="eager",  # deterministic and identical across torch builds
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _seeded(cls: type, config: LlamaConfig, seed: int) -> Any:
    # fork_rng keeps the caller's global RNG stream untouched by model construction.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.float().eval()


def tiny_causal_lm(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides: Any
) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 32, 2 heads, MLP 64), float32, deterministic in ``seed``.

    ``overrides`` are forwarded to ``LlamaConfig`` (e.g. ``initializer_range=0.5`` for a
    peakier next-token distribution). Returned in eval mode.
    """
    model = _seeded(LlamaForCausalLM, _tiny_llama_config(tokenizer, **overrides), seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def tiny_reward_model(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides: Any
) -> LlamaForSequenceClassification:
    """The tiny Llama with a scalar ``score`` head (``num_labels=1``): a reward/value model."""
    config = _tiny_llama_config(tokenizer, num_labels=1, **overrides)
    return _seeded(LlamaForSequenceClassification, config, seed)


def add_logit_bias(model: LlamaForCausalLM, bias: dict[int, float]) -> LlamaForCausalLM:
    """Give the LM head a bias (in place), e.g. ``{tok.eos_token_id: 3.0}`` so that sampled
    responses end often. In-memory only: Llama checkpoints have no head bias."""
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True, dtype=old.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        for token, value in bias.items():
            head.bias[token] = value
    model.lm_head = head
    return model


def save_tiny(obj: Any, directory: str | Path) -> Path:
    """``save_pretrained`` a tiny model or tokenizer into ``directory`` and return the path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    obj.save_pretrained(path)
    return path


def save_tiny_checkpoint(
    directory: str | Path, seed: int = 0, reward: bool = False, **overrides: Any
) -> Path:
    """Save a tiny model *and* its tokenizer into one folder, as a hub checkpoint would be."""
    tok = tiny_tokenizer()
    model = (tiny_reward_model if reward else tiny_causal_lm)(tok, seed=seed, **overrides)
    save_tiny(tok, directory)
    return save_tiny(model, directory)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists into ``(input_ids, attention_mask)`` — the prompt-batch layout."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


# Preference rows in the tiny vocabulary, for `python -m distalign.testing DIR` (a starting point
# for trying the CLI: the README's walk-through).
EXAMPLE_PAIRS = (
    ("what is a good name for a cat", "the cat is good", "no"),
    ("the dog is", "a good dog", "bad bad"),
    ("how was your day", "it was a great day", "day"),
    ("my house is big", "yes it is", "no it is not big at all"),
    ("where is the moon", "the moon is there", "i do not"),
    ("you are good", "thank you", "you"),
    ("who is that man", "he is my first man", "no one"),
    ("what can i do", "you can do it", "nothing"),
)


def write_example(directory: str | Path) -> dict[str, Path]:
    """A tiny policy, a tiny reward model, preference pairs and held-out prompts in
    ``directory``: everything the CLI needs, built in a second with no download."""
    import json

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars, for two tiny files
    root = Path(directory)
    paths = {"policy": save_tiny_checkpoint(root / "tiny-policy", seed=0),
             "reward": save_tiny_checkpoint(root / "tiny-reward", seed=2, reward=True)}
    pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in EXAMPLE_PAIRS]
    paths["pairs"] = root / "pairs.jsonl"
    paths["pairs"].write_text("".join(json.dumps(r) + "\n" for r in pairs))
    paths["prompts"] = root / "heldout.jsonl"
    paths["prompts"].write_text("".join(
        json.dumps({"prompt": r["prompt"], "reference": r["chosen"]}) + "\n" for r in pairs))
    return paths


if __name__ == "__main__":
    import sys

    for name, path in write_example(sys.argv[1] if len(sys.argv) > 1 else "example").items():
        print(f"{name}: {path}")
