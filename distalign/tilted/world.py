"""A tilted world's settings and its ``world.json``: everything needed to recompute π*.

π*(y|x) = π₀(y|x)·exp(r(x,y)/β*)/Z(x) on the L-token response space (:mod:`.space`), with π₀
a real pretrained LM, r a bounded gold reward (:mod:`.gold`) and labels from the paper's
eq. (3) with tilt γ (:mod:`.labels`). ``world.json`` records the gold reward (spec and bound),
β*, γ, L, the sampling settings, π₀'s spec and fingerprint, the prompt split and the pair
files, under ``"kind": "tilted"`` (eval picks the oracle judge by that kind).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distalign.errors import ConfigError, DataError
from distalign.tilted.gold import GoldReward, check_gold_spec, make_gold_reward
from distalign.tilted.labels import check_positive
from distalign.tilted.pi0 import DEFAULT_PI0

KIND = "tilted"
VERSION = 1
# the shipped HH-RLHF harmless pairs (MIT; a repository checkout, as the pipelines read them)
DEFAULT_PROMPTS = str(Path(__file__).resolve().parents[2] / "data" / "hh-rlhf-harmless"
                      / "harmless-base-test.jsonl.gz")
SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_new_tokens": 0}


@dataclass
class TiltedConfig:
    """How to build a world (``distalign tilted build``)."""

    pi0: str = DEFAULT_PI0  # package:NAME, DIR, DIR@FILE.gguf or FILE.gguf
    gold: str = "vader"  # vader | reward:DIR | MODULE:FUNCTION
    gold_bounds: tuple[float, float] | None = None  # required where the reward states none
    beta_star: float = 0.1  # β*, the world's tilt temperature: π* ∝ π₀·exp(r/β*)
    gamma: float = 1.0  # γ of eq. (3): P(a ≻ b) = σ(γ ln π*(a)/π*(b))
    max_new_tokens: int = 32  # L: replies are at most L new tokens
    prompts: str = DEFAULT_PROMPTS  # HH-RLHF rows (``chosen`` dialogues)
    split_seed: int = 0  # the pipelines' split: shuffled with this seed, first `heldout` held out
    heldout: int = 200
    max_prompt_length: int = 96  # prompt tokens (left-truncated, as the pipelines do)
    train_prompts: int | None = None  # label only the first N training prompts (None: all)
    heldout_prompts: int | None = None  # held-out pairs on the first N held-out prompts
    pairs_per_prompt: int = 1
    seed: int = 0  # sampling and label draws
    dtype: str = "float32"
    rows_per_batch: int = 32

    def check(self) -> tuple[float, float]:
        """One-line ConfigErrors for bad settings, before any model loads; returns the gold
        reward's bound."""
        self.beta_star = check_positive("beta_star (β*)", self.beta_star)
        self.gamma = check_positive("gamma (γ)", self.gamma)
        for name in ("max_new_tokens", "heldout", "pairs_per_prompt", "rows_per_batch",
                     "max_prompt_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}={v!r} must be an integer >= 1")
        for name in ("train_prompts", "heldout_prompts"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name}={v!r} must be an integer >= 1 (or unset: all)")
        return check_gold_spec(self.gold, self.gold_bounds)


def split_prompts(source: str, out: Path, seed: int, heldout: int) -> dict[str, Any]:
    """``out/train.jsonl`` and ``out/heldout.jsonl``: the rows of ``source`` shuffled with
    ``seed``, the first ``heldout`` held out, each with its source position as ``id`` (the
    split of the pipelines' ``data`` stage, so the same seed gives the same prompts)."""
    from distalign.eval.prompts import read_rows

    if not Path(source).is_file():
        raise DataError(f"prompts file not found: {source}")
    rows = read_rows(source)
    if not 1 <= heldout < len(rows):
        raise ConfigError(f"heldout={heldout} must be in [1, {len(rows) - 1}] ({source} has "
                          f"{len(rows)} rows)")
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    parts = {"heldout": sorted(idx[:heldout]), "train": sorted(idx[heldout:])}
    out.mkdir(parents=True, exist_ok=True)
    for name, ids in parts.items():
        text = "".join(json.dumps({"id": str(i), **rows[i]}, ensure_ascii=False) + "\n"
                       for i in ids)
        (out / f"{name}.jsonl").write_text(text, encoding="utf-8")
    return {name: len(ids) for name, ids in parts.items()}


class TiltedWorld:
    """A built world, read from its ``world.json`` (paths inside are relative to it)."""

    def __init__(self, data: dict[str, Any], path: Path) -> None:
        self.data, self.path = data, path
        where = str(path)
        if data.get("kind") != KIND:
            raise ConfigError(f"{where}: not a tilted world (kind {data.get('kind')!r})")
        for key in ("beta_star", "gamma", "max_new_tokens", "gold_reward", "pi0"):
            if key not in data:
                raise ConfigError(f"{where}: field {key!r} is missing")
        self.beta_star = check_positive(f"{where}: beta_star", data["beta_star"])
        self.gamma = check_positive(f"{where}: gamma", data["gamma"])
        self.max_new_tokens = int(data["max_new_tokens"])
        gold = data["gold_reward"]
        self.gold_bounds = check_gold_spec(gold.get("spec", ""), gold.get("bounds"))
        self.r_max = self.gold_bounds[1]

    @classmethod
    def load(cls, path: str | Path) -> TiltedWorld:
        p = Path(path)
        if p.is_dir():
            p = p / "world.json"
        if not p.is_file():
            raise ConfigError(f"{path}: no world.json there")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a JSON object")
        return cls(data, p)

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def pi0_spec(self) -> str:
        return str(self.data["pi0"]["spec"])

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.data["pi0"].get("fingerprint") or {})

    def file(self, key: str) -> Path:
        """A file of the world (``prompts/heldout.jsonl``, ``pairs-train.jsonl``, …)."""
        return self.root / key

    def gold_reward(self) -> GoldReward:
        g = self.data["gold_reward"]
        return make_gold_reward(g["spec"], g.get("bounds"))

    def load_pi0(self) -> tuple[Any, Any]:
        """(π₀, tokenizer), refused with one line unless its fingerprint is the world's."""
        from distalign.tilted.pi0 import check_fingerprint, fingerprint, load_pi0

        model, tok = load_pi0(self.pi0_spec, self.data["pi0"].get("dtype", "float32"))
        check_fingerprint(self.fingerprint, fingerprint(model, tok), str(self.path),
                          f"π₀ loaded from {self.pi0_spec!r}")
        return model, tok


def world_record(cfg: TiltedConfig, gold: dict[str, Any], fp: dict[str, Any],
                 eos: list[int], extra: dict[str, Any]) -> dict[str, Any]:
    """The content of world.json."""
    return {
        "kind": KIND, "version": VERSION,
        "beta_star": cfg.beta_star, "gamma": cfg.gamma, "max_new_tokens": cfg.max_new_tokens,
        "sampling": SAMPLING, "gold_reward": gold,
        "pi0": {"spec": cfg.pi0, "dtype": cfg.dtype, "fingerprint": fp, "eos_ids": eos},
        "config": {k: v for k, v in asdict(cfg).items()
                   if k not in ("beta_star", "gamma", "max_new_tokens")},
        **extra,
    }
