"""How a run's models are laid out over its processes: replicated (DDP, or one process) or
sharded (FSDP2), behind one small interface the engine calls.

Sharding is asked for the way accelerate asks for it, ``accelerate launch --use_fsdp
--fsdp_version 2`` (``ACCELERATE_USE_FSDP=true``, ``FSDP_VERSION=2``), and its settings are
accelerate's FSDP plugin (``reshard_after_forward``, CPU offload, mixed precision, the layer
classes to wrap). The sharding itself is torch's ``fully_shard``, called here rather than
through ``Accelerator.prepare``, for three reasons:

* accelerate's FSDP2 prepare takes one model, and PPO trains two (policy and value model)
  with one optimizer;
* accelerate turns FSDP on only on accelerators: on CPU (``ACCELERATE_USE_CPU``) it runs DDP,
  so the path it would take on GPUs could not be tested here. ``fully_shard`` runs on CPU
  over gloo, so the 2-process tests run the very code a GPU run runs;
* the library calls some submodules directly: ``generate`` calls the HF model inside a peft
  wrapper, and scorers run backbone and head separately (``lm/scoring.py``). Each of those is
  made an FSDP root here, so every call gathers its own parameters.

π₀ and the scorers are sharded too (frozen, no optimizer state): replicated, each would cost
its full size on every device, more than the sharded policy with its optimizer state. docs/
scaling.md has the measurement. Checkpoints are torch distributed checkpoints (one file per
rank); ``final/`` is gathered to the main process and written by plain ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distalign.errors import ConfigError
from distalign.lm.scoring import _split_head
from distalign.lm.wrappers import is_peft_model
from distalign.train.setup import Models

log = logging.getLogger("distalign")
SHARDS = "sharded"  # a checkpoint's torch distributed checkpoint folder


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


class Replicated:
    """accelerate's own path: each process holds whole models (DDP across processes)."""

    sharded = False

    def __init__(self, acc: Any) -> None:
        self.acc = acc

    def place_models(self, models: Models, method_cls: Any) -> None:
        """Before the data pass and the optimizer: nothing to do when replicated."""

    def prepare(self, models: Models, trainables: list[nn.Module], optimizer: Any, loader: Any,
                scheduler: Any) -> tuple[list[nn.Module], Any, Any, Any]:
        prepared = self.acc.prepare(*trainables, optimizer, loader, scheduler)
        n = len(trainables)
        for m in (models.reward_model, models.ref):
            if m is not None:
                m.to(self.acc.device)
        return list(prepared[:n]), *prepared[n:]

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return self.acc.no_sync(model)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        return float(self.acc.clip_grad_norm_(params, max_norm))

    def checkpoint(self, trainables: list[nn.Module], optimizer: Any) -> ShardedState | None:
        return None  # accelerate's save_state holds models and optimizer

    def plain_copies(self, trainables: list[nn.Module]) -> list[nn.Module] | None:
        """The trained models as plain modules on the main process (for ``final/``)."""
        if not self.acc.is_main_process:
            return None
        return [self.acc.unwrap_model(m) for m in trainables]


def reshard(models: list[nn.Module]) -> None:
    """Back to sharded parameters: a no-grad forward leaves FSDP2 roots gathered (they do not
    reshard after forward), and state dicts and parameter lists must see the shards."""
    from torch.distributed.fsdp import FSDPModule

    for model in models:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


