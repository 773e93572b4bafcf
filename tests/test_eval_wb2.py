"""The evaluation harness (``python -m fcn3_lightning evaluate``) reproduces WeatherBench2's own numbers.

The harness runs on the reference fixture (tests/data/wb2_fixture_5p625: forecast_det.zarr and forecast_ens.zarr
as two runs, with the fixture's climatology.zarr), and every record of the fixture's reference files is read back
from the written CSVs and compared with the README's per-record tolerances. Record counts are asserted, so nothing
is skipped silently. Also: the climatology computation against an independent numpy implementation of WB2's
definition, SEEPS' pieces, the netCDF layout, atomic outputs and the error cases.
"""

from __future__ import annotations

import argparse
import calendar
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from fcn3_lightning.eval.cli import main as cli_main
from fcn3_lightning.eval.climatology import compute_climatology, weighted_quantile, window_weights
from fcn3_lightning.eval.harness import Options, evaluate
from fcn3_lightning.eval.seeps import scoring_matrix

from fcn3_lightning.metrics import REGIONS

FIXTURE = Path(__file__).parent / "data" / "wb2_fixture_5p625"
KEYS = ["eval", "variable", "metric", "region", "level", "lead_time_hours"]
DEBIASED = ["debiased_ensemble_mean_mse", "debiased_ensemble_mean_rmse", "spread_skill_ratio_debiased"]
SPECTRA = ("geopotential", "2m_temperature")  # all levels of geopotential, as the reference
EXPECTED_ROWS = {
    "det": 8256,
    "ens": 26112,
    "per_init_sample": 3288,
    "per_init_all_regions": 70656,
    "rank_histogram": 450,
    "spectra": 26400,
}


