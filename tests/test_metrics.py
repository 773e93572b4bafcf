"""Issue 5: spectra (acceptance 3), clear errors (acceptance 5) and independent checks of the scores.

The WB2 reference numbers are in test_metrics_wb2.py, the multi-process runs in test_metrics_distributed.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scoringrules
import torch
import xarray as xr
from scipy.special import sph_harm_y

from fcn3_lightning.grid import sphere_quadrature
from fcn3_lightning.metrics import (
    ACC,
    CRPS,
    AngularPowerSpectrum,
    DeterministicScores,
    EnergyScore,
    RankHistogram,
    Region,
    SpreadSkill,
    ZonalEnergySpectrum,
    region_weights,
)

# three kinds of latitude grids: equiangular with poles (ours), without poles (WB2's 5.625 deg), Gaussian
GRIDS = {
    "equiangular 33x64": np.linspace(90.0, -90.0, 33),
    "no poles 32x64 (WB2)": -87.1875 + 5.625 * np.arange(32),
    "Gaussian 32x64": np.rad2deg(np.arcsin(np.polynomial.legendre.leggauss(32)[0]))[::-1],
}
LON = np.arange(64) * 5.625


def real_sh(deg: int, m: int, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Orthonormal real spherical harmonic (scipy), m < 0 for the sine ones: unit mean square x 4 pi."""
    theta = np.deg2rad(90.0 - lat)[:, None]
    phi = np.deg2rad(lon)[None, :]
    y = sph_harm_y(deg, abs(m), theta, phi)
    if m == 0:
        return y.real
    return math.sqrt(2.0) * (y.real if m > 0 else y.imag)


def _spectrum(field: np.ndarray, lat: np.ndarray, **kw) -> np.ndarray:
    spec = AngularPowerSpectrum(lat, LON, ["x"], [0], **kw)
    spec.update(torch.as_tensor(field)[None, None, None])
    return spec.compute()["angular_power_spectrum"][0, 0].numpy()


@pytest.mark.parametrize("grid", GRIDS)
def test_quadrature_is_exact(grid):
    lat = GRIDS[grid]
    w = sphere_quadrature(lat)
    x = np.sin(np.deg2rad(lat))
    for k in range(len(lat)):  # exact up to degree nlat - 1
        exact = 0.0 if k % 2 else 2.0 / (k + 1)
        assert abs((w * x**k).sum() - exact) < 1e-12, (grid, k)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("deg,m", [(0, 0), (1, 0), (2, 1), (3, -2), (5, 5), (8, -3), (12, 7), (15, 0)])
def test_single_harmonic_puts_all_power_at_its_degree(grid, deg, m):
    lat = GRIDS[grid]
    # degrees <= 16: the quadrature is exact for the products of two of them (degree <= nlat - 1)
    p = _spectrum(real_sh(deg, m, lat, LON), lat, lmax=17)
    # unit-norm harmonic: its area mean of squares is 1 / (4 pi), all at degree l
    assert abs(p[deg] - 1.0 / (4.0 * math.pi)) < 1e-12
    others = np.delete(p, deg)
    assert others.max() < 1e-14 * p[deg], f"leak {others.max() / p[deg]:.1e} at degree {others.argmax()}"


