"""The evaluation loop: a forecast Zarr against the truth, scored as WB2's leaderboard scores it.

The forecast (WB2's by-init layout: ``time`` = initialisation, [``number``], ``prediction_timedelta``, [``level``],
``latitude``, ``longitude``) is matched with the truth at valid time = init + lead. Variables are packed into
channel groups, and each group is read in blocks of (a few inits) x (a range of lead times) x (its channels),
the next block being read in a background thread while the current one is scored. Each block becomes one
``(batch, [member], lead, channel, lat, lon)`` tensor per data source, fed to the metric classes of
:mod:`fcn3_lightning.metrics` (one set per channel group and lead range; their states are additive over inits),
so nothing larger than a block is ever in memory.

Evals (names as WB2's results): a deterministic forecast gets ``deterministic``; an ensemble gets
``ensemble_mean_deterministic`` (the member mean, taken in the data's dtype as WB2 does), ``probabilistic``,
``ensemble_experimental`` and the rank histogram; both get the baselines (:mod:`.baselines`) and zonal energy
spectra of the forecast and of the truth (each distinct valid time once). Deterministic scores: mse, rmse,
rmse_sqrt_before_time_avg, bias, mae, acc (climatology at the valid time), seeps_24hr (total_precipitation_24hr,
:mod:`.seeps`), and mse/rmse/rmse_sqrt_before_time_avg of the wind vectors (:mod:`.derived`).

Speed: the pointwise work of the metric classes' updates is fused into one kernel per block (:mod:`.fast`,
compiled with ``torch.compile`` for large data), in float32 by default (WB2 computes in the data's float32; the
fixture's tolerances hold), while the metric states, i.e. the sums over initialisations, stay float64.

NaN: by default any non-finite value in the forecast, the truth or the climatology is an error naming the variable
and time (a non-finite input makes a per-init score non-finite; only then is the block searched, so the data are
not scanned twice). With ``skipna``, a grid point where the truth or the forecast (any member) is not finite is
dropped from that field's spatial means (per eval: the pair scored), the region's area weights renormalised over
the remaining points (WB2's NaN-skipping spatial average); a field without any valid point in a region gives NaN
there for that init, and a NaN per-init value makes the time mean NaN.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from fcn3_lightning.eval.adapters import per_forecast, shared_region_weights, variant
from fcn3_lightning.eval.baselines import BASELINE_EVALS, BASELINES, ProbClimPlan, prob_clim_plan
from fcn3_lightning.eval.climatology import _LRU, SEEPS_VARIABLE, ObsClimatology, ZarrClimatology, targets_of
from fcn3_lightning.eval.data import Channel, SourcePlan, align_grid, ascending_latitude, level_value, open_store
from fcn3_lightning.eval.derived import WINDS, WindVectorScores, wind_of
from fcn3_lightning.eval.fast import (
    MAX_NETWORK_MEMBERS,
    FusedUpdates,
    crps_spread_weights,
    deterministic_kernel,
    ensemble_kernel,
    sorting_network,
)
from fcn3_lightning.eval.results import (
    PER_INIT_COLUMNS,
    RANK_COLUMNS,
    SCORE_COLUMNS,
    SPECTRA_COLUMNS,
    commit,
    eval_dataset,
    write_csv,
    write_netcdf,
)
from fcn3_lightning.eval.seeps import SEEPS
from torch import Tensor
from tqdm.auto import tqdm

from fcn3_lightning.metrics import ACC, CRPS, REGIONS, DeterministicScores, EnergyScore, RankHistogram, SpreadSkill, ZonalEnergySpectrum
from fcn3_lightning.metrics.base import GriddedMetric

INIT_DIMS = ("time", "init_time")
MEMBER_DIMS = ("number", "member", "realization")
LEAD_DIM = "prediction_timedelta"

DET_KEYS = ("mse", "rmse", "rmse_sqrt_before_time_avg", "bias", "mae")
WIND_KEYS = ("mse", "rmse", "rmse_sqrt_before_time_avg")
CRPS_KEYS = ("crps", "crps_skill", "crps_spread")
PROB_SS_KEYS = (
    "ensemble_mean_mse",
    "ensemble_mean_rmse",
    "debiased_ensemble_mean_mse",
    "debiased_ensemble_mean_rmse",
    "ensemble_variance",
    "ensemble_spread",
    "spread_skill_ratio",
    "spread_skill_ratio_fortin_corrected",
    "spread_skill_ratio_debiased",
)
ENERGY_KEYS = ("energy_score", "energy_score_skill", "energy_score_spread")
EXP_SS_KEYS = ("ensemble_mean_rmse_sqrt_before_time_avg", "ensemble_stddev_sqrt_before_time_avg", "spread_skill_ratio_sqrt_before_time_avg")
#: evals whose per-initialisation values go to per_init.csv (as ``{eval}_temporal``)
TEMPORAL_EVALS = ("deterministic", "ensemble_mean_deterministic", "probabilistic")
DEFAULT_SPECTRA = ("geopotential/500", "2m_temperature")


@dataclass
class Options:
    """What to score and how (the ``evaluate`` command's options)."""

    name: str | None = None
    regions: Sequence[str] | None = None  # None: all of REGIONS (land regions only with a land-sea mask)
    variables: Sequence[str] | None = None
    levels: Sequence[float] | None = None
    lead_hours: Sequence[float] | None = None
    max_lead_hours: float | None = None
    start: str | None = None  # first initialisation time scored (inclusive)
    end: str | None = None  # last initialisation time scored (inclusive)
    skipna: bool = False
    baselines: Sequence[str] | None = None  # None: all three, each skipped (loudly) when its data are missing
    prob_clim_years: tuple[int, int] | None = None
    clim_years: tuple[int, int] | None = None
    spectra: Sequence[str] = DEFAULT_SPECTRA
    dtype: str = "float32"  # the pointwise work (the sums over forecasts are float64 whatever this is)
    device: str = "cpu"
    block_mb: float = 128.0
    seed: int = 0
    progress: bool = True
    read_threads: int = 4
    compile: str = "auto"  # torch.compile the fused metric kernels: auto (when the data are large), on, off
    tune_malloc: bool = True  # glibc: keep freed block-sized buffers for reuse (see _keep_freed_memory)
    memory_mb: float = 2600.0  # with tune_malloc: give freed memory back to the system above this resident size


def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def _keep_freed_memory() -> None:
    """Make glibc's malloc serve and keep block-sized buffers (up to 1 GB) in the heap instead of fresh mmaps.

    Every block allocates and frees the same few 10-100 MB temporaries; glibc maps each one anew (its mmap
    threshold stops adapting at 32 MB) and the kernel zero-fills every page on first touch, which doubled the
    scoring time. The heap then fragments over the run (buffers are freed by other threads than the ones that
    allocated them): :func:`_release_memory` hands free pages back whenever the process grows past its budget.
    Process-wide and permanent (the CLI process ends with the run); a no-op off glibc.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _release_memory(limit_mb: float) -> None:
    """malloc_trim when the resident size passes ``limit_mb`` (glibc keeps freed, fragmented heap pages)."""
    if _rss_mb() > limit_mb:
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)


def warn(msg: str, notes: list[str]) -> None:
    print(f"evaluate: WARNING: {msg}", file=sys.stderr, flush=True)
    notes.append(msg)


def _iso(t: np.datetime64) -> str:
    return str(np.datetime64(t, "s"))


def _hours(td: np.ndarray) -> list[float]:
    return [float(x / np.timedelta64(1, "h")) for x in np.asarray(td)]


def _range_years(years: tuple[int, int] | None) -> list[int] | None:
    return None if years is None else list(range(int(years[0]), int(years[1]) + 1))


@dataclass
class Group:
    """Channels scored together: whole variables (with all their levels), wind components with their speed."""

    index: int
    channels: list[Channel]
    seeps: list[int] = field(default_factory=list)
    vectors: list[tuple[Channel, int, int]] = field(default_factory=list)  # (vector, u position, v position)
    spectra: list[int] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.channels]


@dataclass
class Block:
    group: int
    inits: np.ndarray  # indices into the scored inits
    leads: np.ndarray  # indices into the scored leads
    key: tuple[int, int]  # (group, first lead index): which metric set


@dataclass
class Loaded:
    block: Block
    fc: np.ndarray  # (B, [M], L, C, H, W)
    obs: np.ndarray  # (B, L, C, H, W)
    pers: np.ndarray | None = None  # (B, C, H, W)
    clim: np.ndarray | None = None  # (B, L, C, H, W)
    thr: np.ndarray | None = None  # (B, L, S, H, W)
    pclim: np.ndarray | None = None  # (B, Y, L, C, H, W)
    obs_spec: np.ndarray | None = None  # (n new valid times, 1, Csp, H, W)
    seconds: float = 0.0


@dataclass
class Part:
    """A metric object and the output rows it gives one eval."""

    eval: str
    metric: GriddedMetric
    keys: tuple[str, ...]
    labels: list[str]
    temporal: bool = False


class Evaluation:
    """One run of the harness: checks everything up front, then :meth:`run` scores and writes."""

    def __init__(
        self,
        forecast: str | Path | xr.Dataset,
        obs: str | Path | xr.Dataset,
        out: str | Path,
        climatology: str | Path | xr.Dataset | None = None,
        options: Options | None = None,
    ) -> None:
        self.opt = opt = options or Options()
        self.notes: list[str] = []
        self.out = Path(out)
        self.paths = {
            k: (str(v) if not isinstance(v, xr.Dataset) else "<dataset>")
            for k, v in (("forecast", forecast), ("obs", obs), ("climatology", climatology))
        }
        self.name = opt.name or (
            Path(forecast).name.removesuffix(".zarr").removesuffix(".nc") if not isinstance(forecast, xr.Dataset) else "forecast"
        )
        if opt.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {opt.dtype!r}")
        # metric states (sums over forecasts) are always float64; dtype is that of the pointwise work
        self.compute_dtype = torch.float64
        self.work_dtype = {"float64": torch.float64, "float32": torch.float32}[opt.dtype]
        self.device = torch.device(opt.device)
        self._open_forecast(forecast)
        self._open_obs(obs)
        self._plan_channels()
        self._plan_times()
        self._plan_regions()
        self._plan_baselines()
        self._plan_climatology(climatology)
        self._plan_groups()
        self._plan_blocks()
        self.fused = FusedUpdates(self._compile_mode(), lambda msg: warn(msg, self.notes), self.work_dtype)

    def _compile_jobs(self) -> list[tuple[str, Any, tuple[Any, ...]]]:
        """The kernel variants this run calls, on small example inputs (for the background compilation)."""
        if self.opt.skipna:
            return []

        def dtype_of(ds: xr.Dataset) -> torch.dtype:
            names = [v for v in dict.fromkeys(c.variable for c in self.channels) if v in ds.data_vars]
            return torch.from_numpy(np.zeros(0, dtype=np.result_type(*[ds[v].dtype for v in names] or [np.float32]))).dtype

        fc, obs = dtype_of(self.fc), dtype_of(self.obs)
        clim = dtype_of(self.clim.ds) if isinstance(self.clim, ZarrClimatology) else obs
        n, w = 64, self.work_dtype

        def ens(m: int, x: torch.dtype, rank: bool) -> tuple[str, Any, tuple[Any, ...]]:
            pairs = sorting_network(m) if m <= MAX_NETWORK_MEMBERS else []
            return (
                "ensemble",
                ensemble_kernel,
                (torch.ones(m, n, dtype=x), torch.ones(n, dtype=obs), w, pairs, crps_spread_weights(m), rank),
            )

        def det(f: torch.dtype, c: torch.dtype | None) -> tuple[str, Any, tuple[Any, ...]]:
            return (
                "deterministic",
                deterministic_kernel,
                (torch.ones(n, dtype=f), torch.ones(n, dtype=obs), None if c is None else torch.ones(n, dtype=c), w),
            )

        jobs = [ens(self.members, fc, True)] if self.ensemble else []
        jobs.append(det(fc, clim))
        if "persistence" in self.baselines:
            jobs.append(det(obs, clim))
        if "climatology" in self.baselines:
            jobs.append(det(clim, None))
        if self.pclim is not None:
            jobs.append(ens(len(self.pclim.years), obs, False))
        return jobs

    def _compile_mode(self) -> str:
        """auto: compile only when the data are large enough for the one-off compilation (~40 s cold) to pay off."""
        if self.opt.compile != "auto":
            return self.opt.compile
        points = len(self.inits) * len(self.leads) * len(self.channels) * self.lat.size * self.lon.size
        return "auto" if points * self.members >= 3e8 else "off"

    # --- setup ------------------------------------------------------------------------------------------

    def _open_forecast(self, source: str | Path | xr.Dataset) -> None:
        where = f"the forecast {self.paths['forecast']}"
        ds = open_store(source, "forecast")
        if LEAD_DIM not in ds.dims:
            raise ValueError(
                f"{where} has no {LEAD_DIM!r} dimension (dims {dict(ds.sizes)}): evaluate needs WB2's by-init layout, "
                f"time = initialisation time and {LEAD_DIM} = lead time"
            )
        if not np.issubdtype(ds[LEAD_DIM].dtype, np.timedelta64):
            raise ValueError(f"{where}: {LEAD_DIM} is {ds[LEAD_DIM].dtype}, not a timedelta (open it with decode_timedelta=True)")
        init_dims = [d for d in INIT_DIMS if d in ds.dims]
        if not init_dims:
            raise ValueError(f"{where} has no initialisation time dimension ({' or '.join(INIT_DIMS)}); dims {dict(ds.sizes)}")
        self.init_dim = init_dims[0]
        member = [d for d in MEMBER_DIMS if d in ds.dims]
        self.member_dim = member[0] if member and ds.sizes[member[0]] > 1 else None
        if member and self.member_dim is None:
            ds = ds.isel({member[0]: 0})  # a one-member "ensemble" is scored as a deterministic forecast
        self.ensemble = self.member_dim is not None
        self.members = ds.sizes[self.member_dim] if self.ensemble else 1
        ds = ascending_latitude(ds, where)
        self.lat = ds["latitude"].values.astype(np.float64)
        self.lon = ds["longitude"].values.astype(np.float64)
        core = {self.init_dim, LEAD_DIM, "latitude", "longitude"}
        self.fc_vars = [v for v, da in ds.data_vars.items() if core <= set(da.dims)]
        if not self.fc_vars:
            raise ValueError(f"{where} has no variable with dims ({self.init_dim}, {LEAD_DIM}, latitude, longitude)")
        self.fc = ds
        self.fc_where = where

    def _open_obs(self, source: str | Path | xr.Dataset) -> None:
        where = f"the truth {self.paths['obs']}"
        ds = open_store(source, "truth (obs)")
        if "time" not in ds.dims:
            raise ValueError(f"{where} has no 'time' dimension (dims {dict(ds.sizes)})")
        ds = ascending_latitude(ds, where)
        self.obs = align_grid(ds, self.lat, self.lon, where)
        self.obs_where = where
        self.obs_times = pd.DatetimeIndex(self.obs["time"].values)
        if not self.obs_times.is_unique:
            raise ValueError(f"{where} has duplicate times")

    def _plan_channels(self) -> None:
        fc, obs = self.fc, self.obs
        wanted = list(self.opt.variables) if self.opt.variables else None
        names = list(self.fc_vars)
        for w in WINDS:  # derivable speeds the forecast does not store
            if w.u in names and w.v in names and w.speed not in names:
                names.append(w.speed)
        if wanted is not None:
            unknown = [v for v in wanted if v not in names and not any(v == w.vector for w in WINDS)]
            if unknown:
                raise ValueError(f"--variables {unknown} are not in {self.fc_where} (nor derivable); it has {names}")
            keep = set(wanted)
            for v in wanted:  # a derived speed or a vector needs its components
                w = wind_of(v)
                if w is not None and (v == w.vector or v not in self.fc_vars):
                    keep |= {w.u, w.v}
            names = [n for n in names if n in keep]
        self.vector_winds = [w for w in WINDS if w.u in names and w.v in names and (wanted is None or w.vector in wanted or w.u in wanted)]
        levels_opt = {level_value(x) for x in self.opt.levels} if self.opt.levels else None
        channels: list[Channel] = []
        for var in names:
            src = var if var in fc.data_vars else wind_of(var).u  # type: ignore[union-attr]
            da = fc[src]
            if var not in obs.data_vars:
                w = wind_of(var)
                if not (
                    w is not None and var == w.speed and w.u in obs.data_vars and w.v in obs.data_vars and w.u in names and w.v in names
                ):
                    raise ValueError(
                        f"the variable {var!r} is in {self.fc_where} but not in {self.obs_where} (it has {sorted(obs.data_vars)})"
                    )
            if "level" in da.dims:
                levels = [level_value(x) for x in da["level"].values]
                if var not in fc.data_vars:  # derived speed: the levels of both components
                    other = [level_value(x) for x in fc[wind_of(var).v]["level"].values]  # type: ignore[union-attr]
                    levels = [x for x in levels if x in other]
                if levels_opt is not None:
                    levels = [x for x in levels if x in levels_opt]
                channels += [Channel(var, lev) for lev in levels]
            else:
                channels.append(Channel(var))
        if not channels:
            raise ValueError(f"no variable of {self.fc_where} left to score (variables {names}, levels {self.opt.levels})")
        self.channels = channels
        # check the truth's levels now, not in the middle of the run
        for var in dict.fromkeys(c.variable for c in channels):
            if var in obs.data_vars and channels[[c.variable for c in channels].index(var)].level is not None:
                have = [level_value(x) for x in obs[var]["level"].values] if "level" in obs[var].dims else []
                missing = [c.level for c in channels if c.variable == var and c.level not in have]
                if missing:
                    raise ValueError(f"{self.obs_where}: the variable {var!r} lacks the levels {missing} of the forecast (it has {have})")
        self.vectors: list[Channel] = []
        for w in self.vector_winds:
            ul = {c.level for c in channels if c.variable == w.u}
            vl = {c.level for c in channels if c.variable == w.v}
            self.vectors += [Channel(w.vector, lev) for lev in sorted(ul & vl, key=lambda x: -1 if x is None else x)]

    def _plan_times(self) -> None:
        inits = self.fc[self.init_dim].values.astype("datetime64[ns]")
        keep = np.ones(inits.size, dtype=bool)
        if self.opt.start:
            keep &= inits >= np.datetime64(self.opt.start, "ns")
        if self.opt.end:
            keep &= inits <= np.datetime64(self.opt.end, "ns")
        if not keep.any():
            raise ValueError(f"no initialisation time of {self.fc_where} in {self.opt.start} ... {self.opt.end}")
        self.init_index = np.flatnonzero(keep)
        self.inits = inits[keep]
        leads = self.fc[LEAD_DIM].values.astype("timedelta64[ns]")
        hours = np.array(_hours(leads))
        lkeep = np.ones(leads.size, dtype=bool)
        if self.opt.lead_hours:
            want = [float(h) for h in self.opt.lead_hours]
            missing = [h for h in want if not np.isclose(hours, h).any()]
            if missing:
                raise ValueError(f"lead times {missing} h are not in {self.fc_where} (it has {hours.tolist()} h)")
            lkeep &= np.isin(hours, want)
        if self.opt.max_lead_hours is not None:
            lkeep &= hours <= float(self.opt.max_lead_hours)
        if not lkeep.any():
            raise ValueError(f"no lead time of {self.fc_where} left (lead times {hours.tolist()} h)")
        self.lead_index = np.flatnonzero(lkeep)
        self.leads = leads[lkeep]
        self.lead_hours = _hours(self.leads)
        self.valid = self.inits[:, None] + self.leads[None, :]
        vidx = self.obs_times.get_indexer(pd.DatetimeIndex(self.valid.reshape(-1))).reshape(self.valid.shape)
        if (vidx < 0).any():
            missing = sorted(set(self.valid[vidx < 0].tolist()))
            shown = ", ".join(_iso(np.datetime64(t, "ns")) for t in missing[:20])
            raise ValueError(
                f"{len(missing)} valid times (init + lead) are missing from {self.obs_where}: {shown}{' ...' if len(missing) > 20 else ''}"
            )
        self.valid_index = vidx

    def _plan_regions(self) -> None:
        explicit = self.opt.regions is not None
        names = list(self.opt.regions) if explicit else list(REGIONS)
        unknown = [r for r in names if r not in REGIONS]
        if unknown:
            raise ValueError(f"unknown regions {unknown}; known: {', '.join(REGIONS)}")
        self.lsm = None
        land = [r for r in names if REGIONS[r].land]
        if land:
            if "land_sea_mask" in self.obs.data_vars and set(self.obs["land_sea_mask"].dims) == {"latitude", "longitude"}:
                self.lsm = self.obs["land_sea_mask"].transpose("latitude", "longitude").values.astype(np.float64)
            elif explicit:
                raise ValueError(f"the land regions {land} need a static land_sea_mask (latitude, longitude) in {self.obs_where}")
            else:
                warn(f"{self.obs_where} has no static land_sea_mask: the land regions {land} are skipped", self.notes)
                names = [r for r in names if r not in land]
        self.regions = names
        self.record_region = names.index("global") if "global" in names else None
        if self.record_region is None:
            warn("region 'global' is not scored: per_init.csv (global values per initialisation) stays empty", self.notes)

    def _plan_baselines(self) -> None:
        explicit = self.opt.baselines is not None
        wanted = list(self.opt.baselines) if explicit else list(BASELINES)
        unknown = [b for b in wanted if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; choose from {', '.join(BASELINES)}")
        self.baselines: list[str] = []
        self.skipped: dict[str, str] = {}
        self.pers_index = None
        self.pclim: ProbClimPlan | None = None

        def skip(b: str, why: str) -> None:
            if explicit:
                raise ValueError(f"baseline {b!r}: {why}")
            self.skipped[b] = why
            warn(f"baseline {b} SKIPPED: {why}", self.notes)

        for b in wanted:
            if b == "persistence":
                idx = self.obs_times.get_indexer(pd.DatetimeIndex(self.inits))
                if (idx < 0).any():
                    missing = [_iso(t) for t in self.inits[idx < 0][:10]]
                    skip(b, f"{self.obs_where} lacks {int((idx < 0).sum())} initialisation times, e.g. {', '.join(missing)}")
                    continue
                self.pers_index = idx
            elif b == "probabilistic_climatology":
                plan = prob_clim_plan(self.obs_times.values, self.valid, _range_years(self.opt.prob_clim_years))
                for n in plan.notes:
                    warn(f"probabilistic climatology: {n}", self.notes)
                if len(plan.years) < 2:
                    skip(
                        b,
                        f"{self.obs_where} holds the valid times' calendar dates in {len(plan.years)} earlier years ({plan.years}); "
                        "at least 2 are needed",
                    )
                    continue
                self.pclim = plan
            self.baselines.append(b)

    def _plan_climatology(self, source: str | Path | xr.Dataset | None) -> None:
        self.targets = targets_of(self.valid)  # (dayofyear, hour) of every valid time, init-major
        if source is not None:
            self.clim = ZarrClimatology(source, self.lat, self.lon)
            self.clim_desc = f"{self.paths['climatology']}"
            # a derived variable the user did not ask for is dropped (loudly) when the climatology lacks it
            wanted = set(self.opt.variables or ())
            lacking = [
                c
                for c in self.channels
                if c.variable not in self.fc.data_vars and c.variable not in self.clim.ds and c.variable not in wanted
            ]
            if lacking:
                names = sorted({c.variable for c in lacking})
                warn(
                    f"{self.clim.where} lacks the derived variable(s) {names}: not scored (the climatology of a speed is not derivable)",
                    self.notes,
                )
                self.channels = [c for c in self.channels if c not in lacking]
        else:
            years = _range_years(self.opt.clim_years) or sorted(set(self.obs_times.year.tolist()))
            self.clim = ObsClimatology(self.obs_times.values, years, (self.lat.size, self.lon.size))
            self.clim_desc = (
                f"computed from the truth: WB2 hour x dayofyear climatology, 61-day triangular window, years {years[0]}-{years[-1]}"
            )
            if len(years) < 3:
                warn(
                    f"the climatology is computed from only {len(years)} year(s) of truth ({years}); "
                    "pass --climatology for a WB2 climatology",
                    self.notes,
                )
        self.clim.check(self.channels, self.targets)
        self.seeps_on = any(c.variable == SEEPS_VARIABLE for c in self.channels)
        if self.seeps_on:
            if isinstance(self.clim, ZarrClimatology) and not self.clim.has_seeps:
                warn(f"{self.clim.where} lacks the SEEPS statistics of {SEEPS_VARIABLE}: seeps_24hr is skipped", self.notes)
                self.seeps_on = False
            elif isinstance(self.clim, ObsClimatology):
                obs_precip = SourcePlan(self.obs, [Channel(SEEPS_VARIABLE)], self.obs_where)
                self.clim.enable_seeps(lambda idx: obs_precip.read({"time": idx}, ("time",))[:, 0])
        self.p1 = self.clim.p1() if self.seeps_on else None

    def _plan_groups(self) -> None:
        units: list[list[Channel]] = []
        seen: dict[str, int] = {}
        for c in self.channels:
            w = wind_of(c.variable)
            key = f"wind:{w.prefix}" if w is not None else c.variable
            if key not in seen:
                seen[key] = len(units)
                units.append([])
            units[seen[key]].append(c)
        self.n_fields_per_point = self.members + 1 + 1 + (len(self.pclim.years) if self.pclim else 0)
        self.itemsize = max(np.dtype(self.fc[v].dtype).itemsize for v in self.fc_vars)
        field_bytes = self.lat.size * self.lon.size * self.itemsize * self.n_fields_per_point
        budget = self.opt.block_mb * 2**20
        groups: list[list[Channel]] = []
        for u in units:
            if groups and (len(groups[-1]) + len(u)) * len(self.leads) * field_bytes <= budget:
                groups[-1] += u
            else:
                groups.append(list(u))
        spectra = self._spectra_channels()
        self.groups = []
        for gi, chans in enumerate(groups):
            g = Group(gi, chans)
            pos = {c.label: i for i, c in enumerate(chans)}
            g.seeps = [i for i, c in enumerate(chans) if c.variable == SEEPS_VARIABLE] if self.seeps_on else []
            for vec in self.vectors:
                w = wind_of(vec.variable)
                u, v = Channel(w.u, vec.level).label, Channel(w.v, vec.level).label  # type: ignore[union-attr]
                if u in pos and v in pos:
                    g.vectors.append((vec, pos[u], pos[v]))
            g.spectra = [i for i, c in enumerate(chans) if c.label in spectra]
            self.groups.append(g)
        self.field_bytes = field_bytes

    def _spectra_channels(self) -> set[str]:
        out: set[str] = set()
        for spec in self.opt.spectra:
            var, _, lev = spec.partition("/")
            hit = [
                c.label for c in self.channels if c.variable == var and (not lev or (c.level is not None and c.level == level_value(lev)))
            ]
            if not hit:
                warn(f"spectra: {spec!r} is not among the scored channels; no spectrum for it", self.notes)
            out.update(hit)
        return out

    def _chunk(self, dim: str, group: Group) -> int:
        """The forecast's chunk length along ``dim`` (1 when unknown): blocks align with it to read each chunk once."""
        sizes = []
        for var in dict.fromkeys(c.variable for c in group.channels):
            if var not in self.fc.data_vars:
                continue
            da = self.fc[var]
            chunks = da.encoding.get("chunks") or da.encoding.get("preferred_chunks")
            if isinstance(chunks, dict):
                sizes.append(int(chunks.get(dim, 1)))
            elif chunks is not None and dim in da.dims:
                sizes.append(int(chunks[da.dims.index(dim)]))
        return max(sizes, default=1)

    def _plan_blocks(self) -> None:
        budget = self.opt.block_mb * 2**20
        n_inits, n_leads = len(self.inits), len(self.leads)
        self.blocks: list[Block] = []
        for g in self.groups:
            per_lead = len(g.channels) * self.field_bytes
            lead_chunk = self._chunk(LEAD_DIM, g)
            nl = n_leads if n_leads * per_lead <= budget else max(1, int(budget // per_lead))
            if nl < n_leads:
                # never split a lead chunk unless it is far over budget: a split chunk is read once per part
                if nl < lead_chunk and lead_chunk * per_lead <= 4 * budget:
                    nl = min(lead_chunk, n_leads)
                elif nl >= lead_chunk:
                    nl = (nl // lead_chunk) * lead_chunk
            nb = 1
            if nl == n_leads:
                nb = max(1, min(n_inits, int(budget // (n_leads * per_lead))))
                time_chunk = self._chunk(self.init_dim, g)
                if nb >= time_chunk:
                    nb = (nb // time_chunk) * time_chunk
            for b0 in range(0, n_inits, nb):
                for l0 in range(0, n_leads, nl):
                    self.blocks.append(
                        Block(g.index, np.arange(b0, min(b0 + nb, n_inits)), np.arange(l0, min(l0 + nl, n_leads)), (g.index, l0))
                    )

    # --- loading (background thread) --------------------------------------------------------------------

    def _begin_group(self, g: Group) -> None:
        self._group = g.index
        self._fc_plan = SourcePlan(self.fc, g.channels, self.fc_where)
        self._obs_plan = SourcePlan(self.obs, g.channels, self.obs_where)
        per_block = max(b.inits.size * b.leads.size for b in self.blocks if b.group == g.index)
        years = len(self.pclim.years) if self.pclim else 0
        cap = max(8, int(1.5 * 2**30 // max(1, self._obs_plan.n_fields * self.itemsize)))  # at most ~1.5 GB of cached truth
        self._obs_cache = _LRU(min(cap, 2 * per_block * (2 + years) + 8))
        schedule = [[self.targets[i * len(self.leads) + j] for i in b.inits for j in b.leads] for b in self.blocks if b.group == g.index]
        self.clim.begin_group(g.channels, schedule, lambda idx: self._obs_plan.read({"time": np.asarray(idx)}, ("time",), self._pool))
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

    def _load(self, b: Block) -> Loaded:
        t0 = time.perf_counter()
        g = self.groups[b.group]
        if getattr(self, "_group", None) != g.index:
            self._begin_group(g)
        dims = (self.init_dim, *((self.member_dim,) if self.ensemble else ()), LEAD_DIM)
        isel = {self.init_dim: self.init_index[b.inits], LEAD_DIM: self.lead_index[b.leads]}
        # no NaN scan here: a non-finite input makes a score non-finite, and only then are the inputs searched
        fc = self._fc_plan.read(isel, dims, self._pool)
        vidx = self.valid_index[np.ix_(b.inits, b.leads)]
        obs = self._obs_fields(vidx)
        out = Loaded(b, fc, obs)
        if self.pers_index is not None:
            out.pers = self._obs_fields(self.pers_index[b.inits])
        targets = [self.targets[i * len(self.leads) + j] for i in b.inits for j in b.leads]
        shape = (b.inits.size, b.leads.size)
        out.clim = self.clim.fields(targets).reshape(*shape, *self._obs_plan.shape)
        if g.seeps:
            out.thr = self.clim.seeps_threshold(targets).reshape(*shape, 1, *self._obs_plan.shape[1:])
        if self.pclim is not None:
            idx = self.pclim.indices[:, b.inits][:, :, b.leads].transpose(1, 0, 2)  # (B, Y, L)
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

    def _finite(self, arr: np.ndarray, what: str, b: Block, member: str | None = None, at_init: bool = False) -> None:
        """Raise naming variable and time if ``arr`` ((B, [member], L, C, H, W), or (B, C, H, W) ``at_init``) has NaN/inf."""
        if np.isfinite(arr.sum()):
            return
        bad = np.argwhere(~np.isfinite(arr))
        if bad.size == 0:  # the sum overflowed; the values are finite
            return
        first = bad[0]
        ch = self.groups[b.group].channels[int(first[-3])]
        init = self.inits[b.inits[int(first[0])]]
        if at_init:
            when = f"the initialisation time {_iso(init)}"
        else:
            lead = self.leads[b.leads[int(first[-4])]]
            when = f"init {_iso(init)}, lead {_hours(np.array([lead]))[0]:g} h (valid time {_iso(init + lead)})"
        which = f", {member} {int(first[1])}" if member else ""
        raise ValueError(
            f"the {what} has NaN (or inf) in {ch.label!r} at {when}{which} ({len(bad)} points in this block); "
            "pass --skipna to leave NaN points out of the spatial means"
        )

    # --- scoring ----------------------------------------------------------------------------------------

    def _make(
        self,
        cls: type[GriddedMetric],
        labels: Sequence[str],
        lead_hours: Sequence[float],
        *,
        record: bool = False,
        regions: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        **kw: Any,
    ) -> GriddedMetric:
        klass = variant(cls, self.opt.skipna, record and self.record_region is not None)
        regions = list(regions) if regions is not None else self.regions
        m = klass(
            self.lat,
            self.lon,
            list(labels),
            list(lead_hours),
            regions=regions,
            land_sea_mask=self.lsm,
            dtype=dtype or self.compute_dtype,
            **kw,
        )
        if record and self.record_region is not None:
            m.record_region = self.record_region  # type: ignore[attr-defined]
        return m.to(self.device)

    def _metric_set(self, b: Block) -> dict[str, Any]:
        g = self.groups[b.group]
        leads = [self.lead_hours[i] for i in b.leads]
        labels = g.labels
        vec_labels = [v.label for v, _, _ in g.vectors]
        seeps_labels = [labels[i] for i in g.seeps]
        parts: list[Part] = []
        det: dict[str, dict[str, Part | None]] = {}

        def det_eval(name: str, acc: bool, seeps: bool, temporal: bool) -> None:
            d: dict[str, Part | None] = {
                "scores": Part(name, self._make(DeterministicScores, labels, leads, record=temporal), DET_KEYS, labels, temporal)
            }
            d["acc"] = Part(name, self._make(ACC, labels, leads, record=temporal), ("acc",), labels, temporal) if acc else None
            d["seeps"] = (
                Part(name, self._make(SEEPS, seeps_labels, leads, record=temporal, p1=self.p1), ("seeps_24hr",), seeps_labels, temporal)
                if seeps and g.seeps
                else None
            )
            d["wind"] = (
                Part(name, self._make(WindVectorScores, vec_labels, leads, record=temporal), WIND_KEYS, vec_labels, temporal)
                if g.vectors
                else None
            )
            det[name] = d
            parts.extend(p for p in d.values() if p is not None)

        ens: dict[str, Any] = {}
        if self.ensemble:
            det_eval("ensemble_mean_deterministic", True, True, "ensemble_mean_deterministic" in TEMPORAL_EVALS)
            t = "probabilistic" in TEMPORAL_EVALS
            crps = self._make(CRPS, labels, leads, record=t)
            ss = self._make(SpreadSkill, labels, leads, record=t)
            es = self._make(EnergyScore, labels, leads)
            ens = {"crps": crps, "ss": ss, "es": es}
            parts += [
                Part("probabilistic", crps, CRPS_KEYS, labels, t),
                Part("probabilistic", ss, PROB_SS_KEYS, labels, t),
                Part("ensemble_experimental", es, ENERGY_KEYS, labels),
                Part("ensemble_experimental", ss, EXP_SS_KEYS, labels),
            ]
            ens["rank"] = self._make(RankHistogram, labels, leads, regions=["global"], n_members=self.members, seed=self.opt.seed)
        else:
            det_eval("deterministic", True, True, "deterministic" in TEMPORAL_EVALS)
        if "persistence" in self.baselines:
            det_eval(BASELINE_EVALS["persistence"], True, True, False)
        if "climatology" in self.baselines:
            det_eval(BASELINE_EVALS["climatology"], False, False, False)
        pclim: dict[str, GriddedMetric] = {}
        if self.pclim is not None:
            name = BASELINE_EVALS["probabilistic_climatology"]
            pclim = {"crps": self._make(CRPS, labels, leads), "ss": self._make(SpreadSkill, labels, leads)}
            parts += [Part(name, pclim["crps"], CRPS_KEYS, labels), Part(name, pclim["ss"], PROB_SS_KEYS, labels)]
        spec = None
        if g.spectra:
            sp_labels = [labels[i] for i in g.spectra]
            spec = self._make(ZonalEnergySpectrum, sp_labels, leads, regions=["global"], dtype=torch.float64, ensemble=self.ensemble)
        return {"parts": parts, "det": det, "ens": ens, "pclim": pclim, "spec": spec, "group": g, "leads": leads}

    def _mask(self, pred: Tensor, target: Tensor, ensemble: bool = False) -> tuple[Tensor, Tensor]:
        """skipna: NaN in both where either is not finite (so every spatial mean of the pair drops the same points)."""
        cd = self.compute_dtype
        pred, target = pred.to(cd), target.to(cd)
        bad = ~torch.isfinite(target)
        bad |= ~torch.isfinite(pred).all(1) if ensemble else ~torch.isfinite(pred)
        if not bool(bad.any()):
            return pred, target
        nan = float("nan")
        return pred.masked_fill(bad.unsqueeze(1) if ensemble else bad, nan), target.masked_fill(bad, nan)

    def _det_update(
        self, ms: dict[str, Any], name: str, pred: Tensor, obs: Tensor, clim: Tensor | None, thr: Tensor | None, blk: Loaded
    ) -> None:
        """The deterministic scores of one eval; inputs in the data's dtype, (B, L, C, H, W)."""
        d = ms["det"][name]
        g: Group = ms["group"]
        acc = d["acc"].metric if d["acc"] is not None else None
        if self.opt.skipna:
            f, o = self._mask(pred, obs)
            d["scores"].metric.update(f, o)
            if acc is not None:
                acc.update(f, o, clim)
        else:
            f, o = pred, obs
            if not self.fused.deterministic(pred, obs, d["scores"].metric, acc, clim):
                self._nonfinite(blk)
        if d["seeps"] is not None:
            # categories in the data's dtype, as WB2 compares them; SEEPS skips NaN points itself
            d["seeps"].metric.update(take(pred, g.seeps), take(obs, g.seeps), thr)
        if d["wind"] is not None:
            u, v = [x for _, x, _ in g.vectors], [x for _, _, x in g.vectors]
            if self.opt.skipna:
                d["wind"].metric.update(take(f, u), take(f, v), take(o, u), take(o, v))
            else:
                self.fused.wind_vector(d["wind"].metric, take(f, u), take(f, v), take(o, u), take(o, v))

    def _ens_update(self, metrics: dict[str, GriddedMetric], x: Tensor, o: Tensor, blk: Loaded) -> Tensor:
        """The ensemble scores; returns the member mean in the data's dtype (WB2's ensemble mean)."""
        if self.opt.skipna:
            xm, om = self._mask(x, o, ensemble=True)
            for m in metrics.values():
                m.update(xm, om)
            return x.mean(1)
        ok, mean = self.fused.ensemble(x, o, metrics.get("crps"), metrics.get("ss"), metrics.get("es"), metrics.get("rank"))  # type: ignore[arg-type]
        if not ok:
            self._nonfinite(blk)
        return mean

    def _nonfinite(self, blk: Loaded) -> None:
        """A score came out non-finite: find the NaN in the block's inputs and raise naming it."""
        b = blk.block
        self._finite(blk.fc, "forecast", b, member="member index" if self.ensemble else None)
        self._finite(blk.obs, "truth", b)
        if blk.pers is not None:
            self._finite(blk.pers, "truth (persistence)", b, at_init=True)
        if blk.clim is not None:
            self._finite(blk.clim, "climatology", b)
        if blk.pclim is not None:
            self._finite(blk.pclim, "truth (probabilistic climatology)", b, member="year index")
        raise ValueError(f"non-finite scores in block {b} without non-finite inputs (values too large for the computation dtype?)")

    def _score(self, ms: dict[str, Any], blk: Loaded) -> None:
        dev = self.device
        fc = torch.from_numpy(blk.fc).to(dev)
        obs = torch.from_numpy(blk.obs).to(dev)
        clim = torch.from_numpy(blk.clim).to(dev) if blk.clim is not None else None
        thr = torch.from_numpy(blk.thr).to(dev) if blk.thr is not None else None
        if self.ensemble:
            mean = self._ens_update(ms["ens"], fc, obs, blk)
            self._det_update(ms, "ensemble_mean_deterministic", mean, obs, clim, thr, blk)
            del mean
        else:
            self._det_update(ms, "deterministic", fc, obs, clim, thr, blk)
        if blk.pers is not None:
            pers = torch.from_numpy(blk.pers).to(dev).unsqueeze(1).expand(*obs.shape).contiguous()
            self._det_update(ms, BASELINE_EVALS["persistence"], pers, obs, clim, thr, blk)
        if "climatology" in self.baselines and clim is not None:
            self._det_update(ms, BASELINE_EVALS["climatology"], clim, obs, None, None, blk)
        if blk.pclim is not None:
            self._ens_update(ms["pclim"], torch.from_numpy(blk.pclim).to(dev), obs, blk)
        g: Group = ms["group"]
        if ms["spec"] is not None:
            ms["spec"].update(take(fc, g.spectra))
        if blk.obs_spec is not None:
            self._obs_spectra[g.index].update(torch.from_numpy(np.ascontiguousarray(blk.obs_spec)).to(dev))
        self._record(ms, blk.block)

    def _record(self, ms: dict[str, Any], b: Block) -> None:
        if self.record_region is None:
            return
        inits = [_iso(self.inits[i]) for i in b.inits]
        for p in ms["parts"]:
            if not p.temporal:
                continue
            values = per_forecast(p.metric)
            for key in p.keys:
                a = values[key].detach().cpu().double().numpy()  # (B, L, C)
                self._per_init.append((f"{p.eval}_temporal", key, p.labels, ms["leads"], inits, a))

    # --- the run ----------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        if self.opt.tune_malloc:
            _keep_freed_memory()
        self.fused.compile_in_background(self._compile_jobs(), self.device)
        try:
            return self._run(t_start)
        finally:
            self.fused.wait()

    def _run(self, t_start: float) -> dict[str, Any]:
        self._per_init: list[tuple] = []
        self._weights_memo: dict[tuple, np.ndarray] = {}
        with shared_region_weights(self._weights_memo):
            self._obs_spectra = {
                g.index: self._make(ZonalEnergySpectrum, [g.labels[i] for i in g.spectra], [0.0], regions=["global"], dtype=torch.float64)
                for g in self.groups
                if g.spectra
            }
        sets: dict[tuple[int, int], dict[str, Any]] = {}
        load_s = wait_s = score_s = 0.0
        # progress over the inits, once per channel group (the outer loop)
        bar = tqdm(total=len(self.inits), unit="init", disable=not self.opt.progress, file=sys.stderr)
        shown_group = -1
        with ThreadPoolExecutor(max_workers=self.opt.read_threads) as self._pool, ThreadPoolExecutor(max_workers=1) as loader:
            fut = loader.submit(self._load, self.blocks[0])
            try:
                for k, b in enumerate(self.blocks):
                    t0 = time.perf_counter()
                    blk = fut.result()
                    wait_s += time.perf_counter() - t0
                    load_s += blk.seconds
                    if k + 1 < len(self.blocks):
                        fut = loader.submit(self._load, self.blocks[k + 1])
                    t0 = time.perf_counter()
                    if b.key not in sets:
                        with shared_region_weights(self._weights_memo):
                            sets[b.key] = self._metric_set(b)
                    self._score(sets[b.key], blk)
                    del blk
                    if self.opt.tune_malloc:
                        _release_memory(self.opt.memory_mb)
                    score_s += time.perf_counter() - t0
                    if b.group != shown_group:
                        shown_group = b.group
                        names = list(dict.fromkeys(c.variable for c in self.groups[b.group].channels))
                        bar.reset(total=len(self.inits))
                        bar.set_description(f"evaluate {self.name} [{b.group + 1}/{len(self.groups)}: {', '.join(names)[:60]}]")
                    bar.update(b.inits.size * b.leads.size / len(self.leads))
            except BaseException:
                fut.cancel()
                raise
            finally:
                bar.close()
        t0 = time.perf_counter()
        frames = self._collect(sets)
        meta = self._meta(
            frames, timing={"load_s": load_s, "load_wait_s": wait_s, "score_s": score_s, "loop_s": time.perf_counter() - t_start}
        )
        meta["timing"]["collect_s"] = time.perf_counter() - t0
        meta["files"] = commit(self.out, self._writers(frames, meta), meta)
        meta["timing"]["total_s"] = time.perf_counter() - t_start  # after the write: in the returned meta only
        return meta

    # --- results ----------------------------------------------------------------------------------------

    def _collect(self, sets: dict[tuple[int, int], dict[str, Any]]) -> dict[str, pd.DataFrame]:
        """Long-form frames of every result; string columns categorical, level NaN for 2-D variables."""
        labels = [c.label for c in self.channels] + [v.label for v in self.vectors]
        cats = _Categories(labels, self.regions)
        scores, ranks, spectra, per_init = [], [], [], []
        for ms in sets.values():
            leads = np.asarray(ms["leads"], dtype=np.float64)
            for p in ms["parts"]:
                values = p.metric.compute()
                for key in p.keys:
                    scores.append(cats.grid(p.eval, key, values[key], leads, p.labels))
            if ms["ens"]:
                for key, v in ms["ens"]["rank"].compute().items():
                    ranks.append(cats.rank(key, v[0], leads, ms["group"].labels))
            if ms["spec"] is not None:
                spectra.append(cats.spectrum(self.name, ms["spec"]))
        for spec in self._obs_spectra.values():
            spectra.append(cats.spectrum("obs", spec, lead=np.nan))
        for ev, key, labs, leads, inits, a in self._per_init:
            per_init.append(cats.per_init(ev, key, a, np.asarray(leads, dtype=np.float64), labs, inits))
        frames = {
            "scores": cats.frame(scores, ["eval", "variable", "metric", "region", "level", "lead_time_hours"]),
            "per_init": cats.frame(per_init, ["eval", "variable", "metric", "region", "level", "lead_time_hours", "init_time"]),
            "rank_histogram": cats.frame(ranks, ["eval", "variable", "metric", "level", "lead_time_hours", "bin"]),
            "spectra": cats.frame(spectra, ["eval", "dataset", "variable", "level", "lead_time_hours", "latitude", "zonal_wavenumber"]),
        }
        if "persistence" in self.baselines:  # persistence's CRPS: that of a one-member ensemble, its MAE
            sc = frames["scores"]
            mae = sc[(sc["eval"] == BASELINE_EVALS["persistence"]) & (sc["metric"] == "mae")].copy()
            mae["metric"] = pd.Categorical(["crps"] * len(mae), categories=sc["metric"].cat.categories)
            frames["scores"] = pd.concat([sc, mae], ignore_index=True)
        return frames

    def _evals(self) -> list[str]:
        evals = ["ensemble_mean_deterministic", "probabilistic", "ensemble_experimental"] if self.ensemble else ["deterministic"]
        return evals + [BASELINE_EVALS[b] for b in self.baselines]

    def _meta(self, frames: dict[str, pd.DataFrame], timing: dict[str, float]) -> dict[str, Any]:
        import torchmetrics

        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            "name": self.name,
            "forecast": self.paths["forecast"],
            "obs": self.paths["obs"],
            "climatology": self.clim_desc,
            "forecast_kind": "ensemble" if self.ensemble else "deterministic",
            "members": self.members,
            "inits": [_iso(t) for t in self.inits],
            "lead_hours": self.lead_hours,
            "variables": list(dict.fromkeys(c.variable for c in self.channels)),
            "channels": [c.label for c in self.channels],
            "wind_vectors": [v.label for v in self.vectors],
            "regions": self.regions,
            "evals": self._evals(),
            "per_init_evals": sorted(set(frames["per_init"]["eval"])),
            "baselines": self.baselines,
            "baselines_skipped": self.skipped,
            "probabilistic_climatology_years": self.pclim.years if self.pclim else [],
            "seeps": bool(self.seeps_on),
            "spectra": sorted({g.labels[i] for g in self.groups for i in g.spectra}),
            "options": {k: v for k, v in asdict(self.opt).items() if k != "name"},
            "warnings": self.notes,
            "rows": {k: len(v) for k, v in frames.items()},
            "blocks": len(self.blocks),
            "groups": [g.labels for g in self.groups],
            "timing": {**timing, "peak_rss_mb": rss_kb / 1024},
            "created": pd.Timestamp.now(tz="UTC").isoformat(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "torchmetrics": torchmetrics.__version__,
                "xarray": xr.__version__,
                "numpy": np.__version__,
            },
        }

    def _writers(self, frames: dict[str, pd.DataFrame], meta: dict[str, Any]) -> dict[str, Any]:
        writers: dict[str, Any] = {
            "scores.csv": lambda p: write_csv(frames["scores"], SCORE_COLUMNS, p),
            "per_init.csv": lambda p: write_csv(frames["per_init"], PER_INIT_COLUMNS, p),
            "spectra.csv": lambda p: write_csv(frames["spectra"], SPECTRA_COLUMNS, p),
        }
        if self.ensemble:
            writers["rank_histogram.csv"] = lambda p: write_csv(frames["rank_histogram"], RANK_COLUMNS, p)
        attrs = {"model": self.name, "forecast": self.paths["forecast"], "obs": self.paths["obs"], "climatology": self.clim_desc}
        scores = frames["scores"]
        for ev in self._evals():
            df = scores[scores["eval"] == ev]
            if len(df):
                writers[f"{ev}.nc"] = lambda p, df=df, ev=ev: write_netcdf(eval_dataset(df, ev, attrs), p)
        return writers


def take(x: Tensor, positions: Sequence[int], dim: int = -3) -> Tensor:
    """``x`` at channel ``positions``: a view when they are consecutive (index_select copies slowly on 5-D tensors)."""
    pos = list(positions)
    if pos == list(range(pos[0], pos[0] + len(pos))):
        return x.narrow(dim, pos[0], len(pos))
    return x.index_select(dim, torch.as_tensor(pos, device=x.device))


class _Categories:
    """Builds the output frames from result arrays: categorical codes for the strings, vectorised."""

    def __init__(self, labels: list[str], regions: list[str]) -> None:
        self.labels = labels
        self.label_index = {lab: i for i, lab in enumerate(labels)}
        self.regions = regions
        self.pieces_meta: dict[str, list[str]] = {"eval": [], "metric": [], "dataset": [], "init_time": []}
        self._codes: dict[str, dict[str, int]] = {k: {} for k in self.pieces_meta}

    def _code(self, col: str, value: str) -> int:
        codes = self._codes[col]
        if value not in codes:
            codes[value] = len(codes)
            self.pieces_meta[col].append(value)
        return codes[value]

    def _labels(self, labs: Sequence[str]) -> np.ndarray:
        return np.array([self.label_index[x] for x in labs], dtype=np.int64)

    def grid(self, eval_name: str, metric: str, value: Tensor, leads: np.ndarray, labs: Sequence[str]) -> dict[str, Any]:
        a = value.detach().cpu().double().numpy()  # (R, L, C)
        r, lead, c = (x.ravel() for x in np.meshgrid(np.arange(a.shape[0]), np.arange(a.shape[1]), np.arange(a.shape[2]), indexing="ij"))
        return {
            "eval": self._code("eval", eval_name),
            "metric": self._code("metric", metric),
            "region": r,
            "lead_time_hours": leads[lead],
            "label": self._labels(labs)[c],
            "value": a.ravel(),
        }

    def rank(self, metric: str, value: Tensor, leads: np.ndarray, labs: Sequence[str]) -> dict[str, Any]:
        a = value.detach().cpu().double().numpy()  # (L, C, K)
        lead, c, k = (x.ravel() for x in np.meshgrid(np.arange(a.shape[0]), np.arange(a.shape[1]), np.arange(a.shape[2]), indexing="ij"))
        return {
            "eval": self._code("eval", "rank_histogram"),
            "metric": self._code("metric", metric),
            "lead_time_hours": leads[lead],
            "label": self._labels(labs)[c],
            "bin": k,
            "value": a.ravel(),
        }

    def spectrum(self, dataset: str, metric: ZonalEnergySpectrum, lead: float | None = None) -> dict[str, Any]:
        a = metric.compute()["zonal_energy_spectrum"].detach().cpu().double().numpy()  # (L, C, lat, K)
        lead_i, c, y, k = (x.ravel() for x in np.meshgrid(*(np.arange(n) for n in a.shape), indexing="ij"))
        leads = np.asarray(metric.lead_hours, dtype=np.float64)[lead_i] if lead is None else np.full(lead_i.size, lead)
        return {
            "eval": self._code("eval", "zonal_energy_spectrum"),
            "dataset": self._code("dataset", dataset),
            "lead_time_hours": leads,
            "label": self._labels(metric.channels)[c],
            "latitude": metric.lat[y],
            "zonal_wavenumber": k,
            "value": a.ravel(),
        }

    def per_init(
        self, eval_name: str, metric: str, a: np.ndarray, leads: np.ndarray, labs: Sequence[str], inits: Sequence[str]
    ) -> dict[str, Any]:
        b, lead, c = (x.ravel() for x in np.meshgrid(np.arange(a.shape[0]), np.arange(a.shape[1]), np.arange(a.shape[2]), indexing="ij"))
        init_codes = np.array([self._code("init_time", t) for t in inits], dtype=np.int64)
        return {
            "eval": self._code("eval", eval_name),
            "metric": self._code("metric", metric),
            "region": np.zeros(b.size, dtype=np.int64) + self.regions.index("global"),
            "lead_time_hours": leads[lead],
            "label": self._labels(labs)[c],
            "init_time": init_codes[b],
            "value": a.ravel(),
        }

    def frame(self, pieces: list[dict[str, Any]], order: list[str]) -> pd.DataFrame:
        """Concatenate pieces; map labels to variable and level; sort by ``order``."""
        cols: dict[str, list[np.ndarray]] = {}
        for p in pieces:
            n = p["value"].size
            for k, v in p.items():
                cols.setdefault(k, []).append(np.full(n, v) if np.ndim(v) == 0 else np.asarray(v))
        data = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
        if not pieces:
            return pd.DataFrame(columns=[*order, "value"])
        var_names = sorted({lab.split("/")[0] for lab in self.labels})
        var_of = np.array([var_names.index(lab.split("/")[0]) for lab in self.labels], dtype=np.int64)
        lev_of = np.array([float(lab.split("/")[1]) if "/" in lab else np.nan for lab in self.labels])
        label = data.pop("label").astype(np.int64)
        out: dict[str, Any] = {}
        keys: list[np.ndarray] = []
        for col in order:
            if col == "variable":
                codes, cats = var_of[label], var_names
            elif col == "region":
                codes, cats = data["region"].astype(np.int64), self.regions
            elif col in self.pieces_meta:
                codes, cats = data[col].astype(np.int64), self.pieces_meta[col]
            elif col == "level":
                codes, cats = lev_of[label], None
            else:
                codes, cats = data[col], None
            if cats is not None:
                # sort by the names, not by first appearance
                rank = np.argsort(np.argsort(np.asarray(cats, dtype=object)))
                keys.append(rank[codes])
                out[col] = pd.Categorical.from_codes(codes, categories=list(cats))
            else:
                keys.append(np.nan_to_num(np.asarray(codes, dtype=np.float64), nan=-1.0))
                out[col] = codes
        out["value"] = data["value"]
        idx = np.lexsort(keys[::-1])
        return pd.DataFrame({k: (v.take(idx) if isinstance(v, pd.Categorical) else np.asarray(v)[idx]) for k, v in out.items()})


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
