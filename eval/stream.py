"""Scoring a forecast while it is made (``predict --score-against``): the results of a later ``evaluate``, without the Zarr.

:class:`StreamingEvaluation` plans the run from a *template* of the forecast (the dataset ``predict`` would write:
coordinates, variables, dtypes; no values), exactly as :func:`.harness.evaluate` plans it from the store. Then the
forecaster hands it every step as it comes, all members of one (init, lead) at a time, as a one-step dataset in the
forecast's layout (:meth:`StreamingEvaluation.add`); each channel group of the step is one block, read by that
group's own :class:`.load.BlockLoader` (truth, climatology and baselines from their stores, the forecast from the
step) and scored by the same :class:`.score.Scorer`. The metric sets are per (channel group, lead time): what is
held is their states (a few numbers per region, lead and channel) and one step, so memory does not grow with the
number of lead times. :meth:`StreamingEvaluation.finish` writes what ``evaluate`` writes (:mod:`.collect`,
:mod:`.results`).

Same numbers as ``evaluate``: the same metric classes and fused kernels on the same float32 values; only the blocks
differ (one lead per block), and the spatial means are summed in float64 (:meth:`.fast.FusedUpdates._smean`), so
the results agree to ~1e-15. The rank histogram's
random tie-breaking follows the blocks, so its draws (not its distribution) differ.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from fcn3_lightning.eval import collect
from fcn3_lightning.eval.blocks import Block
from fcn3_lightning.eval.data import LEAD_DIM, MEMBER_DIMS, SourcePlan, ascending_latitude
from fcn3_lightning.eval.fast import FusedUpdates
from fcn3_lightning.eval.harness import Options
from fcn3_lightning.eval.load import BlockLoader
from fcn3_lightning.eval.plan import iso, make_plan, warn
from fcn3_lightning.eval.results import commit
from fcn3_lightning.eval.score import Scorer


class StreamingEvaluation:
    """``evaluate`` fed one forecast step at a time (module docstring).

    Args:
        template: the forecast's layout (WB2 by-init dataset; its values are never read).
        obs, climatology: as for :func:`.harness.evaluate`.
        out: the results folder (written by :meth:`finish`).
        options: :class:`.harness.Options`; the planning errors (a variable the truth lacks, a valid time it does not
            hold, ...) are raised here, before any forecast is made.
        forecast_desc: what meta.json names as the forecast (the kept store, or how it was made).
    """

    def __init__(
        self,
        template: xr.Dataset,
        obs: str | Path | xr.Dataset,
        out: str | Path,
        climatology: str | Path | xr.Dataset | None = None,
        options: Options | None = None,
        forecast_desc: str = "<scored while forecasting>",
    ) -> None:
        self.opt = options or Options()
        self.out = Path(out)
        plan = make_plan(template, obs, climatology, self.opt)
        plan.paths["forecast"] = forecast_desc
        # one block per (group, init, lead): the metric sets are per (group, lead), keyed like evaluate's
        plan.blocks = [
            Block(g.index, np.array([i]), np.array([j]), (g.index, j))
            for i in range(len(plan.inits))
            for j in range(len(plan.leads))
            for g in plan.groups
        ]
        self.plan = plan
        self.fused = FusedUpdates("off", lambda msg: warn(msg, plan.notes), plan.work_dtype)
        self.scorer = Scorer(plan, self.fused)
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.opt.read_threads))
        # one loader per group, each with its own climatology state (its caches follow one group)
        self._loaders = {}
        for g in plan.groups:
            gp = dataclasses.replace(plan, clim=copy.copy(plan.clim), blocks=[b for b in plan.blocks if b.group == g.index])
            self._loaders[g.index] = BlockLoader(gp, self._pool)
        self._sets: dict[tuple[int, int], dict[str, Any]] = {}
        self._init_pos = {iso(t): i for i, t in enumerate(plan.inits)}
        self._lead_pos = {int(np.timedelta64(td, "ns").astype(np.int64)): j for j, td in enumerate(plan.leads)}
        self._done: set[tuple[int, int]] = set()
        self.seconds = 0.0

    def add(self, step: xr.Dataset) -> None:
        """Score one step: a dataset in the forecast's layout with one init and one lead (all members)."""
        t0 = time.perf_counter()
        p = self.plan
        init = iso(step[p.init_dim].values[0])
        lead = int(step[LEAD_DIM].values.astype("timedelta64[ns]").astype(np.int64)[0])
        if init not in self._init_pos or lead not in self._lead_pos:
            return  # a lead the options leave out (--max-lead, --lead-times)
        i, j = self._init_pos[init], self._lead_pos[lead]
        if (i, j) in self._done:
            raise ValueError(f"init {init}, lead {lead / 3.6e12:g} h was scored already")
        self._done.add((i, j))
        if not p.ensemble:  # a one-member ensemble is scored as a deterministic forecast, as evaluate does
            step = step.isel({d: 0 for d in MEMBER_DIMS if d in step.dims})
        ds = ascending_latitude(step, "the forecast step")
        dims = (p.init_dim, *((p.member_dim,) if p.ensemble else ()), LEAD_DIM)
        for g in p.groups:
            b = Block(g.index, np.array([i]), np.array([j]), (g.index, j))
            fc = SourcePlan(ds, g.channels, "the forecast step").read({p.init_dim: [0], LEAD_DIM: [0]}, dims)
            blk = self._loaders[g.index].load(b, fc=fc)
            if b.key not in self._sets:
                self._sets[b.key] = self.scorer.metric_set(b)
            self.scorer.score(self._sets[b.key], blk)
        self.seconds += time.perf_counter() - t0

    def finish(self) -> dict[str, Any]:
        """Write the results (as ``evaluate``); every planned (init, lead) must have been added."""
        self._pool.shutdown()
        p = self.plan
        want = len(p.inits) * len(p.leads)
        if len(self._done) != want:
            raise ValueError(f"only {len(self._done)} of the {want} (init, lead) pairs were scored; no results written")
        t0 = time.perf_counter()
        frames = collect.collect(p, self._sets, self.scorer.obs_spectra, self.scorer.per_init)
        meta = collect.meta(p, frames, timing={"score_s": self.seconds})
        meta["scored_while_forecasting"] = True
        meta["timing"]["collect_s"] = time.perf_counter() - t0
        meta["files"] = commit(self.out, collect.writers(p, frames), meta)
        return meta
