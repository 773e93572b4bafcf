"""WeatherBench-X's headline scores beyond WB2's, written by ``evaluate``, against an independent numpy implementation.

On the WB2 fixture's ensemble (tests/data/wb2_fixture_5p625: 4 inits x 4 members x 3 lead times, 32 x 64): WBX's
``UnbiasedSpreadSkillRatio`` (our ``spread_skill_ratio_debiased``), ``UnbiasedEnsembleMeanRMSE``
(``debiased_ensemble_mean_rmse``) and ``PredictionActivity`` (``prediction_activity`` of the ensemble mean), each
recomputed here from the stores with numpy from WBX's definitions: area weights from the cell edges, per-init
spatial means, their time mean, the square root after it. The work is float64 (``--dtype float64``), so the
records must agree to rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from fcn3_lightning.eval.harness import Options, evaluate

FIXTURE = Path(__file__).parent / "data" / "wb2_fixture_5p625"
VARIABLES = [("2m_temperature", None), ("geopotential", 500)]


def _area_weights(lat: np.ndarray, lon: np.ndarray, lat_range: tuple[float, float] | None) -> np.ndarray:
    """Cell-edge area weights (sin of the upper minus sin of the lower edge), the region's summing to 1."""
    half = (lat[1] - lat[0]) / 2  # equally spaced
    edges = np.clip(np.concatenate([[lat[0] - half], (lat[1:] + lat[:-1]) / 2, [lat[-1] + half]]), -90, 90)
    w = np.abs(np.sin(np.deg2rad(edges[1:])) - np.sin(np.deg2rad(edges[:-1])))
    if lat_range is not None:
        w = w * ((lat >= lat_range[0]) & (lat <= lat_range[1]))
    w2 = np.repeat(w[:, None], lon.size, axis=1)
    return w2 / w2.sum()


def _field(ds: xr.Dataset, var: str, level: int | None) -> xr.DataArray:
    da = ds[var]
    return da.sel(level=level) if level is not None else da


def _expected(var: str, level: int | None, lat_range: tuple[float, float] | None) -> dict[str, np.ndarray]:
    """Per lead time: the three WBX scores and the per-init prediction activity (init, lead)."""
    fc = xr.open_zarr(FIXTURE / "forecast_ens.zarr", decode_timedelta=True)
    obs = xr.open_zarr(FIXTURE / "obs.zarr")
    clim = xr.open_zarr(FIXTURE / "climatology.zarr")
    x = _field(fc, var, level).transpose("time", "number", "prediction_timedelta", "latitude", "longitude").values  # float32
    inits, leads = fc["time"].values, fc["prediction_timedelta"].values
    w = _area_weights(fc["latitude"].values, fc["longitude"].values, lat_range)
    m = x.shape[1]
    smean = lambda a: (a * w).sum(axis=(-2, -1))  # noqa: E731 - per-field area-weighted mean
    out = {k: np.zeros(len(leads)) for k in ("spread_skill_ratio_debiased", "debiased_ensemble_mean_rmse", "prediction_activity")}
    out["activity_per_init"] = np.zeros((len(inits), len(leads)))
    for j, lead in enumerate(leads):
        valid = pd.DatetimeIndex(inits + lead)
        o = _field(obs, var, level).sel(time=valid.values).transpose("time", "latitude", "longitude").values.astype(np.float64)
        c = np.stack([_field(clim, var, level).sel(hour=t.hour, dayofyear=t.day_of_year).values for t in valid]).astype(np.float64)
        xs = x[:, :, j].astype(np.float64)  # (init, member, lat, lon)
        variance = xs.var(axis=1, ddof=1)
        skill = (xs.mean(axis=1) - o) ** 2
        unbiased_mse_t = smean(skill) - smean(variance) / m  # WBX's UnbiasedEnsembleMeanSquaredError, per init
        out["debiased_ensemble_mean_rmse"][j] = np.sqrt(unbiased_mse_t.mean())
        out["spread_skill_ratio_debiased"][j] = np.sqrt(smean(variance).mean()) / np.sqrt(unbiased_mse_t.mean())
        # the ensemble mean is taken in the data's float32, member after member (WB2's ensemble_mean_deterministic)
        f = x[:, 0, j]
        for k in range(1, m):
            f = f + x[:, k, j]
        f = (f / np.float32(m)).astype(np.float64)
        activity_t = smean((f - c) ** 2)  # WBX's SquaredPredictionAnomaly, per init
        out["prediction_activity"][j] = np.sqrt(activity_t.mean())
        out["activity_per_init"][:, j] = np.sqrt(activity_t)
    return out


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wbx") / "ens"
    evaluate(
        FIXTURE / "forecast_ens.zarr",
        FIXTURE / "obs.zarr",
        out,
        FIXTURE / "climatology.zarr",
        Options(
            variables=[v for v, _ in VARIABLES],
            levels=[500.0],
            regions=["global", "tropics"],
            dtype="float64",
            spectra=[],
            baselines=[],
            progress=False,
        ),
    )
    return out