class ShardedState:
    """Trainable weights and optimizer state as a torch distributed checkpoint: each rank
    writes and reads its own shards. Frozen parameters are left out (a LoRA run's base model
    is rebuilt from its source), as in the replicated path."""

    def __init__(self, trainables: list[nn.Module], optimizer: Any) -> None:
        self.models = nn.ModuleList(trainables)  # one module for torch's state-dict helpers
        self.optimizer = optimizer

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(ignore_frozen_params=True)
        reshard(list(self.models))
        model, optim = get_state_dict(self.models, self.optimizer, options=opts)
        return {"model": model, "optim": optim}

    def save(self, out: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(out / SHARDS))

    def load(self, ckpt: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        if not (ckpt / SHARDS).is_dir():
            raise ConfigError(f"{ckpt} holds no sharded weights ({SHARDS}/): it was written by "
                              "an unsharded run; resume it without FSDP")
        state = self._state()
        dcp.load(state, checkpoint_id=str(ckpt / SHARDS))
        keys = set_state_dict(self.models, self.optimizer, model_state_dict=state["model"],
                              optim_state_dict=state["optim"],
                              options=StateDictOptions(ignore_frozen_params=True, strict=False))
        frozen = {n for n, p in self.models.named_parameters(remove_duplicate=False)
                  if not p.requires_grad}
        extra = sorted(set(keys.missing_keys) - frozen) + sorted(keys.unexpected_keys)
        if extra:
            raise RuntimeError(f"checkpoint {ckpt} does not match the model: "
                               f"{', '.join(extra[:5])}")


class Sharded(Replicated):
    """FSDP2 over every process: each model's decoder layers are FSDP units (the classes the
    plugin names, else the model's ``_no_split_modules``), under the roots described in the
    module doc. Gradients are reduce-scattered (averaged) like DDP's all-reduce."""

    sharded = True

    def __init__(self, acc: Any, plugin: Any, rebuild: list[Callable[[], nn.Module]]) -> None:
        super().__init__(acc)
        from torch.distributed.device_mesh import init_device_mesh

        self.plugin, self.rebuild = plugin, rebuild
        self.mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
        # `accelerate launch` loads weights on local rank 0 only by default (other ranks get
        # meta tensors, transformers' FSDP loading): rank 0's are broadcast while sharding
        self.broadcast = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING",
                                        "false").lower() in ("1", "true")

    def _kwargs(self) -> dict[str, Any]:
        from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy

        p = self.plugin
        return {"mesh": self.mesh, "mp_policy": p.mixed_precision_policy or MixedPrecisionPolicy(),
                "offload_policy": p.cpu_offload or OffloadPolicy()}

    def shard(self, model: nn.Module, trainable: bool) -> nn.Module:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import fully_shard

        hf = model.get_base_model() if is_peft_model(model) else model
        if is_peft_model(model):  # peft < 0.21 calls hf.forward(), which skips FSDP's hooks
            tuner = model.base_model
            tuner.forward = lambda *a, **k: tuner.model(*a, **k)
        full = hf.state_dict() if self.broadcast and self.acc.is_main_process else {}
        if trainable and self.plugin.mixed_precision_policy is not None:
            for p in model.parameters():  # fp32 master weights; the policy casts for compute
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.to(torch.float32)
        kwargs = self._kwargs()
        names = set(self.plugin.transformer_cls_names_to_wrap or
                    getattr(hf, "_no_split_modules", None) or ())
        layers = [m for m in hf.modules() if type(m).__name__ in names]
        if not layers:
            log.warning("sharding %s: no layer of classes %s; one FSDP unit for the whole model",
                        type(hf).__name__, sorted(names))
        for m in layers:
            fully_shard(m, reshard_after_forward=self.plugin.reshard_after_forward, **kwargs)
        try:  # a scorer: backbone and head are called directly (lm/scoring.py)
            roots = list(_split_head(model))
        except TypeError:  # a causal LM: the HF model (peft calls it in generate)
            roots = [hf]
        for m in roots:
            fully_shard(m, **kwargs)
        if self.broadcast:
            set_model_state_dict(hf, full, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True))
        _no_2d_keep(model)
        return model

    def place_models(self, models: Models, method_cls: Any) -> None:
        """Shard every model before the data pass (DPO's π₀ pass) and the optimizer."""
        self.shard(models.model, trainable=True)
        if models.value_model is not None:
            self.shard(models.value_model, trainable=True)
        if models.reward_model is not None:
            self.shard(models.reward_model, trainable=False)
        if models.ref is not None and models.ref.model is not None:
            self.shard(models.ref.model, trainable=False)

    def prepare(self, models: Models, trainables: list[nn.Module], optimizer: Any, loader: Any,
                scheduler: Any) -> tuple[list[nn.Module], Any, Any, Any]:
        # models and optimizer stay out of accelerate (see the module doc); the loader and
        # schedule go through it as usual (data split, saved in save_state)
        loader, scheduler = self.acc.prepare(loader, scheduler)
        return trainables, optimizer, loader, scheduler

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """Keep this micro-batch's gradients unreduced (FSDP2's form of DDP's no_sync)."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for m in units:
                m.set_requires_gradient_sync(True, recurse=False)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def checkpoint(self, trainables: list[nn.Module], optimizer: Any) -> ShardedState:
        return ShardedState(trainables, optimizer)

    def plain_copies(self, trainables: list[nn.Module]) -> list[nn.Module] | None:
        """Gather each trained model (a collective: every rank calls it) into a copy rebuilt
        from its source on the main process; LoRA stays unmerged here and ``final/`` merges
        the copy, so the training model is never changed."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        reshard(trainables)
        copies = []
        for model, rebuild in zip(trainables, self.rebuild, strict=True):
            full = get_model_state_dict(model, options=opts)  # on rank 0 only
            if self.acc.is_main_process:
                copy = rebuild()
                copy.load_state_dict(full)
                copies.append(copy)
        return copies if self.acc.is_main_process else None