@pytest.mark.parametrize("grid", GRIDS)
def test_parseval(grid):
    """sum_l P_l = area mean of f^2 for a band-limited field: per degree and in total, to 1e-6 (measured ~1e-16)."""
    lat = GRIDS[grid]
    rng = np.random.default_rng(3)
    lmax = 15  # transforms are exact for l + lmax <= nlat - 1
    f = np.zeros((lat.size, LON.size))
    per_degree = np.zeros(32)
    for deg in range(lmax + 1):
        for m in range(-deg, deg + 1):
            c = rng.normal() * (1 + deg) ** -1.0
            f += c * real_sh(deg, m, lat, LON)
            per_degree[deg] += c * c / (4.0 * math.pi)
    # with nlat - lmax degrees the quadrature is exact for every product of the field with a harmonic of the
    # spectrum (a quadrature transform aliases a band-limited field into degrees beyond nlat - 1 - its band)
    p = _spectrum(f, lat, lmax=lat.size - lmax)
    exact_mean_sq = per_degree.sum()  # orthonormality: the area mean of f^2 is sum c^2 / (4 pi)
    rel = abs(p.sum() - exact_mean_sq) / exact_mean_sq
    per_degree_err = np.abs(p[: lmax + 1] - per_degree[: lmax + 1]).max() / exact_mean_sq
    print(f"{grid}: Parseval relative error {rel:.1e}, per-degree max {per_degree_err:.1e}")
    assert rel < 1e-6
    np.testing.assert_allclose(p[: lmax + 1], per_degree[: lmax + 1], rtol=1e-6, atol=1e-12 * exact_mean_sq)
    # and the WB2 area mean (cell-edge weights) of the same field agrees to the grid's O(h^2) accuracy
    wb2 = (region_weights(lat, LON, ["global"])[0] * f * f).sum()
    assert abs(wb2 - exact_mean_sq) / exact_mean_sq < 1e-2


def test_angular_spectrum_matches_torch_harmonics():
    """On the equiangular grid our a_lm equal torch-harmonics' RealSHT (ortho norm)."""
    from torch_harmonics import RealSHT

    lat = GRIDS["equiangular 33x64"]
    x = torch.randn(2, 33, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spec = AngularPowerSpectrum(lat, LON, ["x"], [0], lmax=32)
    ours = spec.coefficients(x)
    ref = RealSHT(33, 64, lmax=32, mmax=spec.mmax, grid="equiangular").double()(x)
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0)


def test_zonal_spectrum_definition():
    """A pure wave A cos(k lambda) on a latitude circle: S_k = 2 C (A/2)^2 = C A^2 / 2, C = 2 pi R cos(lat)."""
    lat = GRIDS["no poles 32x64 (WB2)"]
    a, k = 3.0, 5
    f = a * np.cos(k * np.deg2rad(LON))[None, :] * np.ones((lat.size, 1)) + 7.0
    spec = ZonalEnergySpectrum(lat, LON, ["x"], [0])
    spec.update(torch.as_tensor(f)[None, None, None])
    s = spec.compute()["zonal_energy_spectrum"][0, 0].numpy()  # (lat, k)
    circ = 2 * math.pi * 6_367_500.0 * np.cos(np.deg2rad(lat))
    np.testing.assert_allclose(s[:, k], circ * a * a / 2, rtol=1e-12)
    np.testing.assert_allclose(s[:, 0], circ * 49.0, rtol=1e-12)
    assert np.abs(np.delete(s, [0, k], axis=1)).max() < 1e-9 * s[:, k].min()


def _grid():
    lat = GRIDS["equiangular 33x64"]
    return lat, LON


def test_crps_equals_scoringrules_fair_estimator():
    lat, lon = _grid()
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(3, 7, 2, 2, 33, 64, generator=g, dtype=torch.float64)
    obs = torch.randn(3, 2, 2, 33, 64, generator=g, dtype=torch.float64)
    crps = CRPS(lat, lon, ["a", "b"], [6, 12])
    crps.update(pred, obs)
    pointwise = scoringrules.crps_ensemble(obs.numpy(), np.moveaxis(pred.numpy(), 1, -1), estimator="fair")  # (B, L, C, H, W)
    w = region_weights(lat, lon, ["global"])[0]
    expected = (pointwise * w).sum((-2, -1)).mean(0)
    np.testing.assert_allclose(crps.compute()["crps"][0].numpy(), expected, rtol=1e-12)


