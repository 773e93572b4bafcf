"""The evaluation loop: a forecast Zarr against the truth, scored as WB2's leaderboard scores it.

:func:`evaluate` plans the run (:mod:`.plan`: the stores opened and checked, the channels, times, regions,
baselines and climatology chosen, the channels laid out in groups and blocks), then the runner
(:class:`Evaluation`) goes through the blocks: the next block is read in a background thread (:mod:`.load`) while
the current one is scored (:mod:`.score`), so nothing larger than a block is ever in memory. At the end the
metric states become long-form frames (:mod:`.collect`), written atomically with the run's meta data
(:mod:`.results`). :mod:`.memory` keeps glibc from zero-filling fresh pages for every block.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from fcn3_lightning.eval import collect
from fcn3_lightning.eval.fast import FusedUpdates
from fcn3_lightning.eval.load import BlockLoader
from fcn3_lightning.eval.plan import Options, Plan, iso, make_plan, warn
from fcn3_lightning.eval.results import commit
from fcn3_lightning.eval.score import Scorer, compile_jobs, compile_mode
from tqdm.auto import tqdm

from fcn3_lightning.bounds import Extremes, Moments, Report
from fcn3_lightning.memory import keep_freed_memory, release_memory


class Evaluation:
    """One run of the harness: :func:`.plan.make_plan` checks everything up front, then :meth:`run` scores and writes."""

    def __init__(
        self,
        forecast: str | Path | xr.Dataset,
        obs: str | Path | xr.Dataset,
        out: str | Path,
        climatology: str | Path | xr.Dataset | None = None,
        options: Options | None = None,
    ) -> None:
        self.opt = options or Options()
        for name in ("torch_threads", "read_threads"):
            n = getattr(self.opt, name)
            if n is not None and n < 1:
                raise ValueError(f"{name} (--{name.removeprefix('torch_').replace('_', '-')}) must be at least 1, got {n}")
        self.out = Path(out)
        self.plan = make_plan(forecast, obs, climatology, self.opt)
        self.fused = FusedUpdates(compile_mode(self.plan), lambda msg: warn(msg, self.plan.notes), self.plan.work_dtype)

    def run(self) -> dict[str, Any]:
        """Score every block, write the results to ``out``; returns the run's meta data."""
        t_start = time.perf_counter()
        if self.opt.tune_malloc:
            keep_freed_memory()
        threads = torch.get_num_threads()
        torch.set_num_threads(self.opt.torch_threads or max(1, len(os.sched_getaffinity(0)) - 1))
        self.fused.compile_in_background(compile_jobs(self.plan), self.plan.device)
        try:
            return self._run(t_start)
        finally:
            self.fused.wait()
            torch.set_num_threads(threads)

    def _run(self, t_start: float) -> dict[str, Any]:
        plan = self.plan
        scorer = Scorer(plan, self.fused)
        bounds = BoundsWatch(plan)
        sets: dict[tuple[int, int], dict[str, Any]] = {}
        load_s = wait_s = score_s = 0.0
        # progress over the inits, once per channel group (the outer loop)
        bar = tqdm(total=len(plan.inits), unit="init", disable=not self.opt.progress, file=sys.stderr)
        shown_group = -1
        with ThreadPoolExecutor(max_workers=self.opt.read_threads) as pool, ThreadPoolExecutor(max_workers=1) as loader:
            load = BlockLoader(plan, pool).load
            fut = loader.submit(load, plan.blocks[0])
            try:
                for k, b in enumerate(plan.blocks):
                    t0 = time.perf_counter()
                    blk = fut.result()
                    wait_s += time.perf_counter() - t0
                    bounds.update(blk)
                    load_s += blk.seconds
                    if k + 1 < len(plan.blocks):
                        fut = loader.submit(load, plan.blocks[k + 1])
                    t0 = time.perf_counter()
                    if b.key not in sets:
                        sets[b.key] = scorer.metric_set(b)
                    scorer.score(sets[b.key], blk)
                    del blk
                    if self.opt.tune_malloc:
                        release_memory(self.opt.memory_mb)
                    score_s += time.perf_counter() - t0
                    if b.group != shown_group:
                        shown_group = b.group
                        names = list(dict.fromkeys(c.variable for c in plan.groups[b.group].channels))
                        bar.reset(total=len(plan.inits))
                        bar.set_description(f"evaluate {plan.name} [{b.group + 1}/{len(plan.groups)}: {', '.join(names)[:60]}]")
                    bar.update(b.inits.size * b.leads.size / len(plan.leads))
            except BaseException:
                fut.cancel()
                raise
            finally:
                bar.close()
        t0 = time.perf_counter()
        physical_bounds = bounds.finish()  # warns before meta.json takes the warnings
        frames = collect.collect(plan, sets, scorer.obs_spectra, scorer.per_init)
        meta = collect.meta(
            plan, frames, timing={"load_s": load_s, "load_wait_s": wait_s, "score_s": score_s, "loop_s": time.perf_counter() - t_start}
        )
        meta["physical_bounds"] = physical_bounds
        meta["timing"]["collect_s"] = time.perf_counter() - t0
        meta["files"] = commit(self.out, collect.writers(plan, frames), meta)
        meta["timing"]["total_s"] = time.perf_counter() - t_start  # after the write: in the returned meta only
        return meta


