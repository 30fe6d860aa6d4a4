"""Shared, session-scoped fixtures: tiny checkpoints on disk and tiny jsonl datasets.

Everything is built locally with :mod:`distalign.testing` (no hub access) once per test
session, so the engine tests can load models "from a path" exactly as a user run does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from distalign.testing import save_tiny, tiny_causal_lm, tiny_reward_model, tiny_tokenizer

# Tiny models are latency-bound: one intra-op thread is much faster than a pool contending
# for a couple of shared CI cores (measured ~20x on the engine tests).
torch.set_num_threads(1)

# ``make test-fast`` (pytest -m "not slow") is the edit loop: it leaves out what is marked slow
# here, chosen from ``pytest --durations=0`` (a test over ~1 s on two idle cores: a fresh
# Python process, a multi-process launch, a training grid or a long convergence check).
# ``make test`` runs everything. A new test that takes seconds belongs in one of these lists.
SLOW_MODULES = frozenset({
    "test_cli_as_user.py", "test_cli_pipeline_user.py", "test_cli_provenance.py",
    "test_cli_inputs.py", "test_engine_ddp.py", "test_engine_resume.py",
    "test_eval_synthetic.py", "test_fsdp.py", "test_gpu_check.py", "test_logprobs_chunked.py",
    "test_pipeline.py",
    "test_synthetic_grid.py", "test_synthetic_train.py", "test_toy_cli.py", "test_train_cli.py",
    "test_vllm_server.py",
})
SLOW_TESTS = frozenset({  # module::function (every parametrisation) in otherwise quick modules
    "test_pipeline_world.py::test_tilted_world_pipeline_end_to_end",
    "test_alpaca_annotations.py::test_cli_annotations_subprocess",
    "test_data.py::test_num_proc_counts_and_errors_survive_workers",
    "test_evaluate.py::test_cli_eval_subprocess_output_to_file",
    "test_fuzz_inputs.py::test_config_values_are_accepted_or_refused_with_the_key_named",
    "test_generate.py::test_cli_subprocess_with_output_to_a_file",
    "test_generate.py::test_kill_9_then_rerun_equals_one_run",
    "test_judge_registry.py::test_a_fresh_process_finds_the_synthetic_oracle_and_eval_imports_no_world",
    "test_judges.py::test_cache_shared_by_two_processes",
    "test_recipes.py::test_paper_pipelines_carry_tables_5_and_6",
    "test_report.py::test_cli_report_subprocess_output_to_file",
    "test_report.py::test_cli_report_to_an_unwritable_place_is_one_line",
    "test_synthetic_light.py::test_a_fresh_distalign_eval_process_loads_a_saved_light_reward_model",
    "test_synthetic_light.py::test_engine_trains_the_light_class_to_a_small_exact_rm_kl",
    "test_tabular_certificate.py::test_certified_problems_have_no_better_second_start",
    "test_tabular_cnewton.py::test_the_toy_command_says_which_solver_ran",
    "test_tabular_fast.py::test_numpy_engine_equals_the_torch_engine",
    "test_tabular_fast.py::test_the_toy_command_does_not_import_torch",
    "test_tabular_solvers.py::test_closed_forms_are_the_optima_of_objectives_1_and_15",
    "test_tilted_evaluate.py::test_eval_with_the_world_oracle_and_pi0s_generations_adds_the_measures",
    "test_tilted_evaluate.py::test_measures_of_a_policy_match_the_exact_values",
    "test_tilted_evaluate.py::test_pi0_against_itself",
    "test_tilted_residual.py::test_f_learns_the_tilt_from_labels",
    "test_tilted_space.py::test_the_space_is_a_distribution_for_every_model",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        name = getattr(item, "originalname", item.name)  # without the [parameters]
        if item.path.name in SLOW_MODULES or f"{item.path.name}::{name}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


# Unmarked tests that ran long are named at the end of the run, so that test-fast stays fast as
# tests are added (wall seconds: generous, since a loaded machine stretches every test).
UNMARKED_LIMIT_S = 5.0
_long_unmarked: list[tuple[float, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.duration > UNMARKED_LIMIT_S and "slow" not in report.keywords:
        _long_unmarked.append((report.duration, f"{report.nodeid} ({report.when})"))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _long_unmarked:
        terminalreporter.write_sep(
            "-", f"not marked slow but over {UNMARKED_LIMIT_S:g} s: list them in tests/conftest.py")
        for seconds, what in sorted(_long_unmarked, reverse=True):
            terminalreporter.write_line(f"{seconds:7.1f}s {what}")

# Prompt / chosen / rejected rows over the tiny tokenizer's vocabulary (no <unk> tokens).
# 12 rows with varied lengths, so batches need padding and loss values depend on the rows.
PROMPTS = [
    "what is a good name for a cat",
    "the dog is",
    "how was your day",
    "my house is big",
    "where is the moon",
    "you are good",
    "who is that man",
    "what can i do",
    "the sun is",
    "is the water good",
    "why is the world so big",
    "what did she have",
]
CHOSEN = [
    "the cat is good", "a good dog", "it was a great day", "yes it is", "the moon is there",
    "thank you", "he is my first man", "you can do it", "the sun is big and new",
    "yes", "it is the world", "she had some food",
]
REJECTED = [
    "no", "bad bad", "day", "no it is not big at all", "i do not", "you", "no one",
    "nothing", "small", "no the water is bad", "why", "she had no food and no water",
]


@dataclass(frozen=True)
class Tiny:
    """Paths of the session's tiny checkpoints and datasets."""

    root: Path
    policy: Path  # causal LM (seed 0) + tokenizer
    ref: Path  # a *different* causal LM (seed 1), to make π₀ ≠ π in loss checks
    reward: Path  # scalar scorer (seed 2) + tokenizer
    pairs: Path  # prompt/chosen/rejected jsonl (also the prompt source of online methods)
    sft: Path  # prompt/completion jsonl


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer()
    paths = {}
    for name, model in {
        "policy": tiny_causal_lm(tok, seed=0),
        "ref": tiny_causal_lm(tok, seed=1),
        "reward": tiny_reward_model(tok, seed=2),
    }.items():
        save_tiny(tok, root / name)
        paths[name] = save_tiny(model, root / name)
    pairs = _write_jsonl(
        root / "pairs.jsonl",
        [
            {"prompt": p, "chosen": c, "rejected": r}
            for p, c, r in zip(PROMPTS, CHOSEN, REJECTED, strict=True)
        ],
    )
    sft = _write_jsonl(
        root / "sft.jsonl",
        [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, CHOSEN, strict=True)],
    )
    return Tiny(root, paths["policy"], paths["ref"], paths["reward"], pairs, sft)


