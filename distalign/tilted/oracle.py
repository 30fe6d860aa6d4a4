"""The oracle judge of a tilted world: the exact P(output ≻ reference | x) of eq. (3).

With ln π* = ln π₀ + r/β* − ln Z(x) and both replies answering the same x, ln Z(x) cancels:

    P(a ≻ b | x) = σ(γ (ln π₀(a|x) − ln π₀(b|x) + (r(x,a) − r(x,b))/β*)),

so the judge needs π₀ (loaded from the world and checked against its fingerprint) and the gold
reward, never Z. Both replies are mapped into the world's L-token space first (:mod:`.space`):
an output is scored on its exact token ids, a reference text on its ids plus EOS, and either
one longer than L is cut to its L-token prefix (counted in ``cut``). Eval finds the judge
through the entry point group ``distalign.oracles`` (``tilted``) when ``--judge oracle:WORLD``
names a world whose kind is ``tilted``.

Refused with one line: a world.json whose π₀ fingerprint does not match the π₀ it loads or
the reference model given to the evaluation (``ref_model``), a policy tokenizer other than
π₀'s, and pairs whose prompt is not a prompt of this world (the judge pointed at another
world's generations).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from distalign.errors import ConfigError, DataError
from distalign.eval.judges.base import Pair, Verdict
from distalign.tilted.world import TiltedWorld


def _world_prompts(world: TiltedWorld) -> set[str]:
    """The prompt texts of both sides of the world's split (as ``distalign generate`` shows
    them: the HH transcript up to its last Assistant turn)."""
    from distalign.eval.prompts import read_rows
    from distalign.lm.data import split_hh

    texts: set[str] = set()
    for split in ("train", "heldout"):
        path = world.file(f"prompts/{split}.jsonl")
        if not path.is_file():
            raise ConfigError(f"{world.path}: its prompt file {path} is missing")
        for row in read_rows(str(path)):
            if isinstance(row.get("chosen"), str) and "\n\nAssistant:" in row["chosen"]:
                texts.add(split_hh(row["chosen"])[0])
            elif isinstance(row.get("prompt"), str):
                texts.add(row["prompt"])
    return texts


class TiltedOracleJudge:
    """The exact preference of a tilted world (the Judge protocol of ``eval.judges.base``)."""

    template_id = None

    def __init__(self, world_path: str, *, ref_model: str | None = None,
                 policy_tokenizer: Any = None, batch_size: int = 16) -> None:
        from distalign.lm.tokenizers import check_same_tokenizer
        from distalign.tilted.space import eos_ids

        self.world = TiltedWorld.load(world_path)
        self.id = f"oracle:{self.world.path}"
        self.calls, self.cut, self.batch_size = 0, 0, batch_size
        self.prompts = _world_prompts(self.world)
        self.model, self.tok = self.world.load_pi0()  # checked against the world's fingerprint
        if ref_model is not None:
            self.check_reference(ref_model)
        if policy_tokenizer is not None:
            check_same_tokenizer(policy_tokenizer, self.tok, "the evaluated policy",
                                 f"π₀ of {self.world.path}")
        self.eos = eos_ids(self.tok, self.model)
        self.gold = self.world.gold_reward()

    def check_reference(self, ref_model: str) -> None:
        """Refuse (one line) an evaluation whose π₀ is not this world's π₀."""
        from distalign.tilted.pi0 import check_fingerprint, fingerprint, load_pi0

        if ref_model == self.world.pi0_spec:
            return
        model, tok = load_pi0(ref_model)
        check_fingerprint(self.world.fingerprint, fingerprint(model, tok), str(self.world.path),
                          f"the evaluation's reference model {ref_model!r}")

    def _reply(self, pair: Pair, output: bool) -> list[int]:
        from distalign.eval.judges.reward import reference_ids
        from distalign.tilted.space import to_response

        if output and pair.output_ids:
            ids = list(pair.output_ids)
        else:
            ids = reference_ids(self.tok, pair.prompt, pair.output if output else pair.reference,
                                False)
        cut, _ = to_response(ids, self.eos, self.world.max_new_tokens)
        self.cut += len(cut) < len(ids) and cut[-1] not in self.eos
        return cut

    def log_tilts(self, pairs: Sequence[Pair]) -> tuple[list[float], list[float]]:
        """ln π₀ + r/β* (= ln π* + ln Z(x)) of every output and every reference."""
        from distalign.tilted.labels import log_tilt
        from distalign.tilted.space import reply_logprobs

        for k, p in enumerate(pairs):
            if p.prompt not in self.prompts:
                raise DataError(f"pair {k}: prompt {p.prompt[:60]!r}… is not a prompt of the "
                                f"tilted world {self.world.path} (generations of another world?)")
            if not p.prompt_ids:
                raise DataError(f"pair {k}: no prompt token ids (the oracle scores exact ids)")
        outs = [self._reply(p, True) for p in pairs]
        refs = [self._reply(p, False) for p in pairs]
        pids = [list(p.prompt_ids) for p in pairs] * 2
        replies = outs + refs
        lp = reply_logprobs(self.model, pids, replies, self.tok.pad_token_id, self.batch_size)
        texts = [self.tok.decode(r, skip_special_tokens=True) for r in replies]
        r = self.gold.score([p.prompt for p in pairs] * 2, texts, pids, replies)
        tilt = log_tilt(lp, r, self.world.beta_star).tolist()
        return tilt[: len(pairs)], tilt[len(pairs):]

    def measure(self, rows: Sequence[dict[str, Any]], base_rows: Sequence[dict[str, Any]],
                policy_model: str | None = None, meta: dict[str, Any] | None = None,
                base_meta: dict[str, Any] | None = None) -> dict[str, float]:
        """The world's ``tilted/*`` metrics of a generations file (``rows``, π̂'s samples with
        ``output_logprob``) against π₀'s generations on the same prompts (``base_rows``): see
        :func:`distalign.tilted.evaluate.generation_measures`. ``policy_model`` (π̂'s
        directory) adds the forward KL; the sidecars' ``gen`` are checked against the world's
        sampling settings."""
        from distalign.tilted.evaluate import check_sampling, generation_measures
        from distalign.tilted.pi0 import load_pi0

        check_sampling(self.world, (meta or {}).get("gen"), "the policy's generations")
        check_sampling(self.world, (base_meta or {}).get("gen"), "π₀'s generations")
        policy = None
        if policy_model is not None:
            policy = self.model if policy_model == self.world.pi0_spec else load_pi0(
                policy_model)[0]
        return generation_measures(self.world, self.model, self.tok, self.gold, rows, base_rows,
                                   policy, batch_size=self.batch_size)

    def judge(self, pairs: Sequence[Pair], progress: bool = True) -> list[Verdict]:
        from distalign.eval.judges.reward import sigmoid

        a, b = self.log_tilts(pairs)
        self.calls += len(pairs)
        return [Verdict(sigmoid(self.world.gamma * (x - y))) for x, y in zip(a, b, strict=True)]


def oracle_judge(world_path: str | None, **kwargs: Any) -> TiltedOracleJudge:
    """Entry point ``distalign.oracles: tilted``. Keyword arguments eval may pass:
    ``ref_model`` (its π₀, checked against the world's fingerprint), ``policy_tokenizer``
    (must be π₀'s) and ``batch_size``; others (cache, template, …) are ignored."""
    if not world_path:
        raise ConfigError("--judge oracle: a tilted world has no default; name its world.json "
                          "(oracle:DIR/world.json)")
    known = {k: kwargs[k] for k in ("ref_model", "policy_tokenizer", "batch_size") if k in kwargs}
    return TiltedOracleJudge(world_path, **known)
