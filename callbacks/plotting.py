"""Shared plumbing of the plotting callbacks: Agg figures, atomic PNG writes, a background plotting thread and
MLflow artifacts.

Figures are bare :class:`matplotlib.figure.Figure` objects (rendered by Agg, no pyplot state), so drawing them on a
worker thread is safe. One process-wide worker thread draws and uploads them, off the training thread; each
callback keeps its own :class:`PlotJobs` to collect its errors and to wait for its plots before the run ends.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_info

from fcn3_lightning.io import atomic_path

_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _lower_priority() -> None:
    # Linux schedules threads individually: a niced plotting thread takes the cores the training leaves idle
    if sys.platform.startswith("linux"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _executor() -> ThreadPoolExecutor:
    # one thread for every callback: plots queue up instead of competing with training for the cores
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fcn3-plots", initializer=_lower_priority)
        return _EXECUTOR


class PlotJobs:
    """A callback's plotting jobs: run in the background (or inline), errors re-raised on the training thread."""

    def __init__(self, background: bool = True):
        self.background = background
        self._futures: list[Future] = []

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.raise_errors()
        if not self.background:
            fn(*args, **kwargs)
            return
        self._futures.append(_executor().submit(fn, *args, **kwargs))

    def raise_errors(self) -> None:
        """Re-raise the first error of a finished job (a plot that fails must not go unnoticed)."""
        done = [f for f in self._futures if f.done()]
        self._futures = [f for f in self._futures if not f.done()]
        for f in done:
            f.result()

    def wait(self) -> None:
        """Block until every submitted job has finished; re-raise the first error."""
        futures, self._futures = self._futures, []
        for f in futures:
            f.result()


@dataclass(frozen=True)
class ArtifactSink:
    """Where a plot goes: always a PNG under ``local_dir``, and the MLflow run's artifact store when there is one."""

    local_dir: Path
    repository: Any = None  # mlflow ArtifactRepository of the run: the worker thread uploads without touching the tracking DB

    def save(self, fig: Any, subdir: str, name: str, dpi: int = 100) -> Path:
        """Write ``fig`` to ``<local_dir>/<subdir>/<name>`` atomically and log it to ``<subdir>/`` of the MLflow run."""
        path = self.local_dir / subdir / name
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=dpi)  # render first: the file is open only for the write (a kill then leaves no temp file)
        with atomic_path(path) as tmp:
            tmp.write_bytes(png.getvalue())
        if self.repository is not None:
            self.repository.log_artifact(str(path), subdir)
        return path


_WARNED_NO_MLFLOW: set[str] = set()


def artifact_sink(trainer: L.Trainer) -> ArtifactSink:
    """The sink for this trainer: its first MLflow logger's run, else PNGs only under ``<default_root_dir>/plots`` (said once)."""
    local = Path(trainer.default_root_dir) / "plots"
    if trainer.is_global_zero and local.is_dir():  # a killed run's temporary files (atomic_path's ".<name>.<random>.tmp")
        for stale in local.rglob(".*.tmp"):
            stale.unlink(missing_ok=True)
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            # the run's artifact location is looked up here, on the training thread
            uri = logger.experiment.get_run(logger.run_id).info.artifact_uri
            return ArtifactSink(local, get_artifact_repository(uri, tracking_uri=logger._tracking_uri))
    if str(local) not in _WARNED_NO_MLFLOW:
        _WARNED_NO_MLFLOW.add(str(local))
        rank_zero_info(f"plots: no MLflow logger, so the PNGs are only saved under {local}")
    return ArtifactSink(local)


def new_figure(width: float, height: float, layout: str | None = "constrained") -> Any:
    """A figure rendered by Agg that leaves pyplot's global state alone (safe on the plotting thread)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout=layout)


def cell_edges(centres: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Edges of the cells around ``centres`` (midpoints; the outer ones mirrored, then clipped to [lo, hi])."""
    c = np.asarray(centres, dtype=np.float64)
    mid = 0.5 * (c[1:] + c[:-1])
    edges = np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])
    if lo is not None or hi is not None:
        edges = np.clip(edges, lo, hi)
    return edges


def lead_text(hours: float) -> str:
    """``+6 h``, ``+1 d``, ``+1.5 d``: a lead time for titles."""
    return f"+{hours / 24:g} d" if hours >= 24 and hours % 12 == 0 else f"+{hours:g} h"
