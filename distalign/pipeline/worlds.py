"""A pipeline on a world with a known target (``world:``, the tilted world): its stages.

The ``world`` stage builds the world from π₀ (labelled pairs, prompt split, ``world.json``)
and writes its gold reward as a reward-model folder (``world/gold-scorer``). Then:

- the reward model and the offline methods train on ``world/pairs-train.jsonl`` read as exact
  token ids (format ``tokens``: a reply cut at L stays cut), the RM is measured on the
  held-out pairs, and the online methods sample from ``world/prompts/train.jsonl``;
- every row is generated from the first ``heldout_prompts`` held-out prompts at the world's
  sampling (T = 1, top-k/top-p off, at most L new tokens), π₀ with ``base_samples`` replies
  per prompt: the importance sampler's proposals for every policy's forward KL;
- oracle judges get π₀'s generations (``--base-generations``), so each eval writes the world's
  ``tilted/*`` measures;
- reference rows: ``pi-star`` (exact draws of π* by rejection) and ``rlhf-gold`` (rlhf on the
  gold reward itself at β = β*, whose optimum is π*: the engine's optimisation error).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from distalign.errors import ConfigError
from distalign.pipeline.config import PipelineConfig, StageSection, WorldSection

PI_STAR, GOLD_RLHF = "pi-star", "rlhf-gold"
# the report's columns for a world pipeline (tilted/* come from the oracle judge's measures)
COLUMNS = ("tilted/kl_fwd", "tilted/kl_rev", "tilted/gold_reward", "tilted/kl_ref",
           "tilted/oracle_win", "eval/rm_score", "tilted/entropy", "tilted/length")


def world_config(pc: PipelineConfig, pi0: str) -> Any:
    """The world's :class:`~distalign.tilted.world.TiltedConfig`, checked (one line for an
    unknown or unbounded gold reward, a bad β* or γ) before anything loads."""
    from distalign.tilted.world import DEFAULT_PROMPTS, TiltedConfig

    w = pc.world
    assert w is not None
    prompts = pc.resolve(w.prompts) if w.prompts else DEFAULT_PROMPTS
    if not Path(prompts).is_file():
        raise ConfigError(f"world.prompts: no such file: {w.prompts}")
    cfg = TiltedConfig(
        pi0=pi0, gold=w.gold, gold_bounds=tuple(w.gold_bounds) if w.gold_bounds else None,
        beta_star=w.beta_star, gamma=w.gamma, max_new_tokens=w.max_new_tokens, prompts=prompts,
        split_seed=w.split_seed, heldout=w.heldout, max_prompt_length=w.max_prompt_length,
        train_prompts=w.train_prompts, heldout_prompts=w.heldout_prompts,
        pairs_per_prompt=w.pairs_per_prompt, seed=w.seed, dtype=pc.base.dtype)
    try:
        cfg.check()
    except ConfigError as exc:
        raise ConfigError(f"world: {exc}") from None
    return cfg


def sampling(w: WorldSection) -> dict[str, Any]:
    """The world's response space as a ``gen`` section."""
    return {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_new_tokens": 0,
            "max_new_tokens": w.max_new_tokens}


def data_for(root: Path, kind: str) -> dict[str, Any]:
    """The ``data`` section of a training stage of ``kind`` (pairs, prompts) on the world."""
    if kind == "pairs":
        return {"path": str(root / "pairs-train.jsonl"), "format": "tokens"}
    if kind == "prompts":
        return {"path": str(root / "prompts" / "train.jsonl"), "format": "hh"}
    raise ConfigError(f"a world pipeline has no {kind!r} data (an SFT stage needs data.sft)")


def check_gen(pc: PipelineConfig, name: str, gen: dict[str, Any]) -> None:
    """An online run must sample from the world's space (π's own T = 1 distribution)."""
    assert pc.world is not None
    for key, want in sampling(pc.world).items():
        if key in gen and key != "max_new_tokens" and float(gen[key]) != float(want):
            raise ConfigError(f"stage {name!r}: gen.{key}={gen[key]!r}, but the world's "
                              f"samples use {key}={want!r} (set it in defaults.gen)")


def world_stage_spec(pc: PipelineConfig, pi0: str) -> dict[str, Any]:
    """The ``world`` stage's arguments (``pipeline.stages.world_run``)."""
    from dataclasses import asdict

    cfg = asdict(world_config(pc, pi0))
    cfg["gold_bounds"] = list(cfg["gold_bounds"]) if cfg["gold_bounds"] else None
    spec: dict[str, Any] = {"config": cfg, "out": str(pc.out / "world")}
    if pc.world and pc.world.reward_class == "residual":
        spec["residual_init"] = str(pc.out / "world" / "residual-init")
    return spec


def gold_rlhf(planner: Any, section: StageSection, init: str, deps: list[str | None],
              curves: list[str]) -> tuple[str, str, int, dict]:
    """rlhf on the gold reward at β = β*, first seed: π* is its optimum, so its distance to
    π* is the engine's own optimisation error in this world."""
    pc = planner.pc
    seed, name = pc.seeds[0], f"{GOLD_RLHF}-s{pc.seeds[0]}"
    pinned = {"algo": {"beta": pc.world.beta_star},
              "model": {"reward_model": str(planner.world / "gold-scorer"), "value_model": init}}
    merged = OmegaConf.to_container(OmegaConf.merge(section.config, pinned))
    assert isinstance(merged, dict)
    section = StageSection(recipe=section.recipe, config=merged)  # type: ignore[arg-type]
    cfg = planner.train_config("rlhf", section, name, seed, init, None)
    planner.add(name, "train", "train_run", {"method": "rlhf", "config": cfg}, pc.out / name,
                deps, launchable=True)
    curves.append(planner.add(f"curves/{name}", "curves", "curves_run",
                              {"run_dir": str(pc.out / name)}, pc.out / name, [name],
                              resumable=False))
    return name, "rlhf (gold r, β = β*)", seed, cfg.get("gen", {})


def pi_star_stages(planner: Any, trained: Any, seed: int) -> list[str]:
    """Exact draws of π* on the evaluated prompts, and their eval stages (the end points)."""
    pc = planner.pc
    gens = pc.out / PI_STAR / "generations.jsonl"
    spec = {"world": str(planner.world / "world.json"), "out": str(gens),
            "limit": pc.world.heldout_prompts, "n": pc.world.pi_star, "seed": seed}
    stage = planner.add(f"generate/{PI_STAR}", "generate", "pistar_run", spec, pc.out / PI_STAR,
                        ["world"], resumable=False)
    return [stage] if pc.eval is None else planner.eval_stages(PI_STAR, gens, trained, stage)
