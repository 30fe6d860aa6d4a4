"""What ``distalign synthetic`` trains: the world, the data sizes and seeds, and per method the
engine settings and the small hyper-parameter grid selected on held-out pairs.

Grids (γ is the world's tilt, 1 by default; all grids are multiples of it):

- pmle, distill, rkl — the consistent estimators — use the true γ and grid β ∈ {0, 0.1γ, γ}:
  β = 0 is the estimator the theorems are about, β > 0 the regularised variants (5), (12), (15).
- dpo grids its temperature γ_DPO ∈ {γ/4, γ, 4γ}: its population optimum is π₀·π*^{γ/γ_DPO}
  (SPEC §2), the RLHF family, so the grid spans over- and under-shooting.
- rlhf and rebel grid the KL weight β ∈ {γ/4, γ, 4γ} (RLHF optimum π₀·π*^{γ/β} with the true
  reward); REBEL's η = 1 (SPEC Table 5) is a step size that does not move REBEL's fixed point.

Two presets: ``default_config()`` (the README grid) and ``quick_config()`` (a smoke run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distalign.synthetic.world import WorldConfig

ALL_METHODS = ("pmle", "dpo", "distill", "rebel", "rlhf", "rkl")
OFFLINE = ("pmle", "dpo")  # trained on the labelled pairs themselves
ONLINE = ("distill", "rebel", "rlhf", "rkl")  # prompts of D_n + reward model trained on D_n


@dataclass
class Stage:
    """Engine settings of one kind of run (merged into the method's config dict)."""

    run: dict[str, Any]
    optim: dict[str, Any]
    algo: dict[str, Any] = field(default_factory=dict)


@dataclass
class SyntheticConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    methods: tuple[str, ...] = ALL_METHODS
    sizes: tuple[int, ...] = (1024, 4096, 16384)
    seeds: tuple[int, ...] = (0, 1)
    val_fraction: float = 0.25  # validation pairs drawn in addition to n, as n·val_fraction
    sft_samples: int = 8192  # samples of π_sft that π₀ is fine-tuned on
    sft: Stage = field(
        default_factory=lambda: Stage(
            run={"batch_size": 128, "epochs": 10},
            optim={"lr": 3e-3, "scheduler": "cosine", "warmup_steps": 20},
        )
    )
    reward: Stage = field(
        default_factory=lambda: Stage(
            run={"batch_size": 64, "epochs": 10},
            optim={"lr": 1e-3, "scheduler": "cosine"},
            algo={"center_coef": 0.01},  # pins BT's free offset near 0 (see below)
        )
    )
    offline: Stage = field(
        default_factory=lambda: Stage(
            run={"batch_size": 64, "epochs": 5}, optim={"lr": 1e-3, "scheduler": "cosine"}
        )
    )
    online: Stage = field(
        default_factory=lambda: Stage(
            run={"batch_size": 64, "max_steps": 150},
            optim={"lr": 1e-3, "scheduler": "cosine"},
            # A response that never stops is outside 𝒜 (π* = 0 there); the reward model has
            # never seen one, so without a penalty R̂ extrapolates. −10 is far below the
            # centred reward's spread (γ·|ln π*| ≲ 6 here); the engine's standard knob.
            algo={"update_epochs": 1, "missing_eos_penalty": 10.0},
        )
    )
    grids: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    eval_points: int = 5  # exact-metric evaluations per run (curves in metrics.jsonl)
    workers: int = 2

    def __post_init__(self) -> None:
        if not self.grids:
            self.grids = default_grids(self.world.gamma)
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
        if not self.sizes or min(self.sizes) < 8:
            raise ValueError("sizes must be data sizes n >= 8")

    def fixed_algo(self, method: str) -> dict[str, float]:
        """Method settings that are not searched: the known γ where the method has a tilt."""
        g = self.world.gamma
        return {"pmle": {"gamma": g}, "distill": {"gamma": g}, "rkl": {"gamma": g}}.get(
            method, {}
        )


def default_grids(gamma: float) -> dict[str, list[dict[str, float]]]:
    consistent = [{"beta": 0.0}, {"beta": 0.1 * gamma}, {"beta": gamma}]
    kl_family = [{"beta": gamma / 4}, {"beta": gamma}, {"beta": 4 * gamma}]
    return {
        "pmle": consistent,
        "distill": consistent,
        "rkl": consistent,
        "dpo": [{"gamma": gamma / 4}, {"gamma": gamma}, {"gamma": 4 * gamma}],
        "rlhf": kl_family,
        "rebel": [{**p, "eta": 1.0} for p in kl_family],
    }


def default_config(**overrides: Any) -> SyntheticConfig:
    """The documented grid: 6 methods × n ∈ {1024, 4096, 16384} × 2 seeds × 3 grid points."""
    return SyntheticConfig(**overrides)


def quick_config(**overrides: Any) -> SyntheticConfig:
    """A minutes-long smoke run: 2 sizes, 1 seed, 1–2 grid points, short training."""
    g = WorldConfig().gamma
    kwargs: dict[str, Any] = dict(
        sizes=(512, 2048),
        seeds=(0,),
        sft_samples=4096,
        sft=Stage(
            run={"batch_size": 128, "epochs": 4},
            optim={"lr": 3e-3, "scheduler": "cosine", "warmup_steps": 20},
        ),
        reward=Stage(
            run={"batch_size": 64, "epochs": 3}, optim={"lr": 1e-3}, algo={"center_coef": 0.01}
        ),
        offline=Stage(run={"batch_size": 64, "epochs": 3}, optim={"lr": 1e-3}),
        online=Stage(
            run={"batch_size": 64, "max_steps": 40},
            optim={"lr": 1e-3},
            algo={"update_epochs": 1, "missing_eos_penalty": 10.0},
        ),
        grids={
            "pmle": [{"beta": 0.0}],
            "distill": [{"beta": 0.0}],
            "rkl": [{"beta": 0.0}],
            "dpo": [{"gamma": g / 4}, {"gamma": g}],
            "rlhf": [{"beta": g}],
            "rebel": [{"beta": g, "eta": 1.0}],
        },
        eval_points=2,
    )
    kwargs.update(overrides)
    return SyntheticConfig(**kwargs)