def base_config(tiny: Tiny, method: str, run_dir: Path) -> dict[str, Any]:
    """A small, fast run: batch 4, 6 new tokens, no eval split. Progress stays on (the user's
    default): under pytest's captured stdout it prints plain lines, which tests exercise."""
    return {
        "model": {"name_or_path": str(tiny.policy), "reward_model": str(tiny.reward)},
        "data": {"path": str(tiny.sft if method == "sft" else tiny.pairs)},
        "gen": {"max_new_tokens": 6, "temperature": 0.7},
        "optim": {"lr": 1e-3},
        "run": {
            "name": run_dir.name,
            "output_dir": str(run_dir.parent),
            "batch_size": 4,
            "max_steps": 2,
            "progress": True,
            "num_samples_logged": 1,
        },
    }


MakeConfig = Callable[..., Any]


@pytest.fixture(scope="session")
def make_config(tiny: Tiny) -> MakeConfig:
    """``make_config(method, run_dir, "a.b=v", ...)`` → a validated ``TrainConfig``."""
    from distalign.train import load_config

    def make(method: str, run_dir: Path, *overrides: str) -> Any:
        return load_config(method, base_config(tiny, method, Path(run_dir)), list(overrides))

    return make


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl``."""
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]


def rows_by_step(run_dir: Path) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in read_metrics(run_dir)}


# ------------------------------------------------------------- independent reference maths
# Written without distalign.lm: every row is run *unpadded* through the plain HF model, so
# the library's batched, padded (left and right) computation is checked against the simplest
# possible one.
def _real_positions(attn_row: torch.Tensor) -> torch.Tensor:
    return attn_row.bool().nonzero()[:, 0]


@torch.no_grad()
def row_token_logps(model, ids: torch.Tensor, attn: torch.Tensor, temperature: float = 1.0):
    """``[B, L]``: ln p(ids[t] | real tokens before t) at each real position t (0 elsewhere)."""
    out = torch.zeros(ids.shape, dtype=torch.float32)
    for i in range(ids.shape[0]):
        pos = _real_positions(attn[i])
        row = ids[i, pos]
        logits = model(input_ids=row[None]).logits[0].float() / temperature
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, row[1:, None])[:, 0]
        out[i, pos[1:]] = lp
    return out


@torch.no_grad()
def row_head_outputs(scorer, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """``[B, L]``: a sequence-classification model's scalar head on each real token's state."""
    out = torch.zeros(ids.shape, dtype=torch.float32)
    for i in range(ids.shape[0]):
        pos = _real_positions(attn[i])
        hidden = scorer.model(input_ids=ids[i, pos][None]).last_hidden_state
        out[i, pos] = scorer.score(hidden)[0, :, 0].float()
    return out


def last_one(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 per row (written out, not distalign's helper)."""
    return torch.tensor([int(r.nonzero().max()) for r in mask])


def row_scores(scorer, ids: torch.Tensor, attn: torch.Tensor, upto: torch.Tensor):
    """R̂ per row: the head at the last 1 of ``upto`` (the last real response token)."""
    heads = row_head_outputs(scorer, ids, attn)
    return heads[torch.arange(ids.shape[0]), last_one(upto)]