def _read(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    if "level" in df:
        df["level"] = df["level"].fillna(-1).astype(int)
    return df


def _reference(name: str) -> pd.DataFrame:
    df = _read(FIXTURE / f"{name}.csv.gz")
    assert len(df) == EXPECTED_ROWS[name], f"{name}.csv.gz has {len(df)} rows"
    return df


def _run(kind: str, out: Path, **kw) -> dict:
    return evaluate(
        FIXTURE / f"forecast_{kind}.zarr",
        FIXTURE / "obs.zarr",
        out,
        FIXTURE / "climatology.zarr",
        Options(spectra=SPECTRA, progress=False, **kw),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("wb2_eval")
    out = {}
    for kind in ("det", "ens"):
        out[kind] = base / kind
        _run(kind, out[kind])
    return out


def _tolerance(merged: pd.DataFrame) -> np.ndarray:
    """The fixture README's per-record rule (as tests/test_metrics_wb2.py)."""
    ref = merged["value_ref"].abs().to_numpy()
    tol = 5e-5 * ref
    debiased = merged["metric"].isin(DEBIASED).to_numpy()
    tol[debiased] = 1e-3 * ref[debiased]
    bias = (merged["metric"] == "bias").to_numpy()
    tol[bias] += 1e-3 * merged["mae_ref"].abs().to_numpy()[bias]
    return tol


def _compare(ref: pd.DataFrame, ours: pd.DataFrame, keys: list[str], what: str) -> float:
    ref = ref.rename(columns={"value": "value_ref"})
    mae = ref[ref["metric"] == "mae"].drop(columns="metric").rename(columns={"value_ref": "mae_ref"})
    ref = ref.merge(mae, on=[k for k in keys if k != "metric"], how="left")
    merged = ref.merge(ours, on=keys, how="left", validate="one_to_one", indicator=True)
    missing = (merged["_merge"] != "both").to_numpy()
    assert len(merged) == len(ref)
    a, r = merged["value"].to_numpy(), merged["value_ref"].to_numpy()
    both_nan = np.isnan(a) & np.isnan(r)
    diff = np.where(both_nan, 0.0, np.abs(a - r))
    tol = _tolerance(merged)
    bad = ~(diff <= tol) & ~both_nan & ~missing
    print(f"{what}: matched {int((~missing & ~bad).sum())}, missing {int(missing.sum())}, failed {int(bad.sum())} of {len(ref)} records")
    assert not missing.any(), f"{what}: {missing.sum()} reference records not written by the harness:\n{merged[missing].head()}"
    rel = diff / np.maximum(np.abs(r), 1e-300)
    worst = np.nanmax(np.where(both_nan, 0, diff / tol))
    print(f"{what}: {len(merged)} records, max relative difference {np.nanmax(rel):.2e}, max |diff|/tolerance {worst:.3f}")
    for (ev, metric), g in merged.assign(rel=rel).groupby(["eval", "metric"]):
        print(f"  {ev:36s} {metric:42s} {len(g):5d} records, max rel diff {g['rel'].max():.2e}")
    assert not bad.any(), (
        f"{what}: {bad.sum()} records outside tolerance; worst:\n{merged.assign(rel=rel)[bad].sort_values('rel').tail(10)}"
    )
    return float(np.nanmax(rel))


def test_det_and_ens_scores_match_reference(runs):
    """Every record of det.csv.gz and ens.csv.gz, incl. seeps_24hr, 10m_wind_vector and both baselines."""
    ours = pd.concat([_read(runs["det"] / "scores.csv"), _read(runs["ens"] / "scores.csv")], ignore_index=True)
    assert list(pd.read_csv(runs["det"] / "scores.csv", nrows=0).columns) == KEYS + ["value"]
    det, ens = _reference("det"), _reference("ens")
    _compare(det, _read(runs["det"] / "scores.csv"), KEYS, "det.csv.gz vs the deterministic run")
    _compare(ens, _read(runs["ens"] / "scores.csv"), KEYS, "ens.csv.gz vs the ensemble run")
    # the baselines do not depend on the forecast: the ensemble run's climatology baseline is the same
    clim = det[det["eval"] == "climatology_baseline_deterministic"]
    _compare(clim, _read(runs["ens"] / "scores.csv"), KEYS, "det.csv.gz climatology baseline vs the ensemble run")
    # every region and both special variables were compared
    assert set(ours["region"]) == set(REGIONS)
    assert {"seeps_24hr", "acc"} <= set(ours["metric"])
    assert "10m_wind_vector" in set(ours["variable"])


def test_persistence_baseline_rows(runs):
    """Not in the fixture: check persistence against its definition (truth at init) for one record, and crps = mae."""
    df = _read(runs["det"] / "scores.csv")
    p = df[df["eval"] == "persistence_baseline"]
    det_metrics = {"mse", "rmse", "rmse_sqrt_before_time_avg", "bias", "mae", "acc", "prediction_activity", "seeps_24hr"}
    assert set(p["metric"]) == det_metrics | {"crps"}
    crps = p[p["metric"] == "crps"].drop(columns="metric").set_index(KEYS[:2] + KEYS[3:])["value"]
    mae = p[p["metric"] == "mae"].drop(columns="metric").set_index(KEYS[:2] + KEYS[3:])["value"]
    pd.testing.assert_series_equal(crps.sort_index(), mae.sort_index())
    obs = xr.open_zarr(FIXTURE / "obs.zarr")
    det = xr.open_zarr(FIXTURE / "forecast_det.zarr", decode_timedelta=True)
    inits = det["time"].values
    lead = det["prediction_timedelta"].values[1]
    o = obs["2m_temperature"].sel(time=inits + lead).values.astype(np.float64)
    f = obs["2m_temperature"].sel(time=inits).values.astype(np.float64)
    w = np.cos(np.deg2rad(obs["latitude"].values))[:, None] * np.ones(obs.sizes["longitude"])
    mse = np.mean([(w * (f[i] - o[i]) ** 2).sum() / w.sum() for i in range(len(inits))])
    row = p[(p["variable"] == "2m_temperature") & (p["metric"] == "mse") & (p["region"] == "global") & (p["lead_time_hours"] == 48)]
    np.testing.assert_allclose(row["value"].item(), mse, rtol=1e-6)  # float32 work


@pytest.mark.parametrize("name", ["per_init_sample", "per_init_all_regions"])
def test_per_init_matches_reference(runs, name):
    """Every per-initialisation (``*_temporal``) record of WB2, in every region it evaluates (all 16)."""
    ref = _reference(name)
    keys = [*KEYS, "init_time"]
    ours = pd.concat([_read(runs["det"] / "per_init.csv"), _read(runs["ens"] / "per_init.csv")], ignore_index=True)
    expected = {"deterministic_temporal", "ensemble_mean_deterministic_temporal", "probabilistic_temporal"}
    baselines = {f"{b}_temporal" for b in ("persistence_baseline", "climatology_baseline_deterministic")}
    baselines.add("probabilistic_climatology_baseline_temporal")
    assert set(ref["eval"]) <= expected and set(ours["eval"]) == expected | baselines
    # the baselines' records (both runs score them; WB2 keeps none): test_baseline_per_init_records_match_numpy
    ours = ours[ours["eval"].isin(expected)]
    _compare(ref, ours, keys, f"{name}.csv.gz")
    assert set(ours["region"]) == set(REGIONS)


def test_baseline_per_init_records_match_numpy(runs):
    """WB2 keeps no per-init baseline records: ours (the leaderboard's tests need them) against numpy, from the fixture's
    truth and climatology: persistence, climatology and probabilistic climatology, per init, in two regions."""
    pi = _read(runs["ens"] / "per_init.csv")
    meta = json.loads((runs["ens"] / "meta.json").read_text())
    baselines = ("persistence_baseline", "climatology_baseline_deterministic", "probabilistic_climatology_baseline")
    assert {f"{b}_temporal" for b in baselines} <= set(meta["per_init_evals"])
    obs = xr.open_zarr(FIXTURE / "obs.zarr")
    clim = xr.open_zarr(FIXTURE / "climatology.zarr")
    fc = xr.open_zarr(FIXTURE / "forecast_ens.zarr", decode_timedelta=True)
    inits = fc["time"].values
    lat = obs["latitude"].values
    cos = np.cos(np.deg2rad(lat))[:, None] * np.ones(obs.sizes["longitude"])
    masks = {"global": np.ones_like(cos), "tropics": (np.abs(lat) <= 20)[:, None] * np.ones_like(cos)}
    checked = 0
    for var, level in (("2m_temperature", -1), ("geopotential", 500)):
        x = obs[var] if level < 0 else obs[var].sel(level=level)
        c = clim[var] if level < 0 else clim[var].sel(level=level)
        for lead in fc["prediction_timedelta"].values:
            hours = int(lead / np.timedelta64(1, "h"))
            for region, mask in masks.items():
                w = cos * mask / (cos * mask).sum()
                for init in inits:
                    valid = pd.Timestamp(init + lead)
                    o = x.sel(time=valid).values.astype(np.float64)
                    pers = x.sel(time=init).values.astype(np.float64) - o
                    cl = c.sel(dayofyear=valid.dayofyear, hour=valid.hour).values.astype(np.float64) - o
                    members = np.stack([x.sel(time=valid.replace(year=y)).values.astype(np.float64) for y in (2017, 2018, 2019)])
                    m = len(members)
                    skill = np.abs(members - o).mean(0)
                    em = members.mean(0) - o
                    spread = np.abs(members[:, None] - members[None]).sum((0, 1)) / (2 * m * (m - 1))  # WB2's fair estimator
                    expected = {
                        ("persistence_baseline_temporal", "mse"): (w * pers**2).sum(),
                        ("persistence_baseline_temporal", "rmse"): np.sqrt((w * pers**2).sum()),
                        ("persistence_baseline_temporal", "bias"): (w * pers).sum(),
                        ("persistence_baseline_temporal", "mae"): (w * np.abs(pers)).sum(),
                        ("persistence_baseline_temporal", "crps"): (w * np.abs(pers)).sum(),  # a one-member ensemble
                        ("climatology_baseline_deterministic_temporal", "mse"): (w * cl**2).sum(),
                        ("climatology_baseline_deterministic_temporal", "rmse"): np.sqrt((w * cl**2).sum()),
                        ("climatology_baseline_deterministic_temporal", "mae"): (w * np.abs(cl)).sum(),
                        ("probabilistic_climatology_baseline_temporal", "crps"): (w * (skill - spread)).sum(),
                        ("probabilistic_climatology_baseline_temporal", "ensemble_mean_rmse"): np.sqrt((w * em**2).sum()),
                    }
                    rows = pi[
                        (pi["variable"] == var)
                        & (pi["level"] == level)
                        & (pi["lead_time_hours"] == hours)
                        & (pi["region"] == region)
                        & (pd.to_datetime(pi["init_time"]) == pd.Timestamp(init))
                    ].set_index(["eval", "metric"])["value"]
                    for key, want in expected.items():
                        np.testing.assert_allclose(rows.loc[key], want, rtol=1e-5, err_msg=f"{key} {var} {level} {hours} h {region} {init}")
                        checked += 1
    print(f"baseline per-init records checked against numpy: {checked}")
    assert checked == 2 * 3 * 2 * len(inits) * 10


def test_per_init_regions_option(tmp_path):
    """--per-init-regions limits per_init.csv to the regions named (the time means keep every region); an unscored one is an error."""
    meta = evaluate(
        FIXTURE / "forecast_det.zarr",
        FIXTURE / "obs.zarr",
        tmp_path / "o",
        FIXTURE / "climatology.zarr",
        Options(regions=["global", "tropics", "europe"], per_init_regions=["europe"], variables=["2m_temperature"], progress=False),
    )
    per_init = _read(tmp_path / "o" / "per_init.csv")
    assert set(per_init["region"]) == {"europe"}
    assert set(_read(tmp_path / "o" / "scores.csv")["region"]) == {"global", "tropics", "europe"}
    assert "deterministic_temporal" in meta["per_init_evals"]
    with pytest.raises(ValueError, match=r"--per-init-regions \['arctic'\] are not among the scored regions"):
        evaluate(
            FIXTURE / "forecast_det.zarr",
            FIXTURE / "obs.zarr",
            tmp_path / "p",
            FIXTURE / "climatology.zarr",
            Options(regions=["global"], per_init_regions=["arctic"], variables=["2m_temperature"], progress=False),
        )


def test_rank_histogram_matches_reference(runs):
    ref = _reference("rank_histogram").rename(columns={"value": "value_ref"})
    ours = _read(runs["ens"] / "rank_histogram.csv")
    keys = ["eval", "variable", "metric", "level", "lead_time_hours", "bin"]
    merged = ref.merge(ours, on=keys, how="left", validate="one_to_one")
    assert merged["value"].notna().all() and len(merged) == 450
    tol = np.where(merged["variable"] == "total_precipitation_24hr", 0.03, 5e-3)
    diff = (merged["value"] - merged["value_ref"]).abs()
    other = diff[merged["variable"] != "total_precipitation_24hr"].max()
    print(f"rank_histogram.csv.gz: 450 records, max |diff| {diff.max():.2e} (precipitation), {other:.2e} (others)")
    assert (diff <= tol).all(), merged[diff > tol].head()


def test_spectra_match_reference(runs):
    ref = _reference("spectra").rename(columns={"value": "value_ref"})
    ours = pd.concat([_read(runs["det"] / "spectra.csv"), _read(runs["ens"] / "spectra.csv")], ignore_index=True)
    ours = ours.drop_duplicates(
        subset=["dataset", "variable", "level", "lead_time_hours", "latitude", "zonal_wavenumber"]
    )  # obs: both runs
    for df in (ref, ours):
        df["lead_time_hours"] = df["lead_time_hours"].fillna(-1).astype(int)
    keys = ["eval", "dataset", "variable", "level", "lead_time_hours", "latitude", "zonal_wavenumber"]
    merged = ref.merge(ours, on=keys, how="left", validate="one_to_one")
    assert merged["value"].notna().all() and len(merged) == 26400
    s0 = merged.merge(merged[merged["zonal_wavenumber"] == 0][keys[:-1] + ["value_ref"]].rename(columns={"value_ref": "s0"}), on=keys[:-1])[
        "s0"
    ].to_numpy()
    s = merged["value_ref"].to_numpy()
    diff = np.abs(merged["value"].to_numpy() - s)
    tol = 5e-5 * s + 1e-6 * np.sqrt(s * s0)
    print(f"spectra.csv.gz: 26400 records, max |diff|/tolerance {np.max(diff / tol):.3f}, max relative {np.max(diff / s):.2e}")
    assert (diff <= tol).all()


def test_netcdf_layout_and_meta(runs):
    meta = json.loads((runs["ens"] / "meta.json").read_text())
    assert meta["evals"] == [
        "ensemble_mean_deterministic",
        "probabilistic",
        "ensemble_experimental",
        "persistence_baseline",
        "climatology_baseline_deterministic",
        "probabilistic_climatology_baseline",
    ]
    assert meta["members"] == 4 and len(meta["inits"]) == 4 and meta["probabilistic_climatology_years"] == [2017, 2018, 2019]
    scores = _read(runs["ens"] / "scores.csv")
    for ev in meta["evals"]:
        ds = xr.open_dataset(runs["ens"] / f"{ev}.nc")
        assert ds["geopotential"].dims == ("metric", "region", "lead_time", "level")
        assert ds["2m_temperature"].dims == ("metric", "region", "lead_time")
        assert np.issubdtype(ds["lead_time"].dtype, np.timedelta64)
        row = scores[
            (scores["eval"] == ev) & (scores["variable"] == "geopotential") & (scores["level"] == 500) & (scores["region"] == "europe")
        ]
        row = row[row["lead_time_hours"] == 48].iloc[0]
        v = ds["geopotential"].sel(metric=row["metric"], region="europe", level=500, lead_time=np.timedelta64(48, "h")).item()
        np.testing.assert_equal(v, row["value"])
    assert sorted(p.name for p in runs["ens"].iterdir()) == sorted(meta["files"])  # no temporary files left


def test_float64_work_meets_tolerances(tmp_path):
    """The runs above use the default float32 work (as WB2); float64 work meets the tolerances too, more closely."""
    for kind in ("det", "ens"):
        _run(kind, tmp_path / kind, dtype="float64")
        worst = _compare(_reference(kind), _read(tmp_path / kind / "scores.csv"), KEYS, f"{kind}.csv.gz (float64 work)")
        assert worst < 2e-4


# --- climatology --------------------------------------------------------------------------------------------


def _numpy_climatology(times: pd.DatetimeIndex, x: np.ndarray, hour: int, window: int = 61) -> np.ndarray:
    """WB2's stack-years / fill day 366 / wrap-pad / weighted rolling mean, written out with numpy loops."""
    half = window // 2
    w = np.concatenate([np.linspace(0, 1, half + 1), np.linspace(1, 0, half + 1)[1:]])
    years = sorted(set(times.year))
    rows = np.full((len(years), 366, *x.shape[1:]), np.nan)
    for i, t in enumerate(times):
        if t.hour == hour:
            rows[years.index(t.year), t.day_of_year - 1] = x[i]
    for yi, y in enumerate(years):
        if not calendar.isleap(y):
            rows[yi, 365] = rows[yi, 364]
    padded = np.concatenate([rows[:, -half:], rows, rows[:, :half]], axis=1)
    out = np.empty((366, *x.shape[1:]))
    for d in range(366):
        win = padded[:, d : d + window]  # (year, window, ...)
        ww = np.broadcast_to(w.reshape(1, -1, *([1] * (x.ndim - 1))), win.shape)
        ok = np.isfinite(win)
        out[d] = np.where(ok, win * ww, 0).sum((0, 1)) / np.where(ok, ww, 0).sum((0, 1))
    return out


def test_climatology_matches_independent_numpy():
    rng = np.random.default_rng(0)
    times = pd.date_range("2019-01-01", "2020-12-31T18", freq="6h")
    times = times[rng.random(times.size) > 0.05]  # some missing times
    doy = times.day_of_year.to_numpy()
    x = (np.sin(2 * np.pi * doy / 366)[:, None, None] * 10 + rng.normal(size=(times.size, 2, 3))).astype(np.float32)
    x[rng.random(x.shape) < 0.01] = np.nan  # and some NaN points
    obs = xr.Dataset(
        {"t": (("time", "latitude", "longitude"), x)}, coords={"time": times, "latitude": [-10.0, 10.0], "longitude": [0.0, 120.0, 240.0]}
    )
    clim = compute_climatology(obs)
    assert clim["t"].dims == ("hour", "dayofyear", "latitude", "longitude") and clim.sizes["dayofyear"] == 366
    for hour in (0, 18):
        ref = _numpy_climatology(times, x.astype(np.float64), hour)
        np.testing.assert_allclose(clim["t"].sel(hour=hour).values, ref.astype(np.float32), rtol=2e-6, atol=1e-6)
    w = window_weights(61)
    assert w[0] == w[-1] == 0 and np.argmax(w) == 30 and np.isclose(w.mean(), 1)


def test_weighted_quantile_is_xarrays():
    rng = np.random.default_rng(1)
    data = rng.gamma(0.7, size=(40, 5))
    data[rng.random(data.shape) < 0.2] = np.nan
    weights = rng.random(40)
    ours = weighted_quantile(data, weights, 2 / 3)
    ref = xr.DataArray(data, dims=("s", "p")).weighted(xr.DataArray(weights, dims="s")).quantile(2 / 3, dim="s").values
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_seeps_scoring_matrix():
    s = scoring_matrix(np.array([[0.05, 0.5, 0.9]]))
    assert np.isnan(s[:, :, 0, 0]).all() and np.isnan(s[:, :, 0, 2]).all()
    p = np.float32(0.5)
    np.testing.assert_allclose(
        s[:, :, 0, 1], 0.5 * np.array([[0, 1 / (1 - p), 4 / (1 - p)], [1 / p, 0, 3 / (1 - p)], [1 / p + 3 / (2 + p), 3 / (2 + p), 0]])
    )


def test_computed_climatology_run(tmp_path):
    """Without --climatology the harness computes WB2's climatology from the truth (here: four Januaries) and runs."""
    meta = evaluate(
        FIXTURE / "forecast_det.zarr",
        FIXTURE / "obs.zarr",
        tmp_path,
        None,
        Options(progress=False, regions=["global", "tropics"], spectra=()),
    )
    assert "computed from the truth" in meta["climatology"] and meta["seeps"]
    df = _read(tmp_path / "scores.csv")
    assert df["value"].notna().all()
    assert set(df["eval"]) == {
        "deterministic",
        "persistence_baseline",
        "climatology_baseline_deterministic",
        "probabilistic_climatology_baseline",
    }


# --- errors and outputs -------------------------------------------------------------------------------------


def _small(kind: str = "det") -> tuple[xr.Dataset, xr.Dataset, xr.Dataset]:
    fc = xr.open_zarr(FIXTURE / f"forecast_{kind}.zarr", decode_timedelta=True)[["2m_temperature", "geopotential"]].load()
    obs = xr.open_zarr(FIXTURE / "obs.zarr")[["2m_temperature", "geopotential", "land_sea_mask"]].load()
    clim = xr.open_zarr(FIXTURE / "climatology.zarr")[["2m_temperature", "geopotential"]].load()
    return fc.drop_encoding(), obs.drop_encoding(), clim.drop_encoding()


def _cli(tmp_path: Path, fc, obs, clim, *extra: str) -> tuple[int, str]:
    paths = {}
    for name, ds in (("fc", fc), ("obs", obs), ("clim", clim)):
        if ds is not None:
            paths[name] = tmp_path / f"{name}.zarr"
            ds.to_zarr(paths[name], mode="w")
    args = ["--forecast", str(paths["fc"]), "--obs", str(paths["obs"]), "--out", str(tmp_path / "out"), "--no-progress", *extra]
    if "clim" in paths:
        args += ["--climatology", str(paths["clim"])]
    return cli_main(args), str(tmp_path / "out")


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_valid", r"2 valid times .* missing from the truth .*2020-01-05T00:00:00, 2020-01-05T12:00:00"),
        ("grid", r"grids differ in longitude"),
        ("no_lead", r"no 'prediction_timedelta' dimension"),
        ("nan", r"forecast has NaN .* in 'geopotential/700' at init 2020-01-01T12:00:00, lead 48 h"),
        ("nan_obs", r"truth has NaN .* '2m_temperature'"),
        ("nan_clim", r"climatology has NaN .* 'geopotential/500'"),
        ("clim_var", r"climatology .* lacks the variable 'geopotential'"),
        ("obs_var", r"'geopotential' is in the forecast .* but not in the truth"),
        ("obs_level", r"'geopotential' lacks the levels \[850\]"),
    ],
)
def test_errors(tmp_path, capsys, case, match):
    fc, obs, clim = _small()
    if case == "missing_valid":
        obs = obs.sel(time=obs["time"] < np.datetime64("2020-01-05"))
    elif case == "grid":
        obs = obs.assign_coords(longitude=obs["longitude"] + 1.0)
    elif case == "no_lead":
        fc = fc.isel(prediction_timedelta=0, drop=True)
    elif case == "nan":
        fc["geopotential"][1, 1, 1, 5, 5] = np.nan
    elif case == "nan_obs":
        obs["2m_temperature"][-1, 3, 3] = np.nan
    elif case == "nan_clim":
        clim["geopotential"][:, :, 0] = np.nan
    elif case == "clim_var":
        clim = clim.drop_vars("geopotential")
    elif case == "obs_var":
        obs = obs.drop_vars("geopotential")
    elif case == "obs_level":
        obs = obs.sel(level=[500, 700])
    rc, out = _cli(tmp_path, fc, obs, clim)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert pd.Series([err]).str.contains(match, regex=True).item(), err
    assert not Path(out).exists() or not any(Path(out).iterdir())  # nothing written


