"""The ground-truth language world: an enumerable response space with a known target π*.

The language has one alphabet (default ``a b c``) plus ``<eos>``, which also serves as pad.
Prompts are all ``prompt_len``-token strings (default 2: 9 prompts such as ``"a c"``). A
response is 1…``max_len`` tokens (default 3) followed by ``<eos>``, so the response space 𝒜
(default 3 + 9 + 27 = 39 strings per prompt) is enumerable.

Why no other tokens: a policy can put mass only on strings it can spell. With distinct prompt
symbols and ``<bos>``/``<unk>`` in the vocabulary, the first version of this world let the
on-policy methods move most of their mass (≈ 70 %) onto such junk strings, where π* = 0 and a
reward model trained on μ's valid responses extrapolates arbitrarily. π* = 0 there breaks the
paper's bounded-log-ratio Assumption 2, so that failure says nothing about the claims; with a
single alphabet the only strings outside 𝒜 are the empty response and one that does not stop
after ``max_len`` tokens, and the metrics report their mass as ``leak``.

π* is a *prompt-conditioned Markov chain*: the next token (a content token or EOS) depends on
the prompt x, the position k and the previous content token, through a logit table
θ*[x, k, prev, next] with i.i.d. N(0, ``logit_scale``²) entries. EOS is forbidden at k = 0 (no
empty response, which the data pipeline rejects) and forced at k = ``max_len``, so π*(·|x) is a
proper distribution on 𝒜 and ln π*(a|x) is an exact finite sum. Why a table rather than a
random transformer: it is exact in closed form (no float or torch-version drift), small, and its
first-order structure is easily learnable by the 2-layer transformer policy, so the policy class
is (close to) realisable, the paper's Assumption 1.

π_sft, the distribution π₀ is fine-tuned on, has logits ``sft_temper``·θ* + N(0, ``sft_noise``²)
noise: a *flatter, noisy* π*. Flatter, because an SFT model is broader than the aligned target
and alignment sharpens it; noisy, because without noise π_sft ∝ π*^τ and RLHF's family
π₀·π*^{γ/β} (closed form, App. B) would contain π* exactly. With both, RLHF with the *true*
reward can close part of the gap to π* but stops at a floor (``rlhf_floor``), as in the paper's
Figure 1, where π₀ and π* are drawn independently. Sizes were chosen with a tabular
simulation *before* any LM was trained, so that the consistent methods can get well below
KL(π*‖π₀) within the data sizes a 30-minute CPU grid affords (see docs/synthetic.md).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

EOS = "<eos>"
CONTENT_LETTERS = "abcdefghijklmnop"


@dataclass
class WorldConfig:
    """Size and randomness of the world. Defaults give 9 prompts × 39 responses."""

    prompt_len: int = 2  # prompts are all num_content^prompt_len strings
    num_content: int = 3  # the alphabet a, b, c (prompts and responses)
    max_len: int = 3  # content tokens before the (mandatory) EOS
    gamma: float = 1.0  # γ of the preference model (3): labels are BT with reward ln π*
    logit_scale: float = 1.0  # std of π*'s logit table
    sft_temper: float = 0.5  # π_sft's logits are sft_temper·θ* + noise (flatter than π*)
    sft_noise: float = 0.25  # std of the independent noise added to π_sft's logits
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_content <= len(CONTENT_LETTERS):
            raise ValueError(f"num_content must be in 1..{len(CONTENT_LETTERS)}")
        if self.max_len < 1 or self.prompt_len < 1:
            raise ValueError("max_len and prompt_len must be >= 1")
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")


@dataclass
class World:
    """A built world: prompts, the enumerated responses, and exact ln π*, ln π_sft."""

    config: WorldConfig
    prompts: list[str]  # whitespace-joined text, e.g. "a c"
    responses: list[str]  # e.g. "a c b" (EOS not included: the data pipeline appends it)
    response_tokens: list[tuple[int, ...]]  # content indices 0..C-1
    star_table: Tensor = field(repr=False)  # θ*[P, L+1, C+1, C+1] float64
    sft_table: Tensor = field(repr=False)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    @property
    def num_responses(self) -> int:
        return len(self.responses)

    @property
    def gamma(self) -> float:
        return self.config.gamma

    def content_tokens(self) -> list[str]:
        return list(CONTENT_LETTERS[: self.config.num_content])

    def logp_star(self) -> Tensor:
        """Exact ln π*(a|x) as a ``[P, N]`` float64 tensor (rows sum to 1 in probability)."""
        return chain_logprobs(self.star_table, self.response_tokens, self.config.max_len)

    def logp_sft(self) -> Tensor:
        """Exact ln π_sft(a|x), the distribution whose samples π₀ is fine-tuned on."""
        return chain_logprobs(self.sft_table, self.response_tokens, self.config.max_len)

    def index_of(self, response: str) -> int:
        return self._index()[response]

    def _index(self) -> dict[str, int]:
        cached = getattr(self, "_idx", None)
        if cached is None:
            cached = {r: i for i, r in enumerate(self.responses)}
            object.__setattr__(self, "_idx", cached)
        return cached

    def save(self, path: str | Path) -> Path:
        """Write ``world.json`` (the config suffices: the world is deterministic in it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"kind": "synthetic", "world": asdict(self.config)}
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> World:
        data = json.loads(Path(path).read_text())
        return build_world(WorldConfig(**data["world"]))


