"""Planning a run: the forecast and the truth opened and checked, and everything scored decided up front.

The forecast (WB2's by-init layout: ``time`` = initialisation, [``number``], ``prediction_timedelta``, [``level``],
``latitude``, ``longitude``) is matched with the truth at valid time = init + lead. :func:`make_plan` opens both,
picks the channels (variables x levels, derivable wind speeds and vectors), the initialisation and lead times,
the regions, the baselines (:mod:`.baselines`) and the climatology (:mod:`.climatology`), then lays the channels
out in groups and blocks (:mod:`.blocks`; :func:`layout_groups`, :func:`layout_blocks`), so that every error in the
inputs shows before any scoring starts.
The result is a :class:`Plan` made from the user's :class:`Options`, which the runner (:mod:`.harness`) consumes.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from fcn3_lightning.eval.baselines import BASELINES, ProbClimPlan, prob_clim_plan
from fcn3_lightning.eval.blocks import Block, Group
from fcn3_lightning.eval.climatology import SEEPS_VARIABLE, ObsClimatology, ZarrClimatology, targets_of
from fcn3_lightning.eval.data import (
    INIT_DIMS,
    LEAD_DIM,
    MEMBER_DIMS,
    Channel,
    SourcePlan,
    align_grid,
    ascending_latitude,
    level_value,
    open_store,
)
from fcn3_lightning.eval.derived import WINDS, wind_of
from fcn3_lightning.eval.leaderboard import year_span

from fcn3_lightning.metrics import REGIONS
from fcn3_lightning.metrics.regions import ALL_REGIONS

#: the channels with zonal energy spectra when the user names none (those the forecast has)
DEFAULT_SPECTRA = ("geopotential/500", "2m_temperature")


def warn(msg: str, notes: list[str]) -> None:
    """Print a warning now and keep it for meta.json."""
    print(f"evaluate: WARNING: {msg}", file=sys.stderr, flush=True)
    notes.append(msg)


def iso(t: np.datetime64) -> str:
    return str(np.datetime64(t, "s"))


def as_hours(td: np.ndarray) -> list[float]:
    return [float(x / np.timedelta64(1, "h")) for x in np.asarray(td)]


def _choose(given: Sequence[str] | None, known: Collection[str], what: str, listing: str) -> list[str]:
    """The names ``given`` (all ``known`` ones when None); an unknown name is an error."""
    names = list(given) if given is not None else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; {listing} {', '.join(known)}")
    return names


def _range_years(years: tuple[int, int] | None) -> list[int] | None:
    return None if years is None else list(range(int(years[0]), int(years[1]) + 1))


@dataclass
class Options:
    """What to score and how (the ``evaluate`` command's options)."""

    name: str | None = None
    regions: Sequence[str] | None = None  # None: all of REGIONS (land regions only with a land-sea mask)
    per_init_regions: Sequence[str] | None = None  # regions with per-init (_temporal) records; None: every scored one, [] none
    variables: Sequence[str] | None = None
    levels: Sequence[float] | None = None
    lead_hours: Sequence[float] | None = None
    max_lead_hours: float | None = None
    start: str | None = None  # first initialisation time scored (inclusive)
    end: str | None = None  # last initialisation time scored (inclusive)
    init_every_hours: float | None = None  # score only the inits at multiples of this many hours after 00 UTC (12: 00 and 12 UTC)
    skipna: bool = False
    baselines: Sequence[str] | None = None  # None: all three, each skipped (loudly) when its data are missing
    prob_clim_years: tuple[int, int] | None = None
    clim_years: tuple[int, int] | None = None
    spectra: Sequence[str] | None = None  # None: those of plan.DEFAULT_SPECTRA that are scored (no warning for the others)
    dtype: str = "float32"  # the pointwise work (the sums over forecasts are float64 whatever this is)
    device: str = "cpu"
    block_mb: float = 128.0
    seed: int = 0
    progress: bool = True
    read_threads: int = 4
    # torch's threads while scoring; None: one core fewer than the process may use (the readers' core), at least 1.
    # On 2 cores a second torch thread was measured slower: its barriers wait on threads the readers displace.
    torch_threads: int | None = None
    compile: str = "auto"  # torch.compile the fused metric kernels: auto (when the data are large), on, off
    tune_malloc: bool = True  # glibc: keep freed block-sized buffers for reuse (see memory.keep_freed_memory)
    memory_mb: float = 2600.0  # with tune_malloc: give freed memory back to the system above this resident size


@dataclass
class Plan:
    """What one run scores, checked against the data: made by :func:`make_plan`, read by the runner."""

    opt: Options
    name: str
    paths: dict[str, str]  # forecast, obs, climatology as given (for meta.json)
    notes: list[str]  # warnings so far (the run adds its own)
    compute_dtype: torch.dtype  # of the metric states (sums over forecasts): always float64
    work_dtype: torch.dtype  # of the pointwise work (Options.dtype)
    device: torch.device
    # the forecast
    fc: xr.Dataset
    fc_where: str
    fc_vars: list[str]
    init_dim: str
    member_dim: str | None
    ensemble: bool
    members: int
    lat: np.ndarray
    lon: np.ndarray
    # the truth
    obs: xr.Dataset
    obs_where: str
    obs_times: pd.DatetimeIndex
    # what is scored
    channels: list[Channel]
    vectors: list[Channel]  # wind vectors (scored from their components)
    init_index: np.ndarray  # scored inits: indices into the forecast's
    inits: np.ndarray
    lead_index: np.ndarray  # scored leads: indices into the forecast's
    leads: np.ndarray
    lead_hours: list[float]
    valid: np.ndarray  # (init, lead) valid times
    valid_index: np.ndarray  # (init, lead) indices into the truth's times
    regions: list[str]
    lsm: np.ndarray | None  # land-sea mask (for the land regions)
    record_regions: list[int]  # indices into regions of those whose per-init values are recorded (Options.per_init_regions)
    baselines: list[str]
    skipped: dict[str, str]  # baseline -> why it was skipped
    pers_index: np.ndarray | None  # persistence: the truth's time index of each init
    pclim: ProbClimPlan | None
    targets: list[tuple[int, int]]  # (dayofyear, hour) of every valid time, init-major
    clim: ZarrClimatology | ObsClimatology
    clim_desc: str
    clim_years: list[int] | None  # years of the truth the computed climatology averages (None: given as a Zarr)
    seeps_on: bool
    p1: Any  # SEEPS's dry probability (None without SEEPS)
    spectra: set[str]  # labels of the channels with zonal energy spectra
    # the layout (:mod:`.blocks`)
    groups: list[Group] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    itemsize: int = 4
    field_bytes: int = 0


def make_plan(
    forecast: str | Path | xr.Dataset,
    obs: str | Path | xr.Dataset,
    climatology: str | Path | xr.Dataset | None,
    opt: Options,
) -> Plan:
    """Open and check the inputs and plan the run (raises ``ValueError`` naming what is wrong)."""
    p = _Planner(forecast, obs, climatology, opt)
    plan = Plan(**{f.name: getattr(p, f.name) for f in fields(Plan) if f.init and hasattr(p, f.name)})
    plan.groups, plan.itemsize, plan.field_bytes = layout_groups(plan)
    plan.blocks = layout_blocks(plan)
    return plan


# ---------------------------------------------------------------------------------------------- layout


def layout_groups(plan: Plan) -> tuple[list[Group], int, int]:
    """The channel groups, the largest item size of the forecast's variables and the bytes of one field.

    A field here is one (lat, lon) slice of every source scored at a point: the members, the truth, the
    climatology and the probabilistic climatology's years.
    """
    units: list[list[Channel]] = []
    seen: dict[str, int] = {}
    for c in plan.channels:
        w = wind_of(c.variable)
        key = f"wind:{w.prefix}" if w is not None else c.variable
        if key not in seen:
            seen[key] = len(units)
            units.append([])
        units[seen[key]].append(c)
    n_fields_per_point = plan.members + 1 + 1 + (len(plan.pclim.years) if plan.pclim else 0)
    itemsize = max(np.dtype(plan.fc[v].dtype).itemsize for v in plan.fc_vars)
    field_bytes = plan.lat.size * plan.lon.size * itemsize * n_fields_per_point
    budget = plan.opt.block_mb * 2**20
    groups: list[list[Channel]] = []
    for u in units:
        if groups and (len(groups[-1]) + len(u)) * len(plan.leads) * field_bytes <= budget:
            groups[-1] += u
        else:
            groups.append(list(u))
    out: list[Group] = []
    for gi, chans in enumerate(groups):
        g = Group(gi, chans)
        pos = {c.label: i for i, c in enumerate(chans)}
        g.seeps = [i for i, c in enumerate(chans) if c.variable == SEEPS_VARIABLE] if plan.seeps_on else []
        for vec in plan.vectors:
            w = wind_of(vec.variable)
            u, v = Channel(w.u, vec.level).label, Channel(w.v, vec.level).label  # type: ignore[union-attr]
            if u in pos and v in pos:
                g.vectors.append((vec, pos[u], pos[v]))
        g.spectra = [i for i, c in enumerate(chans) if c.label in plan.spectra]
        out.append(g)
    return out, itemsize, field_bytes


def _chunk(plan: Plan, dim: str, group: Group) -> int:
    """The forecast's chunk length along ``dim`` (1 when unknown): blocks align with it to read each chunk once."""
    sizes = []
    for var in dict.fromkeys(c.variable for c in group.channels):
        if var not in plan.fc.data_vars:
            continue
        da = plan.fc[var]
        chunks = da.encoding.get("chunks") or da.encoding.get("preferred_chunks")
        if isinstance(chunks, dict):
            sizes.append(int(chunks.get(dim, 1)))
        elif chunks is not None and dim in da.dims:
            sizes.append(int(chunks[da.dims.index(dim)]))
    return max(sizes, default=1)


def layout_blocks(plan: Plan) -> list[Block]:
    """The blocks of every group, group by group: as many inits x leads as fit the budget, aligned with the chunks."""
    budget = plan.opt.block_mb * 2**20
    n_inits, n_leads = len(plan.inits), len(plan.leads)
    blocks: list[Block] = []
    for g in plan.groups:
        per_lead = len(g.channels) * plan.field_bytes
        lead_chunk = _chunk(plan, LEAD_DIM, g)
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
            time_chunk = _chunk(plan, plan.init_dim, g)
            if nb >= time_chunk:
                nb = (nb // time_chunk) * time_chunk
        for b0 in range(0, n_inits, nb):
            for l0 in range(0, n_leads, nl):
                blocks.append(Block(g.index, np.arange(b0, min(b0 + nb, n_inits)), np.arange(l0, min(l0 + nl, n_leads)), (g.index, l0)))
    return blocks


class _Planner:
    """The planning steps, in order; each checks its part and sets the attributes the later ones read."""

    def __init__(
        self,
        forecast: str | Path | xr.Dataset,
        obs: str | Path | xr.Dataset,
        climatology: str | Path | xr.Dataset | None,
        opt: Options,
    ) -> None:
        self.opt = opt
        self.notes: list[str] = []
        self.paths = {
            k: (str(v) if not isinstance(v, xr.Dataset) else "<dataset>")
            for k, v in (("forecast", forecast), ("obs", obs), ("climatology", climatology))
        }
        self.name = opt.name or (
            Path(str(forecast).rstrip("/")).name.removesuffix(".zarr").removesuffix(".nc")
            if not isinstance(forecast, xr.Dataset)
            else "forecast"
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
        self.spectra = self._spectra_channels()

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
        member = [d for d in MEMBER_DIMS if d in ds.dims]
        if member:  # scoring against one of several analyses is a choice evaluate must not make silently
            raise ValueError(
                f"{where} has an ensemble-member dimension {member[0]!r} ({ds.sizes[member[0]]} members): evaluate scores against one "
                "truth per time. Convert one member into its own store: convert_cfgrib_to_wb2(src, dst, member=0) "
                "(python -m fcn3_lightning convert-era5 DST --member 0)"
            )
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
        if self.opt.init_every_hours is not None:  # e.g. 12: the inits at 00 and 12 UTC
            every = float(self.opt.init_every_hours)
            if not every > 0 or 24 % every:
                raise ValueError(f"--init-every-hours must divide 24 (e.g. 6, 12, 24), got {self.opt.init_every_hours:g}")
            hours = (inits - inits.astype("datetime64[D]")) / np.timedelta64(1, "h")
            keep &= np.isclose(np.mod(hours, every), 0.0)
        if not keep.any():
            every = f" every {self.opt.init_every_hours:g} h" if self.opt.init_every_hours is not None else ""
            raise ValueError(f"no initialisation time of {self.fc_where} in {self.opt.start} ... {self.opt.end}{every}")
        self.init_index = np.flatnonzero(keep)
        self.inits = inits[keep]
        leads = self.fc[LEAD_DIM].values.astype("timedelta64[ns]")
        hours = np.array(as_hours(leads))
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
        self.lead_hours = as_hours(self.leads)
        self.valid = self.inits[:, None] + self.leads[None, :]
        vidx = self.obs_times.get_indexer(pd.DatetimeIndex(self.valid.reshape(-1))).reshape(self.valid.shape)
        if (vidx < 0).any():
            missing = sorted(set(self.valid[vidx < 0].tolist()))
            shown = ", ".join(iso(np.datetime64(t, "ns")) for t in missing[:20])
            raise ValueError(
                f"{len(missing)} valid times (init + lead) are missing from {self.obs_where}: {shown}{' ...' if len(missing) > 20 else ''}"
            )
        self.valid_index = vidx

    def _plan_regions(self) -> None:
        explicit = self.opt.regions is not None
        names = list(REGIONS) if self.opt.regions is None else _choose(self.opt.regions, ALL_REGIONS, "regions", "known:")
        self.lsm = None
        land = [r for r in names if ALL_REGIONS[r].land]
        if land:
            if "land_sea_mask" in self.obs.data_vars and set(self.obs["land_sea_mask"].dims) == {"latitude", "longitude"}:
                self.lsm = self.obs["land_sea_mask"].transpose("latitude", "longitude").values.astype(np.float64)
            elif explicit:
                raise ValueError(f"the land regions {land} need a static land_sea_mask (latitude, longitude) in {self.obs_where}")
            else:
                warn(f"{self.obs_where} has no static land_sea_mask: the land regions {land} are skipped", self.notes)
                names = [r for r in names if r not in land]
        self.regions = names
        if self.opt.per_init_regions is None:  # WB2 writes the per-init scores of every region it evaluates
            self.record_regions = list(range(len(names)))
        else:
            unscored = [r for r in self.opt.per_init_regions if r not in names]
            if unscored:
                raise ValueError(f"--per-init-regions {unscored} are not among the scored regions {names} (see --regions)")
            self.record_regions = [names.index(r) for r in dict.fromkeys(self.opt.per_init_regions)]

    def _plan_baselines(self) -> None:
        explicit = self.opt.baselines is not None
        wanted = _choose(self.opt.baselines, BASELINES, "baselines", "choose from")
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
                    missing = [iso(t) for t in self.inits[idx < 0][:10]]
                    skip(b, f"{self.obs_where} lacks {int((idx < 0).sum())} initialisation times, e.g. {', '.join(missing)}")
                    continue
                self.pers_index = idx
            elif b == "probabilistic_climatology":
                explicit_years = _range_years(self.opt.prob_clim_years)
                plan = prob_clim_plan(self.obs_times.values, self.valid, explicit_years or self.earlier_years)
                for n in plan.notes:
                    warn(f"probabilistic climatology: {n}", self.notes)
                if len(plan.years) < 2:
                    which = "of --prob-clim-years" if explicit_years else f"before the first scored init ({self.first_init_text})"
                    skip(
                        b,
                        f"{self.obs_where} holds the valid times' calendar dates in {len(plan.years)} year(s) {which} ({plan.years}); "
                        "at least 2 are needed (--prob-clim-years FIRST:LAST chooses them)",
                    )
                    continue
                if explicit_years:
                    self._warn_if_scored("probabilistic climatology (--prob-clim-years)", plan.years)
                self.pclim = plan
            self.baselines.append(b)

    @property
    def first_init_text(self) -> str:
        return iso(self.inits.min())

    @property
    def earlier_years(self) -> list[int]:
        """The years of the truth before that of the first scored initialisation: a baseline made of them has not
        seen any scored init or valid time (as WB2 scores 2020 against a 1990-2019 climatology)."""
        first = pd.Timestamp(self.inits.min()).year
        return sorted(y for y in set(self.obs_times.year.tolist()) if y < first)

    def _warn_if_scored(self, what: str, years: Sequence[int]) -> None:
        """Loudly, when years the user chose hold scored valid times (a baseline that has seen the answer)."""
        scored = sorted(set(pd.DatetimeIndex(self.valid.reshape(-1)).year.tolist()) & set(years))
        if scored:
            warn(f"the {what} uses years holding scored valid times ({scored}): it has seen the truth it is scored against", self.notes)

    def _climatology_years(self) -> list[int]:
        """--clim-years, else the years before the first scored init (an error names the options when there are none)."""
        have = sorted(set(self.obs_times.year.tolist()))
        if self.opt.clim_years is not None:
            years = _range_years(self.opt.clim_years)
            if not set(years) & set(have):
                raise ValueError(f"--clim-years {year_span(years)}: {self.obs_where} has no time in these years (it has {year_span(have)})")
            self._warn_if_scored("climatology (--clim-years)", years)
            return years
        years = self.earlier_years
        if not years:
            later = [y for y in have if y > pd.DatetimeIndex(self.valid.reshape(-1)).year.max()]
            hint = f"; the truth has years after the scored period: --clim-years {later[0]}:{later[-1]}" if later else ""
            raise ValueError(
                f"the climatology (for the ACC and the climatology baseline) is computed from the years of the truth before the first "
                f"scored init ({self.first_init_text}), and {self.obs_where} has none (it has {year_span(have)}): pass --climatology "
                f"(a WB2 climatology Zarr) or --clim-years FIRST:LAST{hint} (years holding scored times give a baseline that has "
                "seen the answer)"
            )
        return years

    def _plan_climatology(self, source: str | Path | xr.Dataset | None) -> None:
        self.targets = targets_of(self.valid)  # (dayofyear, hour) of every valid time, init-major
        self.clim_years = None
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
            years = self._climatology_years()
            self.clim = ObsClimatology(self.obs_times.values, years, (self.lat.size, self.lon.size))
            self.clim_desc = (
                f"computed from the truth: WB2 hour x dayofyear climatology, 61-day triangular window, years {year_span(years)}"
            )
            self.clim_years = years
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

    def _spectra_channels(self) -> set[str]:
        """Labels of the scored channels named by ``Options.spectra`` (a name matching none is a warning); without
        ``Options.spectra``, those of :data:`DEFAULT_SPECTRA` that are scored (the others silently: nobody asked)."""
        out: set[str] = set()
        asked = self.opt.spectra is not None
        for spec in self.opt.spectra if asked else DEFAULT_SPECTRA:
            var, _, lev = spec.partition("/")
            hit = [
                c.label for c in self.channels if c.variable == var and (not lev or (c.level is not None and c.level == level_value(lev)))
            ]
            if not hit and asked:
                warn(f"spectra: {spec!r} is not among the scored channels; no spectrum for it", self.notes)
            out.update(hit)
        return out