@pytest.mark.parametrize("option", ["--threads", "--read-threads"])
def test_thread_options(tmp_path, capsys, option):
    import torch

    fc, obs, clim = _small()
    rc, _ = _cli(tmp_path, fc, obs, clim, option, "0")
    err = capsys.readouterr().err
    assert rc == 2 and f"({option}) must be at least 1, got 0" in err, err
    before = torch.get_num_threads()
    rc, _ = _cli(tmp_path / "ok", fc, obs, clim, option, "1", "--regions", "global", "--no-baselines", "--spectra", "none")
    assert rc == 0 and torch.get_num_threads() == before  # the scoring threads are given back after the run


def test_skipna(tmp_path):
    """--skipna: NaN points are left out of the spatial means (weights renormalised), here checked against numpy."""
    fc, obs, clim = _small()
    fc["2m_temperature"][:, :, :4, :] = np.nan  # the 4 southernmost rows of every forecast
    rc, out = _cli(tmp_path, fc, obs, clim, "--skipna", "--regions", "global,tropics", "--no-baselines", "--spectra", "none")
    assert rc == 0
    df = _read(Path(out) / "scores.csv")
    got = df.query("variable == '2m_temperature' and metric == 'mse' and region == 'global' and lead_time_hours == 24")["value"].item()
    f = fc["2m_temperature"].isel(prediction_timedelta=0).values.astype(np.float64)
    o = obs["2m_temperature"].sel(time=fc["time"].values + fc["prediction_timedelta"].values[0]).values.astype(np.float64)
    w = np.cos(np.deg2rad(fc["latitude"].values))[:, None] * np.ones(fc.sizes["longitude"])
    ok = np.isfinite(f)
    want = np.mean([(np.where(ok[i], w * (f[i] - o[i]) ** 2, 0)).sum() / np.where(ok[i], w, 0).sum() for i in range(f.shape[0])])
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert df["value"].notna().all()


