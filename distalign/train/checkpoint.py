"""Checkpoint/resume: model, optimizer, scheduler and RNG via accelerate, plus our position.

Checkpoints hold the trainable weights only (:func:`keep_trainable_weights_only`): a LoRA
run's frozen base model, about 0.5 GB per model for SmolLM2-135M, is rebuilt from its source
when the run resumes instead of being written at every checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol


class Shards(Protocol):
    """Model and optimizer state kept outside accelerate (sharded runs: train/sharding.py)."""

    def save(self, out: Path) -> None: ...

    def load(self, ckpt: Path) -> None: ...


@dataclass
class TrainState:
    """Where the loop is: ``step`` completed collect→update steps; ``epoch`` and
    ``batch_in_epoch`` locate the next dataloader batch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    optimizer_steps: int = 0

    def save(self, path: Path) -> None:
        # atomic: this file marks a checkpoint as complete, so a kill -9 mid-write must leave
        # either no file or a whole one (an empty one would be picked up and fail to parse)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            f.write(json.dumps(asdict(self)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> TrainState:
        return cls(**json.loads(path.read_text()))


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [d for d in root.glob("step-*") if (d / "trainer_state.json").exists()]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    accelerator: Any, run_dir: Path, state: TrainState, keep: int, tag: str | None = None,
    config_yaml: str | None = None, shards: Shards | None = None,
) -> Path:
    """Save everything needed to continue; the state file is written last, so a checkpoint
    interrupted mid-write is never picked up by ``latest_checkpoint``. ``config_yaml`` is kept
    with it: a rerun may continue it only with the same config (``train/rundir.py``).
    ``shards`` writes what accelerate does not hold (a sharded run's models and optimizer)."""
    out = run_dir / "checkpoints" / (tag or f"step-{state.step}")
    accelerator.wait_for_everyone()
    accelerator.save_state(str(out))
    if shards is not None:
        shards.save(out)
    if accelerator.is_main_process:
        if config_yaml is not None:
            (out / "config.yaml").write_text(config_yaml)
        state.save(out / "trainer_state.json")
        if keep > 0 and tag is None:
            for old in checkpoint_dirs(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return out


def _frozen(model: Any) -> set[str]:
    # every alias of a tied parameter (SmolLM2's lm_head is its embedding): the state dict
    # holds each name
    return {name for name, p in model.named_parameters(remove_duplicate=False)
            if not p.requires_grad}


def keep_trainable_weights_only(accelerator: Any) -> None:
    """Make ``accelerator.save_state`` leave frozen parameters out of the model files, and
    ``load_state`` load such files, checking that exactly the frozen ones are missing. Only
    for models accelerate saves as state dicts (not FSDP, DeepSpeed or Megatron shards), and
    only where some parameter is frozen; otherwise accelerate's own save and load run."""
    from accelerate.utils import DistributedType
    from safetensors.torch import load_model

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                        DistributedType.MEGATRON_LM):
        return

    def save(models: list, weights: list[dict], _output_dir: str) -> None:
        for model, state in zip(models, weights, strict=False):
            for name in _frozen(model) & state.keys():
                del state[name]

    def load(models: list, input_dir: str) -> None:
        if not any(_frozen(m) for m in models):
            return
        for i, model in enumerate(models):  # accelerate's file names: model, model_1, …
            path = Path(input_dir) / f"model{f'_{i}' if i else ''}.safetensors"
            missing, unexpected = load_model(model, str(path), strict=False)
            extra = sorted(set(missing) - _frozen(model)) + sorted(unexpected)
            if extra:
                raise RuntimeError(f"checkpoint {path} does not match the model: "
                                   f"{', '.join(extra[:5])}")
        models.clear()  # loaded here: accelerate goes on with optimizer, scheduler and RNG

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def load_checkpoint(accelerator: Any, ckpt: Path, shards: Shards | None = None) -> TrainState:
    accelerator.load_state(str(ckpt))
    if shards is not None:
        shards.load(ckpt)
    return TrainState.load(ckpt / "trainer_state.json")


def resync_lr(optimizer: Any, scheduler: Any) -> None:
    """After a resume, set the optimizer's lr from the schedule of *this* config.

    Only the step count is restored (schedule functions are not saved), so a run resumed with
    a larger ``run.max_steps`` follows the new horizon; without this, its first update would
    use the lr saved by the old schedule (0 at the end of a linear decay).
    """
    sched = getattr(scheduler, "scheduler", scheduler)
    if not hasattr(sched, "lr_lambdas"):
        return
    pairs = zip(sched.base_lrs, sched.lr_lambdas, strict=True)
    lrs = [b * f(sched.last_epoch) for b, f in pairs]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    sched._last_lr = lrs
