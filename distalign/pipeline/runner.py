"""The one stage runner: a graph of stages, each an ordinary run or eval directory.

A :class:`Stage` is a call ``target(**spec)`` (a ``module:function`` path, so it can also run
in a worker process or under ``accelerate launch``) that writes into ``stage.out``. The runner
executes stages in dependency order and, once a stage has returned, writes its done marker
``out/.done.<kind>.json`` atomically: the marker exists only when the stage's outputs are
complete. A rerun skips every stage whose marker matches its fingerprint (its spec plus its
dependencies' fingerprints); a stage killed half-way has no marker and runs again, resuming
from whatever its own code checkpoints (the engine's ``checkpoints/``, generation's prompt
ids). ``distalign pipeline`` and ``distalign synthetic`` both schedule through here.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from distalign.errors import ConfigError, DistalignError
from distalign.hostspeed import host_speed

Log = Callable[[str], None]
LAUNCHERS = ("inprocess", "subprocess", "accelerate")


@dataclass
class Stage:
    """One unit of work; ``out`` is its directory, ``deps`` the stages it reads from."""

    name: str
    kind: str
    target: str  # "package.module:function", called as function(**spec) -> JSON-able dict
    spec: dict[str, Any]
    out: Path
    deps: tuple[str, ...] = ()
    launchable: bool = False  # may run under the launcher (training); others run in-process
    clear: tuple[str, ...] = ()  # outputs (relative to out) to delete before a redo
    resumable: bool = True  # continues its own partial outputs (training, generation, judging)
    # what a started stage leaves behind (relative to out); default: anything in out. A
    # stage writing into another stage's directory (generation into a run dir) names its file
    started: str | None = None
    # call-time arguments that change how the stage treats what it finds, not what it
    # computes (``pipeline --overwrite``): passed to the call, left out of the fingerprint
    options: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def arguments(self) -> dict[str, Any]:
        return {**self.spec, **self.options}

    @property
    def marker(self) -> Path:
        return self.out / f".done.{self.kind}.json"


@dataclass
class Launcher:
    """How launchable stages run: in this process (CPU default), in a child ``python``, or
    under ``accelerate launch ARGS`` (multi-GPU); the latter two isolate each stage's memory."""

    kind: str = "inprocess"
    args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in LAUNCHERS:
            raise ConfigError(
                f"launcher.kind={self.kind!r}: expected one of {', '.join(LAUNCHERS)}"
            )


@dataclass
class Outcome:
    stage: Stage
    result: dict[str, Any]
    seconds: float
    reused: bool
    timing: dict[str, Any] = field(default_factory=dict)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def order(stages: list[Stage]) -> list[Stage]:
    """Validate names and dependencies, set fingerprints; returns the stages unchanged in
    order. Raises a one-line ConfigError for duplicates, unknown dependencies and cycles."""
    by_name: dict[str, Stage] = {}
    for s in stages:
        if s.name in by_name:
            raise ConfigError(f"two stages are named {s.name!r}")
        by_name[s.name] = s
    for s in stages:
        for d in s.deps:
            if d not in by_name:
                raise ConfigError(f"stage {s.name!r} depends on {d!r}, which is not a stage")
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(s: Stage) -> None:
        if state.get(s.name) == 2:
            return
        if state.get(s.name) == 1:
            raise ConfigError(f"stage {s.name!r} depends on itself through its dependencies")
        state[s.name] = 1
        for d in s.deps:
            visit(by_name[d])
        s.fingerprint = _digest([s.target, s.spec, [by_name[d].fingerprint for d in s.deps]])
        state[s.name] = 2

    for s in stages:
        visit(s)
    return stages


