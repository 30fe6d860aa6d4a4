"""The ``vllm`` sampler: an in-process vLLM engine that samples with the policy's current weights.

Design (docs/vllm.md has the measurements):

* **One engine per process, built once.** The engine is created lazily at the first
  ``generate`` from the policy's own config (written to a temporary folder) with
  ``load_format="dummy"``: nothing is read from disk, the weights arrive by the sync below.
  Engines are cached per (architecture, dtype, sizing), so a second sampler in the same process
  (evaluation after training, tests) reuses it; the cache remembers whose weights it holds.
* **Weight sync in place.** Before sampling, if the policy's parameters changed since the last
  push (``Tensor._version`` counters, bumped by every in-place update: optimizer steps,
  ``load_state_dict`` on resume), the current weights go through the worker's
  ``reload_weights(weights_iterator=...)`` (vLLM's in-place reload, which re-runs its
  post-load processing layer by layer), then the prefix cache is reset, since cached KV
  blocks were computed with the old weights. Never a reload from disk.
* **LoRA: merged out of place.** Each LoRA layer is pushed as ``W + scale·B·A`` computed into a
  fresh tensor; the policy's own base weights are never touched. peft's in-place
  merge → push → unmerge would leave ``W`` changed by floating-point rounding, and ``W`` is π₀
  for an adapter-disabled reference. Serving the adapter as a vLLM LoRA request instead would
  need the adapter on disk every step, and LoRA kernels are slower than dense ones on CPU.
* **Exact mapping of sampling settings**, see :meth:`VLLMSampler._params`. Randomness: each
  request gets its own seed drawn from torch's global generator, so sampling follows
  ``torch.manual_seed`` (per-rank seeds under DDP, the checkpointed RNG state on resume)
  exactly like the HF backend, and does not depend on the engine's internal state.
* **DDP: every rank its own engine**, sampling its own prompts with its own seeds (no gather,
  no broadcast of samples); under ``torch.distributed`` the engine joins the existing process
  group through vLLM's ``external_launcher`` executor.

Requires ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (set here before vLLM is imported) so that the
engine core and its worker live in this process and weights pass by reference.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distalign.errors import ConfigError
from distalign.lm.models import is_peft_model, unwrap_model
from distalign.lm.rollout import (
    GenerationConfig,
    Rollout,
    _token_ids,
    check_generation_config,
    stop_token_ids,
    truncate_after_eos,
)

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Benign vLLM warnings that every sync or request would repeat: layers without weights of
# their own (the rotary cache, a tied LM head) "fail" to load on an in-place reload and keep
# their tensors, which is right;
# with skip_tokenizer_init the engine has no EOS of its own (we pass stop_token_ids).
# The chat-template warm-up needs a tokenizer, which the engine deliberately has none of.
_QUIET = ("RotaryEmbedding: Failed to load weights", "Using None for EOS token id",
          "ParallelLMHead: Failed to load weights",  # tied to the embedding, loaded with it
          "Using None for BOS token id", "doesn't allow to use `torch.set_num_threads`",
          "Chat template warmup failed")


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(q in msg for q in _QUIET)


def _quiet_vllm() -> None:
    """Filter the benign warnings above on vLLM's handlers (it may re-create them)."""
    for handler in logging.getLogger("vllm").handlers:
        if not any(isinstance(f, _QuietFilter) for f in handler.filters):
            handler.addFilter(_QuietFilter())


class _Stamp:
    """Which weights the engine holds: the parameter objects (weakly: ``id()`` values are
    reused once a model is freed, so a new run's policy could look like the old one) and
    their version counters, bumped by every in-place update. Cheap: no data is read."""

    def __init__(self, model: nn.Module) -> None:
        params = list(model.parameters())
        self.refs = [weakref.ref(p) for p in params]
        self.versions = [p._version for p in params]

    def matches(self, model: nn.Module) -> bool:
        params = list(model.parameters())
        return len(params) == len(self.refs) and all(
            r() is p and p._version == v
            for r, p, v in zip(self.refs, params, self.versions, strict=True)
        )



