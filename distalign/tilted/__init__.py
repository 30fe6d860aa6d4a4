"""The tilted world: a real pretrained π₀ with a known target π* = π₀·exp(r/β*)/Z (DESIGN.md).

r is a bounded gold reward (VADER sentiment by default), labels follow the paper's eq. (3),
and forward KL(π*‖π̂) is measured by importance sampling from π₀, checked by exact rejection
samples of π*. One module per concern:

- :mod:`.labels`: eq. (3) and ln π* up to ln Z (pure);
- :mod:`.measures`: forward/reverse KL, ESS, rejection, win probability, reward-model
  accuracy (pure functions of recorded ln π₀, ln π̂ and r, per prompt);
- :mod:`.gold`: gold rewards (``vader``, ``reward:DIR``, ``MODULE:FUNCTION``), bounded;
- :mod:`.pi0`: loading π₀ and its fingerprint;
- :mod:`.space`: the L-token response space, sampling and scoring replies in it;
- :mod:`.world`, :mod:`.build`: world.json and building a world's labelled pairs;
- :mod:`.probe`: choosing β*, γ, L by measurement;
- :mod:`.oracle`: the exact judge, found by eval through the ``distalign.oracles`` entry point;
  its ``measure`` method gives eval the world's metrics of a generations file (:mod:`.evaluate`);
- :mod:`.residual`: the residual reward class R̂ = γ ln π₀ + f_θ.

Importing the package loads only numpy-level code; models load in the functions that need them.
"""
