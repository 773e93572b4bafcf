"""Issue 6, acceptance 3: the evaluation harness scores the real ERA5 sample, taken as an ensemble against one of
its members, through the same commands as any model (``convert-era5``, ``evaluate``), without special code paths.

The sample (Copernicus ERA5, 10 members, z and t at 500/850 hPa, 3 degrees, 4 times 12-hourly) is read from
``../shared`` when present, else from the 2-member copy in ``tests/data/era5_sample``. The truth is member 0;
the "forecast" initialised at time t with lead L holds all members at t + L (WB2's by-init layout, built here
with xarray). The fair CRPS the harness writes is checked against an independent numpy computation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "era5-levels-members.nc"
SUBSET = REPO / "tests" / "data" / "era5_sample" / "era5-levels-members-2.nc"
SOURCE = SHARED if SHARED.is_file() else SUBSET


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "fcn3_lightning", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{args[0]} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> tuple[Path, xr.Dataset, xr.Dataset]:
    tmp = tmp_path_factory.mktemp("era5eval")
    _run("convert-era5", str(tmp / "truth.zarr"), "--src", str(SOURCE), "--member", "0", cwd=tmp)
    _run("convert-era5", str(tmp / "members.zarr"), "--src", str(SOURCE), "--member", "-1", cwd=tmp)
    members = xr.open_zarr(tmp / "members.zarr")
    assert "number" in members.dims and members.sizes["number"] >= 2
    # by-init forecast: init t, lead L -> the members at t + L (leads 0 and 12 h; the last time has no 12 h lead)
    times = members["time"].values
    leads = np.array([0, 12], dtype="timedelta64[h]").astype("timedelta64[ns]")
    inits = times[:-1]
    parts = [members.sel(time=inits + lead).assign_coords(time=inits) for lead in leads]
    forecast = xr.concat(parts, dim=pd.Index(leads, name="prediction_timedelta"))
    forecast = forecast.transpose("time", "number", "prediction_timedelta", ...).drop_vars(
        [v for v in forecast.data_vars if v not in ("geopotential", "temperature")]
    )
    forecast = forecast.load()
    for v in forecast.variables.values():
        v.encoding = {}  # the source store's codecs are not those of the new store
    forecast.to_zarr(tmp / "forecast.zarr", mode="w")
    _run(
        "evaluate",
        "--forecast",
        str(tmp / "forecast.zarr"),
        "--obs",
        str(tmp / "truth.zarr"),
        "--out",
        str(tmp / "out"),
        "--name",
        "era5-ens",
        # the sample is 2 days of 2017: no earlier year for the climatology (ACC, climatology baseline), so it is told
        # to use the scored year itself (evaluate then warns that this baseline has seen the truth)
        "--clim-years",
        "2017",
        cwd=tmp,
    )
    return tmp / "out", forecast.load(), xr.open_zarr(tmp / "truth.zarr").load()


def test_era5_ensemble_against_a_member_is_scored(scored):
    out, forecast, truth = scored
    scores = pd.read_csv(out / "scores.csv")
    evals = set(scores["eval"])
    assert {"probabilistic", "ensemble_mean_deterministic", "persistence_baseline"} <= evals, evals
    prob = scores[(scores["eval"] == "probabilistic") & (scores["region"] == "global")]
    assert set(prob["variable"]) == {"geopotential", "temperature"}
    assert set(prob["level"].dropna().astype(int)) == {500, 850}
    assert set(prob["lead_time_hours"]) == {0, 12}
    for name in ("leaderboard.md", "leaderboard.html", "meta.json", "probabilistic.nc"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "meta.json").read_text())
    assert meta["climatology_years"] == [2017]
    assert any("climatology (--clim-years) uses years holding scored valid times ([2017])" in w for w in meta["warnings"])


def test_era5_crps_equals_independent_numpy(scored):
    """Fair CRPS, global, per variable/level/lead: cell-edge area weights, spatial mean per init, then mean over inits."""
    out, forecast, truth = scored
    scores = pd.read_csv(out / "scores.csv")
    crps = scores[(scores["eval"] == "probabilistic") & (scores["metric"] == "crps") & (scores["region"] == "global")]
    lat = truth["latitude"].values
    la = np.sort(lat)
    edges = np.concatenate([[-90.0], (la[1:] + la[:-1]) / 2, [90.0]])
    w_sorted = np.diff(np.sin(np.deg2rad(edges)))
    w = w_sorted[np.searchsorted(la, lat)]
    w = w / w.sum() / truth.sizes["longitude"]  # sums to 1 over the grid
    checked = 0
    for var in ("geopotential", "temperature"):
        for level in (500, 850):
            for li, lead in enumerate(forecast["prediction_timedelta"].values):
                x = forecast[var].sel(level=level).isel(prediction_timedelta=li).values.astype(np.float64)  # (init, member, lat, lon)
                valid = forecast["time"].values + lead
                y = truth[var].sel(level=level).sel(time=valid).transpose("time", "latitude", "longitude").values.astype(np.float64)
                m = x.shape[1]
                skill = np.abs(x - y[:, None]).mean(1)
                spread = np.abs(x[:, :, None] - x[:, None, :]).sum((1, 2)) / (m * (m - 1))
                per_init = ((skill - 0.5 * spread) * w[None, :, None]).sum((1, 2))
                expected = per_init.mean()
                hours = int(lead / np.timedelta64(1, "h"))
                got = crps[(crps["variable"] == var) & (crps["level"] == level) & (crps["lead_time_hours"] == hours)]["value"]
                assert len(got) == 1, (var, level, hours)
                assert got.iloc[0] == pytest.approx(expected, rel=1e-6), (var, level, hours)
                checked += 1
    assert checked == 8