def test_skipna_ensemble(tmp_path):
    """--skipna with an ensemble: a NaN member point drops out of every ensemble score; rank histograms still sum to 1."""
    fc, obs, clim = _small("ens")
    fc["2m_temperature"][0, 2, :, 10, 10] = np.nan
    meta = evaluate(fc, obs, tmp_path, clim, Options(progress=False, skipna=True, regions=["global", "tropics"], spectra=()))
    df = _read(tmp_path / "scores.csv")
    assert df["value"].notna().all() and meta["forecast_kind"] == "ensemble"
    rank = _read(tmp_path / "rank_histogram.csv")
    sums = rank.groupby(["variable", "metric", "level", "lead_time_hours"])["value"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, rtol=1e-12)


def test_cli_registration():
    """add_cli registers ``evaluate`` on a subparsers object, as python -m fcn3_lightning wires it."""
    import argparse

    from fcn3_lightning.eval.cli import add_cli, run

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["evaluate", "--forecast", "f.zarr", "--obs", "o.zarr", "--out", "x", "--regions", "global,europe", "--no-baselines"]
    )
    assert args.func is run and args.regions == ["global", "europe"] and args.no_baselines and args.dtype == "float32"


def test_failure_keeps_previous_outputs(tmp_path, monkeypatch):
    """A run that fails while writing leaves the folder as the previous run left it (no partial or temporary files)."""
    fc, obs, clim = _small()
    rc, out = _cli(tmp_path, fc, obs, clim, "--regions", "global", "--spectra", "none")
    assert rc == 0
    before = {p.name: p.read_bytes() for p in Path(out).iterdir()}
    import fcn3_lightning.eval.results as results

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(results, "write_netcdf", boom)
    monkeypatch.setattr("fcn3_lightning.eval.collect.write_netcdf", boom)
    with pytest.raises(OSError, match="disk full"):
        evaluate(
            tmp_path / "fc.zarr",
            tmp_path / "obs.zarr",
            out,
            tmp_path / "clim.zarr",
            Options(progress=False, regions=["tropics"], spectra=()),
        )
    after = {p.name: p.read_bytes() for p in Path(out).iterdir()}
    assert after == before


