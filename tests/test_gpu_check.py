"""``benchmarks/gpu_check.py`` runs every row on CPU with a tiny model (the GPU figures need a
GPU; this keeps the script working): DPO and rlhf, full and LoRA, and the FSDP2 rows sharded
in a one-process ``torchrun`` child."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_every_row_on_cpu_tiny():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lines = proc.stdout.splitlines()
    rows = {ln[:17].strip(): ln[17:].split() for ln in lines if ln[:4] in ("dpo ", "rlhf", "fsdp")}
    assert sorted(rows) == sorted(["dpo full", "dpo lora", "rlhf full", "rlhf lora",
                                   "fsdp2 dpo full", "fsdp2 rlhf lora"])
    for name, cells in rows.items():
        step_s, gen_s, tokens = (float(c) for c in cells[:3])  # not an error line
        assert step_s > 0 and tokens > 0, name
        assert (gen_s > 0) == ("rlhf" in name), name  # rlhf samples, DPO does not
    assert "cuda-marked tests: not run" in proc.stdout
