"""Two CPU processes (DDP over gloo, via ``accelerate launch``) train exactly like one process
on the doubled batch: same rows per step, same losses and lr, identical replicas."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import base_config, rows_by_step

from distalign.methods import get_method
from distalign.train import load_config, train

ACCELERATE = Path(sys.executable).with_name("accelerate")
WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS = 4  # 12 rows: 3 steps per epoch (batch 4 on one process, 2 + 2 on two), so epoch 2 too
OVERRIDES = [f"run.max_steps={STEPS}", "optim.scheduler=linear", "optim.warmup_steps=1"]
COMPARED = {  # method -> metrics that must match the one-process run
    "dpo": ("loss", "lr", "rewards/chosen", "rewards/rejected", "rewards/margin", "grad_norm"),
    "reward": ("loss", "lr", "rm/chosen", "rm/rejected", "rm/margin", "grad_norm"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, jobs: Path) -> None:
    launcher = str(ACCELERATE) if ACCELERATE.exists() else shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the `accelerate` launcher is not installed next to this Python")
    # --multi_gpu selects accelerate's torchrun launcher; ACCELERATE_USE_CPU makes it DDP on
    # CPU with gloo (with --cpu alone accelerate wants mpirun for several processes).
    cmd = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(WORKER), str(out), str(jobs),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "CUDA_VISIBLE_DEVICES": ""}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("accelerate launch of 2 CPU processes did not finish in 300 s")
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        pytest.fail(f"accelerate launch failed ({proc.returncode}):\n{tail}")


def _unpadded(rows: list[list[int]], pad: int = 0) -> list[tuple[int, ...]]:
    out = []
    for r in rows:
        while r and r[-1] == pad:
            r = r[:-1]
        out.append(tuple(r))
    return out


@pytest.fixture(scope="module")
def two_process_runs(tiny, tmp_path_factory):
    """One ``accelerate launch`` of 2 processes training dpo, reward and rlhf (batch 2 per
    process) one after the other; returns (tmp dir, {name: [rank0 record, rank1 record]})."""
    tmp = tmp_path_factory.mktemp("ddp")
    jobs = []
    for method in ("dpo", "reward", "rlhf"):
        cfg = base_config(tiny, method, tmp / f"two-{method}")
        cfg["run"]["batch_size"] = 2
        config = tmp / f"{method}.yaml"
        config.write_text(yaml.safe_dump({"method": method, **cfg}))
        extra = ["algo.update_epochs=2"] if method == "rlhf" else []
        jobs.append({"name": method, "method": method, "config": str(config),
                     "overrides": OVERRIDES + extra})
    # a LoRA run whose checkpoints hold the LoRA weights only: 2 steps, then extended to 4
    # (resumed from its step-2 checkpoint), beside an uninterrupted 4-step run
    lora = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8",
            "optim.scheduler=constant", "run.save_every=1"]
    for name, steps in (("lora", 2), ("lora", 4), ("lora-ref", 4)):
        cfg = base_config(tiny, "dpo", tmp / f"two-{name}")
        cfg["run"]["batch_size"] = 2
        config = tmp / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"method": "dpo", **cfg}))
        jobs.append({"name": f"{name}-{steps}", "method": "dpo", "config": str(config),
                     "overrides": [*lora, f"run.max_steps={steps}"]})
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    _launch(tmp / "ranks", tmp / "jobs.json")
    records = {
        j["name"]: [json.loads((tmp / "ranks" / f"{j['name']}-rank{i}.json").read_text())
                    for i in (0, 1)]
        for j in jobs
    }
    return tmp, records


@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_two_processes_equal_one_process_on_the_doubled_batch(
    method, two_process_runs, tiny, tmp_path, monkeypatch
):
    tmp, records = two_process_runs
    ranks = records[method]
    assert [r["world"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]

    cls = get_method(method)
    seen: list[list[list[int]]] = []
    real = cls.collect

    def collect(self, batch):
        seen.append(batch["input_ids"].tolist())
        return real(self, batch)

    monkeypatch.setattr(cls, "collect", collect)
    one_dir = train(load_config(method, base_config(tiny, method, tmp_path / "one"), OVERRIDES))
    one = rows_by_step(one_dir)

    # the same rows per step: process i gets every other batch of 2, i.e. rows 2i, 2i+1 of
    # the one-process batch of 4 (pair batches: chosen rows first, then rejected rows)
    def halves(rows):
        return _unpadded(rows[: len(rows) // 2]), _unpadded(rows[len(rows) // 2 :])

    for step in range(STEPS):
        (c0, r0), (c1, r1) = (halves(r["batches"][step]) for r in ranks)
        c, r = halves(seen[step])
        assert (c0 + c1, r0 + r1) == (c, r), f"rows of step {step + 1}"

    two = rows_by_step(tmp / f"two-{method}")
    for step in range(1, STEPS + 1):
        for k in COMPARED[method]:
            assert two[step][k] == pytest.approx(one[step][k], rel=1e-5, abs=1e-7), (step, k)
    # DDP kept the replicas identical, and equal to the one-process model
    assert ranks[0]["weights"] == ranks[1]["weights"]
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if method == "reward" else AutoModelForCausalLM
    final = auto.from_pretrained(one_dir / "final")
    for k, v in final.named_parameters():
        want = float(v.detach().double().sum())
        assert ranks[0]["weights"][0][k] == pytest.approx(want, rel=1e-4, abs=1e-5), k


def test_two_process_ppo_keeps_policy_and_value_replicas_identical(two_process_runs):
    """Each rank samples its own prompts; DDP must still average both models' gradients."""
    tmp, records = two_process_runs
    r0, r1 = records["rlhf"]
    assert r0["batches"] != r1["batches"]  # different prompts per rank
    assert r0["rng"] != r1["rng"]  # and independent sampling streams
    assert len(r0["weights"]) == 2  # policy and value model
    assert r0["weights"] == r1["weights"]
    rows = rows_by_step(tmp / "two-rlhf")
    assert sorted(rows) == list(range(STEPS + 1))


def test_two_process_lora_run_resumes_from_trainable_only_checkpoints(two_process_runs):
    """Under DDP a LoRA run's checkpoints hold the LoRA weights only, and a run extended from
    one logs exactly what the uninterrupted run logs."""
    from safetensors import safe_open

    tmp, records = two_process_runs
    with safe_open(str(tmp / "two-lora" / "checkpoints" / "step-4" / "model.safetensors"),
                   "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names), names[:5]
    got, want = rows_by_step(tmp / "two-lora"), rows_by_step(tmp / "two-lora-ref")
    assert sorted(got) == sorted(want) == list(range(5))
    for step in range(1, 5):
        for k in ("loss", "grad_norm", "rewards/margin"):
            assert got[step][k] == want[step][k], (step, k)
    assert records["lora-4"][0]["weights"] == records["lora-ref-4"][0]["weights"]