def enumerate_responses(num_content: int, max_len: int) -> list[tuple[int, ...]]:
    """All content strings of length 1..max_len, shortest first, then lexicographic."""
    out: list[tuple[int, ...]] = []
    for length in range(1, max_len + 1):
        out.extend(itertools.product(range(num_content), repeat=length))
    return out


def _masked_logsoftmax(table: Tensor, max_len: int) -> Tensor:
    """Per-state next-token log-probs, index C (last) = EOS. EOS is masked at k = 0 (no empty
    response) and is the only choice at k = max_len (no overlong response)."""
    t = table.clone()
    eos = t.shape[-1] - 1
    t[:, 0, :, eos] = -math.inf
    t[:, max_len, :, :eos] = -math.inf
    t[:, max_len, :, eos] = 0.0
    return torch.log_softmax(t, dim=-1)


def chain_logprobs(table: Tensor, responses: list[tuple[int, ...]], max_len: int) -> Tensor:
    """ln π(a|x) = Σ_k ln p(a_k | x, k, a_{k-1}) + ln p(EOS | x, |a|, a_{|a|}) for every a.

    ``prev`` index 0 means "start"; content token c is prev index c + 1. Vectorised over
    prompts; the loop over the (few hundred) responses is cheap and built once.
    """
    logp = _masked_logsoftmax(table, max_len)  # [P, L+1, C+1, C+1]
    eos = table.shape[-1] - 1
    rows: list[Tensor] = []
    for resp in responses:
        total = torch.zeros(table.shape[0], dtype=table.dtype)
        prev = 0
        for k, tok in enumerate(resp):
            total = total + logp[:, k, prev, tok]
            prev = tok + 1
        rows.append(total + logp[:, len(resp), prev, eos])
    return torch.stack(rows, dim=1)


def build_world(config: WorldConfig | None = None) -> World:
    """Draw π*'s and π_sft's logit tables from ``config.seed`` (CPU generator, float64)."""
    cfg = config or WorldConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    letters = CONTENT_LETTERS[: cfg.num_content]
    prompts = [" ".join(p) for p in itertools.product(letters, repeat=cfg.prompt_len)]
    shape = (len(prompts), cfg.max_len + 1, cfg.num_content + 1, cfg.num_content + 1)
    star = cfg.logit_scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    sft = cfg.sft_temper * star + cfg.sft_noise * noise
    tokens = enumerate_responses(cfg.num_content, cfg.max_len)
    responses = [" ".join(letters[t] for t in resp) for resp in tokens]
    return World(cfg, prompts, responses, tokens, star, sft)


def sample_responses(
    logp: Tensor, prompt_idx: Tensor, generator: torch.Generator, num: int = 1
) -> Tensor:
    """Exact draws a ∼ π(·|x) from an enumerated ``[P, N]`` log-prob table: ``[len(x), num]``.

    Rows may be sub-normalised (an LM's mass on 𝒜); ``torch.multinomial`` then samples from
    the distribution conditioned on 𝒜.
    """
    probs = torch.exp(logp[prompt_idx].double())
    return torch.multinomial(probs, num, replacement=True, generator=generator)
