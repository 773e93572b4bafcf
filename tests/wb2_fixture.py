"""Load the WeatherBench2 reference fixture (tests/data/wb2_fixture_5p625, see its PROVENANCE.md) as tensors.

Channels are ``(variable, level)`` pairs in the fixture's long WB2 names; arrays are laid out as the metrics
take them: ``(init time, [member,] lead, channel, lat, lon)``, latitude ascending as stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr

FIXTURE = Path(__file__).parent / "data" / "wb2_fixture_5p625"
VARS_3D = ("geopotential", "temperature", "specific_humidity")
LEVELS = (500, 700, 850)
VARS_2D = (
    "2m_temperature",
    "mean_sea_level_pressure",
    "10m_u_component_of_wind",
    "10m_v_component_of_wind",
    "10m_wind_speed",
    "total_precipitation_24hr",
)
CHANNELS: list[tuple[str, int | None]] = [(v, lev) for v in VARS_3D for lev in LEVELS] + [(v, None) for v in VARS_2D]
LABELS = [f"{v}/{lev}" if lev is not None else v for v, lev in CHANNELS]


def _open(name: str) -> xr.Dataset:
    return xr.open_zarr(FIXTURE / name, decode_timedelta=True)


def _fields(ds: xr.Dataset, lead_dims: tuple[str, ...]) -> np.ndarray:
    """Stack the channels of ``ds`` into ``(*lead_dims sizes, channel, lat, lon)`` float32."""
    out = []
    for var, level in CHANNELS:
        da = ds[var] if level is None else ds[var].sel(level=level)
        out.append(da.transpose(*lead_dims, "latitude", "longitude").values)
    return np.stack(out, axis=len(lead_dims))


@dataclass
class Fixture:
    lat: np.ndarray
    lon: np.ndarray
    lead_hours: list[int]
    init_times: np.ndarray
    valid_times: np.ndarray  # (init, lead)
    land_sea_mask: np.ndarray
    det: torch.Tensor  # (init, lead, C, H, W)
    ens: torch.Tensor  # (init, member, lead, C, H, W)
    obs: torch.Tensor  # truth at the valid times (init, lead, C, H, W)
    clim_ds: xr.Dataset
    prob_clim: torch.Tensor  # (init, 3, lead, C, H, W): the obs of 2017-2019 at the valid times' calendar dates
    obs_spectra: torch.Tensor  # (8 distinct valid times, 1, C, H, W)


@cache
def load() -> Fixture:
    det = _open("forecast_det.zarr")
    ens = _open("forecast_ens.zarr")
    obs = _open("obs.zarr")
    inits = det["time"].values
    leads = det["prediction_timedelta"].values
    lead_hours = [int(td / np.timedelta64(1, "h")) for td in leads]
    valid = inits[:, None] + leads[None, :]
    truth = np.stack([_fields(obs.sel(time=valid[i]), ("time",)) for i in range(len(inits))])

    def years_back(t: np.datetime64, year: int) -> np.datetime64:
        return np.datetime64(pd.Timestamp(t).replace(year=year), "ns")

    members = []
    for year in (2017, 2018, 2019):
        members.append(np.stack([_fields(obs.sel(time=[years_back(t, year) for t in valid[i]]), ("time",)) for i in range(len(inits))]))
    distinct = np.unique(valid.reshape(-1))
    return Fixture(
        lat=det["latitude"].values,
        lon=det["longitude"].values,
        lead_hours=lead_hours,
        init_times=inits,
        valid_times=valid,
        land_sea_mask=obs["land_sea_mask"].values,
        det=torch.from_numpy(_fields(det, ("time", "prediction_timedelta"))),
        ens=torch.from_numpy(_fields(ens, ("time", "number", "prediction_timedelta"))),
        obs=torch.from_numpy(truth),
        clim_ds=_open("climatology.zarr"),
        prob_clim=torch.from_numpy(np.stack(members, axis=1)),
        obs_spectra=torch.from_numpy(_fields(obs.sel(time=distinct), ("time",))[:, None]),
    )


def reference(name: str) -> pd.DataFrame:
    """A reference CSV with ``level`` as -1 for 2-D variables (so that it can be merged on)."""
    df = pd.read_csv(FIXTURE / f"{name}.csv.gz")
    if "level" in df:
        df["level"] = df["level"].fillna(-1).astype(int)
    return df


def label_to_variable_level(label: str) -> tuple[str, int]:
    var, _, lev = label.partition("/")
    return var, int(lev) if lev else -1