def read_marker(stage: Stage) -> dict[str, Any] | None:
    try:
        return json.loads(stage.marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def status(stage: Stage) -> str:
    """``done`` (marker matches), ``changed`` (finished with another config), ``partial``
    (started, not finished: it resumes) or ``todo``."""
    mark = read_marker(stage)
    if mark is not None:
        return "done" if mark.get("fingerprint") == stage.fingerprint else "changed"
    if stage.started is not None:
        begun = (stage.out / stage.started).exists()
    else:
        begun = stage.out.exists() and any(stage.out.iterdir())
    return "partial" if stage.resumable and begun else "todo"


def _clock() -> tuple[float, float, float]:
    """Wall time, CPU seconds of this process and its children, 1-min load average."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    return time.perf_counter(), cpu, os.getloadavg()[0]


def _timing(start: tuple[float, float, float], resumed: bool) -> dict[str, Any]:
    # CPU time and the load average make a wall time readable: a stage that ran beside
    # other work shows load > cores, and a resumed stage's wall time covers this attempt only
    end = _clock()
    return {"seconds": end[0] - start[0], "cpu_seconds": end[1] - start[1],
            "load": [round(start[2], 2), round(end[2], 2)], "resumed": resumed}


def _write_marker(stage: Stage, result: dict[str, Any], timing: dict[str, Any]) -> None:
    stage.out.mkdir(parents=True, exist_ok=True)
    tmp = stage.marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({
        "stage": stage.name, "fingerprint": stage.fingerprint, **timing,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "result": result,
    }, default=str, indent=1) + "\n")
    os.replace(tmp, stage.marker)  # atomic: a kill leaves either no marker or a whole one


def call(target: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Import ``module:function`` and call it with ``spec``."""
    module, _, func = target.partition(":")
    result = getattr(importlib.import_module(module), func)(**spec)
    return dict(result or {})


def _call_timed(
    target: str, spec: dict[str, Any], resumed: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    start = _clock()
    result = call(target, spec)
    return result, _timing(start, resumed)


def _launch(stage: Stage, launcher: Launcher) -> dict[str, Any]:
    """Run a stage in a child process (``distalign.pipeline.worker``); the child writes the
    result file on the main process only, and the parent writes the marker."""
    stage.out.mkdir(parents=True, exist_ok=True)
    job = stage.out / f".stage.{stage.kind}.json"
    result = stage.out / f".result.{stage.kind}.json"
    result.unlink(missing_ok=True)
    job.write_text(json.dumps({"target": stage.target, "spec": stage.arguments,
                               "result": str(result)}, default=str))
    if launcher.kind == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
               *launcher.args, "--module", "distalign.pipeline.worker", str(job)]
    else:
        cmd = [sys.executable, "-m", "distalign.pipeline.worker", str(job)]
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0 or not result.exists():
        raise DistalignError(f"stage {stage.name!r} failed under the {launcher.kind} launcher "
                             f"(exit status {rc}); its output is above")
    return json.loads(result.read_text())


def _redo(stage: Stage, log: Log) -> None:
    """A stage finished with another config: drop its marker and the outputs it cannot
    resume into (training runs stay: the engine resumes or extends them)."""
    log(f"  {stage.name}: its config changed since it finished; running it again")
    stage.marker.unlink(missing_ok=True)
    for rel in stage.clear:
        p = stage.out / rel
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def run_stages(
    stages: list[Stage],
    *,
    workers: int = 1,
    launcher: Launcher | None = None,
    force: bool = False,
    only: set[str] | None = None,
    log: Log = print,
    on_done: Callable[[Outcome], None] | None = None,
) -> dict[str, Outcome]:
    """Run every stage not already done, dependencies first; returns outcomes by name.

    ``workers > 1`` runs independent stages in that many spawned processes. ``force``
    ignores done markers. ``only``: run just these stages; the others are read from their
    markers when done and left alone otherwise. A failing stage raises after the stages
    running beside it end.
    """
    order(stages)
    launcher = launcher or Launcher()
    outcomes: dict[str, Outcome] = {}
    resuming: set[str] = set()
    pending = list(stages)
    host: dict[str, float] = {}

    def host_now() -> dict[str, float]:
        # measured once, before the first stage that runs, so it is never measured beside one
        if not host:
            host.update(host_speed())
        return host
    if only is not None:
        for s in stages:
            if s.name not in only:
                pending.remove(s)
                if status(s) == "done":
                    finish_reused = read_marker(s) or {}
                    outcomes[s.name] = Outcome(s, finish_reused.get("result", {}), 0.0, True,
                                               _marker_timing(finish_reused))

    def finish(stage: Stage, result: dict[str, Any], timing: dict[str, Any], reused: bool,
               ) -> None:
        if not reused:
            timing = {**timing, "host": host_now()}
            _write_marker(stage, result, timing)
        outcomes[stage.name] = Outcome(stage, result, timing.get("seconds", 0.0), reused,
                                       timing)
        if on_done is not None:
            on_done(outcomes[stage.name])

    def take_ready(limit: int) -> list[Stage]:
        ready = []
        for s in list(pending):
            if len(ready) >= limit:
                break
            if all(d in outcomes for d in s.deps):
                pending.remove(s)
                ready.append(s)
        return ready

    def reuse(stage: Stage) -> bool:
        st = "todo" if force else status(stage)
        if st == "done":
            mark = read_marker(stage) or {}
            finish(stage, mark.get("result", {}), _marker_timing(mark), True)
            return True
        if st == "changed" or (force and stage.marker.exists()):
            _redo(stage, log)
        elif st == "partial":
            log(f"  {stage.name}: resuming ({stage.out})")
            resuming.add(stage.name)
        return False

    if workers <= 1:
        while pending:
            (stage,) = take_ready(1) or _stuck(pending)
            if reuse(stage):
                continue
            log(f"▶ {stage.name} → {stage.out}")
            host_now()
            start = _clock()
            if stage.launchable and launcher.kind != "inprocess":
                result = _launch(stage, launcher)
            else:
                result = call(stage.target, stage.arguments)
            finish(stage, result, _timing(start, stage.name in resuming), False)
        return outcomes

    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        running: dict[Future, Stage] = {}
        while pending or running:
            ready = take_ready(len(pending))
            while ready:  # reused stages may release others at once
                for stage in ready:
                    if not reuse(stage):
                        host_now()
                        log(f"▶ {stage.name} → {stage.out}")
                        running[pool.submit(_call_timed, stage.target, stage.arguments,
                                            stage.name in resuming)] = stage
                ready = take_ready(len(pending))
            if not running:
                if pending:
                    _stuck(pending)
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                stage = running.pop(fut)
                result, timing = fut.result()
                finish(stage, result, timing, False)
    return outcomes


def _marker_timing(mark: dict[str, Any]) -> dict[str, Any]:
    return {k: mark[k] for k in ("seconds", "cpu_seconds", "load", "resumed", "host")
            if k in mark}


def _stuck(pending: list[Stage]) -> list[Stage]:
    raise ConfigError(f"stage {pending[0].name!r} waits on stages that never run: "
                      f"{', '.join(pending[0].deps)}")
