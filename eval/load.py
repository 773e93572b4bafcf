"""Reading the blocks of a plan: forecast, truth, climatology and baseline fields as numpy arrays.

The runner reads the next block in a background thread (:class:`BlockLoader`, one at a time) while the current one is
scored; each variable of a block is read by a pool of threads. The truth is cached by time within a channel group,
since persistence, the probabilistic climatology and overlapping valid times read the same fields again.

NaN: loading does not scan for non-finite values (that would read the data twice); when a score comes out
non-finite, :func:`raise_nonfinite` searches the block's inputs and raises naming the variable and time.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from fcn3_lightning.eval.blocks import Block, Group
from fcn3_lightning.eval.climatology import LRU
from fcn3_lightning.eval.data import LEAD_DIM, SourcePlan
from fcn3_lightning.eval.plan import Plan, as_hours, iso


@dataclass
class Loaded:
    """The arrays of one block, in the data's dtypes."""

    block: Block
    fc: np.ndarray  # (B, [M], L, C, H, W)
    obs: np.ndarray  # (B, L, C, H, W)
    pers: np.ndarray | None = None  # (B, C, H, W)
    clim: np.ndarray | None = None  # (B, L, C, H, W)
    thr: np.ndarray | None = None  # (B, L, S, H, W)
    pclim: np.ndarray | None = None  # (B, Y, L, C, H, W)
    obs_spec: np.ndarray | None = None  # (n new valid times, 1, Csp, H, W)
    seconds: float = 0.0


class BlockLoader:
    """Reads the blocks of a plan, in order, in one thread at a time (its caches are not thread-safe)."""

    def __init__(self, plan: Plan, pool: Executor) -> None:
        self.plan = plan
        self._pool = pool  # reads the variables of a block in parallel
        self._group: int | None = None

    def _begin_group(self, g: Group) -> None:
        p = self.plan
        self._group = g.index
        self._fc_plan = SourcePlan(p.fc, g.channels, p.fc_where)
        self._obs_plan = SourcePlan(p.obs, g.channels, p.obs_where)
        per_block = max(b.inits.size * b.leads.size for b in p.blocks if b.group == g.index)
        years = len(p.pclim.years) if p.pclim else 0
        cap = max(8, int(1.5 * 2**30 // max(1, self._obs_plan.n_fields * p.itemsize)))  # at most ~1.5 GB of cached truth
        self._obs_cache = LRU(min(cap, 2 * per_block * (2 + years) + 8))
        schedule = [[p.targets[i * len(p.leads) + j] for i in b.inits for j in b.leads] for b in p.blocks if b.group == g.index]
        p.clim.begin_group(g.channels, schedule, lambda idx: self._obs_plan.read({"time": np.asarray(idx)}, ("time",), self._pool))
        self._spec_seen: set[int] = set()

    def _obs_fields(self, idx: np.ndarray) -> np.ndarray:
        """Truth fields ``(*idx.shape, C, H, W)`` of the current group at obs time indices (cached by time)."""
        flat = np.asarray(idx).reshape(-1)
        missing = sorted({int(i) for i in flat if self._obs_cache.get(int(i)) is None})
        if missing:
            arr = self._obs_plan.read({"time": np.array(missing)}, ("time",), self._pool)
            for k, i in enumerate(missing):
                self._obs_cache.put(i, arr[k])
        return np.stack([self._obs_cache.get(int(i)) for i in flat]).reshape(*np.shape(idx), *self._obs_plan.shape)

    def load(self, b: Block, fc: np.ndarray | None = None) -> Loaded:
        """Read block ``b`` (blocks come group by group: a new group resets the caches); ``fc``: the forecast block
        when it is in memory already (scoring while forecasting), else it is read from the plan's forecast."""
        t0 = time.perf_counter()
        p = self.plan
        g = p.groups[b.group]
        if self._group != g.index:
            self._begin_group(g)
        dims = (p.init_dim, *((p.member_dim,) if p.ensemble else ()), LEAD_DIM)
        isel = {p.init_dim: p.init_index[b.inits], LEAD_DIM: p.lead_index[b.leads]}
        # no NaN scan here: a non-finite input makes a score non-finite, and only then are the inputs searched
        if fc is None:
            fc = self._fc_plan.read(isel, dims, self._pool)
        vidx = p.valid_index[np.ix_(b.inits, b.leads)]
        obs = self._obs_fields(vidx)
        out = Loaded(b, fc, obs)
        if p.pers_index is not None:
            out.pers = self._obs_fields(p.pers_index[b.inits])
        targets = [p.targets[i * len(p.leads) + j] for i in b.inits for j in b.leads]
        shape = (b.inits.size, b.leads.size)
        out.clim = p.clim.fields(targets).reshape(*shape, *self._obs_plan.shape)
        if g.seeps:
            out.thr = p.clim.seeps_threshold(targets).reshape(*shape, 1, *self._obs_plan.shape[1:])
        if p.pclim is not None:
            idx = p.pclim.indices[:, b.inits][:, :, b.leads].transpose(1, 0, 2)  # (B, Y, L)
            out.pclim = self._obs_fields(idx)
        if g.spectra:
            new = [(i, j) for i in range(shape[0]) for j in range(shape[1]) if int(vidx[i, j]) not in self._spec_seen]
            uniq: dict[int, tuple[int, int]] = {}
            for i, j in new:
                uniq.setdefault(int(vidx[i, j]), (i, j))
            if uniq:
                self._spec_seen.update(uniq)
                ii, jj = zip(*uniq.values(), strict=True)
                out.obs_spec = obs[np.array(ii), np.array(jj)][:, None][:, :, g.spectra]
        out.seconds = time.perf_counter() - t0
        return out


def raise_nonfinite(plan: Plan, blk: Loaded) -> None:
    """A score came out non-finite: find the NaN in the block's inputs and raise naming it."""
    b = blk.block
    _check_finite(plan, blk.fc, "forecast", b, member="member index" if plan.ensemble else None)
    _check_finite(plan, blk.obs, "truth", b)
    if blk.pers is not None:
        _check_finite(plan, blk.pers, "truth (persistence)", b, at_init=True)
    if blk.clim is not None:
        _check_finite(plan, blk.clim, "climatology", b)
    if blk.pclim is not None:
        _check_finite(plan, blk.pclim, "truth (probabilistic climatology)", b, member="year index")
    raise ValueError(f"non-finite scores in block {b} without non-finite inputs (values too large for the computation dtype?)")


def _check_finite(plan: Plan, arr: np.ndarray, what: str, b: Block, member: str | None = None, at_init: bool = False) -> None:
    """Raise naming variable and time if ``arr`` ((B, [member], L, C, H, W), or (B, C, H, W) ``at_init``) has NaN/inf."""
    if np.isfinite(arr.sum()):
        return
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size == 0:  # the sum overflowed; the values are finite
        return
    first = bad[0]
    ch = plan.groups[b.group].channels[int(first[-3])]
    init = plan.inits[b.inits[int(first[0])]]
    if at_init:
        when = f"the initialisation time {iso(init)}"
    else:
        lead = plan.leads[b.leads[int(first[-4])]]
        when = f"init {iso(init)}, lead {as_hours(np.array([lead]))[0]:g} h (valid time {iso(init + lead)})"
    which = f", {member} {int(first[1])}" if member else ""
    raise ValueError(
        f"the {what} has NaN (or inf) in {ch.label!r} at {when}{which} ({len(bad)} points in this block); "
        "pass --skipna to leave NaN points out of the spatial means"
    )