class BoundsWatch:
    """Where the forecast leaves its physical bounds (:mod:`fcn3_lightning.bounds`); the reference is the truth at the
    scored valid times (each once), so the bounds are known when every block was read.

    Per channel group: the forecast's extremes per lead time (:class:`~fcn3_lightning.bounds.Extremes`) and the
    truth's moments (:class:`~fcn3_lightning.bounds.Moments`). With ``skipna`` NaN points are missing data.
    """

    REFERENCE = "the truth at the scored valid times"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.extremes: dict[int, Extremes] = {}
        self.truth: dict[int, Moments] = {}
        self.seen: dict[int, set[int]] = {}

    def update(self, blk: Any) -> None:
        """Add a loaded block (:class:`.load.Loaded`)."""
        p, b = self.plan, blk.block
        if b.group not in self.extremes:
            labels = p.groups[b.group].labels
            self.extremes[b.group] = Extremes(labels, p.lead_hours, p.lat)
            self.truth[b.group] = Moments(len(labels), p.lat, skipna=p.opt.skipna)
            self.seen[b.group] = set()
        inits = [iso(t) for t in p.inits[b.inits]]
        members = range(blk.fc.shape[1]) if p.ensemble else None
        self.extremes[b.group].update(blk.fc, inits, b.leads, members=members, skipna=p.opt.skipna)
        vidx = p.valid_index[np.ix_(b.inits, b.leads)]
        seen, new = self.seen[b.group], []
        for i, j in np.ndindex(vidx.shape):
            if int(vidx[i, j]) not in seen:
                seen.add(int(vidx[i, j]))
                new.append((i, j))
        if new:
            ii, jj = (np.array(a) for a in zip(*new, strict=True))
            self.truth[b.group].update(blk.obs[ii, jj])

    def finish(self) -> dict[str, Any]:
        """Warn once per channel that left its bounds (first lead time, worst excursion); the record for meta.json."""
        report, channels, definition = Report(), {}, ""
        for g, ext in self.extremes.items():
            bounds = self.truth[g].bounds(ext.channels, self.REFERENCE)
            report.update(bounds.check(ext))
            channels.update(bounds.as_dict()["channels"])
            definition = bounds.definition()
        units = {c.label: str(self.plan.fc[c.variable].attrs.get("units", "")) for c in self.plan.channels if c.variable in self.plan.fc}
        for line in report.lines(units):
            warn(f"the forecast leaves its physical bounds: {line}", self.plan.notes)
        return {"definition": definition, "channels": channels, "out_of_bounds": report.as_dict()}


def evaluate(
    forecast: str | Path | xr.Dataset,
    obs: str | Path | xr.Dataset,
    out: str | Path,
    climatology: str | Path | xr.Dataset | None = None,
    options: Options | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """Score ``forecast`` against ``obs`` and write the results to ``out``; returns the run's meta data.

    ``kw`` are :class:`Options` fields (``evaluate(f, o, out, regions=["global"])``).
    """
    if kw:
        options = Options(**{**(asdict(options) if options else {}), **kw})
    return Evaluation(forecast, obs, out, climatology, options).run()