def test_ensemble_block_split_is_exact(tmp_path):
    """Tiny blocks (one init, one lead and one variable group at a time) give the same numbers as one block.

    Except where the rank histogram breaks ties at random: the draws follow the blocks (within its tolerance)."""
    fc, obs, clim = _small("ens")
    opts = dict(progress=False, regions=["global", "europe", "global_land"], spectra=("geopotential",), dtype="float64")
    a = evaluate(fc, obs, tmp_path / "a", clim, Options(**opts))
    b = evaluate(fc, obs, tmp_path / "b", clim, Options(block_mb=0.05, **opts))
    assert a["blocks"] == 1 and b["blocks"] > 10
    for name in ("scores.csv", "per_init.csv", "rank_histogram.csv", "spectra.csv"):
        x, y = pd.read_csv(tmp_path / "a" / name), pd.read_csv(tmp_path / "b" / name)
        pd.testing.assert_frame_equal(x.drop(columns="value"), y.drop(columns="value"))
        tol = dict(rtol=0, atol=2e-3) if name == "rank_histogram.csv" else dict(rtol=1e-9, atol=1e-12)  # summation order only
        np.testing.assert_allclose(x["value"], y["value"], err_msg=name, **tol)


# --- the fused updates ------------------------------------------------------------------------------------


def test_sorting_network_sorts():
    from fcn3_lightning.eval.fast import sorting_network

    rng = np.random.default_rng(2)
    for m in range(2, 21):
        x = [row for row in rng.integers(0, 4, size=(m, 200))]  # many ties
        for a, b in sorting_network(m):
            x[a], x[b] = np.minimum(x[a], x[b]), np.maximum(x[a], x[b])
        np.testing.assert_array_equal(np.stack(x), np.sort(np.stack(x), axis=0), err_msg=f"M={m}")