@dataclass
class _Engine:
    llm: Any
    max_model_len: int
    synced: _Stamp | None = None  # the weights the engine holds
    syncs: int = 0
    sync_seconds: list[float] = field(default_factory=list)


_ENGINES: dict[str, _Engine] = {}


def policy_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(checkpoint name, tensor) of the model π samples from; LoRA layers merged out of place.

    Names are those of the base model's own checkpoint (what vLLM's ``load_weights`` maps),
    e.g. ``model.layers.0.self_attn.q_proj.weight``.
    """
    model = unwrap_model(model)
    if not is_peft_model(model):
        for name, p in model.named_parameters():
            yield name, p.detach()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    lora_names: list[str] = []
    for name, mod in base.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        lora_names.append(name + ".")
        layer = mod.get_base_layer()
        weight = layer.weight.detach()
        if not mod.merged and not mod.disable_adapters:
            for a in mod.active_adapters:
                if a not in mod.lora_A and a not in getattr(mod, "lora_embedding_A", {}):
                    continue
                if mod.use_dora.get(a, False):
                    raise ConfigError("gen.backend=vllm: DoRA adapters cannot be merged; "
                                      "use plain LoRA or gen.backend=hf")
                weight = weight + mod.get_delta_weight(a).to(weight.dtype)
        yield name + ".weight", weight
        if getattr(layer, "bias", None) is not None:
            yield name + ".bias", layer.bias.detach()
    for name, p in base.named_parameters():
        if not any(name.startswith(prefix) for prefix in lora_names):
            yield name, p.detach()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class VLLMSampler:
    """Sampler on an in-process ``vllm.LLM`` (see the module doc). Same :class:`Rollout` as
    :class:`~distalign.lm.generation.HFSampler`, plus ``logprobs`` (ln μ at temperature T)."""

    def __init__(self, tokenizer_or_ids: Any, cfg: GenerationConfig | None = None) -> None:
        self.cfg = cfg or GenerationConfig(backend="vllm")
        self.pad_id, self.eos_ids = _token_ids(tokenizer_or_ids)
        check_generation_config(self.cfg)
        c = self.cfg
        if not 0 < c.vllm_memory <= 1:
            raise ConfigError(f"gen.vllm_memory must be in (0, 1], got {c.vllm_memory}")
        if c.vllm_kv_cache_gb is not None and c.vllm_kv_cache_gb <= 0:
            raise ConfigError(f"gen.vllm_kv_cache_gb must be > 0, got {c.vllm_kv_cache_gb}")
        if c.vllm_max_model_len is not None and c.vllm_max_model_len <= c.max_new_tokens:
            raise ConfigError(f"gen.vllm_max_model_len ({c.vllm_max_model_len}) must exceed "
                              f"gen.max_new_tokens ({c.max_new_tokens})")
        self.engine: _Engine | None = None

    # ---------------------------------------------------------------------------- engine
    def _engine_kwargs(self, hf: nn.Module) -> dict[str, Any]:
        c = self.cfg
        dtype = next(hf.parameters()).dtype
        if dtype not in _DTYPES:
            raise ConfigError(f"gen.backend=vllm: policy dtype {dtype} is not supported")
        on_gpu = next(hf.parameters()).device.type == "cuda"
        kv_gb = c.vllm_kv_cache_gb if c.vllm_kv_cache_gb is not None else (None if on_gpu else 1.0)
        kwargs: dict[str, Any] = dict(
            load_format="dummy",  # weights come from the policy (sync), not from disk
            skip_tokenizer_init=True,  # prompts are token ids; stop ids are passed explicitly
            generation_config="vllm",  # ignore the checkpoint's sampling defaults
            logprobs_mode="processed_logprobs",  # ln μ after temperature, like token_logprobs
            dtype=_DTYPES[dtype],
            seed=0,
            enable_prefix_caching=True,
            gpu_memory_utilization=c.vllm_memory,
            # CPU: eager (torch.compile warm-up costs minutes on a small box); GPU: vLLM's
            # default CUDA graphs, which keep pointing at the same storage after an in-place sync
            enforce_eager=not on_gpu,
        )
        if not on_gpu:
            # A prompt split over steps (chunked prefill) makes vLLM roll back that request's
            # seeded generator, which CPU generators cannot do (RuntimeError once a batch's
            # prompts pass the 4096-token budget); unsplit, such a prompt waits a step instead.
            kwargs["enable_chunked_prefill"] = False
        if kv_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_gb * 2**30)
        if c.vllm_max_model_len is not None:
            kwargs["max_model_len"] = c.vllm_max_model_len
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        return kwargs

    def _get_engine(self, hf: nn.Module) -> _Engine:
        if self.engine is not None:
            return self.engine
        kwargs = self._engine_kwargs(hf)
        config_json = hf.config.to_json_string(use_diff=False)
        key = json.dumps([config_json, sorted((k, repr(v)) for k, v in kwargs.items())])
        if key not in _ENGINES:
            _ENGINES[key] = self._build(hf, kwargs)
        self.engine = _ENGINES[key]
        return self.engine

    def _build(self, hf: nn.Module, kwargs: dict[str, Any]) -> _Engine:
        arch = ",".join(getattr(hf.config, "architectures", None) or [type(hf).__name__])
        folder = Path(tempfile.mkdtemp(prefix="distalign-vllm-"))
        hf.config.save_pretrained(folder)  # config only: dummy weights, no tokenizer
        # vLLM's CPU worker replaces torch.set_num_threads process-wide (it pins its threads);
        # the trainer shares this process, so keep torch's own function and thread count.
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        # The worker re-seeds torch's global generator (and draws dummy weights from it):
        # fork it, or building the engine would reset the run's RNG stream (exact resume).
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices):
                from vllm import LLM

                _quiet_vllm()
                llm = LLM(model=str(folder), **kwargs)
                _quiet_vllm()
                # one token with the dummy weights: kernels that reject this architecture (a
                # head size the CPU attention lacks) fail here as a config error, not mid-run
                self._run(llm, [[0]], [self._params(1, None)])
        except ConfigError:
            raise
        except Exception as err:  # vLLM raises ValueError/RuntimeError/NotImplementedError
            hint = ("; raise gen.vllm_kv_cache_gb or gen.vllm_memory, or lower "
                    "gen.vllm_max_model_len" if "memory" in str(err).lower() or "cache" in
                    str(err).lower() else "")
            raise ConfigError(
                f"gen.backend=vllm: vLLM cannot serve {arch} ({_first_line(err)}){hint}"
            ) from err
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
        max_len = int(llm.llm_engine.model_config.max_model_len)
        return _Engine(llm, max_len)

    # ------------------------------------------------------------------------------ sync
    def sync(self, model: nn.Module, force: bool = False) -> bool:
        """Push ``model``'s weights into the engine if they changed; True if it pushed."""
        model = unwrap_model(model)
        hf = model.get_base_model() if is_peft_model(model) else model
        engine = self._get_engine(hf)
        if not force and engine.synced is not None and engine.synced.matches(model):
            return False
        t0 = time.perf_counter()
        engine.synced = None  # a failed push leaves the engine's weights unknown
        try:
            with torch.no_grad():
                engine.llm.collective_rpc(
                    "reload_weights", kwargs={"weights_iterator": policy_weights(model)}
                )
        except ValueError as err:  # a name or shape vLLM's model does not have
            raise ConfigError(
                f"gen.backend=vllm: the policy's weights do not fit vLLM's "
                f"{type(hf).__name__} ({_first_line(err)[:300]})"
            ) from err
        engine.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights
        engine.synced = _Stamp(model)
        engine.syncs += 1
        engine.sync_seconds.append(time.perf_counter() - t0)
        return True

    # -------------------------------------------------------------------------- sampling
    def _params(self, max_tokens: int, seed: int | None, stop: list[int] | None = None) -> Any:
        """vLLM ``SamplingParams`` equal in distribution to the HF path's settings."""
        from vllm import SamplingParams

        c = self.cfg
        greedy = c.temperature == 0
        return SamplingParams(
            n=1,  # one request per sample: sample-major order and one seed per row
            temperature=c.temperature,
            top_k=0 if greedy else c.top_k,  # 0 = off, the same convention as ours
            top_p=1.0 if greedy else c.top_p,
            min_p=0.0,
            repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
            max_tokens=max_tokens,
            min_tokens=min(self.cfg.min_new_tokens, max_tokens),  # EOS blocked before this
            stop_token_ids=stop or [],
            ignore_eos=False,
            seed=seed,
            logprobs=0,  # the sampled token's ln μ only
            detokenize=False,
        )

    @staticmethod
    def _run(llm: Any, prompts: list[list[int]], params: list[Any]) -> list[Any]:
        from vllm.inputs import TokensPrompt

        reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        return llm.generate(reqs, params, use_tqdm=False)

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompt_input_ids: Tensor,
        prompt_attention_mask: Tensor,
        num_samples: int = 1,
    ) -> Rollout:
        """``num_samples`` responses per left-padded prompt, sample-major, with the policy's
        current weights (synced first when they changed)."""
        model = unwrap_model(model)
        hf = model.get_base_model() if is_peft_model(model) else model
        self.sync(model)
        engine = self.engine
        assert engine is not None
        eos_ids = stop_token_ids(self.eos_ids, getattr(hf, "generation_config", None))
        b, width = prompt_input_ids.shape
        cpu_ids, cpu_mask = prompt_input_ids.cpu(), prompt_attention_mask.cpu().bool()
        prompts = [cpu_ids[i][cpu_mask[i]].tolist() for i in range(b)]
        longest = max(len(p) for p in prompts)
        if longest + self.cfg.max_new_tokens > engine.max_model_len:
            raise ConfigError(
                f"gen.backend=vllm: a {longest}-token prompt plus gen.max_new_tokens="
                f"{self.cfg.max_new_tokens} exceeds the engine's max length "
                f"{engine.max_model_len} (gen.vllm_max_model_len)"
            )
        n = b * num_samples
        # seeds from torch's generator: per rank, checkpointed, and like HF's use of it
        seeds = (torch.randint(0, 2**31 - 1, (n,)).tolist() if self.cfg.temperature > 0
                 else [None] * n)
        params = [self._params(self.cfg.max_new_tokens, s, eos_ids) for s in seeds]
        outs = self._run(engine.llm, [prompts[r % b] for r in range(n)], params)
        width_r = max(len(o.outputs[0].token_ids) for o in outs)
        responses = torch.full((n, width_r), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros((n, width_r), dtype=torch.float32)
        for r, o in enumerate(outs):
            out = o.outputs[0]
            toks = list(out.token_ids)
            responses[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            lps = [step[t].logprob for step, t in zip(out.logprobs or [], toks, strict=False)]
            logprobs[r, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
        responses, response_mask, ended = truncate_after_eos(responses, eos_ids, self.pad_id)
        device = prompt_input_ids.device
        ids = prompt_input_ids.repeat(num_samples, 1)
        attn = prompt_attention_mask.repeat(num_samples, 1).long()
        response_mask = response_mask.to(device)
        return Rollout(
            input_ids=torch.cat([ids, responses.to(device)], dim=1),
            attention_mask=torch.cat([attn, response_mask], dim=1),
            response_mask=torch.cat([torch.zeros_like(attn), response_mask], dim=1),
            prompt_length=width,
            ended=ended.to(device),
            response_lengths=response_mask.sum(-1),
            num_samples=num_samples,
            logprobs=(logprobs * response_mask.cpu()).to(device),
        )

