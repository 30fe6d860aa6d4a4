"""FSDP: what is supported, and the CPU fact that decides what can be tested here.

accelerate (1.x) turns ``--use_fsdp`` into FSDP only on accelerators; on CPU
(``ACCELERATE_USE_CPU=true``) it runs MULTI_CPU, i.e. DDP, and ignores the plugin without a
word. A CPU "FSDP" run therefore equals DDP (checked below, with the warning we now print);
a real FSDP run needs GPUs, so under FSDP the engine refuses the paths it cannot vouch for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import base_config

from distalign.errors import ConfigError
from distalign.methods import get_method
from distalign.train.setup import check_fsdp

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_fsdp_requested_on_cpu_is_reported_as_data_parallel(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    why = check_fsdp("DistributedType.MULTI_CPU", get_method("dpo"), lora=False)
    assert why is not None and "plain data parallel" in why
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert check_fsdp("DistributedType.MULTI_CPU", get_method("dpo"), lora=False) is None


@pytest.mark.parametrize(("method", "lora"), [("rlhf", False), ("rebel", False),
                                              ("reward", False), ("dpo", True)])
def test_real_fsdp_refuses_untested_paths(method, lora):
    with pytest.raises(ConfigError, match="FSDP is not supported"):
        check_fsdp("DistributedType.FSDP", get_method(method), lora=lora)


def test_real_fsdp_allows_offline_methods_with_a_warning():
    assert "untested" in check_fsdp("DistributedType.FSDP", get_method("dpo"), lora=False)


def test_cpu_fsdp_launch_runs_ddp_and_says_so(tiny, tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists():
        pytest.skip("the `accelerate` launcher is not installed next to this Python")
    cfg = base_config(tiny, "dpo", tmp_path / "fsdp")
    cfg["run"]["batch_size"] = 2
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({"method": "dpo", **cfg}))
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"name": "dpo", "method": "dpo", "config": str(config),
                                 "overrides": ["run.max_steps=1"]}]))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(launcher), "launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--fsdp_cpu_ram_efficient_loading", "false", "--main_process_port", str(port),
           str(WORKER), str(tmp_path / "out"), str(jobs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "plain data parallel" in proc.stdout + proc.stderr
    ranks = [json.loads((tmp_path / "out" / f"dpo-rank{i}.json").read_text()) for i in (0, 1)]
    assert [r["distributed_type"] for r in ranks] == ["DistributedType.MULTI_CPU"] * 2
    assert not any(r["sharded"] for r in ranks)  # no DTensor parameters: not sharded
    assert ranks[0]["weights"] == ranks[1]["weights"]  # data parallel kept replicas equal
