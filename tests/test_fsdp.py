"""Sharded training (FSDP2, ``distalign/train/sharding.py``) with 2 CPU processes over gloo.

One ``accelerate launch --use_fsdp --fsdp_version 2`` (accelerate's default
``--fsdp_cpu_ram_efficient_loading true``: rank 1 loads no weights and gets rank 0's) trains
every job below; a second launch resumes a run killed with SIGKILL and extends another.

* dpo (offline) sharded equals one process on the doubled batch (as DDP does,
  tests/test_engine_ddp.py), full fine-tuning and LoRA;
* pmle, rlhf and distill sample per rank, and one process cannot draw the same samples, so
  they are compared with DDP at the same world size (same per-rank streams), inside the same
  launch (``ACCELERATE_USE_FSDP=false`` for those jobs);
* a sharded run killed with ``kill -9`` resumes exactly; checkpoints are torch distributed
  checkpoints holding the trainable weights only; ``final/`` loads in plain transformers.

Tolerances: the sharded gradient norm is summed in another order (per shard, then across
ranks), so clipped updates differ from the replicated ones at float32 rounding: metrics must
agree to ``rel=1e-4, abs=1e-6`` and ``final/`` weights elementwise to 1e-5. Measured (CPU,
torch 2.13): losses and gradient norms within rel 2e-7, rlhf's env/kl within rel 4e-5
(abs 2e-7), ``final/`` weights within 1.3e-8 (most runs bit-identical).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import base_config, rows_by_step

from distalign.errors import ConfigError
from distalign.methods import get_method
from distalign.train import load_config, train
from distalign.train.checkpoint import latest_checkpoint
from distalign.train.sharding import check_sharded

WORKER = Path(__file__).with_name("ddp_worker.py")
LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"]
EXACT_SKIP = ("time", "step_time", "tokens_per_s")  # wall-clock fields
ONLINE = ("pmle", "rlhf", "distill")


def _launch(out: Path, jobs: Path, expect_kill: bool = False) -> None:
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists():
        pytest.skip("the `accelerate` launcher is not installed next to this Python")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(launcher), "launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), str(WORKER), str(out), str(jobs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "CUDA_VISIBLE_DEVICES": ""}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("accelerate launch of 2 sharded CPU processes did not finish in 400 s")
    (out.parent / f"{jobs.stem}.log").write_text(proc.stdout + proc.stderr)
    if (proc.returncode != 0) != expect_kill:
        lines = (proc.stdout + proc.stderr).splitlines()
        first = next((i for i, ln in enumerate(lines) if ln.startswith("Traceback")), 0)
        tail = "\n".join(lines[first : first + 40])
        pytest.fail(f"accelerate launch returned {proc.returncode}:\n{tail}")


def _job(tiny, tmp: Path, name: str, method: str, steps: int, extra: list[str],
         run: str | None = None, **more) -> dict:
    cfg = base_config(tiny, method, tmp / (run or name))
    cfg["run"]["batch_size"] = 2
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"method": method, **cfg}))
    overrides = [f"run.max_steps={steps}", "optim.scheduler=linear", "optim.warmup_steps=1",
                 *extra]
    return {"name": name, "method": method, "config": str(config), "overrides": overrides,
            **more}


@pytest.fixture(scope="module")
def sharded_runs(tiny, tmp_path_factory):
    """(tmp dir, {job name: [rank0 record, rank1 record]}) of both launches."""
    tmp = tmp_path_factory.mktemp("fsdp")
    ddp = {"ACCELERATE_USE_FSDP": "false"}
    jobs = [_job(tiny, tmp, "dpo", "dpo", 4, ["run.save_every=1"]),
            _job(tiny, tmp, "dpo-lora", "dpo", 4, LORA)]
    for method in ONLINE:
        # pmle samples for its KL term only with beta > 0 (its default is 0)
        extra = ["algo.update_epochs=2"] if method != "pmle" else ["algo.beta=1e-5"]
        for kind, lora in (("full", []), ("lora", LORA)):
            name = f"{method}-{kind}"
            steps = 3 if name == "rlhf-lora" else 2
            save = ["run.save_every=1"] if name == "rlhf-lora" else []
            jobs.append(_job(tiny, tmp, name, method, steps, extra + lora + save))
            jobs.append(_job(tiny, tmp, f"{name}-ddp", method, steps, extra + lora, env=ddp))
    # resume: a dpo run of 2 steps, extended to 4 below; an rlhf LoRA run killed after step 1
    jobs.append(_job(tiny, tmp, "dpo-ext-2", "dpo", 2, ["run.save_every=1"], run="dpo-ext"))
    victim = _job(tiny, tmp, "victim", "rlhf", 3, ["algo.update_epochs=2", *LORA,
                                                      "run.save_every=1"])
    jobs.append({**victim, "kill_after_step": 1})
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    _launch(tmp / "ranks", tmp / "jobs.json", expect_kill=True)
    again = [{k: v for k, v in victim.items() if k != "kill_after_step"},
             _job(tiny, tmp, "dpo-ext-4", "dpo", 4, ["run.save_every=1"], run="dpo-ext")]
    (tmp / "again.json").write_text(json.dumps(again))
    _launch(tmp / "ranks", tmp / "again.json")
    records = {}
    for j in [*jobs[:-1], *again]:
        records[j["name"]] = [json.loads((tmp / "ranks" / f"{j['name']}-rank{i}.json")
                                         .read_text()) for i in (0, 1)]
    return tmp, records


def _metrics_close(got: dict, want: dict, exact: bool = False) -> None:
    assert sorted(got) == sorted(want)
    for step in want:
        keys = set(want[step]) - set(EXACT_SKIP) - {k for k in want[step] if k.startswith("time/")}
        for k in sorted(keys):
            if k.endswith("clipfrac") and not exact:
                continue  # a fraction of values past a threshold: one may cross it at 1e-7
            if exact:
                assert got[step][k] == want[step][k], (step, k)
            else:
                assert got[step][k] == pytest.approx(want[step][k], rel=1e-4, abs=1e-6), (step, k)


def _params_close(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert float((got[k] - v).detach().abs().max()) < 1e-5, k


@pytest.mark.parametrize("name", ["dpo", "dpo-lora"])
def test_sharded_dpo_equals_one_process_on_the_doubled_batch(name, sharded_runs, tiny,
                                                             tmp_path):
    tmp, records = sharded_runs
    r0, r1 = records[name]
    assert r0["sharded"] and r1["sharded"] and r0["world"] == 2
    assert r1["rank0_loading"] == "true"  # accelerate's default: weights broadcast from rank 0
    assert r0["weights"] == r1["weights"]  # the gathered model is the same on both ranks
    extra = ["optim.scheduler=linear", "optim.warmup_steps=1", "run.max_steps=4"]
    one_dir = train(load_config("dpo", base_config(tiny, "dpo", tmp_path / "one"),
                                extra + (LORA if name == "dpo-lora" else [])))
    _metrics_close(rows_by_step(tmp / name), rows_by_step(one_dir))
    # final/ is a plain save_pretrained model (LoRA merged), equal to the one-process one
    from transformers import AutoModelForCausalLM

    got = dict(AutoModelForCausalLM.from_pretrained(tmp / name / "final").named_parameters())
    _params_close(got, dict(AutoModelForCausalLM.from_pretrained(one_dir / "final")
                            .named_parameters()))
    if name == "dpo":  # and it holds exactly the gathered weights
        for k, v in got.items():
            assert float(v.detach().double().sum()) == pytest.approx(r0["weights"][0][k],
                                                                     rel=1e-9), k


@pytest.mark.parametrize("method", ONLINE)
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_sharded_online_methods_equal_ddp(method, kind, sharded_runs):
    tmp, records = sharded_runs
    name = f"{method}-{kind}"
    sharded, ddp = records[name], records[f"{name}-ddp"]
    assert sharded[0]["sharded"] and not ddp[0]["sharded"]
    assert sharded[0]["batches"] == ddp[0]["batches"]  # the same prompts per rank
    assert sharded[0]["batches"] != sharded[1]["batches"]
    _metrics_close(rows_by_step(tmp / name), rows_by_step(tmp / f"{name}-ddp"))
    assert sharded[0]["weights"] == sharded[1]["weights"]
    # final/ (LoRA merged) loads in plain transformers and equals the DDP run's
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    finals = [("final", AutoModelForCausalLM)]
    if method == "rlhf":
        finals.append(("final/value_model", AutoModelForSequenceClassification))
    for sub, auto in finals:
        got = dict(auto.from_pretrained(tmp / name / sub).named_parameters())
        want = dict(auto.from_pretrained(tmp / f"{name}-ddp" / sub).named_parameters())
        _params_close(got, want)


def test_killed_sharded_run_resumes_exactly(sharded_runs):
    """kill -9 of both ranks after step 1's checkpoint; the rerun resumes from it and logs
    and ends exactly as the uninterrupted run (rlhf with LoRA: sampling streams, policy and
    value adapters, the frozen reward model, optimizer and schedule)."""
    tmp, records = sharded_runs
    _metrics_close(rows_by_step(tmp / "victim"), rows_by_step(tmp / "rlhf-lora"), exact=True)
    assert records["victim"][0]["weights"] == records["rlhf-lora"][0]["weights"]
    # extending a finished full fine-tuning run (resumed from its step-2 checkpoint)
    _metrics_close(rows_by_step(tmp / "dpo-ext"), rows_by_step(tmp / "dpo"), exact=True)
    assert records["dpo-ext-4"][0]["weights"] == records["dpo"][0]["weights"]


def test_sharded_checkpoints_are_distributed_checkpoints_of_trainable_weights(sharded_runs):
    from torch.distributed.checkpoint import FileSystemReader

    tmp, _ = sharded_runs
    for run, lora in (("dpo", False), ("rlhf-lora", True)):
        step = latest_checkpoint(tmp / run)
        assert step is not None
        assert sorted(p.name for p in (step / "sharded").glob("*.distcp")) == [
            "__0_0.distcp", "__1_0.distcp"]
        assert not list(step.glob("model*.safetensors"))  # no whole-model copy
        keys = FileSystemReader(str(step / "sharded")).read_metadata().state_dict_metadata
        weights = [k for k in keys if k.startswith("model.")]
        adapter = [k for k in weights if "lora_" in k or "modules_to_save" in k]
        # LoRA: the adapters (and the value head) only, not the frozen base weights
        assert weights and (adapter == weights if lora else not adapter), weights[:4]


def test_sharded_value_model_final_loads_in_transformers(sharded_runs):
    from transformers import AutoModelForSequenceClassification

    tmp, records = sharded_runs
    model = AutoModelForSequenceClassification.from_pretrained(tmp / "rlhf-full" / "final"
                                                               / "value_model")
    want = records["rlhf-full"][0]["weights"][1]
    for k, v in model.named_parameters():
        assert float(v.detach().double().sum()) == pytest.approx(want[k], rel=1e-9), k


@pytest.mark.parametrize(("change", "why"), [
    ({"backend": "vllm"}, "gen.backend=vllm"),
    ({"mixed_precision": "fp16"}, "fp16"),
    ({"callbacks": True}, "callbacks"),
])
def test_sharding_refuses_what_it_cannot_do(change, why):
    cfg = SimpleNamespace(gen=SimpleNamespace(backend=change.get("backend", "hf")),
                          algo=get_method("rlhf").Config())
    with pytest.raises(ConfigError, match=why):
        check_sharded(cfg, get_method("rlhf"), change.get("mixed_precision", "no"),
                      change.get("callbacks", False))
    cfg.gen.backend = "hf"
    check_sharded(cfg, get_method("rlhf"), "bf16", False)  # bf16 and HF sampling are fine
