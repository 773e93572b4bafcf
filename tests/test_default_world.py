"""The embedded default world: numerics, determinism, schema, physics, atomic writes and the cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from fcn3_lightning.data import default_world as dw
from fcn3_lightning.data.zenith import cos_zenith

SMALL = {"years": 0.05, "spinup_days": 15.0, "progress": False}  # 74 six-hourly steps after a 15-day spin-up


@pytest.fixture(scope="module")
def world_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dw.generate_default_world(tmp_path_factory.mktemp("world") / "w.zarr", seed=0, **SMALL)


@pytest.fixture(scope="module")
def world(world_path: Path) -> xr.Dataset:
    return xr.open_zarr(world_path).load()


def _arrays(path: Path) -> dict[str, np.ndarray]:
    ds = xr.open_zarr(path)
    return {name: ds[name].values for name in [*ds.data_vars, *ds.coords]}


def _lag_corr(x: np.ndarray, lag: int) -> float:
    a = x - x.mean(0)
    return float((a[lag:] * a[:-lag]).sum() / np.sqrt((a[lag:] ** 2).sum() * (a[:-lag] ** 2).sum()))


def _clenshaw_curtis_weights(nlat: int) -> np.ndarray:
    from torch_harmonics.quadrature import precompute_latitudes

    return precompute_latitudes(nlat, grid="equiangular")[1].numpy()


# --- numerics ----------------------------------------------------------------------------------------


def test_transforms_match_torch_harmonics():
    import torch_harmonics as th

    k, n, lmax = 24, 48, 16
    mu, w = np.polynomial.legendre.leggauss(k)
    tr = dw._Transforms(np.arcsin(mu[::-1]), n, lmax, lmax, w[::-1])
    grid = torch.randn(3, k, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sht = th.RealSHT(k, n, lmax=lmax, mmax=lmax, grid="legendre-gauss", csphase=False).double()
    isht = th.InverseRealSHT(k, n, lmax=lmax, mmax=lmax, grid="legendre-gauss", csphase=False).double()
    coeffs = tr.analysis(grid)
    torch.testing.assert_close(coeffs, sht(grid).transpose(-1, -2), rtol=0, atol=1e-12)
    torch.testing.assert_close(tr.scalars(coeffs), isht(sht(grid)), rtol=0, atol=1e-12)


def test_winds_are_eastward_and_northward_with_the_right_vorticity_and_divergence():
    """Winds from (psi, chi) on a grid with poles, differentiated by finite differences, give back laplacian(psi, chi)."""
    lmax, nlat, nlon = 8, 181, 360
    rng = np.random.default_rng(0)
    tr = dw._Transforms(np.deg2rad(np.linspace(90, -90, nlat)), nlon, lmax, lmax)
    ell, m = np.arange(lmax)[None, :], np.arange(lmax)[:, None]
    c = (rng.standard_normal((2, lmax, lmax)) + 1j * rng.standard_normal((2, lmax, lmax))) * (ell >= m) * (ell > 0)
    c[:, 0] = c[:, 0].real  # m = 0 of a real field
    c = torch.from_numpy(c * 1e6)
    u, v = (x.numpy() for x in tr.winds(c[0:1], c[1:2])[:, 0])
    assert np.isfinite(u).all() and np.isfinite(v).all()  # pole rows included
    lap = torch.from_numpy(-ell * (ell + 1) / dw.EARTH_RADIUS**2)
    vort_true, div_true = (x.numpy() for x in tr.scalars(c * lap))
    lat = np.deg2rad(np.linspace(90, -90, nlat))[:, None]
    dlat, dlon = lat[1, 0] - lat[0, 0], 2 * np.pi / nlon
    ddlon = lambda f: (np.roll(f, -1, 1) - np.roll(f, 1, 1)) / (2 * dlon)  # noqa: E731
    ddlat = lambda f: np.gradient(f, dlat, axis=0)  # noqa: E731
    a, cos = dw.EARTH_RADIUS, np.cos(lat)
    vort = (ddlon(v) - ddlat(u * cos)) / (a * cos)
    div = (ddlon(u) + ddlat(v * cos)) / (a * cos)
    inner = np.abs(lat[:, 0]) <= np.deg2rad(80)  # differences across the poles are not meaningful
    for got, want in ((vort, vort_true), (div, div_true)):
        err = np.abs(got[inner] - want[inner]).max() / np.abs(want).max()
        assert err < 5e-3, err  # the finite differences' own error is 2e-3 here; a wrong sign or factor is O(1)


def test_the_sun_is_cos_zenith():
    times = pd.date_range("2000-03-01", periods=7, freq="5h17min").values.astype("datetime64[ns]")
    lat, lon = np.linspace(90, -90, 9), np.arange(16) * 22.5
    a, b, c = (x[:, None, None] for x in dw._World._sun(times).T)
    la, lo = np.deg2rad(lat)[None, :, None], np.deg2rad(lon)[None, None, :]
    ours = a * np.sin(la) + np.cos(la) * (b * np.cos(lo) + c * np.sin(lo))
    np.testing.assert_allclose(ours, cos_zenith(times, lat, lon), rtol=0, atol=1e-12)


# --- determinism ---------------------------------------------------------------------------------------


def test_same_seed_gives_identical_arrays_and_another_seed_does_not(world_path: Path, tmp_path: Path):
    threads = torch.get_num_threads()
    again = _arrays(dw.generate_default_world(tmp_path / "again.zarr", seed=0, **SMALL))
    assert torch.get_num_threads() == threads  # the generator restores the thread count
    first = _arrays(world_path)
    assert first.keys() == again.keys()
    for name in first:
        assert first[name].dtype == again[name].dtype and first[name].tobytes() == again[name].tobytes(), name
    other = _arrays(dw.generate_default_world(tmp_path / "other.zarr", seed=1, **SMALL))
    for name in ("geopotential", "u_component_of_wind", "total_column_water_vapour", "land_sea_mask", "geopotential_at_surface"):
        assert not np.array_equal(first[name], other[name]), name
    np.testing.assert_array_equal(first["time"], other["time"])


# --- schema ----------------------------------------------------------------------------------------------


def test_schema(world: xr.Dataset, world_path: Path):
    nlat, nlon = dw.DEFAULT_NLAT, dw.DEFAULT_NLON
    assert (world_path / ".zmetadata").is_file()  # consolidated
    level_vars = {"geopotential": "m**2 s**-2", "u_component_of_wind": "m s**-1", "v_component_of_wind": "m s**-1"}
    for name, units in level_vars.items():
        da = world[name]
        assert da.dims == ("time", "level", "latitude", "longitude") and da.dtype == np.float32
        assert da.attrs["units"] == units and da.attrs["long_name"]
        assert da.encoding["chunks"] == (1, 1, nlat, nlon)
    tcwv = world["total_column_water_vapour"]
    assert tcwv.dims == ("time", "latitude", "longitude") and tcwv.dtype == np.float32 and tcwv.attrs["units"] == "kg m**-2"
    assert tcwv.encoding["chunks"] == (1, nlat, nlon)
    for name, units in {"geopotential_at_surface": "m**2 s**-2", "land_sea_mask": "1"}.items():
        assert world[name].dims == ("latitude", "longitude") and world[name].dtype == np.float32 and world[name].attrs["units"] == units
    assert set(world.data_vars) == {*level_vars, "total_column_water_vapour", "geopotential_at_surface", "land_sea_mask"}

    np.testing.assert_array_equal(world["level"].values, [500])
    assert world["level"].dtype == np.int64
    lat, lon = world["latitude"].values, world["longitude"].values
    assert lat.dtype == lon.dtype == np.float64
    np.testing.assert_allclose(lat, np.linspace(90, -90, nlat), rtol=0, atol=1e-12)
    assert lat[0] == 90.0 and lat[-1] == -90.0 and np.all(np.diff(lat) < 0)
    np.testing.assert_allclose(lon, np.arange(nlon) * 360.0 / nlon, rtol=0, atol=1e-12)
    times = world["time"].values
    assert times.dtype == np.dtype("datetime64[ns]") and times[0] == np.datetime64("2000-01-01T00:00")
    assert np.all(np.diff(times) == np.timedelta64(6, "h")) and times.size == 74

    attrs = world.attrs
    assert attrs["generator_version"] == dw.GENERATOR_VERSION and attrs["seed"] == 0
    assert json.loads(attrs["channels"]) == list(dw.DEFAULT_WORLD_CHANNELS) == ["tcwv", "u500", "v500", "z500"]
    splits = json.loads(attrs["recommended_splits"])
    assert splits["train"][0] == "2000-01-01T00:00:00" and np.datetime64(splits["test"][1]) == times[-1]
    for a, b in (("train", "valid"), ("valid", "test")):  # contiguous, non-empty, in order
        assert np.datetime64(splits[b][0]) - np.datetime64(splits[a][1]) == np.timedelta64(6, "h")
        assert np.datetime64(splits[a][0]) < np.datetime64(splits[a][1])


def test_the_data_reader_reads_it(world_path: Path, world: xr.Dataset):
    store_mod = pytest.importorskip("fcn3_lightning.data.store")
    store = store_mod.WB2Store(world_path, dw.DEFAULT_WORLD_CHANNELS)
    x = store.read([0, 1])
    assert x.shape == (2, 4, dw.DEFAULT_NLAT, dw.DEFAULT_NLON) and np.isfinite(x).all()
    np.testing.assert_array_equal(x[1, 3], world["geopotential"].values[1, 0])
    np.testing.assert_array_equal(x[0, 0], world["total_column_water_vapour"].values[0])


def test_default_splits_follow_from_the_default_span():
    times = dw._time_axis(pd.Timestamp(dw.DEFAULT_START), dw.DEFAULT_YEARS)
    assert len(times) == 4 * (366 + 365 + 365) and times[-1] == pd.Timestamp("2002-12-31T18:00")
    assert dw._recommended_splits(times, dw.DEFAULT_YEARS) == {k: tuple(v) for k, v in dw.DEFAULT_WORLD_SPLITS.items()}


# --- physics ---------------------------------------------------------------------------------------------


def test_values_are_physical(world: xr.Dataset):
    z = world["geopotential"].values[:, 0] / dw.GRAVITY
    u, v = world["u_component_of_wind"].values[:, 0], world["v_component_of_wind"].values[:, 0]
    q = world["total_column_water_vapour"].values
    for x in (z, u, v, q):
        assert np.isfinite(x).all()
    assert 4000 < z.min() and z.max() < 6800
    assert np.abs(u).max() < 120 and np.abs(v).max() < 120 and u.std() > 2 and v.std() > 2
    assert q.min() >= 0 and 20 < q.max() < 90 and q.std() > 1
    # mass conservation: the global-mean height (exact quadrature for the T31 fields) is constant
    w = _clenshaw_curtis_weights(z.shape[1])
    mean = (z.mean(-1) * w).sum(-1) / w.sum()
    np.testing.assert_allclose(mean, 5750.0, rtol=0, atol=0.05)
    # westerlies in mid-latitudes, equator warmer (thicker, moister) than the poles
    assert u[:, 8:13].mean() > 3 and u[:, 20:25].mean() > 1.5  # 45N-22.5N (winter) and 22.5S-45S (summer) bands
    assert z[:, 16].mean() - z[:, [0, -1]].mean() > 200 and q[:, 16].mean() > 2 * q[:, [0, -1]].mean()

    lsm, oro = world["land_sea_mask"].values, world["geopotential_at_surface"].values
    assert lsm.min() == 0.0 and lsm.max() == 1.0 and ((lsm > 0) & (lsm < 1)).any()
    area = np.cos(np.deg2rad(world["latitude"].values))[:, None] * np.ones_like(lsm)
    assert 0.2 < (lsm * area).sum() / area.sum() < 0.4  # land fraction
    assert oro.min() == 0.0 and np.all(oro[lsm == 0] == 0) and 500 * dw.GRAVITY < oro.max() < 3500 * dw.GRAVITY


def test_fields_evolve_predictably_not_as_noise(world: xr.Dataset):
    fields = {
        "z500": world["geopotential"].values[:, 0],
        "u500": world["u_component_of_wind"].values[:, 0],
        "v500": world["v_component_of_wind"].values[:, 0],
        "tcwv": world["total_column_water_vapour"].values,
    }
    for name, x in fields.items():
        r1, r8 = _lag_corr(x.astype(np.float64), 1), _lag_corr(x.astype(np.float64), 8)
        assert 0.5 < r1 < 0.9999, (name, r1)  # correlated from one 6 h step to the next, but moving
        assert r8 < r1, (name, r1, r8)  # and decorrelating over days


def test_winds_are_near_geostrophic_balance_in_midlatitudes(world: xr.Dataset):
    phi = world["geopotential"].values[:, 0].astype(np.float64)
    u = world["u_component_of_wind"].values[:, 0]
    v = world["v_component_of_wind"].values[:, 0]
    lat = np.deg2rad(world["latitude"].values)
    dlat, dlon = lat[1] - lat[0], np.deg2rad(world["longitude"].values[1])
    band = (np.abs(np.rad2deg(lat)) >= 30) & (np.abs(np.rad2deg(lat)) <= 65)
    f = 2 * dw.OMEGA * np.sin(lat[band])[None, :, None]
    u_g = -np.gradient(phi, dlat, axis=1)[:, band] / (dw.EARTH_RADIUS * f)
    v_g = (np.roll(phi, -1, 2) - np.roll(phi, 1, 2))[:, band] / (2 * dlon * dw.EARTH_RADIUS * np.cos(lat[band])[None, :, None] * f)
    for geo, wind in ((u_g, u[:, band]), (v_g, v[:, band])):
        g, w = geo.ravel(), wind.ravel()
        corr, slope = np.corrcoef(g, w)[0, 1], (g * w).sum() / (g * g).sum()
        assert corr > 0.85 and 0.7 < slope < 1.3, (corr, slope)


# --- writing, cache, arguments ---------------------------------------------------------------------------

TINY = {"years": 0.01, "spinup_days": 0.0, "progress": False}  # 15 steps, no spin-up


def test_a_failure_mid_write_leaves_no_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "w.zarr"
    calls = []
    write = dw._write_block

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return write(*args, **kwargs)

    monkeypatch.setattr(dw, "_BLOCK", 4)  # several blocks, so the failure comes after a first write
    monkeypatch.setattr(dw, "_write_block", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        dw.generate_default_world(path, **TINY)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []

    # a failed regeneration leaves the old store untouched
    monkeypatch.setattr(dw, "_write_block", write)
    dw.generate_default_world(path, **TINY)
    before = _arrays(path)
    calls.clear()
    monkeypatch.setattr(dw, "_write_block", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        dw.generate_default_world(path, seed=5, **TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["w.zarr"]
    after = _arrays(path)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_publishing_onto_an_existing_store(tmp_path: Path):
    path = dw.generate_default_world(tmp_path / "w.zarr", **TINY)
    mine = dw.generate_default_world(tmp_path / ".w.zarr.tmp-mine", seed=3, **TINY)
    (mine / "marker").touch()
    dw._publish(mine, path, replace=False)  # a concurrent generator got there first: keep theirs, drop ours
    assert not mine.exists() and not (path / "marker").exists() and [p.name for p in tmp_path.iterdir()] == ["w.zarr"]
    mine = dw.generate_default_world(tmp_path / ".w.zarr.tmp-mine", seed=3, **TINY)
    (mine / "marker").touch()
    dw._publish(mine, path, replace=True)
    assert (path / "marker").exists() and [p.name for p in tmp_path.iterdir()] == ["w.zarr"]


def test_cache_location_and_ensure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("FCN3_LIGHTNING_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dw.default_world_path() == tmp_path / "home" / ".cache" / "fcn3_lightning" / f"default_world_v{dw.GENERATOR_VERSION}_seed0.zarr"
    monkeypatch.setenv("FCN3_LIGHTNING_CACHE", str(tmp_path / "cache"))
    path = dw.default_world_path(seed=2)
    assert path == tmp_path / "cache" / f"default_world_v{dw.GENERATOR_VERSION}_seed2.zarr"

    monkeypatch.setattr(dw, "DEFAULT_YEARS", TINY["years"])  # keep the "default" world tiny for the test
    monkeypatch.setattr(dw, "DEFAULT_SPINUP_DAYS", 0.0)
    path.mkdir(parents=True)  # debris that is not a complete store gets replaced
    assert dw.ensure_default_world(seed=2) == path and (path / ".zmetadata").is_file()
    assert xr.open_zarr(path).attrs["seed"] == 2

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated a cached world")

    monkeypatch.setattr(dw, "_generate", no_generation)
    assert dw.ensure_default_world(seed=2) == path
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"years": 0}, ValueError, "years"),
        ({"years": -1.0}, ValueError, "years"),
        ({"years": float("nan")}, ValueError, "years"),
        ({"years": 0.001}, ValueError, "at least 8"),
        ({"nlat": 5}, ValueError, "too small"),
        ({"nlon": 8}, ValueError, "too small"),
        ({"nlon": 65}, ValueError, "even"),
        ({"nlat": 33.0}, TypeError, "nlat"),
        ({"seed": -1}, ValueError, "seed"),
        ({"start": "2000-01-01T03:00"}, ValueError, "6-hour"),
        ({"start": "not a date"}, ValueError, "start"),
        ({"spinup_days": -1}, ValueError, "spinup_days"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, error: type[Exception], match: str):
    with pytest.raises(error, match=match):
        dw.generate_default_world(tmp_path / "w.zarr", **{"progress": False, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_other_grids(tmp_path: Path):
    ds = xr.open_zarr(dw.generate_default_world(tmp_path / "w.zarr", nlat=17, nlon=36, **TINY))
    assert ds["u_component_of_wind"].shape == (15, 1, 17, 36) and ds["latitude"].values[[0, -1]].tolist() == [90.0, -90.0]
    assert np.isfinite(ds["u_component_of_wind"].values).all() and os.path.isdir(tmp_path / "w.zarr")
