"""Worker for ``tests/test_engine_ddp.py``, run under ``accelerate launch --num_processes N``.

Usage: ``ddp_worker.py OUT_DIR JOBS.json``, where JOBS.json lists
``{"name", "method", "config", "overrides"}`` runs, optionally with ``"env"`` (variables set for
that job only, e.g. ``ACCELERATE_USE_FSDP=false`` for a DDP run inside a sharded launch) and
``"kill_after_step"`` (every rank kills itself with SIGKILL once that step's checkpoint is
written: a ``kill -9`` of the whole job). One launch trains them one after the other (process
start-up dominates the cost), and every rank writes ``OUT_DIR/{name}-rank{i}.json`` with the
batches it was given (to check the data split) and a fingerprint of each of its trained
models (to check that DDP kept the replicas identical; sharded weights are gathered first).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch


def fingerprint(model: torch.nn.Module) -> dict[str, float]:
    """Each parameter's sum; a sharded (DTensor) parameter is gathered first (a collective:
    every rank calls this on the same models in the same order)."""
    out = {}
    for k, v in model.named_parameters():
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = float(full.detach().double().sum())
    return out


def _kill_after(step: int) -> None:
    import distalign.train.engine as engine

    real = engine.save_checkpoint

    def save_checkpoint(acc, run_dir, state, *args, **kwargs):
        out = real(acc, run_dir, state, *args, **kwargs)
        if state.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    engine.save_checkpoint = save_checkpoint


def run_job(out_dir: Path, job: dict) -> None:
    from distalign.train import Trainer, load_config

    saved = dict(os.environ)
    os.environ.update(job.get("env", {}))
    if "kill_after_step" in job:
        _kill_after(job["kill_after_step"])
    try:
        cfg = load_config(job["method"], job["config"], job["overrides"])
        trainer = Trainer(cfg)
        _fit(out_dir, job, trainer)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _fit(out_dir: Path, job: dict, trainer) -> None:
    rng = torch.get_rng_state()  # the sampling stream this rank starts from
    method_cls = type(trainer.method)
    seen: list[list[list[int]]] = []
    real_collect = method_cls.collect

    def collect(self, batch):
        key = "input_ids" if "input_ids" in batch else "prompt_input_ids"
        seen.append(batch[key].tolist())
        return real_collect(self, batch)

    method_cls.collect = collect  # type: ignore[method-assign]
    try:
        trainer.fit()
    finally:
        method_cls.collect = real_collect  # type: ignore[method-assign]
    models = [trainer.acc.unwrap_model(m) for m in trainer.trainables]
    rank = trainer.acc.process_index
    record = {
        "rank": rank,
        "world": trainer.acc.num_processes,
        "distributed_type": str(trainer.acc.distributed_type),
        # FSDP2 shards parameters as DTensors; under DDP they are plain tensors
        "sharded": any(type(p).__name__ == "DTensor" for p in trainer.trainables[0].parameters()),
        "batches": seen,
        # under `accelerate launch --use_fsdp`, rank 1 loaded no weights of its own (rank 0's
        # are broadcast while sharding) when this is "true"
        "rank0_loading": os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING"),
        "rng": hashlib.sha1(rng.numpy().tobytes()).hexdigest(),
        "weights": [fingerprint(m) for m in models],
    }
    (out_dir / f"{job['name']}-rank{rank}.json").write_text(json.dumps(record))


def main(argv: list[str]) -> None:
    out_dir, jobs = Path(argv[0]), json.loads(Path(argv[1]).read_text())
    torch.set_num_threads(1)  # tiny models, shared CI cores
    out_dir.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        run_job(out_dir, job)


if __name__ == "__main__":
    main(sys.argv[1:])
