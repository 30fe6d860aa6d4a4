"""What ``distalign synthetic`` trains: the world, the data sizes and seeds, the reward-class
variants, per method the engine settings and the hyper-parameter grid selected on held-out pairs,
and the rules that adapt the grid (β extension, training-budget raises).

Grids (γ is the world's tilt, 1 by default; all grids are multiples of it):

- pmle — a consistent estimator — uses the true γ and grids β ∈ {0, 0.1γ, γ}:
  β = 0 is the estimator the theorems are about, β > 0 the regularised variants (5), (12), (15).
- dpo grids its temperature γ_DPO ∈ {γ, 4γ, 16γ}: its population optimum is π₀·π*^{γ/γ_DPO}
  (the RLHF family), so the grid spans over- and under-shooting (γ/4 collapsed in version 1).
- distill and rkl search β ∈ {0, 0.1γ} (two points for time: on-policy runs cost per step
  whatever n is; a choice of 0.1γ is on the edge, so the grid extends to 0.4γ by itself);
- rlhf grids the KL weight β ∈ {γ, 4γ, 16γ}, rebel β ∈ {4γ, 16γ} (RLHF optimum π₀·π*^{γ/β}
  with the true reward); REBEL's η = 1 (the paper's Table 5) is a step size that does not
  move its fixed point.

A grid whose leak-aware choice (the rule the claims use) lies on an edge is extended past that
edge by ``extend_factor`` (log-spaced), at most ``max_extensions`` times per side
(``adapt.py``); β = 0 is a natural edge (the unregularised estimator) and is never extended
below.

Variants (``reward_classes``): ``standard`` trains the reward model as the same transformer as
the policy; ``light`` trains the linear Markov-feature scorer of ``light.py`` (Assumption 5's
generator–verifier gap). The offline methods do not use R̂, so their runs are shared.

Two presets: ``default_config()`` (the documented grid) and ``quick_config()`` (a smoke run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distalign.synthetic.world import WorldConfig

ALL_METHODS = ("pmle", "dpo", "distill", "rebel", "rlhf", "rkl")
OFFLINE = ("pmle", "dpo")  # trained on the labelled pairs themselves
ONLINE = ("distill", "rebel", "rlhf", "rkl")  # prompts of D_n + reward model trained on D_n
REWARD_CLASSES = ("standard", "light")
# the searched hyper-parameter of each method, and whether 0 is a natural lower edge
SEARCHED = {"pmle": "beta", "distill": "beta", "rkl": "beta", "dpo": "gamma", "rlhf": "beta",
            "rebel": "beta"}


@dataclass
class Stage:
    """Engine settings of one kind of run (merged into the method's config dict).

    ``batches_per_epoch``: for epoch-based stages, the batch grows with n so that an epoch
    has at most this many steps; ``epochs_at`` lowers the epochs for large n.
    """

    run: dict[str, Any]
    optim: dict[str, Any]
    algo: dict[str, Any] = field(default_factory=dict)
    batches_per_epoch: int | None = None
    epochs_at: dict[int, float] = field(default_factory=dict)  # n >= key: this many epochs


@dataclass
class Convergence:
    """The plateau rule of on-policy runs (``adapt.converged``).

    A run has converged when its own objective's gap to the method's fixed point under R̂,
    computed exactly over the prompt distribution at each evaluation, varies by at most
    ``tol`` nats over the last ``window`` evaluations. A run that has not is continued from its
    last checkpoint to ``raise_factor``× the steps (constant lr, so this equals a longer run),
    at most ``max_raises`` times, then reported not converged.
    """

    window: int = 3
    tol: float = 0.02
    raise_factor: int = 2
    max_raises: int = 1


@dataclass
class SyntheticConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    methods: tuple[str, ...] = ALL_METHODS
    reward_classes: tuple[str, ...] = REWARD_CLASSES
    sizes: tuple[int, ...] = (1024, 4096, 16384, 65536)
    seeds: tuple[int, ...] = (0, 1, 2)
    # on-policy runs (and their reward models) only from this n on: they cost per step whatever
    # n is, and slopes use the largest ``slope_points`` sizes
    online_min_n: int = 4096
    val_fraction: float = 0.25  # validation pairs drawn in addition to n, as n·val_fraction
    sft_samples: int = 8192  # samples of π_sft that π₀ is fine-tuned on
    sft: Stage = field(
        default_factory=lambda: Stage(
            run={"batch_size": 128, "epochs": 10},
            optim={"lr": 3e-3, "scheduler": "cosine", "warmup_steps": 20},
        )
    )
    # 6 epochs: at 3 the transformer R̂'s π̃ was still at KL 0.41 for n = 4096 (light: 0.08)
    reward: Stage = field(
        default_factory=lambda: Stage(
            run={"batch_size": 64, "epochs": 6},
            optim={"lr": 1e-3, "scheduler": "cosine"},
            algo={"center_coef": 0.01},  # pins BT's free offset near 0
            batches_per_epoch=128,
        )
    )
    # the light scorer is a convex linear model: large steps, same data passes
    light_reward: Stage = field(
        default_factory=lambda: Stage(
            run={"batch_size": 64, "epochs": 6},
            optim={"lr": 0.1, "scheduler": "cosine"},
            algo={"center_coef": 0.01},
            batches_per_epoch=64,
        )
    )
    # epochs fall with n (``epochs_at``): an epoch at 64k pairs is ≈ 5 passes over the ≤ 13.7k
    # distinct (x, a, b) triples of the default world, and the CPU budget is per pair-pass
    offline: Stage = field(
        default_factory=lambda: Stage(
            run={"batch_size": 64, "epochs": 3},
            optim={"lr": 1e-3, "scheduler": "cosine"},
            batches_per_epoch=128,
            epochs_at={4096: 2, 16384: 1},
        )
    )
    # constant lr: with a decaying one every run would "plateau" by construction
    online: Stage = field(
        default_factory=lambda: Stage(
            run={"batch_size": 256, "max_steps": 64},
            optim={"lr": 1e-3, "scheduler": "constant"},
            # A response that never stops is outside 𝒜 (π* = 0 there); the reward model has
            # never seen one, so without a penalty R̂ extrapolates. −10 is far below the
            # centred reward's spread (γ·|ln π*| ≲ 6 here); the engine's standard knob.
            # 256 prompts × 2 passes per step: in a probe (RKL, light R̂) obj_gap fell twice as
            # far in 100 steps as with 64 × 1, as far as with 256 × 4
            algo={"update_epochs": 2, "missing_eos_penalty": 10.0},
        )
    )
    grids: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    eval_points: int = 6  # exact-metric evaluations per run (the plateau rule reads them)
    convergence: Convergence = field(default_factory=Convergence)
    extend_factor: float = 4.0
    max_extensions: int = 1
    slope_points: int = 3  # slopes are fitted over the largest this-many sizes
    bootstrap: int = 2000  # resamples of the seeds for the confidence intervals
    workers: int = 2

    def __post_init__(self) -> None:
        if not self.grids:
            self.grids = default_grids(self.world.gamma)
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
        bad = [v for v in self.reward_classes if v not in REWARD_CLASSES]
        if bad or not self.reward_classes:
            raise ValueError(f"unknown reward class(es) {bad}; choose from standard, light")
        if not self.sizes or min(self.sizes) < 8:
            raise ValueError("sizes must be data sizes n >= 8")

    def fixed_algo(self, method: str) -> dict[str, float]:
        """Method settings that are not searched: the known γ where the method has a tilt."""
        g = self.world.gamma
        return {"pmle": {"gamma": g}, "distill": {"gamma": g}, "rkl": {"gamma": g}}.get(
            method, {}
        )

    def reward_stage(self, reward_class: str) -> Stage:
        return self.light_reward if reward_class == "light" else self.reward


def default_grids(gamma: float) -> dict[str, list[dict[str, float]]]:
    consistent = [{"beta": 0.0}, {"beta": 0.1 * gamma}, {"beta": gamma}]
    # version 1 chose β = 4γ, its upper edge, every time: the grid now starts one step higher
    kl_family = [{"beta": gamma}, {"beta": 4 * gamma}, {"beta": 16 * gamma}]
    return {
        "pmle": consistent,
        # on-policy runs cost per step whatever n is; the edge rule adds 0.4γ where needed
        "distill": consistent[:2],
        "rkl": consistent[:2],
        # γ_DPO = γ/4 collapsed in version 1 and 4γ was best at n ≤ 4096: shift the grid up
        "dpo": [{"gamma": gamma}, {"gamma": 4 * gamma}, {"gamma": 16 * gamma}],
        "rlhf": kl_family,
        "rebel": [{**p, "eta": 1.0} for p in kl_family[1:]],
    }


def default_config(**overrides: Any) -> SyntheticConfig:
    """The documented grid: 6 methods × 2 reward classes × n ∈ {1k, 4k, 16k, 64k} × 3 seeds."""
    return SyntheticConfig(**overrides)


def quick_config(**overrides: Any) -> SyntheticConfig:
    """A minutes-long smoke run: 2 sizes, 1 seed, 1–2 grid points, short training."""
    g = WorldConfig().gamma
    kwargs: dict[str, Any] = dict(
        sizes=(512, 2048),
        seeds=(0,),
        online_min_n=0,
        sft_samples=4096,
        sft=Stage(
            run={"batch_size": 128, "epochs": 4},
            optim={"lr": 3e-3, "scheduler": "cosine", "warmup_steps": 20},
        ),
        reward=Stage(
            run={"batch_size": 64, "epochs": 3}, optim={"lr": 1e-3}, algo={"center_coef": 0.01}
        ),
        light_reward=Stage(
            run={"batch_size": 64, "epochs": 3}, optim={"lr": 0.1}, algo={"center_coef": 0.01}
        ),
        offline=Stage(run={"batch_size": 64, "epochs": 3}, optim={"lr": 1e-3}),
        online=Stage(
            run={"batch_size": 64, "max_steps": 40},
            optim={"lr": 1e-3, "scheduler": "constant"},
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
        eval_points=4,
        convergence=Convergence(max_raises=0),
        max_extensions=0,
        slope_points=2,
        bootstrap=200,
    )
    kwargs.update(overrides)
    return SyntheticConfig(**kwargs)
