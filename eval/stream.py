"""Scoring a forecast while it is made (``predict --score-against``): the results of a later ``evaluate``, without the Zarr.

:class:`StreamingEvaluation` plans the run from a *template* of the forecast (the dataset ``predict`` would write:
coordinates, variables, dtypes; no values), exactly as :func:`.harness.evaluate` plans it from the store. Then the
forecaster hands it every step as it comes, all members of one (init, lead) at a time, as a one-step dataset in the
forecast's layout (:meth:`StreamingEvaluation.add`); each channel group of the step is one block, read by that
group's own :class:`.load.BlockLoader` (truth, climatology and baselines from their stores, the forecast from the
step) and scored by the same :class:`.score.Scorer`. The channel groups are sized for one lead (a block holds one).

Memory: one metric set per group, reused for every lead; per (group, lead) only its accumulated states are held
(:class:`LeadStates`: sums over the inits per region and channel, and the zonal spectrum, latitude x wavenumber, the
largest: 82 KB per lead at 91x180 with 16 regions, 5 channels, one spectrum), plus the per-init records and one
step. The heap is trimmed after every step: the step's freed temporaries would otherwise stay resident, fragmented by
the small states that outlive them (~1.4 MB per lead at 91x180 and 8 members). :meth:`StreamingEvaluation.finish`
writes what ``evaluate`` writes (:mod:`.collect`, :mod:`.results`), building each lead's metric set from its states
one at a time; the results themselves (every lead's rows) are what grows there.

Same numbers as ``evaluate``: the same metric classes and fused kernels on the same float32 values; only the blocks
differ (one lead per block), and the spatial means are summed in float64 (:meth:`.GriddedMetric.spatial_mean`), so
the results agree to ~1e-15. The rank histogram's
random tie-breaking follows the blocks (one generator per group, drawn lead after lead), so its draws (not its
distribution) differ.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from fcn3_lightning.eval import collect
from fcn3_lightning.eval.blocks import Block
from fcn3_lightning.eval.data import LEAD_DIM, MEMBER_DIMS, SourcePlan, ascending_latitude
from fcn3_lightning.eval.fast import FusedUpdates
from fcn3_lightning.eval.load import BlockLoader
from fcn3_lightning.eval.plan import Options, iso, layout_groups, make_plan, warn
from fcn3_lightning.eval.results import commit
from fcn3_lightning.eval.score import Scorer

from fcn3_lightning.memory import trim_heap
from fcn3_lightning.metrics.base import GriddedMetric


class StreamingEvaluation:
    """``evaluate`` fed one forecast step at a time (module docstring).

    Args:
        template: the forecast's layout (WB2 by-init dataset; its values are never read).
        obs, climatology: as for :func:`.harness.evaluate`.
        out: the results folder (written by :meth:`finish`).
        options: :class:`.plan.Options`; the planning errors (a variable the truth lacks, a valid time it does not
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
        # a block holds one lead here: the channel groups are sized for one lead, not for all of them (make_plan's
        # layout for evaluate splits the channels into more groups as the leads grow, and every group costs a metric
        # set per lead)
        plan.groups, plan.itemsize, plan.field_bytes = layout_groups(dataclasses.replace(plan, leads=plan.leads[:1]))
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
        # one set of metric objects per group, reused for every lead: per (group, lead) only its states are held
        # (:class:`LeadStates`), not ~10 metric objects
        self._work: dict[int, dict[str, Any]] = {}
        self.states: dict[tuple[int, int], LeadStates] = {}
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
            ms = self._work.get(g.index)
            if ms is None:
                ms = self._work[g.index] = self.scorer.metric_set(b)
            ms["leads"] = [p.lead_hours[j]]  # the label of the per-init records (the metric objects' own are not read)
            held = self.states.get(b.key)
            if held is None:
                for m in metrics_of(ms):
                    m.reset()
            else:
                held.load(ms)
            self.scorer.score(ms, blk)
            self.states[b.key] = LeadStates.save(ms)
            del blk, fc
        # the step's temporaries are freed; glibc keeps the freed pages, fragmented by the small states that outlive
        # them (measured: ~1.4 MB per lead at 91x180 and 8 members, half the growth of the peak with the lead times)
        trim_heap()
        self.seconds += time.perf_counter() - t0

    def finish(self) -> dict[str, Any]:
        """Write the results (as ``evaluate``); every planned (init, lead) must have been added."""
        self._pool.shutdown()
        p = self.plan
        want = len(p.inits) * len(p.leads)
        if len(self._done) != want:
            raise ValueError(f"only {len(self._done)} of the {want} (init, lead) pairs were scored; no results written")
        t0 = time.perf_counter()
        self._work.clear()
        with warnings.catch_warnings():  # compute() before update(): _Sets merges the states in, it does not update
            warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric")
            frames = collect.collect(p, _Sets(self), self.scorer.obs_spectra, self.scorer.per_init)
        # the frames hold the results now; the building's temporaries stay resident, fragmented, unless trimmed
        self.states.clear()
        self.scorer.per_init.clear()
        trim_heap()
        meta = collect.meta(p, frames, timing={"score_s": self.seconds})
        trim_heap()
        meta["scored_while_forecasting"] = True
        meta["timing"]["collect_s"] = time.perf_counter() - t0
        meta["files"] = commit(self.out, {name: _trimmed(w) for name, w in collect.writers(p, frames).items()}, meta)
        return meta


def _trimmed(write: Callable[[Path], None]) -> Callable[[Path], None]:
    """``write``, then the heap trimmed: each writer's temporaries would otherwise add to the next one's."""

    def run(path: Path) -> None:
        write(path)
        trim_heap()

    return run


def metrics_of(ms: dict[str, Any]) -> list[GriddedMetric]:
    """The metric objects of a metric set of :class:`.score.Scorer`, each once, in the order the set builds them."""
    found = [p.metric for p in ms["parts"]] + list(ms["ens"].values()) + list(ms["pclim"].values()) + [ms["spec"]]
    return list({id(m): m for m in found if m is not None}.values())


@dataclasses.dataclass
class LeadStates:
    """The accumulated states of one (group, lead): each metric object's torchmetrics states (sums over the inits,
    ``(region, 1, channel[, ...])`` each; the zonal spectrum ``(1, channel, lat, wavenumber)``), in
    :func:`metrics_of`'s order. KBs per lead, where the metric objects themselves were ~0.4 MB (module state,
    buffers, their own copies of the default states)."""

    states: list[dict[str, Any]]

    @classmethod
    def save(cls, ms: dict[str, Any]) -> LeadStates:
        return cls([dict(m.metric_state) for m in metrics_of(ms)])

    def load(self, ms: dict[str, Any]) -> None:
        """Make the objects of ``ms`` (the group's) hold these states: updates then add to them."""
        for m, st in zip(metrics_of(ms), self.states, strict=True):
            for name, value in st.items():
                setattr(m, name, value)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for st in self.states for v in st.values())


class _Sets(Mapping):
    """The (group, lead) metric sets for :func:`.collect.collect`, built one at a time as it reads them: a fresh set
    with the lead's labels, its states merged in (to the zero states: the same values), dropped after use."""

    def __init__(self, stream: StreamingEvaluation) -> None:
        self._stream = stream

    def __len__(self) -> int:
        return len(self._stream.states)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(sorted(self._stream.states))

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        g, j = key
        held = self._stream.states[key]
        ms = self._stream.scorer.metric_set(Block(g, np.array([0]), np.array([j]), key))
        for m, st in zip(metrics_of(ms), held.states, strict=True):
            m.merge_state(st)
        return ms