def _no_2d_keep(model: nn.Module) -> None:
    """transformers < 5.20 rejects a 2-D ``logits_to_keep`` by raising inside the forward, and
    ``lm.logprobs`` then retries with full logits. A sharded forward that raises leaves FSDP2's
    hooks half-run (the retry fails on mixed Tensor and DTensor), so with such a transformers
    the sharded model's class is marked as taking none before any forward."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("5.20"):
        return
    from distalign.lm import logprobs
    from distalign.lm.wrappers import unwrap_model

    logprobs._NO_KEEP.add(type(unwrap_model(model)).__name__)


def start(acc: Any, cfg: Any, method_cls: Any, has_callbacks: bool) -> Replicated:
    """The layout this launch asked for; refuses what sharding does not support."""
    if not fsdp_requested():
        if str(acc.distributed_type).endswith("DEEPSPEED"):
            log.warning("DeepSpeed is untested in distalign; the tested ways to spread a run "
                        "are DDP and FSDP2 (`accelerate launch --use_fsdp --fsdp_version 2`)")
        return Replicated(acc)
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("distalign shards with FSDP2 only: launch with "
                          "`accelerate launch --use_fsdp --fsdp_version 2 ...`")
    if not dist.is_initialized():  # one process on CPU: accelerate starts no process group
        log.warning("FSDP was requested but this run has one process and no process group: "
                    "it runs unsharded")
        return Replicated(acc)
    check_sharded(cfg, method_cls, acc.mixed_precision, has_callbacks)
    plugin = getattr(acc.state, "fsdp_plugin", None)
    if plugin is None:  # accelerate runs DDP on CPU and built none: read the same flags
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        if acc.mixed_precision != "no":
            plugin.set_mixed_precision(acc.mixed_precision)
    return Sharded(acc, plugin, _rebuilders(cfg, method_cls))


def check_sharded(cfg: Any, method_cls: Any, mixed_precision: str, has_callbacks: bool) -> None:
    """Refuse what a sharded run cannot do yet, in one line each."""
    why = None
    if cfg.gen.backend != "hf" and method_cls.needs_sampler(cfg.algo):
        why = (f"gen.backend={cfg.gen.backend}: its weight sync reads whole parameters; "
               "sharded runs sample with gen.backend=hf")
    elif mixed_precision == "fp16":
        why = "fp16 needs a sharded gradient scaler; use --mixed_precision bf16"
    elif has_callbacks:
        why = "evaluation callbacks run on the main process only and would need whole models"
    if why:
        raise ConfigError(f"FSDP: {why}")


def _rebuilders(cfg: Any, method_cls: Any) -> list[Callable[[], nn.Module]]:
    """How ``build_models`` made each trainable, to hold a gathered copy for ``final/``."""
    from distalign.lm.models import load_policy, load_value_model, trainable_scorer

    mc = cfg.model
    if method_cls.trains_scorer:
        out = [lambda: trainable_scorer(mc.name_or_path, mc, "model.name_or_path", "new-ok")]
    else:
        out = [lambda: load_policy(mc)]
    if method_cls.uses_value_model:
        out.append(lambda: load_value_model(mc))
    return out
