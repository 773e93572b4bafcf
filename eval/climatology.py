"""Climatologies at forecast valid times: read from a WB2 climatology Zarr, or computed from the ground truth.

Computed climatology (WB2's ``scripts/compute_climatology.py`` with ``utils.compute_hourly_stat``, window 61)
---------------------------------------------------------------------------------------------------------
For every hour of day h and day of year d (1 ... 366, pandas' ``dayofyear``: ordinal day of the year, so
1 March is day 61 in a leap year and 60 otherwise) the climatology is the weighted mean

    clim(d, h) = sum_{y, k} w_k x(y, d + k, h) / sum_{y, k: x present} w_k,   k = -30 ... 30,

* y runs over the years of the truth (``--clim-years`` restricts them), x(y, d, h) the truth at day d, hour h of
  year y; days beyond the year wrap around **within the same year** (WB2 stacks the years as rows and pads each
  row periodically: the window of 1 January reaches into December of the same year);
* w_k = 1 - |k| / 30, WB2's ``create_window_weights(61)`` (the linearly decaying weights; w_{+-30} = 0, so the
  window effectively holds +-29 days);
* day 366 of a non-leap year takes that year's day 365 (WB2 fills the gap day with ``fillna(day 365)``);
* truth that is missing (time not in the store, or NaN at a point) drops out of the sum and of the weights, as
  in xarray's NaN-skipping weighted mean. WB2's ``fillna`` would fill *every* missing day of a year with its day
  365; that only differs on incomplete years, where it would put 31 December into the gaps, which we do not.

SEEPS statistics of a computed climatology (``total_precipitation_24hr`` only), with the same windows and
weights: ``..._seeps_dry_fraction`` = weighted mean of (x < 0.25 mm); ``..._seeps_threshold`` = weighted 2/3
quantile of the wet values (x > 0.25 mm), xarray's weighted quantile (type 7 on Kish's effective sample size);
p1 (SEEPS' dry fraction averaged over all hours and days) = the plain mean of (x < 0.25 mm) over all truth times
at the climatology's hours, day 366 of non-leap years counted as day 365 again: for complete years this is
exactly the mean over (hour, dayofyear) of the windowed dry fraction.
"""

from __future__ import annotations

import calendar
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from fcn3_lightning.eval.data import Channel, SourcePlan, align_grid, ascending_latitude, open_store
from fcn3_lightning.eval.seeps import DRY_THRESHOLD_M

SEEPS_VARIABLE = "total_precipitation_24hr"
SEEPS_THRESHOLD = f"{SEEPS_VARIABLE}_seeps_threshold"
SEEPS_DRY_FRACTION = f"{SEEPS_VARIABLE}_seeps_dry_fraction"

Target = tuple[int, int]  # (dayofyear, hour)
ReadFn = Callable[[np.ndarray], np.ndarray]


def window_weights(window: int = 61) -> np.ndarray:
    """WB2's ``create_window_weights``: linear from 0 to 1 and back to 0 over ``window`` days (odd)."""
    if window % 2 != 1:
        raise ValueError(f"the climatology window must be an odd number of days, got {window}")
    half = window // 2
    w = np.concatenate([np.linspace(0, 1, half + 1), np.linspace(1, 0, half + 1)[1:]])
    return w / w.mean()


def targets_of(times: np.ndarray) -> list[Target]:
    """(dayofyear, hour) of datetimes, in the given order."""
    t = pd.DatetimeIndex(np.asarray(times).reshape(-1))
    return list(zip(t.day_of_year.tolist(), t.hour.tolist(), strict=True))


def _date(year: int, doy: int, hour: int) -> np.datetime64:
    if doy == 366 and not calendar.isleap(year):
        doy = 365  # WB2 fills the gap day with day 365
    return np.datetime64(f"{year:04d}-01-01T00", "ns") + np.timedelta64(doy - 1, "D") + np.timedelta64(hour, "h")


