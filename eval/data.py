"""Opening and checking the stores, and reading blocks of fields out of them.

Stores are opened lazily with xarray (``chunks=None``: lazily indexed backend arrays; nothing is read until a
block is indexed, and then only the chunks it touches); dask is not needed. Latitude is made ascending as WB2
does, without reading anything (a reversed slice).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from fcn3_lightning.eval.derived import wind_of, wind_speed

from fcn3_lightning.paths import StoreLocation, open_zarr, store_location

Index = np.ndarray | slice

# WB2's by-init forecast layout: the names of the initialisation, member and lead time dimensions
INIT_DIMS = ("time", "init_time")
MEMBER_DIMS = ("number", "member", "realization")
LEAD_DIM = "prediction_timedelta"


def open_store(source: str | Path | StoreLocation | xr.Dataset, what: str) -> xr.Dataset:
    """A Zarr store (local, or a URL read in place: see :mod:`fcn3_lightning.paths`) or a local netCDF file, opened lazily;
    datasets pass through."""
    if isinstance(source, xr.Dataset):
        return source
    location = store_location(source, f"the {what}")
    path = Path(location.path)
    if not location.remote and path.suffix in (".nc", ".nc4", ".h5"):
        if not path.exists():
            raise FileNotFoundError(f"the {what} {path} does not exist")
        try:
            return xr.open_dataset(path, decode_timedelta=True)
        except Exception as err:  # noqa: BLE001 - any reader error: name the file
            raise ValueError(f"cannot open the {what} {path}: {err}") from err
    return open_zarr(location, what=what, chunks=None)


def ascending_latitude(ds: xr.Dataset, where: str) -> xr.Dataset:
    """Flip a descending latitude axis (lazily), as WB2 does before computing anything."""
    if "latitude" not in ds.coords or "longitude" not in ds.coords:
        raise ValueError(f"{where} needs 'latitude' and 'longitude' coordinates (it has {sorted(ds.coords)})")
    lat = ds["latitude"].values
    if lat.size > 1 and lat[0] > lat[-1]:
        ds = ds.isel(latitude=slice(None, None, -1))
        lat = ds["latitude"].values
    if lat.size > 1 and not np.all(np.diff(lat) > 0):
        raise ValueError(f"{where}: latitude is not strictly monotonic")
    return ds


def align_grid(ds: xr.Dataset, lat: np.ndarray, lon: np.ndarray, where: str, *, subset: bool = False) -> xr.Dataset:
    """Check that ``ds`` is on the forecast grid (``subset``: contains it; then select it), naming the coordinate that differs."""
    for name, ref in (("latitude", np.asarray(lat, dtype=np.float64)), ("longitude", np.asarray(lon, dtype=np.float64))):
        v = ds[name].values.astype(np.float64)
        if v.shape == ref.shape and np.allclose(v, ref, rtol=0, atol=1e-6):
            continue
        if subset:
            idx = np.searchsorted(v, ref) if np.all(np.diff(v) > 0) else None
            if idx is not None:
                idx = np.clip(idx, 0, v.size - 1)
                near = np.where(
                    np.abs(v[np.clip(idx - 1, 0, v.size - 1)] - ref) < np.abs(v[idx] - ref), np.clip(idx - 1, 0, v.size - 1), idx
                )
                ok = np.abs(v[near] - ref) <= 1e-6
                if ok.all():
                    ds = ds.isel({name: near})
                    continue
                first = ref[np.argmin(ok)]
                raise ValueError(
                    f"the grids differ in {name}: {where} has no {name} {first:g} of the forecast grid ({v.size} points vs {ref.size})"
                )
        if v.shape != ref.shape:
            raise ValueError(
                f"the grids differ in {name}: {where} has {v.size} {name} points ({_span(v)}), the forecast {ref.size} ({_span(ref)})"
            )
        i = int(np.argmax(~np.isclose(v, ref, rtol=0, atol=1e-6)))
        raise ValueError(f"the grids differ in {name}: {where} has {name} {v[i]:g} at index {i} where the forecast has {ref[i]:g}")
    return ds


def _span(v: np.ndarray) -> str:
    return f"{v[0]:g} ... {v[-1]:g}" if v.size else "empty"


def level_value(x: object) -> int | float:
    """A level as a plain int when integral (500, not 500.0)."""
    f = float(x)  # type: ignore[arg-type]
    return int(f) if f.is_integer() else f


@dataclass(frozen=True)
class Channel:
    """One scored field: a WB2 variable name and its pressure level (None for 2-D variables)."""

    variable: str
    level: int | float | None = None

    @property
    def label(self) -> str:
        return self.variable if self.level is None else f"{self.variable}/{self.level:g}"


def as_index(ix: Index) -> Index:
    """Contiguous integer arrays as slices (faster Zarr reads); others unchanged."""
    if isinstance(ix, slice):
        return ix
    a = np.asarray(ix, dtype=np.int64)
    if a.size and np.all(np.diff(a) == 1):
        return slice(int(a[0]), int(a[-1]) + 1)
    return a


def index_size(ix: Index, n: int) -> int:
    return len(range(*ix.indices(n))) if isinstance(ix, slice) else int(np.asarray(ix).size)


class SourcePlan:
    """How one store provides a channel group: stored variables read into contiguous channel ranges, wind speeds
    derived from the group's components where the store lacks them.

    ``read(isel, dims)`` returns ``(*sizes of dims, channel, lat, lon)`` in the stores' dtype.
    """

    def __init__(self, ds: xr.Dataset, channels: Sequence[Channel], where: str, *, derive: bool = True) -> None:
        self.ds = ds
        self.where = where
        self.channels = list(channels)
        self.shape = (len(self.channels), ds.sizes["latitude"], ds.sizes["longitude"])
        pos = {c.label: i for i, c in enumerate(self.channels)}
        self.reads: list[tuple[str, np.ndarray | slice | None, int, int]] = []
        self.derived: list[tuple[int, int, int]] = []
        dtypes = []
        i = 0
        while i < len(self.channels):
            var = self.channels[i].variable
            j = i
            while j < len(self.channels) and self.channels[j].variable == var:
                j += 1
            chans = self.channels[i:j]
            if var in ds.data_vars:
                da = ds[var]
                levels = None
                if chans[0].level is not None:
                    if "level" not in da.dims:
                        raise ValueError(f"{where}: {var!r} has no level dimension, but levels {[c.level for c in chans]} are scored")
                    have = [level_value(x) for x in da["level"].values]
                    missing = [c.level for c in chans if c.level not in have]
                    if missing:
                        raise ValueError(f"{where}: {var!r} lacks the levels {missing} (it has {have})")
                    levels = as_index(np.array([have.index(c.level) for c in chans]))
                self.reads.append((var, levels, i, j - i))
                dtypes.append(da.dtype)
            else:
                w = wind_of(var)
                if not derive or w is None or var != w.speed:
                    raise ValueError(f"{where} lacks the variable {var!r} (it has {sorted(ds.data_vars)})")
                for c in chans:
                    u, v = Channel(w.u, c.level).label, Channel(w.v, c.level).label
                    if u not in pos or v not in pos:
                        raise ValueError(f"{where} lacks {c.label!r} and the components {u!r}, {v!r} to derive it from")
                    self.derived.append((pos[c.label], pos[u], pos[v]))
            i = j
        self.dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.float32)

    @property
    def n_fields(self) -> int:
        return int(np.prod(self.shape))

    def read(self, isel: dict[str, Index], dims: Sequence[str], pool: Executor | None = None) -> np.ndarray:
        sizes = [index_size(isel[d], self.ds.sizes[d]) if d in isel else self.ds.sizes[d] for d in dims]
        if len(self.reads) == 1 and not self.derived:  # one variable: the array as read is the block, no copy...
            var, levels, _, n = self.reads[0]
            arr = self._read_one(var, levels, isel, dims)
            # ...unless it is a view with a negative stride (a flipped latitude axis of an in-memory dataset), which torch refuses
            return np.ascontiguousarray(arr.reshape(*sizes, *self.shape))
        out = np.empty((*sizes, *self.shape), dtype=self.dtype)

        def one(read: tuple[str, np.ndarray | slice | None, int, int]) -> None:
            var, levels, start, n = read
            arr = self._read_one(var, levels, isel, dims)
            if levels is not None:
                out[..., start : start + n, :, :] = arr
            else:
                out[..., start, :, :] = arr

        if pool is not None and len(self.reads) > 1:
            list(pool.map(one, self.reads))
        else:
            for r in self.reads:
                one(r)
        for s, u, v in self.derived:
            wind_speed(out[..., u, :, :], out[..., v, :, :], out=out[..., s, :, :])
        return out

    def _read_one(self, var: str, levels: np.ndarray | slice | None, isel: dict[str, Index], dims: Sequence[str]) -> np.ndarray:
        da = self.ds[var]
        missing = [d for d in dims if d not in da.dims]
        if missing:
            raise ValueError(f"{self.where}: {var!r} lacks the dimension(s) {missing} (its dims {da.dims})")
        sel = {d: as_index(isel[d]) for d in dims if d in isel}
        order = list(dims)
        if levels is not None:
            sel["level"] = levels
            order.append("level")
        return np.asarray(da.isel(sel).transpose(*order, "latitude", "longitude").values, dtype=self.dtype)
