"""Reverse KL, eq. (15): RLHF-PPO plus the entropy term γ·H(π).

Where the entropy enters: in the per-token reward, next to the KL penalty,
    r_t = −β·(ln π_t(a_t) − ln π₀(a_t)) − γ·ln π_t(a_t)   (+ R̂ on the last real token),
with ln π_t the sampling policy's log-prob (``objectives.shaped_rewards``). Summed over a
response, E_{a∼π}[Σ_t −ln π(a_t)] = H(π(x)), so the expected return is
E_π[R̂] − β KL(π‖π₀) + γ H(π) = −L_RKL,β of (15); PPO maximises it exactly as it maximises
RLHF's (1), and the score-function gradient of the −γ ln π term is the entropy gradient
(E_π[∇ln π] = 0 removes the term from differentiating ln π itself). Equivalently, RKL is RLHF
with KL weight β+γ against the smoothed reference π₀^{β/(β+γ)} (App. B).
"""

from __future__ import annotations

from dataclasses import dataclass

from distalign.methods.rlhf import RLHF, RLHFConfig


@dataclass
class RKLConfig(RLHFConfig):
    gamma: float = 0.01  # γ, entropy weight in (15) (Table 5: "entropy coefficient" 0.01)

    RULES = (("gamma", lambda v: v >= 0, ">= 0"),)  # checked after RLHFConfig's rules

    @property
    def entropy_coef(self) -> float:
        return self.gamma


class RKL(RLHF):
    name = "rkl"
    Config = RKLConfig
    algo: RKLConfig


METHOD = RKL