def window_plan(
    obs_times: pd.DatetimeIndex, targets: Sequence[Target], years: Sequence[int], window: int = 61
) -> tuple[np.ndarray, np.ndarray]:
    """Which truth times make up each target's window mean, and with what weight.

    Returns the sorted truth time indices used and the weight matrix ``(len(targets), len(indices))``: the
    climatology is ``W @ x / W @ present(x)``.
    """
    w = window_weights(window)
    half = window // 2
    pos: dict[int, int] = {}
    cols: list[int] = []
    entries: list[tuple[int, int, float]] = []
    lookup = pd.Index(obs_times)
    for ti, (doy, hour) in enumerate(targets):
        dates = []
        weights = []
        for y in years:
            for k in range(-half, half + 1):
                if w[k + half] == 0:
                    continue
                d = (doy - 1 + k) % 366 + 1  # periodic within the year row
                dates.append(_date(y, d, hour))
                weights.append(w[k + half])
        idx = lookup.get_indexer(pd.DatetimeIndex(dates)) if dates else np.zeros(0, dtype=int)
        for i, wt in zip(idx.tolist(), weights, strict=True):
            if i < 0:
                continue
            if i not in pos:
                pos[i] = len(cols)
                cols.append(i)
            entries.append((ti, pos[i], wt))
    order = np.argsort(np.asarray(cols, dtype=np.int64))
    remap = np.empty(len(cols), dtype=np.int64)
    remap[order] = np.arange(len(cols))
    mat = np.zeros((len(targets), len(cols)))
    for ti, c, wt in entries:
        mat[ti, remap[c]] += wt  # += : day 365 appears twice in windows over day 366 of non-leap years
    return np.asarray(cols, dtype=np.int64)[order], mat


def weighted_quantile(data: np.ndarray, weights: np.ndarray, q: float) -> np.ndarray:
    """xarray's weighted quantile (type 7 on Kish's effective sample size, NaN skipped) along axis 0, vectorised."""
    data = np.asarray(data, dtype=np.float64)
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64).reshape(-1, *([1] * (data.ndim - 1))), data.shape)
    w = np.where(np.isnan(data), 0.0, w)
    order = np.argsort(data, axis=0)  # NaN last
    d = np.take_along_axis(data, order, axis=0)
    w = np.take_along_axis(w, order, axis=0)
    total = w.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        nw = total**2 / (w**2).sum(0)
        cum = np.concatenate([np.zeros((1, *d.shape[1:])), np.cumsum(w / total, axis=0)])
        h = (nw - 1) * q + 1
        u = np.maximum((h - 1) / nw, np.minimum(h / nw, cum))
        v = u * nw - h + 1
        dw = np.diff(v, axis=0)
        out = np.where(dw != 0, d * dw, 0.0).sum(0)
    return np.where(total > 0, out, np.nan)


def compute_climatology(
    obs: xr.Dataset, *, hours: Sequence[int] | None = None, years: Sequence[int] | None = None, window: int = 61
) -> xr.Dataset:
    """WB2's climatology ``(hour, dayofyear 1 ... 366, [level], latitude, longitude)`` of an in-memory dataset.

    The whole-year version of what :class:`ObsClimatology` computes for the valid times of an evaluation (the
    module docstring gives the definition); for small data and tests. Variables need a ``time`` dimension.
    """
    times = pd.DatetimeIndex(obs["time"].values)
    hours = sorted(set(times.hour.tolist())) if hours is None else list(hours)
    years = sorted(set(times.year.tolist())) if years is None else list(years)
    targets = [(d, h) for h in hours for d in range(1, 367)]
    cols, mat = window_plan(times, targets, years, window)
    out = {}
    for name, da in obs.data_vars.items():
        if "time" not in da.dims:
            continue
        da = da.transpose("time", ...)
        x = da.values[cols].reshape(len(cols), -1).astype(np.float64)
        present = np.isfinite(x)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (mat @ np.where(present, x, 0.0)) / (mat @ present)
        shape = (len(hours), 366, *da.shape[1:])
        out[name] = (("hour", "dayofyear", *da.dims[1:]), mean.reshape(shape).astype(da.dtype))
    coords = {"hour": hours, "dayofyear": np.arange(1, 367)}
    coords.update({d: obs[d].values for d in obs.dims if d != "time" and d in obs.coords})
    return xr.Dataset(out, coords=coords)


