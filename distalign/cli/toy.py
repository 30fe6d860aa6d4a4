"""``distalign toy``: the exact tabular Figure 1 (arXiv 2506.01523 v2, App. D.1), six methods."""

from __future__ import annotations

import contextlib
import math
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from distalign.cli._app import app, comma_list
from distalign.errors import ConfigError

if TYPE_CHECKING:
    from distalign.tabular.config import ToyConfig


def _output_dir(out: Path) -> Path:
    """Create ``--out`` and make sure files can be written there, before the run starts."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write there ({exc.strerror})") from None
    return out


def _prefetch_matplotlib(start: threading.Event) -> None:
    """Import matplotlib's Figure in a background thread once ``start`` is set.

    An import holds the GIL: waiting for the compiled Newton solves, which release it, keeps
    the import from slowing the numpy work of the closed forms before them.
    """

    def load() -> None:
        start.wait()
        # a missing matplotlib is reported by the plot itself, in the main thread
        with contextlib.suppress(ImportError):
            import matplotlib.figure  # noqa: F401

    threading.Thread(target=load, name="prefetch-matplotlib", daemon=True).start()


def _plot_path(out: Path, plot: str | None) -> Path:
    """The figure's path: ``out/figure1.png`` by default; a ``--plot`` path is taken as given
    (relative to the working directory, like every other path argument). Its suffix must be
    a format matplotlib writes; matplotlib is imported for the check only when it is not PNG."""
    path = out / "figure1.png" if plot is None else Path(plot)
    suffix = path.suffix.lower().lstrip(".")
    if suffix == "png":
        return path
    if not suffix:
        raise ConfigError(f"--plot {plot}: give a file name with a suffix, e.g. figure1.pdf")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise ConfigError(f"--plot {plot}: matplotlib cannot write .{suffix} files "
                          f"(it writes {', '.join(sorted(formats))})")
    return path


# settings that change how the toy runs, not its numbers
_RUN_ONLY = ("device", "engine", "threads")
_SHORT = {"ns": "n", "methods": "", "contexts": "X", "responses": "K", "logit_scale": "scale"}


def _default_out(cfg: ToyConfig, preset: str) -> Path:
    """``runs/toy-<preset>`` for the preset's own grid; a custom grid gets a folder named
    after what it changes (``runs/toy-paper-seeds2-n16-64``), so it never replaces the
    preset's results."""
    import hashlib
    from dataclasses import fields

    from distalign.tabular.config import ToyConfig

    ref = ToyConfig.from_preset(preset)
    changed = [f.name for f in fields(ToyConfig) if f.name not in _RUN_ONLY
               and getattr(cfg, f.name) != getattr(ref, f.name)]
    if not changed:
        return Path("runs") / f"toy-{preset}"
    parts = []
    for key in changed:
        value = getattr(cfg, key)
        text = "-".join(map(str, value)) if isinstance(value, tuple) else str(value)
        parts.append(f"{_SHORT.get(key, key)}{text}")
    name = f"toy-{preset}-" + "-".join(parts)
    if len(name) > 60 or not all(c.isalnum() or c in "-._" for c in name):
        blob = repr([(k, getattr(cfg, k)) for k in changed]).encode()
        name = f"toy-{preset}-custom-{hashlib.sha256(blob).hexdigest()[:8]}"
    return Path("runs") / name