def test_scores_of_a_perfect_and_a_constant_forecast():
    lat, lon = _grid()
    obs = torch.randn(2, 1, 1, 33, 64, dtype=torch.float64)
    det = DeterministicScores(lat, lon, ["x"], [6])
    det.update(obs + 2.5, obs)
    out = det.compute()
    for key in ("bias", "rmse", "mae"):
        assert torch.allclose(out[key], torch.tensor(2.5, dtype=torch.float64)), key
    ens = torch.stack([obs] * 4, 1)
    for cls, key in ((CRPS, "crps"), (SpreadSkill, "ensemble_mean_mse"), (EnergyScore, "energy_score")):
        m = cls(lat, lon, ["x"], [6])
        m.update(ens, obs)
        assert m.compute()[key].abs().max() < 1e-12, cls.__name__


def test_rank_histogram_of_a_calibrated_ensemble_is_flat():
    lat, lon = _grid()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 5, 1, 1, 33, 64, generator=g)  # truth and 4 members from the same distribution
    hist = RankHistogram(lat, lon, ["x"], [6], n_members=4)
    hist.update(x[:, 1:], x[:, 0])
    h = hist.compute()["rank_histogram_unweighted_spatial_mean"][0, 0, 0]
    assert torch.allclose(h, torch.full((5,), 0.2, dtype=h.dtype), atol=0.01), h


def test_regions_follow_wb2_bounds():
    lat = -87.1875 + 5.625 * np.arange(32)
    w = region_weights(lat, LON, ["tropics", "europe", "extra-tropics"])
    tropics_rows = np.nonzero(w[0].sum(1))[0]
    assert lat[tropics_rows].min() >= -20 and lat[tropics_rows].max() <= 20
    eu = w[1] > 0
    assert set(LON[eu.any(0)]) == {x for x in LON if x >= 347.5 or x <= 42.5}
    assert np.allclose(w.sum((1, 2)), 1.0)
    custom = Region("band", lat=((0.0, 30.0),), lon=((10.0, 20.0),))
    assert region_weights(lat, LON, [custom])[0].sum() == pytest.approx(1.0)


# --- acceptance 5: clear errors ---------------------------------------------------------------------------


def test_mismatched_shapes_are_named():
    lat, lon = _grid()
    det = DeterministicScores(lat, lon, ["a", "b"], [6, 12])
    good = torch.zeros(1, 2, 2, 33, 64)
    with pytest.raises(ValueError, match="3 along the channel dimension.*built for 2"):
        det.update(torch.zeros(1, 2, 3, 33, 64), good)
    with pytest.raises(ValueError, match="1 along the lead time dimension"):
        det.update(torch.zeros(1, 1, 2, 33, 64), torch.zeros(1, 1, 2, 33, 64))
    with pytest.raises(ValueError, match="32 along the latitude dimension"):
        det.update(torch.zeros(1, 2, 2, 32, 64), torch.zeros(1, 2, 2, 32, 64))
    with pytest.raises(ValueError, match=r"pred \(2, 2, 2, 33, 64\) and target \(1, 2, 2, 33, 64\) differ"):
        det.update(torch.zeros(2, 2, 2, 33, 64), good)
    with pytest.raises(ValueError, match="must have 6 dimensions"):
        CRPS(lat, lon, ["a", "b"], [6, 12]).update(good, good)


@pytest.mark.parametrize("cls", [CRPS, SpreadSkill, EnergyScore])
def test_ensemble_metric_given_one_member(cls):
    lat, lon = _grid()
    m = cls(lat, lon, ["a"], [6])
    with pytest.raises(ValueError, match=f"{cls.__name__} is an ensemble metric and needs at least 2 members; pred has 1"):
        m.update(torch.zeros(1, 1, 1, 1, 33, 64), torch.zeros(1, 1, 1, 33, 64))
    with pytest.raises(ValueError, match="at least 2 members, got n_members=1"):
        RankHistogram(lat, lon, ["a"], [6], n_members=1)