@pytest.mark.parametrize("members", [2, 5, 20])
def test_fused_updates_equal_the_classes(members):
    """Every state the fused kernels accumulate equals what the classes' own update() accumulates."""
    import torch
    from fcn3_lightning.eval.fast import FusedUpdates

    from fcn3_lightning.metrics import ACC, CRPS, DeterministicScores, EnergyScore, PredictionActivity, RankHistogram, SpreadSkill

    g = torch.Generator().manual_seed(members)
    lat, lon = np.linspace(-80, 80, 9), np.arange(16) * 22.5
    lsm = np.random.default_rng(0).random((9, 16))
    kw = dict(regions=["global", "tropics", "europe", "global_land"], land_sea_mask=lsm)
    x = torch.randn(2, members, 3, 4, 9, 16, generator=g, dtype=torch.float32) * 3 + 100
    x[:, :, :, 0] = x[:, :, :, 0].round()  # ties with the truth for the rank histogram
    o = (torch.randn(2, 3, 4, 9, 16, generator=g) * 3 + 100).float()
    o[:, :, 0] = o[:, :, 0].round()
    c = o + torch.randn(2, 3, 4, 9, 16, generator=g).float()
    chans, leads = ["a", "b", "c", "d"], [6, 12, 18]
    fused = FusedUpdates("off")
    for cls, args in ((CRPS, {}), (SpreadSkill, {}), (EnergyScore, {}), (RankHistogram, {"n_members": members, "seed": 3})):
        a, b = cls(lat, lon, chans, leads, **kw, **args), cls(lat, lon, chans, leads, **kw, **args)
        # ties are broken at random (by different draws): the rank histogram is compared on data without ties
        xx, oo = (x + 0.25, o) if cls is RankHistogram else (x, o)
        a.update(xx, oo)
        a.update(xx[:1], oo[:1])
        key = {CRPS: "crps", SpreadSkill: "ss", EnergyScore: "es", RankHistogram: "rank"}[cls]
        fused.ensemble(xx, oo, **{key: b})
        fused.ensemble(xx[:1], oo[:1], **{key: b})
        for name in a._defaults:
            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-12, atol=1e-12, msg=f"{cls.__name__}.{name}")
    s1, s2 = DeterministicScores(lat, lon, chans, leads, **kw), DeterministicScores(lat, lon, chans, leads, **kw)
    a1, a2 = ACC(lat, lon, chans, leads, **kw), ACC(lat, lon, chans, leads, **kw)
    p1, p2 = PredictionActivity(lat, lon, chans, leads, **kw), PredictionActivity(lat, lon, chans, leads, **kw)
    s1.update(x[:, 0], o)
    a1.update(x[:, 0], o, c)
    p1.update(x[:, 0], c)
    fused.deterministic(x[:, 0], o, s2, a2, c, p2)
    from fcn3_lightning.eval.derived import WindVectorScores

    w1, w2 = WindVectorScores(lat, lon, chans[:2], leads, **kw), WindVectorScores(lat, lon, chans[:2], leads, **kw)
    w1.update(x[:, 0, :, :2], x[:, 1, :, :2], o[:, :, :2], c[:, :, :2])
    fused.wind_vector(w2, x[:, 0, :, :2], x[:, 1, :, :2], o[:, :, :2], c[:, :, :2])
    for m1, m2 in ((s1, s2), (a1, a2), (p1, p2), (w1, w2)):
        for name in m1._defaults:
            torch.testing.assert_close(getattr(m2, name), getattr(m1, name), rtol=1e-12, atol=1e-12, msg=f"{type(m1).__name__}.{name}")


def test_fused_rank_histogram_breaks_ties_uniformly():
    """Where every member equals the truth, the rank is uniform over 0 ... M (as WB2's random tie-breaking)."""
    import torch
    from fcn3_lightning.eval.fast import FusedUpdates

    from fcn3_lightning.metrics import RankHistogram

    lat, lon = np.linspace(-89, 89, 90), np.arange(180) * 2.0
    o = torch.randn(1, 1, 2, 90, 180)
    x = o.unsqueeze(1).repeat(1, 5, 1, 1, 1, 1)
    x[:, :2, :, 1] -= 1.0  # channel 1: two members below, three tied
    rank = RankHistogram(lat, lon, ["a", "b"], [6], regions=["global", "europe"], n_members=5)
    FusedUpdates("off").ensemble(x, o, rank=rank)
    h = rank.compute()["rank_histogram_latweighted_spatial_mean"][:, 0]  # (R, C, K)
    np.testing.assert_allclose(h[0, 0].numpy(), 1 / 6, atol=0.02)  # global: 16200 points
    np.testing.assert_allclose(h[0, 1, 2:].numpy(), 1 / 4, atol=0.03)
    np.testing.assert_allclose(h.sum(-1).numpy(), 1.0, rtol=1e-12)
    assert float(h[:, 1, :2].abs().max()) == 0.0