@app.command(
    help="Exact tabular world of the paper's Figure 1: forward KL E_x KL(π*‖π̂) vs n for RLHF, "
    "reverse KL, PMLE, preference distillation, DPO and REBEL, β tuned per n by oracle and "
    "by held-out preference log-likelihood. Writes results.json, results.csv, figure1.png."
)
def toy(
    preset: Annotated[str, typer.Option(
        help="'paper' = the paper's App. D.1 (logit scale 0.1); 'strong' = logit scale 1.0, "
        "where the separation shows within n ≤ 2^16")] = "paper",
    seeds: Annotated[int, typer.Option(help="independent worlds + datasets (≥ 1)")] = 8,
    n_min_exp: Annotated[int, typer.Option(help="smallest n is 2^this")] = 5,
    n_max_exp: Annotated[int, typer.Option(help="largest n is 2^this")] = 16,
    ns: Annotated[str | None, typer.Option(
        help="explicit comma-separated n values (overrides --n-min-exp/--n-max-exp)")] = None,
    contexts: Annotated[int | None, typer.Option(help="|X|, number of contexts")] = None,
    responses: Annotated[int | None, typer.Option(help="K, responses per context (≥ 2)")] = None,
    gamma: Annotated[float | None, typer.Option(
        help="γ, preference tilt of the data AND entropy weight of RKL (> 0)")] = None,
    logit_scale: Annotated[float | None, typer.Option(
        help="std of the iid N(0, s²) logits of π* and π₀")] = None,
    methods: Annotated[str, typer.Option(
        help="comma list of: rlhf, rkl, pmle, distill, dpo, rebel")] =
        "rlhf,rkl,pmle,distill,dpo,rebel",
    seed: Annotated[int, typer.Option(help="base random seed")] = 0,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="output directory (default runs/toy-<preset>, or a folder named "
        "after the settings that differ from the preset's)")] = None,
    plot: Annotated[str | None, typer.Option(
        help="figure file (default: figure1.png in --out); a path given is taken as given, "
        "relative to the working directory; the suffix picks the format (png, pdf, svg, …)")] =
        None,
    device: Annotated[str, typer.Option(
        help="cpu (numpy solvers) or cuda[:i] (the torch solvers)")] = "cpu",
    engine: Annotated[str, typer.Option(
        help="solvers: numpy (CPU, no torch import), torch, or auto (numpy on the CPU)")] =
        "auto",
    threads: Annotated[int | None, typer.Option(
        help="solver threads; the methods are spread over them (default: 2, or 1 on a "
        "1-core machine)")] = None,
) -> None:
    from rich.console import Console
    from rich.table import Table

    # numpy only on the CPU: importing torch alone would take 1.3 s of the toy's 3 s budget
    from distalign.progress import StepProgress
    from distalign.tabular.config import TWO_STARTS, ToyConfig
    from distalign.tabular.report import LABELS, write_outputs
    from distalign.tabular.runner import run_toy

    if ns is not None:
        n_values = tuple(comma_list(ns, "--ns", int) or ())
    else:
        if n_max_exp < n_min_exp:
            raise ConfigError(f"--n-max-exp ({n_max_exp}) is below --n-min-exp ({n_min_exp})")
        if n_min_exp < 1:
            raise ConfigError(f"--n-min-exp must be ≥ 1 (n ≥ 2), got {n_min_exp}")
        n_values = tuple(2**k for k in range(n_min_exp, n_max_exp + 1))
    overrides: dict[str, object] = {
        "seeds": seeds, "ns": n_values, "seed": seed, "device": device, "engine": engine,
        "methods": tuple(comma_list(methods, "--methods") or ()),
    }
    for key, val in (("contexts", contexts), ("responses", responses), ("gamma", gamma),
                     ("logit_scale", logit_scale), ("threads", threads)):
        if val is not None:
            overrides[key] = val
    cfg = ToyConfig.from_preset(preset, **overrides)
    out_dir = out if out is not None else _default_out(cfg, preset)
    plot_path = _plot_path(out_dir, plot)
    _output_dir(out_dir)
    if not plot_path.parent.is_dir():
        raise ConfigError(f"--plot {plot}: folder {plot_path.parent} does not exist")

    # the numpy engine solves the closed forms first, then the Newton methods (fast.py)
    cheap = len(cfg.ns) * sum(m not in TWO_STARTS for m in cfg.methods)
    figure_now = threading.Event()
    if cheap == 0 or cfg.solver_engine != "numpy":
        figure_now.set()
    _prefetch_matplotlib(figure_now)
    console = Console()
    total = len(cfg.ns) * len(cfg.methods)
    # one solve per method covers every n: off a terminal, one line per method
    with StepProgress("toy", total=total, every=len(cfg.ns)) as bar:
        done = 0

        def step(method: str, n: int) -> None:
            nonlocal done
            done += 1
            bar.update(done, info=f"{method} n={n}")
            if done >= cheap:
                figure_now.set()

        results = run_toy(cfg, progress=step)
    try:
        paths = write_outputs(results, out_dir, figure=plot_path)
    except OSError as exc:
        where = exc.filename or out_dir
        raise ConfigError(f"--out {out_dir}: cannot write {where} ({exc.strerror})") from None

    summ = {(r["method"], r["n"], r["choice"]): r for r in results.summary}
    kl0 = sum(results.kl_star_ref) / cfg.seeds
    rng = results.slopes["_range"]
    # one seed has no spread: its "interval" would be the mean twice
    what = f"mean [95% CI], {cfg.seeds} seeds" if cfg.seeds > 1 else "one seed: no interval"
    for choice, how in (("oracle", "best true forward KL"),
                        ("honest", "best held-out preference log-likelihood")):
        table = Table(title=f"E_x KL(π*‖π̂), β by {how}: {what}; "
                      f"KL(π*‖π₀) = {kl0:.3g}")
        table.add_column("n", justify="right")
        for m in cfg.methods:
            table.add_column(LABELS.get(m, m), justify="right")
        for n in cfg.ns:
            cells = []
            for m in cfg.methods:
                r = summ[(m, n, choice)]
                cells.append(f"{r['fkl']:.3g} [{r['fkl_lo']:.2g}, {r['fkl_hi']:.2g}]"
                             if cfg.seeds > 1 else f"{r['fkl']:.3g}")
            table.add_row(str(n), *cells)
        table.add_row(f"slope {int(rng['n_min'])}–{int(rng['n_max'])}",
                      *(_slope(results.slopes[m][choice]) for m in cfg.methods))
        console.print(table)
    if any(not math.isfinite(results.slopes[m][c]) for m in cfg.methods
           for c in ("oracle", "honest")):
        console.print(f"note: slope – : the log-log slope needs at least two sizes n in the top "
                      f"decade (n ≥ {max(cfg.ns) / 10:g}) with a positive KL; give more sizes, "
                      "e.g. --ns 4096,16384,65536")
    console.print(f"ran in {results.seconds:.1f} s; table: {paths['json']} and {paths['csv']}; "
                  f"plot: {paths['figure']}")
    if results.solver == "numpy":
        console.print("note: the compiled Newton solver (tabular/fast/_newton.c) is not built, so "
                      "numpy's ran (the same results, about 2x slower); reinstall with a C "
                      "compiler, e.g. `pip install -e .`")


def _slope(value: float) -> str:
    return f"{value:+.2f}" if math.isfinite(value) else "–"
