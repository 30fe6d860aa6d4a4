"""Worker for ``tests/test_engine_ddp.py``, run under ``accelerate launch --num_processes N``.

Usage: ``ddp_worker.py OUT_DIR JOBS.json``, where JOBS.json lists
``{"name", "method", "config", "overrides"}`` runs. One launch trains them one after the other
(process start-up dominates the cost), and every rank writes ``OUT_DIR/{name}-rank{i}.json``
with the batches it was given (to check the data split) and a fingerprint of each of its
trained models (to check that DDP kept the replicas identical).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch


def fingerprint(model: torch.nn.Module) -> dict[str, float]:
    return {k: float(v.detach().double().sum()) for k, v in model.named_parameters()}


def run_job(out_dir: Path, job: dict) -> None:
    from distalign.train import Trainer, load_config

    cfg = load_config(job["method"], job["config"], job["overrides"])
    trainer = Trainer(cfg)
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