@pytest.mark.parametrize(("region", "lat_range"), [("global", None), ("tropics", (-20.0, 20.0))])
@pytest.mark.parametrize(("var", "level"), VARIABLES)
def test_wbx_scores_equal_numpy(scored, region, lat_range, var, level):
    scores = pd.read_csv(scored / "scores.csv")
    want = _expected(var, level, lat_range)
    sel = (scores["variable"] == var) & (scores["region"] == region)
    sel &= scores["level"].isna() if level is None else (scores["level"] == level)
    for ev, metric in (
        ("probabilistic", "spread_skill_ratio_debiased"),
        ("probabilistic", "debiased_ensemble_mean_rmse"),
        ("ensemble_mean_deterministic", "prediction_activity"),
    ):
        got = scores[sel & (scores["eval"] == ev) & (scores["metric"] == metric)].sort_values("lead_time_hours")["value"].to_numpy()
        assert got.shape == (3,), f"{ev} {metric} {var} {region}: {got.shape} records"
        print(f"{metric:30s} {var:16s} {region:8s} ours {got} numpy {want[metric]}")
        np.testing.assert_allclose(got, want[metric], rtol=1e-10, err_msg=f"{ev} {metric} {var} {region}")
    per_init = pd.read_csv(scored / "per_init.csv")
    sel = (per_init["variable"] == var) & (per_init["region"] == region) & (per_init["metric"] == "prediction_activity")
    sel &= per_init["eval"] == "ensemble_mean_deterministic_temporal"
    sel &= per_init["level"].isna() if level is None else (per_init["level"] == level)
    got = per_init[sel].pivot(index="init_time", columns="lead_time_hours", values="value").sort_index().to_numpy()
    np.testing.assert_allclose(got, want["activity_per_init"], rtol=1e-10, err_msg=f"per-init prediction_activity {var} {region}")


def test_prediction_activity_of_the_climatology_is_zero_and_grows_with_the_anomaly():
    """The metric class itself: f = c gives 0, f = c + a gives sqrt(<a^2>) in each region (here a constant anomaly)."""
    import torch

    from fcn3_lightning.metrics import PredictionActivity

    lat, lon = np.linspace(-80, 80, 9), np.arange(16) * 22.5
    c = torch.randn(2, 1, 3, 9, 16, dtype=torch.float64)
    m = PredictionActivity(lat, lon, ["a", "b", "c"], [6.0], regions=["global", "tropics"])
    m.update(c, c)
    assert float(m.compute()["prediction_activity"].abs().max()) == 0.0
    m.reset()
    m.update(c + torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(1, 1, 3, 1, 1), c)
    np.testing.assert_allclose(m.compute()["prediction_activity"][:, 0].numpy(), [[1.0, 2.0, 3.0]] * 2, rtol=1e-12)
    with pytest.raises(ValueError, match="climatology"):
        m.update(c, c[:, :, :2])