class LRU:
    """A small LRU map from keys to arrays."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.data: OrderedDict = OrderedDict()

    def get(self, key):  # noqa: ANN001, ANN201
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        return None

    def put(self, key, value) -> None:  # noqa: ANN001
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.capacity:
            self.data.popitem(last=False)

    def clear(self) -> None:
        self.data.clear()


class ZarrClimatology:
    """A WB2 climatology store ``(hour, dayofyear, [level], latitude, longitude)``, read lazily per channel group: the
    one reader of WB2 climatologies (the evaluation's, and :meth:`at` for a metric's climatology argument)."""

    kind = "zarr"

    def __init__(self, source: str | Path | xr.Dataset, lat: np.ndarray, lon: np.ndarray) -> None:
        self.where = f"the climatology {source}" if not isinstance(source, xr.Dataset) else "the climatology"
        ds = open_store(source, "climatology")
        for dim in ("hour", "dayofyear", "latitude", "longitude"):
            if dim not in ds.dims:
                raise ValueError(
                    f"{self.where} has no {dim!r} dimension (dims {dict(ds.sizes)}); a WB2 climatology is (hour, dayofyear, ...)"
                )
        ds = ascending_latitude(ds, self.where)
        self.ds = align_grid(ds, lat, lon, self.where, subset=True)
        self.hours = {int(h): i for i, h in enumerate(self.ds["hour"].values)}
        self.days = {int(d): i for i, d in enumerate(self.ds["dayofyear"].values)}
        self.has_seeps = SEEPS_THRESHOLD in self.ds and SEEPS_DRY_FRACTION in self.ds
        self._p1: np.ndarray | None = None
        self._plan: SourcePlan | None = None
        self._cache = LRU(64)

    def check(self, channels: Sequence[Channel], targets: Sequence[Target]) -> None:
        """Raise unless every channel's variable and level and every (dayofyear, hour) is in the store."""
        for ch in channels:
            if ch.variable not in self.ds:
                raise ValueError(
                    f"{self.where} lacks the variable {ch.variable!r} (needed for the ACC and the climatology baseline); "
                    f"it has {sorted(self.ds.data_vars)}"
                )
            if ch.level is not None:
                da = self.ds[ch.variable]
                if "level" not in da.dims or ch.level not in set(da["level"].values.tolist()):
                    raise ValueError(
                        f"{self.where}: {ch.variable!r} has no level {ch.level} "
                        f"(levels {da['level'].values.tolist() if 'level' in da.dims else 'none'})"
                    )
        missing = sorted({(d, h) for d, h in targets if d not in self.days or h not in self.hours})
        if missing:
            shown = ", ".join(f"day {d} hour {h:02d}" for d, h in missing[:10])
            raise ValueError(
                f"{self.where} lacks {len(missing)} (dayofyear, hour) pairs of the valid times: {shown}"
                f"{' ...' if len(missing) > 10 else ''} (it has days {min(self.days)} ... {max(self.days)}, hours {sorted(self.hours)})"
            )

    def at(self, channels: Sequence[Channel], valid_times: np.ndarray) -> np.ndarray:
        """The climatology ``(*valid_times.shape, channel, lat, lon)`` of ``channels`` at the valid times'
        (dayofyear, hour), on the grid given: the ``climatology`` argument of :class:`~fcn3_lightning.metrics.ACC`
        outside an evaluation (it starts a channel group of its own: not for use inside one)."""
        targets = targets_of(valid_times)
        self.check(channels, targets)
        self.begin_group(channels, [targets])
        out = self.fields(targets)
        return out.reshape(*np.shape(valid_times), *out.shape[1:])

    def begin_group(self, channels: Sequence[Channel], schedule: Sequence[Sequence[Target]] = (), read_obs: ReadFn | None = None) -> None:
        """Start a channel group; ``schedule``: the targets of each block, in order (sizes the cache)."""
        self._plan = SourcePlan(self.ds, channels, self.where, derive=False)
        per_block = max((len(set(s)) for s in schedule), default=8)
        self._cache = LRU(2 * per_block + 8)

    def fields(self, targets: Sequence[Target]) -> np.ndarray:
        """``(len(targets), channel, lat, lon)`` of the current group."""
        assert self._plan is not None
        missing = sorted({t for t in targets if self._cache.get(t) is None})
        if missing:
            hi = np.array(sorted({self.hours[h] for _, h in missing}))
            di = np.array(sorted({self.days[d] for d, _ in missing}))
            arr = self._plan.read({"hour": hi, "dayofyear": di}, ("hour", "dayofyear"))
            hpos = {int(h): i for i, h in enumerate(hi)}
            dpos = {int(d): i for i, d in enumerate(di)}
            for d, h in missing:
                self._cache.put((d, h), arr[hpos[self.hours[h]], dpos[self.days[d]]])
        return np.stack([self._cache.get(t) for t in targets])

    def seeps_threshold(self, targets: Sequence[Target]) -> np.ndarray:
        """``(len(targets), lat, lon)`` wet thresholds (m) at the valid times."""
        da = self.ds[SEEPS_THRESHOLD].transpose("hour", "dayofyear", "latitude", "longitude")
        uniq = sorted(set(targets))
        hi = np.array(sorted({self.hours[h] for _, h in uniq}))
        di = np.array(sorted({self.days[d] for d, _ in uniq}))
        arr = da.isel(hour=hi, dayofyear=di).values
        hpos = {int(h): i for i, h in enumerate(hi)}
        dpos = {int(d): i for i, d in enumerate(di)}
        return np.stack([arr[hpos[self.hours[h]], dpos[self.days[d]]] for d, h in targets])

    def p1(self) -> np.ndarray:
        """The dry fraction averaged over all hours and days of the store (float32, as WB2's mean of float32)."""
        if self._p1 is None:
            da = self.ds[SEEPS_DRY_FRACTION].transpose("hour", "dayofyear", "latitude", "longitude")
            total = np.zeros(da.shape[2:])
            for i in range(da.shape[0]):  # one hour at a time: bounded memory
                total += da.isel(hour=i).values.astype(np.float64).sum(0)
            self._p1 = (total / (da.shape[0] * da.shape[1])).astype(np.float32)
        return self._p1