def _climatology(hours=(0, 6, 12, 18), days=range(1, 367)) -> xr.Dataset:
    lat, lon = _grid()
    shape = (len(hours), len(days), 33, 64)
    return xr.Dataset(
        {"geopotential": (("hour", "dayofyear", "level", "latitude", "longitude"), np.zeros((*shape[:2], 1, *shape[2:]))),
         "2m_temperature": (("hour", "dayofyear", "latitude", "longitude"), np.zeros(shape))},
        coords={"hour": list(hours), "dayofyear": list(days), "level": [500], "latitude": lat[::-1], "longitude": lon},
    )  # fmt: skip


def _clim_channels(*names):
    from fcn3_lightning.eval.data import Channel

    from fcn3_lightning.channels import parse_channel

    return [Channel(c.long_name, c.level) for c in map(parse_channel, names)]


def test_lead_time_missing_from_the_climatology():
    from fcn3_lightning.eval.climatology import ZarrClimatology

    lat, lon = _grid()
    clim = ZarrClimatology(_climatology(hours=(0, 12)), lat, lon)
    init = np.array(["2020-01-01T00"], dtype="datetime64[ns]")
    valid = init[:, None] + np.array([12, 18], dtype="timedelta64[h]")[None, :]
    with pytest.raises(ValueError, match=r"lacks 1 \(dayofyear, hour\) pairs of the valid times: day 1 hour 18 .*hours \[0, 12\]"):
        clim.at(_clim_channels("z500", "t2m"), valid)
    assert clim.at(_clim_channels("z500", "t2m"), valid[:, :1]).shape == (1, 1, 2, 33, 64)
    acc = ACC(lat, lon, ["z500", "t2m"], [12, 18])
    x = torch.zeros(1, 2, 2, 33, 64)
    with pytest.raises(ValueError, match="the climatology has 1 lead times but the forecast has 2"):
        acc.update(x, x, torch.zeros(1, 1, 2, 33, 64))
    with pytest.raises(ValueError, match="lacks the variable 'mean_sea_level_pressure'"):
        clim.at(_clim_channels("msl"), valid[:, :1])
    with pytest.raises(ValueError, match="has no level 850"):
        clim.at(_clim_channels("z850"), valid[:, :1])


def test_climatology_is_looked_up_at_the_valid_times_on_the_forecast_grid():
    from fcn3_lightning.eval.climatology import ZarrClimatology

    lat, lon = _grid()  # 90N first; the store below holds latitude ascending, as WB2's do
    ds = _climatology(hours=(0, 12), days=(1, 2))
    values = np.arange(2 * 2 * 33 * 64, dtype=np.float32).reshape(2, 2, 33, 64)  # (hour, dayofyear, lat, lon)
    ds["2m_temperature"] = (("hour", "dayofyear", "latitude", "longitude"), values)
    valid = np.array([["2020-01-02T12", "2020-01-01T00"]], dtype="datetime64[ns]")
    got = ZarrClimatology(ds, lat, lon).at(_clim_channels("t2m"), valid)
    np.testing.assert_array_equal(got[0, 0, 0], values[1, 1, ::-1])  # day 2, 12 UTC, flipped to 90N first
    np.testing.assert_array_equal(got[0, 1, 0], values[0, 0, ::-1])


def test_configuration_errors():
    lat, lon = _grid()
    with pytest.raises(ValueError, match="unknown region 'tropic'"):
        CRPS(lat, lon, ["a"], [6], regions=["tropic"])
    with pytest.raises(ValueError, match="region 'global_land' needs the land-sea mask"):
        CRPS(lat, lon, ["a"], [6], regions=["global_land"])
    with pytest.raises(ValueError, match="pass spatial_group"):
        CRPS(lat, lon, ["a"], [6], tile=(slice(0, 16), slice(None)))
    with pytest.raises(ValueError, match="equally spaced longitudes"):
        ZonalEnergySpectrum(lat, lon[:-1], ["a"], [6])
    with pytest.raises(ValueError, match="neither an equiangular grid"):
        AngularPowerSpectrum(np.linspace(80, -80, 33), lon, ["a"], [6])
    with pytest.raises(RuntimeError, match="before any update"):
        CRPS(lat, lon, ["a"], [6]).compute()
