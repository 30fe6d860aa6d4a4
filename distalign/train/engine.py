"""The one training loop every method runs on: collect experience → update for k epochs.

Offline methods "collect" by reading a dataset batch; online ones sample and score. The loop
owns the optimiser and schedule, gradient accumulation, checkpoint/resume, NaN guard,
trackers, progress and the run directory (``distalign.train.rundir``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from distalign.errors import Interrupted, TrainingError
from distalign.lm.models import load_tokenizer
from distalign.lm.wrappers import eval_mode
from distalign.locks import run_dir_lock
from distalign.methods import get_method
from distalign.methods.base import Batch, Context, Method
from distalign.progress import StepProgress, quiet_libraries
from distalign.signals import StopAtStepEnd
from distalign.train.checkpoint import (
    TrainState,
    keep_trainable_weights_only,
    load_checkpoint,
    resync_lr,
    save_checkpoint,
)
from distalign.train.config import TrainConfig, check_trackers, to_yaml
from distalign.train.rundir import CONFIG_NAME, clear_run, is_finished, plan_run
from distalign.train.save import save_final
from distalign.train.setup import (
    build_data,
    build_models,
    build_optimizer,
    build_sampler,
    launch_mismatch,
    read_data,
    sequence_tokens,
)
from distalign.train.sharding import start as start_layout
from distalign.train.tracking import (
    RunLog,
    SampleRecorder,
    decode_samples,
    progress_info,
    write_summary,
)

log = logging.getLogger("distalign")


class Callback(Protocol):
    def on_evaluate(self, step: int, model: Any, tokenizer: Any) -> dict[str, float]: ...


def _slice(exp: Batch, idx: torch.Tensor) -> Batch:
    return {k: v[idx] for k, v in exp.items()}


class Trainer:
    """Holds the prepared objects of one run; ``fit`` runs the loop."""

    def __init__(self, cfg: TrainConfig, callbacks: list[Callback] | tuple = ()) -> None:
        self.cfg, self.callbacks = cfg, list(callbacks)
        check_trackers(list(cfg.run.report_to))
        self.method_cls: type[Method] = get_method(cfg.method)
        self.run_dir = cfg.run_dir
        self.acc = Accelerator(
            log_with=cfg.run.report_to or None,
            project_dir=str(self.run_dir),
            mixed_precision=cfg.run.mixed_precision,
            # our schedule counts this process's optimizer steps; by default accelerate would
            # step it num_processes times per update (sized for one process's batches)
            step_scheduler_with_optimizer=False,
        )
        keep_trainable_weights_only(self.acc)
        set_seed(cfg.run.seed)
        if (why := launch_mismatch(self.acc.num_processes)) is not None:
            log.warning(why)
        # replicated (DDP, one process) or sharded (FSDP2): train/sharding.py
        self.par = start_layout(self.acc, cfg, self.method_cls, bool(self.callbacks))
        self.config_yaml = to_yaml(cfg)
        # decided (read-only) before loading, applied after: a failed load changes nothing
        plan = plan_run(self.run_dir, yaml.safe_load(self.config_yaml), cfg.run.resume,
                           cfg.run.overwrite)
        tokenizer = load_tokenizer(cfg.model)
        data = read_data(cfg, self.method_cls, tokenizer)  # bad rows stop here, before loading
        self.models = build_models(cfg, self.method_cls, tokenizer)
        self.par.place_models(self.models, self.method_cls)
        dev = self.acc.device
        loader, self.sampler, eval_loader, report = build_data(
            cfg, self.method_cls, self.models, dev, data
        )
        # accelerate gives process i every num_processes-th full batch and drops the rest
        self.steps_per_epoch = len(loader) // self.acc.num_processes
        if self.steps_per_epoch == 0:
            raise TrainingError(
                f"{cfg.data.path}: {len(self.sampler)} usable rows, fewer than one batch "
                f"of run.batch_size={cfg.run.batch_size} per process "
                f"({self.acc.num_processes} processes)"
            )
        self.data_reports = report
        trainables = [self.models.model]
        if self.models.value_model is not None:
            trainables.append(self.models.value_model)
        mini = cfg.run.mini_batch_size or cfg.run.batch_size
        self.total_steps = cfg.run.max_steps or max(
            1, math.ceil(cfg.run.epochs * self.steps_per_epoch)
        )
        epochs_k = cfg.algo.update_epochs
        updates = self.total_steps * epochs_k * (cfg.run.batch_size // mini)
        optimizer, scheduler = build_optimizer(cfg, trainables, updates)
        n = len(trainables)
        self.trainables, self.optimizer, self.loader, self.scheduler = self.par.prepare(
            self.models, trainables, optimizer, loader, scheduler)
        for m in self.trainables:  # from_pretrained returns eval mode; updates run in train
            m.train()
        self.shards = self.par.checkpoint(self.trainables, self.optimizer)
        self.eval_loader = self.acc.prepare(eval_loader) if eval_loader is not None else None
        # All ranks used one seed so that every model starts identical; from here on each rank
        # samples its own responses (one stream on every rank would correlate them, as TRL's
        # per-process generation seed also avoids). One process: the seed is unchanged.
        set_seed(cfg.run.seed, device_specific=True)
        sampler = build_sampler(cfg, self.method_cls, self.models.tokenizer,
                                self.models.model.config)
        self.recorder = SampleRecorder(sampler) if sampler is not None else None
        self.ctx = Context(
            accelerator=self.acc,
            tokenizer=self.models.tokenizer,
            policy=self.trainables[0],
            ref=self.models.ref,
            reward_model=self.models.reward_model,
            value_model=self.trainables[1] if n > 1 else None,
            sampler=self.recorder,
        )
        self.method = self.method_cls(cfg.algo, cfg.gen, self.ctx)
        self.state = TrainState()
        self.acc.wait_for_everyone()  # every rank has read the run directory
        if self.acc.is_main_process:
            if plan.clear:
                clear_run(self.run_dir, plan.reason)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / CONFIG_NAME).write_text(self.config_yaml)
        self.acc.wait_for_everyone()
        resume_from = plan.resume_from
        if resume_from is not None:
            self.state = load_checkpoint(self.acc, resume_from, self.shards)
            resync_lr(self.optimizer, self.scheduler)
            log.info("resumed from %s (step %d)", resume_from, self.state.step)
        self.log = RunLog(
            self.run_dir, self.state.step if resume_from else None, self.acc.is_main_process
        )

    # ---------------------------------------------------------------------------- data
    def _batches(self):
        """Yield batches from the saved position onward, epoch after epoch."""
        epoch, skip = self.state.epoch, self.state.batch_in_epoch
        while True:
            # The accelerate loader re-sets the sampler's epoch from its own pass counter at
            # every pass (and a skip loader inherits that counter), so set the epoch there.
            self.loader.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
            loader = self.acc.skip_first_batches(self.loader, skip) if skip else self.loader
            for i, batch in enumerate(loader, start=skip):
                yield epoch, i, batch
            epoch, skip = epoch + 1, 0

    # -------------------------------------------------------------------------- update
    def _update(self, exp: Batch, step: int) -> dict[str, float]:
        r = self.cfg.run
        rows = next(iter(exp.values())).shape[0]
        mini = min(r.mini_batch_size or r.batch_size, rows)
        micro = max(mini // r.grad_accum, 1)
        g = torch.Generator().manual_seed(r.seed * 7_919 + step)
        sums: dict[str, float] = defaultdict(float)
        count, lr = 0, 0.0
        for _ in range(self.method.update_epochs):
            order = torch.randperm(rows, generator=g) if self.method.update_epochs > 1 else None
            for start in range(0, rows, mini):
                idx = torch.arange(start, min(start + mini, rows))
                idx = order[idx] if order is not None else idx
                parts = [idx[i : i + micro] for i in range(0, len(idx), micro)]
                mbs = [_slice(exp, p.to(self.acc.device)) for p in parts]
                units = [self.method.units(mb) for mb in mbs]
                total = sum(units) or 1.0
                for j, (mb, u) in enumerate(zip(mbs, units, strict=True)):
                    last = j == len(mbs) - 1
                    sync = contextlib.ExitStack()
                    if not last:  # only the last micro-batch all-reduces gradients
                        for m in self.trainables:
                            sync.enter_context(self.par.no_sync(m))
                    with sync:
                        loss, metrics = self.method.loss(mb)
                        self._guard(loss, step)
                        self.acc.backward(loss * (u / total))
                    for k, v in metrics.items():
                        sums[k] += float(v) * u / total
                    sums["loss"] += float(loss.detach()) * u / total
                if self.cfg.optim.max_grad_norm > 0:
                    # read now: FSDP2 registers other (unsharded) tensors while gathered
                    params = [p for m in self.trainables for p in m.parameters()
                              if p.requires_grad]
                    sums["grad_norm"] += self.par.clip_grad_norm(params,
                                                                 self.cfg.optim.max_grad_norm)
                # log the lr this update used (the scheduler then moves on to the next one)
                lr = float(self.optimizer.param_groups[0]["lr"])
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.optimizer_steps += 1
                count += 1
        return {**{k: v / max(count, 1) for k, v in sums.items()}, "lr": lr}

    def _guard(self, loss: torch.Tensor, step: int) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
        if float(self.acc.reduce(bad.to(self.acc.device), "sum")) > 0:
            path = save_checkpoint(self.acc, self.run_dir, self.state, 0, tag=f"nan-step-{step}",
                                   shards=self.shards)
            hint = "Lower optim.lr or check the data."
            if self.cfg.model.dtype == "float16":
                hint = ("model.dtype=float16 trains in pure fp16, which overflows: use "
                        "model.dtype=float32 with run.mixed_precision=fp16 (or bf16).")
            raise TrainingError(
                f"non-finite loss at step {step + 1} ({self.cfg.method}); state before the "
                f"update saved to {path}. {hint}"
            )

    # ------------------------------------------------------------------------ evaluate
    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out metrics and callbacks. Run under a forked RNG: evaluation samples too,
        and must not shift the training stream (trajectories independent of eval_every,
        exact resume, and ranks stay in step when callbacks run on the main process only)."""
        dev = self.acc.device
        devices = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._evaluate(step)

    def _evaluate(self, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.eval_loader is not None:
            # means over rows, not over batches: a short last batch counts for its size, so
            # held-out accuracy is the plain fraction of pairs (under DDP, accelerate's even
            # batches may repeat a few rows to fill the ranks' last batches)
            sums: dict[str, float] = defaultdict(float)
            rows = 0.0
            with eval_mode(*self.trainables):
                for batch in self.eval_loader:
                    b = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
                    for k, v in self.method.evaluate(batch).items():
                        sums[k] += float(self.acc.reduce(v.detach().float() * b, "sum"))
                    rows += float(self.acc.reduce(torch.tensor(float(b), device=self.acc.device),
                                                  "sum"))
            out.update({f"eval/{k}": v / max(rows, 1.0) for k, v in sums.items()})
        if self.recorder is not None:
            self.recorder.take()  # eval samples are not training samples
        if self.callbacks and self.acc.is_main_process:
            model = self.acc.unwrap_model(self.trainables[0])
            with eval_mode(model):
                for cb in self.callbacks:
                    out.update(cb.on_evaluate(step, model, self.models.tokenizer) or {})
        return out

    def _stop_requested(self, stop: StopAtStepEnd) -> bool:
        """Any rank was signalled (all ranks must leave the loop at the same step)."""
        flag = float(stop.signum is not None)
        if self.acc.num_processes > 1:
            flag = float(self.acc.reduce(torch.tensor(flag, device=self.acc.device), "max"))
        return flag > 0

    def _stop(self, signum: int, saved: bool) -> None:
        """Save the step just finished (unless checkpoints are off) and end the command."""
        r, st = self.cfg.run, self.state
        if r.save_every and not saved:
            save_checkpoint(self.acc, self.run_dir, st, r.keep_checkpoints,
                            config_yaml=self.config_yaml, shards=self.shards)
        where = (f"checkpoint at step {st.step} saved; rerun the same command to resume"
                 if r.save_every else "no checkpoint (run.save_every=0): a rerun starts over")
        raise Interrupted(signum, f"{self.cfg.method}: interrupted at step {st.step}/"
                          f"{self.total_steps}; {where}")

    def _clock(self) -> float:
        """Wall time, after the device's queued work (phase times must not leak across)."""
        if self.acc.device.type == "cuda":
            torch.cuda.synchronize(self.acc.device)
        return time.perf_counter()

    def _samples(self) -> list[dict[str, Any]]:
        if self.recorder is None:
            return []
        rollouts, _ = self.recorder.take()
        k = self.cfg.run.num_samples_logged
        return decode_samples(self.models.tokenizer, rollouts[0], k) if rollouts and k else []

    # ----------------------------------------------------------------------------- fit
    def fit(self) -> Path:
        r, st = self.cfg.run, self.state
        if st.step == 0:
            self.log.write(0, self.evaluate(0) if r.eval_at_start else {})
        progress = StepProgress(
            self.cfg.method, self.total_steps, st.step,
            enabled=r.progress and self.acc.is_main_process, every=r.log_every,
        )
        with progress, StopAtStepEnd() as stop:
            for rep in self.data_reports:
                if rep is not None:
                    progress.note(f"{self.cfg.method}: {rep.summary()}")
            batches = self._batches()
            while st.step < self.total_steps:
                t_start = self._clock()
                epoch, i, batch = next(batches)
                t0 = self._clock()
                # dropout off: old log-probs and values are those of π_t itself (PPO)
                with eval_mode(*self.trainables):
                    exp, collected = self.method.collect(batch)
                t1 = self._clock()
                gen_s = self.recorder.seconds if self.recorder is not None else 0.0
                metrics = self._update(exp, st.step)
                t2 = self._clock()
                metrics.update({k: float(v) for k, v in collected.items()})
                samples = self._samples()
                st.step += 1
                st.epoch, st.batch_in_epoch = epoch, i + 1
                if st.batch_in_epoch >= self.steps_per_epoch:
                    st.epoch, st.batch_in_epoch = epoch + 1, 0
                metrics = {k: float(self.acc.reduce(torch.tensor(v, device=self.acc.device),
                                                    "mean")) for k, v in metrics.items()}
                dt = self._clock() - t_start
                metrics.update({
                    "epoch": st.epoch + st.batch_in_epoch / self.steps_per_epoch,
                    "step_time": dt,
                    "tokens_per_s": sequence_tokens(exp) * self.acc.num_processes / dt,
                    # this process's phases: sampling, the other collect forwards (R̂, π₀,
                    # old log-probs, values), the update, and the rest (data, reductions)
                    "time/generate": gen_s,
                    "time/score": t1 - t0 - gen_s,
                    "time/update": t2 - t1,
                    "time/other": dt - (t2 - t0),
                })
                final = st.step == self.total_steps
                evaluated = bool(r.eval_every and st.step % r.eval_every == 0) or final
                if evaluated:
                    metrics.update(self.evaluate(st.step))
                if st.step % r.log_every == 0 or evaluated:  # never drop an evaluation
                    self.log.write(st.step, metrics)
                    self.log.write_samples(st.step, samples)
                    if r.report_to:
                        self.acc.log(metrics, step=st.step)
                progress.update(st.step, info=progress_info(metrics))
                # the last step is saved too, so a finished run can be extended (max_steps)
                saved = bool(r.save_every and (st.step % r.save_every == 0 or final))
                if saved:
                    save_checkpoint(self.acc, self.run_dir, st, r.keep_checkpoints,
                                    config_yaml=self.config_yaml, shards=self.shards)
                if not final and self._stop_requested(stop):
                    self._stop(stop.signum or signal.SIGTERM, saved)
        save_final(self.acc, self.run_dir, self.par.plain_copies(self.trainables),
                   self.models.tokenizer)
        if self.acc.is_main_process:
            data = {name: asdict(rep) for name, rep in zip(("train", "eval"), self.data_reports,
                                                            strict=True) if rep is not None}
            write_summary(self.run_dir, self.cfg, st.step, self.log.last, data)
        # finish trackers but keep the process group (accelerate's end_training destroys it),
        # so a script may run several trainings in one `accelerate launch` (e.g. RM then PPO)
        for tracker in self.acc.trackers:
            tracker.finish()
        return self.run_dir


def train(cfg: TrainConfig, callbacks: list[Callback] | tuple = ()) -> Path:
    """Run one configured training job; returns the run directory. A run directory that
    already holds this very config, trained to the end, is left as it is."""
    quiet_libraries()
    main = int(os.environ.get("RANK", "0")) == 0  # before accelerate starts the process group
    with run_dir_lock(cfg.run_dir) if main else contextlib.nullcontext():
        if not cfg.run.overwrite and is_finished(cfg.run_dir, to_yaml(cfg)):
            log.info("%s: already trained with this config; nothing to do", cfg.run_dir)
            return cfg.run_dir
        trainer = Trainer(cfg, callbacks)
        if cfg.run.report_to:
            trainer.acc.init_trackers(cfg.run.name, config={"method": cfg.method})
        return trainer.fit()
