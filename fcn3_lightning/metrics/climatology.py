"""WeatherBench2 climatologies (``hour x dayofyear``) looked up at forecast valid times, for the ACC."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from fcn3_lightning.channels import parse_channel

Channel = str | tuple[str, float | None]


def _variable_level(channel: Channel) -> tuple[str, float | None]:
    if isinstance(channel, tuple):
        return channel
    info = parse_channel(channel)
    return info.long_name, info.level


class Climatology:
    """A WB2 climatology dataset with dims ``(hour, dayofyear, [level], latitude, longitude)``.

    Args:
        source: the dataset or the path of its Zarr store.
        channels: our channel names (``z500``, ``t2m``) or ``(long variable name, level or None)`` pairs.
        lat, lon: the grid of the forecasts; the climatology is reordered to it (and must contain it).
    """

    def __init__(self, source: xr.Dataset | str | Path, channels: Sequence[Channel], lat: np.ndarray, lon: np.ndarray) -> None:
        ds = source if isinstance(source, xr.Dataset) else xr.open_zarr(source)
        self.where = "the climatology" if isinstance(source, xr.Dataset) else str(source)
        for dim in ("hour", "dayofyear", "latitude", "longitude"):
            if dim not in ds.dims:
                raise ValueError(
                    f"{self.where} has no {dim!r} dimension (dims: {dict(ds.sizes)}); a WB2 climatology is (hour, dayofyear, ...)"
                )
        try:
            ds = ds.sel(latitude=np.asarray(lat), longitude=np.asarray(lon), method="nearest", tolerance=1e-6)
        except KeyError as err:
            raise ValueError(f"{self.where} does not cover the forecast grid ({len(lat)}x{len(lon)}): {err}") from None
        fields = []
        for ch in channels:
            var, level = _variable_level(ch)
            if var not in ds:
                raise ValueError(f"{self.where} lacks the variable {var!r} (channel {ch!r}); it has {sorted(ds.data_vars)}")
            da = ds[var]
            if level is not None:
                if "level" not in da.dims or not np.isin(level, da["level"].values):
                    raise ValueError(f"{self.where}: {var!r} has no level {level:g} (channel {ch!r})")
                da = da.sel(level=level)
            fields.append(da.transpose("hour", "dayofyear", "latitude", "longitude").values)
        self.data = np.stack(fields, axis=2)  # (hour, dayofyear, channel, lat, lon)
        self.hours = [int(h) for h in ds["hour"].values]
        self.days = [int(d) for d in ds["dayofyear"].values]
        self.channels = [str(c) for c in channels]

    def at(self, valid_times: np.ndarray, lead_hours: Sequence[float] | None = None) -> np.ndarray:
        """The climatology ``(*valid_times.shape, channel, lat, lon)`` at the valid times' (dayofyear, hour).

        ``valid_times`` is usually ``(batch, lead)`` (init time + lead); ``lead_hours`` only makes errors name
        the lead time whose valid time the climatology lacks.
        """
        vt = pd.DatetimeIndex(np.asarray(valid_times, dtype="datetime64[ns]").reshape(-1))
        hour_idx = {h: i for i, h in enumerate(self.hours)}
        day_idx = {d: i for i, d in enumerate(self.days)}
        hi, di = [], []
        for n, t in enumerate(vt):
            missing = []
            if t.hour not in hour_idx or t.minute or t.second:
                missing.append(f"hour {t.hour:02d}:{t.minute:02d} (it has {self.hours})")
            if t.day_of_year not in day_idx:
                missing.append(f"day of year {t.day_of_year} (it has {self.days[0]} ... {self.days[-1]})")
            if missing:
                lead = ""
                if lead_hours is not None and np.ndim(valid_times) >= 1:
                    lead = f" (lead time {lead_hours[n % len(lead_hours)]:g} h)"
                raise ValueError(f"{self.where} has no {' and no '.join(missing)} for the valid time {t:%Y-%m-%dT%H:%M}{lead}")
            hi.append(hour_idx[t.hour])
            di.append(day_idx[t.day_of_year])
        out = self.data[np.asarray(hi), np.asarray(di)]
        return out.reshape(*np.shape(valid_times), *self.data.shape[2:])
