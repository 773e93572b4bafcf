"""Benchmark: what the fcn3_lightning.callbacks (maps, spectra, calibration, health) cost on the default ``fit``.

    python bench/callbacks_overhead.py                    # 1 epoch (100 steps + validation) without, then with them
    python bench/callbacks_overhead.py --epochs 3 --repeats 2

Runs ``python -m fcn3_lightning fit`` (configs/base.yaml: the default world, the default frequencies, validation
and MLflow logging) in fresh processes, once with configs/base.yaml's callback list and once with that list minus
the ``fcn3_lightning.callbacks`` entries; only the number of epochs may be shortened. The time compared is the fit's
own, from ``on_fit_start`` to the end of ``on_fit_end`` (a timing callback appended last, so the plots' final wait is
included; process start-up, imports and the MLflow store's creation are not): wall-clock seconds, and the process's
CPU seconds (all threads, the plotting thread included), which other jobs on a shared machine disturb much less. With
``--repeats`` the runs alternate (without, with, without, ...) and the medians are compared. Prints both variants'
times and the overheads in %.

On a machine shared with other jobs the A/B difference is mostly noise, so the "with" run also accounts for the
callbacks' cost directly: the wall time spent inside their hooks on the training thread (the final wait for the
plots included) plus the CPU time of their drawing on the plotting thread, as a share of that run's fit wall time.
Other load slows the callbacks and the fit alike, so that share holds up where the A/B difference does not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import yaml

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "base.yaml"
OURS = "fcn3_lightning.callbacks."


HOOKS = [name for name in dir(L.Callback) if name.startswith("on_") or name in ("setup", "teardown")]


def _timed(fn: Callable[..., Any], acc: list[float], clock: Callable[[], float] = time.perf_counter) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[0] += clock() - t0

    return wrapper


class FitTimer(L.Callback):
    """Writes the wall and CPU seconds from ``on_fit_start`` to ``on_fit_end`` (this callback's, listed last) to ``out``
    (JSON)."""

    def __init__(self, out: str):
        self.out = Path(out)
        self._t0 = self._cpu0 = 0.0
        self._hooks = [0.0]  # wall seconds in the fcn3_lightning.callbacks' hooks (training thread)
        self._draw = [0.0]  # CPU seconds of their drawing (plotting thread)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # instance attributes shadow the methods: Lightning looks hooks up with getattr
        for cb in trainer.callbacks:
            if type(cb).__module__.startswith(OURS):
                for name in HOOKS:
                    if getattr(type(cb), name) is not getattr(L.Callback, name):
                        setattr(cb, name, _timed(getattr(cb, name), self._hooks))
                if hasattr(cb, "_draw"):
                    cb._draw = _timed(cb._draw, self._draw, clock=time.thread_time)

    @staticmethod
    def _cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process
        return r.ru_utime + r.ru_stime

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._cpu0 = time.perf_counter(), self._cpu()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            tmp = self.out.with_suffix(".tmp")
            wall = time.perf_counter() - self._t0
            out = {"wall": wall, "cpu": self._cpu() - self._cpu0, "hooks": self._hooks[0], "draw_cpu": self._draw[0]}
            tmp.write_text(json.dumps(out))
            os.replace(tmp, self.out)


def _config(workdir: Path, with_callbacks: bool, out: Path) -> Path:
    base = yaml.safe_load(BASE.read_text())["trainer"]["callbacks"]
    callbacks = [cb for cb in base if with_callbacks or not cb["class_path"].startswith(OURS)]
    callbacks.append({"class_path": "callbacks_overhead.FitTimer", "init_args": {"out": str(out)}})
    path = workdir / ("with.yaml" if with_callbacks else "without.yaml")
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return path


def run(workdir: Path, with_callbacks: bool, epochs: int, index: int) -> dict[str, float]:
    """One default fit; returns its wall and CPU seconds."""
    name = f"{'with' if with_callbacks else 'without'}{index}"
    cwd = workdir / name
    cwd.mkdir()
    out = cwd / "fit_seconds"
    argv = [sys.executable, "-m", "fcn3_lightning", "fit", "--config", str(_config(cwd, with_callbacks, out))]
    argv += ["--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", str(cwd / "run")]
    argv += ["--trainer.logger.init_args.tracking_uri", f"sqlite:///{cwd / 'mlruns.db'}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "bench"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{name} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    fit = json.loads(out.read_text())
    plots = cwd / "run" / "plots"
    pngs = sorted(p.relative_to(plots).as_posix() for p in plots.rglob("*.png"))
    print(
        f"{name:>9}: fit {fit['wall']:7.1f} s wall, {fit['cpu']:7.1f} s CPU (process {wall:6.1f} s); PNGs: {pngs if pngs else 'none'}",
        flush=True,
    )
    return fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=1, help="trainer.max_epochs (base.yaml: 3); 100 steps + validation each")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each variant, alternating")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cb_overhead_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for i in range(args.repeats):
            for with_callbacks in (False, True):
                runs[with_callbacks].append(run(workdir, with_callbacks, args.epochs, i))
    for r in runs[True]:
        share = 100.0 * (r["hooks"] + r["draw_cpu"]) / r["wall"]
        print(
            f"accounted in the run with them: {r['hooks']:.2f} s in their hooks + {r['draw_cpu']:.2f} s CPU drawing = "
            f"{share:.2f} % of its {r['wall']:.1f} s fit"
        )
    for kind in ("wall", "cpu"):
        without = statistics.median(r[kind] for r in runs[False])
        with_ = statistics.median(r[kind] for r in runs[True])
        overhead = 100.0 * (with_ - without) / without
        print(
            f"default fit, {args.epochs} epoch(s), median of {args.repeats}, {kind} time: without the callbacks {without:.1f} s, "
            f"with them {with_:.1f} s: overhead {overhead:+.1f} % (budget 5 %)"
        )


if __name__ == "__main__":
    main()