class ObsClimatology:
    """WB2's climatology computed from the truth (module docstring), for the (dayofyear, hour) pairs evaluated.

    Targets are computed in batches, in the order the evaluation needs them, with one pass over the truth times
    of the batch's windows; each batch holds at most ``batch_mb`` of float64 accumulators.
    """

    kind = "computed"

    def __init__(
        self, obs_times: np.ndarray, years: Sequence[int], grid: tuple[int, int], *, window: int = 61, batch_mb: float = 256.0
    ) -> None:
        self.times = pd.DatetimeIndex(obs_times)
        self.years = list(years)
        self.grid = grid
        self.read_obs: ReadFn | None = None  # truth fields (n, channel, lat, lon) of the current group at time indices
        self.window = window
        self.batch_mb = batch_mb
        self.where = "the climatology computed from the truth"
        self.has_seeps = False
        self._shape: tuple[int, int, int] = (0, *grid)
        self._order: list[Target] = []
        self._cache = LRU(64)
        self._seeps_cache: dict[Target, np.ndarray] = {}
        self._p1: np.ndarray | None = None
        self._precip_reader: Callable[[np.ndarray], np.ndarray] | None = None

    def check(self, channels: Sequence[Channel], targets: Sequence[Target]) -> None:
        cols, mat = window_plan(self.times, sorted(set(targets)), self.years, self.window)
        empty = [t for t, row in zip(sorted(set(targets)), mat, strict=True) if not row.any()]
        if empty:
            raise ValueError(
                f"{self.where}: no truth in the {self.window}-day windows of {len(empty)} (dayofyear, hour) pairs, e.g. day {empty[0][0]} "
                f"hour {empty[0][1]:02d} (years {self.years}); pass --climatology"
            )

    def enable_seeps(self, precip_reader: Callable[[np.ndarray], np.ndarray]) -> None:
        """Compute the SEEPS statistics of total_precipitation_24hr too (``precip_reader``: (n, lat, lon) at time indices)."""
        self.has_seeps = True
        self._precip_reader = precip_reader

    def begin_group(self, channels: Sequence[Channel], schedule: Sequence[Sequence[Target]] = (), read_obs: ReadFn | None = None) -> None:
        """Start a channel group: ``read_obs`` reads its truth fields at time indices."""
        if read_obs is None:
            raise ValueError("a climatology computed from the truth needs the truth reader of the channel group")
        self.read_obs = read_obs
        self._shape = (len(channels), *self.grid)
        n_fields = int(np.prod(self._shape))
        self._order = list(dict.fromkeys(t for s in schedule for t in s))
        per_block = max((len(set(s)) for s in schedule), default=8)
        self._batch = max(1, min(len(self._order) or 1, int(self.batch_mb * 2**20 // max(1, 16 * n_fields))))
        self._cache = LRU(max(2 * per_block, 2 * self._batch) + 8)

    def _compute(self, batch: list[Target]) -> None:
        cols, mat = window_plan(self.times, batch, self.years, self.window)
        assert self.read_obs is not None
        n_fields = int(np.prod(self._shape))
        # float64 accumulators; the weight sums stay one column (the same for every point) until a point is missing.
        # Lean, as a batch holds every valid time of a forecast when it is scored while it is made.
        sums: np.ndarray | None = None
        wsum = np.zeros((len(batch), 1))
        dtype = np.dtype(np.float32)
        step = max(1, int(64 * 2**20 // max(1, 4 * n_fields)))  # ~64 MB of truth per read
        for s in range(0, len(cols), step):
            raw = self.read_obs(cols[s : s + step])
            dtype = raw.dtype
            x = raw.reshape(raw.shape[0], -1).astype(np.float64)
            del raw
            ok = np.isfinite(x)
            m = mat[:, s : s + step]
            if ok.all():
                part = m @ x
                wsum += m.sum(1, keepdims=True)
            else:
                part = m @ np.where(ok, x, 0.0)
                if wsum.shape[1] == 1:
                    wsum = np.repeat(wsum, n_fields, axis=1)
                wsum += m @ ok
            del x, ok
            if sums is None:
                sums = part
            else:
                sums += part
            del part
        if sums is None:
            sums = np.zeros((len(batch), n_fields))
        with np.errstate(invalid="ignore", divide="ignore"):
            sums /= wsum
            mean = sums.astype(dtype)
        del sums
        for t, row in zip(batch, mean, strict=True):
            self._cache.put(t, row.reshape(self._shape))

    def fields(self, targets: Sequence[Target]) -> np.ndarray:
        for t in targets:
            if self._cache.get(t) is None:
                start = self._order.index(t) if t in self._order else None
                batch = self._order[start : start + self._batch] if start is not None else [t]
                batch = [b for b in batch if self._cache.get(b) is None] or [t]
                if t not in batch:
                    batch.append(t)
                self._compute(batch)
        return np.stack([self._cache.get(t) for t in targets])

    def seeps_threshold(self, targets: Sequence[Target]) -> np.ndarray:
        assert self._precip_reader is not None
        missing = sorted({t for t in targets if t not in self._seeps_cache})
        if missing:
            cols, mat = window_plan(self.times, missing, self.years, self.window)
            x = self._precip_reader(cols).astype(np.float64)  # (n, lat, lon): one 2-D variable
            wet = np.where(x > DRY_THRESHOLD_M, x, np.nan)
            for t, row in zip(missing, mat, strict=True):
                use = row > 0
                self._seeps_cache[t] = weighted_quantile(wet[use], row[use], 2.0 / 3.0).astype(np.float32)
        return np.stack([self._seeps_cache[t] for t in targets])

    def dry_fraction(self, targets: Sequence[Target]) -> np.ndarray:
        """The windowed dry fraction at targets (not used by the scores; for the tests and the record)."""
        assert self._precip_reader is not None
        cols, mat = window_plan(self.times, list(targets), self.years, self.window)
        x = self._precip_reader(cols).astype(np.float64)
        ok = np.isfinite(x)
        dry = np.where(ok, x < DRY_THRESHOLD_M, 0.0).reshape(len(cols), -1)
        return ((mat @ dry) / (mat @ ok.reshape(len(cols), -1))).reshape(len(targets), *x.shape[1:])

    def p1(self) -> np.ndarray:
        if self._p1 is None:
            assert self._precip_reader is not None
            t = self.times
            hours = sorted(set(t.hour.tolist()))
            keep = np.flatnonzero(t.year.isin(self.years) & t.hour.isin(hours) & (t.minute == 0))
            doy = t.day_of_year.to_numpy()[keep]
            leap = np.array([calendar.isleap(y) for y in t.year.to_numpy()[keep]], dtype=bool)
            weight = np.where(~leap & (doy == 365), 2.0, 1.0)  # day 366 of non-leap years = day 365 again
            total = None
            count = None
            for s in range(0, keep.size, 256):
                x = self._precip_reader(keep[s : s + 256]).astype(np.float64)
                wt = weight[s : s + 256, None, None]
                ok = np.isfinite(x)
                dry = np.where(ok, (x < DRY_THRESHOLD_M) * wt, 0.0).sum(0)
                n = (ok * wt).sum(0)
                total = dry if total is None else total + dry
                count = n if count is None else count + n
            with np.errstate(invalid="ignore", divide="ignore"):
                self._p1 = (total / count).astype(np.float32)
        return self._p1