@pytest.mark.skipif(
    not __import__("os").environ.get("FCN3_TEST_COMPILE"), reason="set FCN3_TEST_COMPILE=1: torch.compile takes ~1 min on 2 cores"
)
def test_compiled_kernels_equal_eager():
    import torch
    from fcn3_lightning.eval.fast import crps_spread_weights, deterministic_kernel, ensemble_kernel, sorting_network

    x = torch.randn(10, 3 * 5 * 12 * 24)
    o = torch.randn(3 * 5 * 12 * 24)
    args = (x, o, torch.float64, sorting_network(10), crps_spread_weights(10), True)
    for got, want in zip(torch.compile(ensemble_kernel, dynamic=True)(*args), ensemble_kernel(*args), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(
        torch.compile(deterministic_kernel, dynamic=True)(o, x[0], x[1], torch.float64), deterministic_kernel(o, x[0], x[1], torch.float64)
    )


# --- the years of the baselines (issue 15) ------------------------------------------------------------------


def _clim_baseline_mse(obs: xr.Dataset, years: list[int], inits: np.ndarray, lead: np.timedelta64) -> float:
    """The climatology baseline's global MSE of 2m_temperature at one lead, with the climatology of ``years`` written
    out in numpy (``_numpy_climatology``) and cos-latitude weights (= cell-edge weights on this equiangular grid)."""
    da = obs["2m_temperature"]
    times = pd.DatetimeIndex(da["time"].values)
    keep = times.year.isin(years)
    x = da.values[keep].astype(np.float64)
    w = np.cos(np.deg2rad(obs["latitude"].values))[:, None] * np.ones(obs.sizes["longitude"])
    mse = []
    for t in pd.DatetimeIndex(inits + lead):
        with np.errstate(invalid="ignore"):  # days of the year without truth in any window: NaN, not used here
            clim = _numpy_climatology(times[keep], x, t.hour)[t.day_of_year - 1]
        truth = da.sel(time=t).values.astype(np.float64)
        mse.append((w * (clim - truth) ** 2).sum() / w.sum())
    return float(np.mean(mse))


def _clim_record(out: Path, lead_hours: int = 24) -> float:
    df = _read(out / "scores.csv")
    sel = df.query(
        "eval == 'climatology_baseline_deterministic' and variable == '2m_temperature' and metric == 'mse' "
        "and region == 'global' and lead_time_hours == @lead_hours"
    )
    return float(sel["value"].item())


def test_climatology_baselines_use_only_years_before_the_scored_inits(tmp_path):
    """Default: the computed climatology and the probabilistic climatology average the years before the first scored
    init (2017-2019 for inits in 2020), not the scored year; meta.json and the leaderboard say which years."""
    fc, obs, _ = _small("ens")
    meta = evaluate(fc, obs, tmp_path, None, Options(progress=False, regions=["global"], spectra=()))
    assert meta["climatology_years"] == [2017, 2018, 2019] and meta["probabilistic_climatology_years"] == [2017, 2018, 2019]
    assert meta["climatology"].endswith("years 2017-2019")
    assert not any("seen the truth" in w for w in meta["warnings"])
    inits, lead = fc["time"].values, fc["prediction_timedelta"].values[0]
    got = _clim_record(tmp_path)
    want = _clim_baseline_mse(obs, [2017, 2018, 2019], inits, lead)
    leaky = _clim_baseline_mse(obs, [2017, 2018, 2019, 2020], inits, lead)  # what the baseline was before
    print(f"climatology baseline t2m MSE at 24 h: {got:.4f} (2017-2019: {want:.4f}; with the scored year 2020: {leaky:.4f})")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert abs(leaky - want) > 100 * 1e-5 * want  # the check tells the two apart

    # the reports name the years
    from fcn3_lightning.eval.reports import write_reports
    from fcn3_lightning.eval.scorecard import scorecard_panels

    write_reports(tmp_path)
    for name in ("leaderboard.md", "leaderboard.html"):
        text = html.unescape((tmp_path / name).read_text())
        assert "climatology of the truth, years 2017-2019" in text, name
        assert "the truth of the years 2017-2019 at the valid times' dates" in text, name
    md = (tmp_path / "leaderboard.md").read_text()
    assert "triangular win;" not in md and "…" not in md  # nothing cut short
    years = {p.baseline: p.years for p in scorecard_panels(_read_run(tmp_path))}
    assert years == {"persistence": "", "climatology": "2017-2019", "probabilistic climatology": "2017-2019"}


def _read_run(out: Path) -> dict[str, pd.DataFrame]:
    from fcn3_lightning.eval.leaderboard import load_runs

    return load_runs([out])


def test_climatology_years_given_by_the_user_are_honoured(tmp_path, capsys):
    fc, obs, _ = _small()
    inits, lead = fc["time"].values, fc["prediction_timedelta"].values[0]
    rc, out = _cli(tmp_path, fc, obs, None, "--regions", "global", "--spectra", "none", "--clim-years", "2018-2019")
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((Path(out) / "meta.json").read_text())
    assert meta["climatology_years"] == [2018, 2019] and meta["climatology"].endswith("years 2018-2019")
    np.testing.assert_allclose(_clim_record(Path(out)), _clim_baseline_mse(obs, [2018, 2019], inits, lead), rtol=1e-5)
    # years holding the scored period: done as asked, with a warning in the log and in meta.json
    rc, out = _cli(tmp_path / "b", fc, obs, None, "--regions", "global", "--spectra", "none", "--clim-years", "2019:2020")
    err = capsys.readouterr().err
    assert rc == 0, err
    meta = json.loads((Path(out) / "meta.json").read_text())
    assert meta["climatology_years"] == [2019, 2020]
    msg = "the climatology (--clim-years) uses years holding scored valid times ([2020]): it has seen the truth it is scored against"
    assert msg in err and msg in meta["warnings"]
    np.testing.assert_allclose(_clim_record(Path(out)), _clim_baseline_mse(obs, [2019, 2020], inits, lead), rtol=1e-5)


def test_no_earlier_year_for_the_climatology_is_a_clear_error(tmp_path, capsys):
    fc, obs, _ = _small()
    obs = obs.sel(time=obs["time"] >= np.datetime64("2020-01-01"))  # only the scored year
    rc, out = _cli(tmp_path, fc, obs, None, "--regions", "global", "--spectra", "none")
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "before the first scored init (2020-01-01T00:00:00)" in err and "has none (it has 2020)" in err, err
    assert "--climatology" in err and "--clim-years FIRST:LAST" in err
    assert not Path(out).exists() or not any(Path(out).iterdir())
    # the probabilistic climatology, when asked for by name with too few earlier years, names its option
    fc2, obs2, clim2 = _small()
    obs2 = obs2.sel(time=obs2["time"] >= np.datetime64("2019-01-01"))  # one earlier year: 2 are needed
    rc, _ = _cli(tmp_path / "p", fc2, obs2, clim2, "--regions", "global", "--spectra", "none", "--baselines", "probabilistic_climatology")
    err = capsys.readouterr().err
    assert rc == 2 and "before the first scored init" in err and "--prob-clim-years" in err, err


def test_default_spectra_are_those_the_store_has(tmp_path, capsys):
    """No warning about spectra nobody asked for (the default world has no 2m_temperature); one for those asked for."""
    fc, obs, clim = _small()
    fc, obs, clim = (ds.drop_vars("2m_temperature") for ds in (fc, obs, clim))
    meta = evaluate(fc, obs, tmp_path / "a", clim, Options(progress=False, regions=["global"]))
    assert meta["spectra"] == ["geopotential/500"] and not any("spectra" in w for w in meta["warnings"]), meta["warnings"]
    assert "spectra" not in capsys.readouterr().err
    opts = Options(progress=False, regions=["global"], spectra=["geopotential/500", "2m_temperature"])
    meta = evaluate(fc, obs, tmp_path / "b", clim, opts)
    assert meta["spectra"] == ["geopotential/500"]
    spectra_warnings = [w for w in meta["warnings"] if not w.startswith("intervals: ")]  # 4 inits: block length 1
    assert spectra_warnings == ["spectra: '2m_temperature' is not among the scored channels; no spectrum for it"]


def test_preset_wbx(tmp_path):
    """``--preset wbx``: WeatherBench-X's levels, inits every 12 h and its 17 regions; an explicit option wins. Each new
    region's MSE against an independent numpy computation of its box (inclusive bounds, cell-edge weights)."""
    from fcn3_lightning.eval.cli import add_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--forecast", "f", "--obs", "o", "--out", "x", "--preset", "wbx"]
    opt = options_from_args(parser.parse_args(base))
    assert list(opt.levels) == [500, 700, 850] and opt.init_every_hours == 12
    assert len(opt.regions) == 17 and "extra-tropics" not in opt.regions and "west-asia" in opt.regions
    assert options_from_args(parser.parse_args([*base, "--levels", "500"])).levels == [500.0]
    opt.variables, opt.spectra, opt.progress, opt.baselines = ["2m_temperature"], [], False, []
    opt.start = "2020-01-01T06"  # the fixture's inits are 00/12 UTC: shift the first to check the cadence filter
    evaluate(FIXTURE / "forecast_det.zarr", FIXTURE / "obs.zarr", tmp_path, FIXTURE / "climatology.zarr", opt)
    df = _read(tmp_path / "scores.csv")
    assert set(df["region"]) == set(opt.regions)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["inits"] == ["2020-01-01T12:00:00", "2020-01-02T00:00:00", "2020-01-02T12:00:00"]
    fc = xr.open_zarr(FIXTURE / "forecast_det.zarr", decode_timedelta=True)["2m_temperature"].sel(time=slice("2020-01-01T12", None))
    obs = xr.open_zarr(FIXTURE / "obs.zarr")["2m_temperature"]
    lat, lon = fc["latitude"].values, fc["longitude"].values
    edges = np.concatenate([[-90.0], (lat[1:] + lat[:-1]) / 2, [90.0]])
    w_lat = np.diff(np.sin(np.deg2rad(edges)))
    boxes = {  # WBX's own bounds, longitudes -180..180 where it writes them so
        "northern-africa": ((5, 32.5), (-12.5, 37.5)),
        "southern-africa": ((-30, 5), (12.5, 37.5)),
        "south-america": ((-40, 5), (-75, -45)),
        "west-asia": ((15, 60), (42.5, 102.5)),
        "south-east-asia": ((-12.5, 25), (95, 125)),
    }
    lon180 = np.where(lon > 180, lon - 360, lon)
    for name, ((la0, la1), (lo0, lo1)) in boxes.items():
        inside = ((lat >= la0) & (lat <= la1))[:, None] & (((lon180 >= lo0) & (lon180 <= lo1)) | ((lon >= lo0) & (lon <= lo1)))[None]
        w = np.where(inside, w_lat[:, None], 0.0)
        for lead in (24, 72):
            td = np.timedelta64(lead, "h")
            se = [
                (w * (fc.sel(time=t, prediction_timedelta=td).values.astype(np.float64) - obs.sel(time=t + td).values) ** 2).sum() / w.sum()
                for t in fc["time"].values
            ]
            row = df[(df["eval"] == "deterministic") & (df["metric"] == "mse") & (df["region"] == name) & (df["lead_time_hours"] == lead)]
            np.testing.assert_allclose(row["value"].item(), np.mean(se), rtol=1e-5)


def test_init_every_hours_must_divide_a_day(tmp_path, capsys):
    code, _ = _cli(tmp_path, *_small(), "--init-every-hours", "7")
    assert code == 2 and "--init-every-hours must divide 24" in capsys.readouterr().err


def test_csv_written_in_slices_keeps_each_number_column_alike(tmp_path: Path) -> None:
    """write_csv converts the frame in row slices (bounded memory); a column whose only non-whole number lies in a
    later slice does not change how the other slices write it, and every row arrives in order."""
    from fcn3_lightning.eval.results import CSV_ROWS, SPECTRA_COLUMNS, write_csv

    n = CSV_ROWS + 10
    lead = np.full(n, 6.0)
    lead[-1] = 1.5  # the only non-whole lead, in the second slice
    df = pd.DataFrame(
        {
            "eval": pd.Categorical(["zonal_energy_spectrum"] * n),
            "dataset": pd.Categorical(["obs"] * n),
            "variable": pd.Categorical(["geopotential"] * n),
            "level": np.full(n, 500.0),
            "lead_time_hours": lead,
            "latitude": np.linspace(-90, 90, n),
            "zonal_wavenumber": np.arange(n) % 91,
            "value": np.arange(n) * 0.1,
        }
    )
    write_csv(df, SPECTRA_COLUMNS, tmp_path / "s.csv")
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert len(lines) == n + 1
    assert [line.split(",")[4] for line in (lines[1], lines[CSV_ROWS + 1], lines[-1])] == ["6", "6", "1.5"]
    back = pd.read_csv(tmp_path / "s.csv")
    np.testing.assert_array_equal(back["value"].to_numpy(), df["value"].to_numpy())
    assert back["level"].tolist()[:2] == [500, 500] and lines[1].split(",")[3] == "500"


def test_evaluate_intervals_equal_an_independent_bootstrap(runs):
    """intervals.csv: the IID bootstrap of every score over the per-init records, as an independent numpy resampling
    (statistics' documented draws: default_rng([seed, 0]).integers(0, n, (1000, n)), 2.5 / 97.5 % quantiles); the
    netCDF's {variable}_lower / _upper are the CSV's stationary interval."""
    out = runs["ens"]
    iv = pd.read_csv(out / "intervals.csv")
    pi = _read(out / "per_init.csv")
    scores = _read(out / "scores.csv")
    assert {"persistence_baseline", "probabilistic_climatology_baseline", "probabilistic", "ensemble_mean_deterministic"} <= set(iv["eval"])
    assert not iv["metric"].str.contains("ratio").any()  # ratios get no interval
    iv["level"] = iv["level"].fillna(-1).astype(int)
    n = pi["init_time"].nunique()
    idx = np.random.default_rng([0, 0]).integers(0, n, size=(1000, n))
    checked = 0
    for ev, metric, rms in [
        ("ensemble_mean_deterministic", "rmse", True),
        ("probabilistic", "crps", False),
        ("persistence_baseline", "mae", False),
        ("climatology_baseline_deterministic", "rmse", True),
        ("probabilistic_climatology_baseline", "crps", False),
    ]:
        for region in ("global", "tropics"):
            for (var, lev, lead), g in pi[(pi["eval"] == f"{ev}_temporal") & (pi["metric"] == metric) & (pi["region"] == region)].groupby(
                ["variable", "level", "lead_time_hours"]
            ):
                v = g.sort_values("init_time")["value"].to_numpy()
                boot = np.sqrt((v[idx] ** 2).mean(1)) if rms else v[idx].mean(1)
                lo, hi = np.quantile(boot, [0.025, 0.975])
                key = (iv["eval"] == ev) & (iv["metric"] == metric) & (iv["region"] == region) & (iv["variable"] == var)
                key &= (iv["level"] == lev) & (iv["lead_time_hours"] == lead)
                row = iv[key].iloc[0]
                assert abs(row["lower_iid"] - lo) <= 1e-12 * abs(lo) and abs(row["upper_iid"] - hi) <= 1e-12 * abs(hi)
                s = scores[
                    (scores["eval"] == ev)
                    & (scores["metric"] == metric)
                    & (scores["region"] == region)
                    & (scores["variable"] == var)
                    & (scores["level"] == lev)
                    & (scores["lead_time_hours"] == lead)
                ]
                np.testing.assert_allclose(row["value"], s["value"].item(), rtol=1e-6)  # the score the interval is about
                assert row["n_inits"] == n and row["lower"] <= row["value"] <= row["upper"]
                checked += 1
    print(f"evaluate intervals checked against an independent bootstrap: {checked}")
    assert checked >= 5 * 2 * 3
    with xr.open_dataset(out / "probabilistic.nc", engine="h5netcdf") as ds:
        row = iv[
            (iv["eval"] == "probabilistic")
            & (iv["metric"] == "crps")
            & (iv["region"] == "global")
            & (iv["variable"] == "geopotential")
            & (iv["level"] == 500)
            & (iv["lead_time_hours"] == 24)
        ].iloc[0]
        sel = dict(metric="crps", region="global", level=500, lead_time=np.timedelta64(24, "h"))
        assert float(ds["geopotential_lower"].sel(sel)) == row["lower"] and float(ds["geopotential_upper"].sel(sel)) == row["upper"]
        assert np.isnan(float(ds["geopotential_lower"].sel(sel | {"metric": "spread_skill_ratio"})))
