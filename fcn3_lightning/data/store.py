"""Reading ERA5 in the WeatherBench2 / ARCO Zarr layout, lazily, for any channel list.

One Zarr store holds one array per variable with WB2 long names and dims ``(time, [level],
latitude, longitude)``. :class:`WB2Store` maps a channel list onto those arrays and reads the
requested times and an optional latitude/longitude tile straight from Zarr (xarray is used for
the metadata only), returning float32 arrays in channel order with latitude 90N first.

A store may also hold several equally plausible analyses of the same times (e.g. the ERA5 EDA members):
an ensemble-member dimension ``number`` after ``time``, dims ``(time, number, [level,] latitude,
longitude)`` (what :func:`fcn3_lightning.data.era5_sample.convert_cfgrib_to_wb2` writes with
``member=None``). Then :attr:`WB2Store.members` is their count and every :meth:`WB2Store.read` names
the member it reads; a reader that needs one state per time (predict's initial conditions) refuses
such a store with :meth:`WB2Store.require_single_member` rather than pick a member silently.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
import zarr
from zarr.core.buffer.cpu import NDBuffer

from fcn3_lightning.channels import parse_channel
from fcn3_lightning.paths import StoreLocation, open_zarr, store_location

#: variables of a remote store read at once (each one a few chunk requests, themselves concurrent in zarr): a sample's
#: reads then overlap instead of paying the round-trip time one variable after another
REMOTE_READ_THREADS = 16

#: the ensemble-member dimension of a store holding several analyses of the same times (cfgrib's name)
MEMBER_DIM = "number"


@dataclass(frozen=True)
class _VariableRead:
    """How to read one store variable: its array, which levels, and where they go in the output."""

    name: str
    array: zarr.Array
    has_level: bool
    level_index: tuple[int, ...]  # positions in the store's level axis
    out_index: tuple[int, ...]  # positions in the output channel axis

    @property
    def reverse_levels(self) -> bool:
        """Levels requested in descending store order (e.g. a store sorted 1000 .. 50 hPa)."""
        return len(self.level_index) > 1 and self.level_index[1] < self.level_index[0]


class WB2Store:
    """A WB2-style Zarr store seen through a channel list.

    Args:
        path: the Zarr store: a local path or an fsspec URL (``https://``, ``gs://``, ``s3://``; see :mod:`fcn3_lightning.paths`).
        channels: channel names (``z500``, ``t2m``, ...; see :mod:`fcn3_lightning.channels`).
        step_hours: the model step; the store's cadence must divide it (hourly and 6-hourly stores
            both serve a 6 h model). None: the store's cadence (for readers of single states, e.g. initial conditions).
        storage_options: fsspec options for a URL (default: anonymous for gs:// and s3://, a time-out for http(s)://).

    Attributes:
        members: the size of the store's ensemble-member dimension ``number``, or None for a store
            without one (one analysis per time).
        member_numbers: the ``number`` coordinate's values (``(members,)`` int64), or None.
    """

    def __init__(
        self,
        path: str | Path | StoreLocation,
        channels: Sequence[str],
        *,
        step_hours: int | None = 6,
        storage_options: dict | None = None,
    ):
        self.location = store_location(path, "data store", storage_options)
        # a local store is a Path (as callers expect), a remote one its URL
        self.path: Path | str = self.location.path if self.location.remote else Path(self.location.path)
        ds = open_zarr(self.location, what="data store")
        self.dataset = ds
        for coord in ("time", "latitude", "longitude"):
            if coord not in ds.coords:
                raise ValueError(f"{self.path}: coordinate {coord!r} missing (WB2 layout has time, [level], latitude, longitude)")
        self.channels = tuple(channels)
        self.step_hours = None if step_hours is None else int(step_hours)

        self.times = ds["time"].values.astype("datetime64[ns]")
        if self.times.size < 2:
            raise ValueError(f"{self.path}: the time axis has {self.times.size} entries; need at least 2")
        steps = np.diff(self.times)
        if not np.all(steps == steps[0]):
            bad = int(np.argmax(steps != steps[0]))
            raise ValueError(
                f"{self.path}: non-uniform time axis: step {steps[bad] / np.timedelta64(1, 'h'):g} h between "
                f"{self.times[bad]} and {self.times[bad + 1]} differs from {steps[0] / np.timedelta64(1, 'h'):g} h"
            )
        cadence_h = steps[0] / np.timedelta64(1, "h")
        if step_hours is None:  # only single states are read (initial conditions): any cadence serves
            self.step_hours = int(cadence_h) if cadence_h == int(cadence_h) else 1
        if cadence_h <= 0 or self.step_hours % cadence_h != 0:
            raise ValueError(f"{self.path}: store cadence {cadence_h:g} h does not divide the model step of {self.step_hours} h")
        self.cadence_hours = float(cadence_h)
        self.stride = int(round(self.step_hours / cadence_h))

        lat = ds["latitude"].values.astype(np.float64)
        if not (np.all(np.diff(lat) > 0) or np.all(np.diff(lat) < 0)):
            raise ValueError(f"{self.path}: latitude is not strictly monotonic")
        self.flip_lat = bool(lat[0] < lat[-1])  # the model wants 90N first
        self.lat = lat[::-1].copy() if self.flip_lat else lat
        self.lon = ds["longitude"].values.astype(np.float64)
        if not np.all(np.diff(self.lon) > 0):
            raise ValueError(f"{self.path}: longitude must be strictly ascending")

        self.members: int | None = int(ds.sizes[MEMBER_DIM]) if MEMBER_DIM in ds.dims else None
        self.member_numbers: np.ndarray | None = None
        if self.members is not None:
            if self.members == 0:
                raise ValueError(f"{self.path}: the ensemble-member dimension {MEMBER_DIM!r} is empty")
            numbers = ds[MEMBER_DIM].values if MEMBER_DIM in ds.coords else np.arange(self.members)
            self.member_numbers = np.asarray(numbers).astype(np.int64)

        self._open_arrays()
        self._reads = self._plan(ds)

    def _open_arrays(self) -> None:
        """The Zarr group read from, per process: a remote store's filesystem (its HTTP session, its event loop) does not
        survive a fork, so a data-loader worker reopens it on its first read."""
        self._pid = os.getpid()
        self._pool: ThreadPoolExecutor | None = None
        store = self.location.zarr_store() if self.location.remote else str(self.path)
        self._group = zarr.open_group(store, mode="r")

    def _reopen_after_fork(self) -> None:
        self._open_arrays()
        self._reads = [_VariableRead(r.name, self._group[r.name], r.has_level, r.level_index, r.out_index) for r in self._reads]

    def __getstate__(self) -> dict:
        # spawned loader workers: the group and the pool are reopened on arrival
        state = dict(self.__dict__)
        state["_pool"], state["_pid"] = None, -1
        return state

    @property
    def shape(self) -> tuple[int, int]:
        return (self.lat.size, self.lon.size)

    def _plan(self, ds: xr.Dataset) -> list[_VariableRead]:
        by_var: dict[str, list[tuple[int, int | None]]] = {}
        for i, name in enumerate(self.channels):
            ch = parse_channel(name)
            if ch.long_name not in ds.data_vars:
                raise ValueError(
                    f"{self.path}: variable {ch.long_name!r} (channel {name}) not in the store; "
                    f"available variables: {sorted(map(str, ds.data_vars))}"
                )
            by_var.setdefault(ch.long_name, []).append((i, ch.level))
        reads = []
        for var, entries in by_var.items():
            dims = ds[var].dims
            has_level = "level" in dims
            want = ("time", *((MEMBER_DIM,) if self.members else ()), *(("level",) if has_level else ()), "latitude", "longitude")
            if tuple(dims) != want:
                hint = f" (the store has an ensemble-member dimension {MEMBER_DIM!r}: every channel's variable needs it)"
                hint = hint if self.members else ""
                raise ValueError(f"{self.path}: variable {var!r} has dims {dims}, expected {want}{hint}")
            levels: list[int] = []
            if has_level:
                store_levels = [int(v) for v in ds["level"].values]
                for i, lev in entries:
                    if lev is None:
                        raise ValueError(f"{self.path}: variable {var!r} has levels {store_levels}; channel {self.channels[i]} names none")
                    if lev not in store_levels:
                        raise ValueError(
                            f"{self.path}: level {lev} hPa of {var!r} (channel {self.channels[i]}) not in the store; levels: {store_levels}"
                        )
                    levels.append(store_levels.index(lev))
            else:
                for i, lev in entries:
                    if lev is not None:
                        raise ValueError(f"{self.path}: variable {var!r} has no level axis but channel {self.channels[i]} names {lev} hPa")
            reads.append(_VariableRead(var, self._group[var], has_level, tuple(levels), tuple(i for i, _ in entries)))
        return reads

    def require_single_member(self, purpose: str) -> None:
        """Refuse a store with an ensemble-member dimension for ``purpose`` (a reader of one state per time)."""
        if self.members is not None:
            raise ValueError(
                f"{self.path} has an ensemble-member dimension {MEMBER_DIM!r} ({self.members} members: "
                f"{self.member_numbers.tolist()}); {purpose} needs one state per time and will not pick a member for you. "
                "Convert one member into its own store: "
                "fcn3_lightning.data.era5_sample.convert_cfgrib_to_wb2(src, dst, member=0) "
                "(python -m fcn3_lightning convert-era5 DST --member 0)"
            )

    def time_index(self, when: str | np.datetime64) -> int:
        """Index of an exact store time; a time outside the store raises, naming the store's span."""
        t = np.datetime64(when, "ns")
        if t < self.times[0] or t > self.times[-1]:
            raise ValueError(f"{self.path}: time {t} is outside the store's time axis {self.times[0]} .. {self.times[-1]}")
        i = int(np.searchsorted(self.times, t))
        if self.times[i] != t:
            raise ValueError(f"{self.path}: time {t} is not on the store's {self.cadence_hours:g}-hourly time axis")
        return i

    def index_range(self, start: str | np.datetime64, end: str | np.datetime64) -> tuple[int, int]:
        """Store indices [i0, i1] of the times within ``start .. end`` (inclusive); both ends must lie in the store."""
        t0, t1 = np.datetime64(start, "ns"), np.datetime64(end, "ns")
        if t1 < t0:
            raise ValueError(f"date range {start} .. {end} is empty")
        if t0 < self.times[0] or t1 > self.times[-1]:
            raise ValueError(
                f"{self.path}: requested dates {start} .. {end} are outside the store's time axis {self.times[0]} .. {self.times[-1]}"
            )
        return int(np.searchsorted(self.times, t0)), int(np.searchsorted(self.times, t1, side="right")) - 1

    def read(
        self,
        time_index: Sequence[int],
        lat: slice = slice(None),
        lon: slice = slice(None),
        *,
        member: int | None = None,
        check_finite: bool = True,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Read ``(T, C, nlat_tile, nlon_tile)`` float32, latitude 90N first; ``lat``/``lon`` index that N-to-S grid.

        ``member``: the position (0 .. members - 1) on the ``number`` axis of a store with members, where it is
        required; a store without members takes None only.
        """
        t_idx = np.asarray(time_index, dtype=np.int64)
        m_sel = self._member_selection(member)
        nlat = self.lat.size
        lat0, lat1, _ = lat.indices(nlat)
        lon0, lon1, _ = lon.indices(self.lon.size)
        store_lat = slice(nlat - lat1, nlat - lat0) if self.flip_lat else slice(lat0, lat1)
        shape = (t_idx.size, len(self.channels), lat1 - lat0, lon1 - lon0)
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32:
            raise ValueError(f"out has shape {out.shape} {out.dtype}, expected {shape} float32")
        t_sel = _as_slice(t_idx)
        if self.location.remote and self._pid != os.getpid():
            self._reopen_after_fork()

        def one(r: _VariableRead) -> None:
            lev_sel, dest = _level_plan(r) if r.has_level else (None, _as_slice(np.asarray(r.out_index)))
            sel = (t_sel, *m_sel, *(() if lev_sel is None else (lev_sel,)), store_lat, slice(lon0, lon1))
            # an integer member index drops the member axis, as a slice would not: it counts as a basic selection
            if isinstance(dest, slice) and all(isinstance(x, slice | int) for x in sel):
                # decompress straight into the output (flipped and gathered by the view): no extra copy
                view = out[:, dest] if r.has_level else out[:, dest.start]
                if r.reverse_levels:
                    view = view[:, ::-1]
                if self.flip_lat:
                    view = view[..., ::-1, :]
                r.array.get_basic_selection(sel, out=NDBuffer.from_numpy_array(view))
                return
            block = np.asarray(r.array.get_orthogonal_selection(sel), dtype=np.float32)
            if not r.has_level:
                block = block[:, None]
            if self.flip_lat:
                block = block[..., ::-1, :]
            out[:, list(r.out_index)] = block

        if self.location.remote and len(self._reads) > 1:
            # a remote store: every variable's requests in flight at once, so latency is paid once per sample, not per variable
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=min(REMOTE_READ_THREADS, len(self._reads)), thread_name_prefix="wb2-read")
            try:
                list(self._pool.map(one, self._reads))
            except Exception as e:  # noqa: BLE001 - a network error mid-run: name the store and the cause in one line
                raise ValueError(self.location.describe(e)) from e
        else:
            for r in self._reads:
                one(r)
        # a sum is a cheap screen (NaN/Inf propagate); only a non-finite sum pays for the element-wise search
        if check_finite and not np.isfinite(np.add.reduce(out, axis=None)) and not np.isfinite(out).all():
            t, c = np.argwhere(~np.isfinite(out))[0][:2]
            which = "" if member is None else f" of member {member} ({MEMBER_DIM}={self.member_numbers[member]})"
            raise ValueError(f"{self.path}: NaN/Inf in channel {self.channels[c]} at time {self.times[t_idx[t]]}{which}")
        return out

    def _member_selection(self, member: int | None) -> tuple[int, ...]:
        """The member axis's part of a Zarr selection: ``(member,)`` on a store with members, ``()`` without."""
        if self.members is None:
            if member is not None:
                raise ValueError(f"{self.path} has no ensemble-member dimension {MEMBER_DIM!r}; read it with member=None, not {member}")
            return ()
        if member is None:
            raise ValueError(
                f"{self.path} has an ensemble-member dimension {MEMBER_DIM!r} ({self.members} members): say which member to read "
                "(member=0 .. members - 1), or convert one member into its own store: convert_cfgrib_to_wb2(src, dst, member=0)"
            )
        if isinstance(member, bool) or not isinstance(member, int | np.integer) or not 0 <= member < self.members:
            raise ValueError(f"{self.path}: member {member!r} is not a position on its {MEMBER_DIM!r} axis (0 .. {self.members - 1})")
        return (int(member),)

    def read_static(self, variable: str, lat: slice = slice(None), lon: slice = slice(None)) -> np.ndarray:
        """A static (latitude, longitude) variable, e.g. ``land_sea_mask``, latitude 90N first, float64."""
        if variable not in self.dataset.data_vars:
            raise ValueError(
                f"{self.path}: static variable {variable!r} not in the store; variables: {sorted(map(str, self.dataset.data_vars))}"
            )
        da = self.dataset[variable]
        if set(da.dims) != {"latitude", "longitude"}:
            raise ValueError(f"{self.path}: static variable {variable!r} has dims {da.dims}, expected (latitude, longitude)")
        values = da.transpose("latitude", "longitude").values.astype(np.float64)
        if self.flip_lat:
            values = values[::-1]
        return np.ascontiguousarray(values[lat, lon])


def _as_slice(idx: np.ndarray) -> slice | list[int]:
    """An arithmetic progression of indices as a slice (Zarr reads slices much faster), else a list."""
    if idx.size == 0:
        return []
    step = int(idx[1] - idx[0]) if idx.size > 1 else 1
    if step > 0 and np.all(np.diff(idx) == step):
        return slice(int(idx[0]), int(idx[-1]) + 1, step)
    return idx.tolist()


def _level_plan(r: _VariableRead) -> tuple[slice | list[int], slice | list[int]]:
    """(store level selection, output channel destination) of a level variable, as slices where possible."""
    lev = np.asarray(r.level_index)
    if r.reverse_levels:
        lev = lev[::-1]
    lev_sel = _as_slice(lev)
    dest = _as_slice(np.asarray(r.out_index))
    if not (isinstance(lev_sel, slice) and lev_sel.step == 1 and isinstance(dest, slice) and dest.step == 1):
        return r.level_index and list(r.level_index), list(r.out_index)
    return lev_sel, dest
