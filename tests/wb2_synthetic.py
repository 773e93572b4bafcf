"""Build small synthetic WeatherBench2-style Zarr stores for tests.

Every value encodes where it came from, value = 1000 * variable_id + level / 10 + hours / 1000
+ lat / 1e5 + lon / 1e7 (roughly), so a test can tell a wrong variable, level, time, latitude or
longitude from the number alone, and computes what a read must return independently of the reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from fcn3_lightning.channels import parse_channel


def encode(var_id: int, level: int, hours: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(T, nlat, nlon) values; float64 then cast by the caller."""
    return 1000.0 * var_id + level / 10.0 + hours[:, None, None] / 1000.0 + lat[None, :, None] / 1e5 + lon[None, None, :] / 1e7


def make_store(
    path: Path,
    channels: Sequence[str],
    *,
    start: str = "2000-01-01",
    n_times: int = 20,
    cadence_hours: int = 6,
    nlat: int = 9,
    nlon: int = 16,
    ascending_lat: bool = False,
    statics: bool = True,
    times: np.ndarray | None = None,
    descending_levels: bool = False,
) -> tuple[Path, dict[str, int]]:
    """Write a WB2-layout store holding the variables/levels ``channels`` need; returns (path, var ids)."""
    if times is None:
        times = np.datetime64(start, "ns") + np.arange(n_times) * np.timedelta64(cadence_hours, "h")
    hours = (times - times[0]) / np.timedelta64(1, "h")
    lat = np.linspace(90, -90, nlat)
    if ascending_lat:
        lat = lat[::-1]
    lon = np.arange(nlon) * 360.0 / nlon
    parsed = [parse_channel(c) for c in channels]
    var_ids = {name: i + 1 for i, name in enumerate(dict.fromkeys(c.long_name for c in parsed))}
    levels = sorted({c.level for c in parsed if c.level is not None}, reverse=descending_levels)
    data_vars = {}
    for long_name, vid in var_ids.items():
        chans = [c for c in parsed if c.long_name == long_name]
        if chans[0].level is None:
            data_vars[long_name] = (("time", "latitude", "longitude"), encode(vid, 0, hours, lat, lon).astype(np.float32))
        else:
            arr = np.stack([encode(vid, lev, hours, lat, lon) for lev in levels], axis=1).astype(np.float32)
            data_vars[long_name] = (("time", "level", "latitude", "longitude"), arr)
    coords = {"time": times, "latitude": lat, "longitude": lon}
    if levels:
        coords["level"] = np.array(levels, dtype=np.int64)
    if statics:
        lat2 = np.broadcast_to(lat[:, None], (nlat, nlon))
        data_vars["geopotential_at_surface"] = (("latitude", "longitude"), (np.abs(lat2) * 100.0).astype(np.float32))
        data_vars["land_sea_mask"] = (("latitude", "longitude"), np.clip((lat2 + 30) / 60, 0, 1).astype(np.float32))
    ds = xr.Dataset(data_vars, coords=coords)
    ds.to_zarr(path, zarr_format=2, consolidated=True)
    return path, var_ids


def expected(channels: Sequence[str], var_ids: dict[str, int], hours: np.ndarray, nlat: int, nlon: int) -> np.ndarray:
    """What a reader must return for ``channels`` at ``hours`` (latitude 90N first): (T, C, nlat, nlon) float32."""
    lat = np.linspace(90, -90, nlat)
    lon = np.arange(nlon) * 360.0 / nlon
    out = []
    for c in channels:
        ch = parse_channel(c)
        out.append(encode(var_ids[ch.long_name], ch.level or 0, np.asarray(hours, dtype=np.float64), lat, lon).astype(np.float32))
    return np.stack(out, axis=1)
