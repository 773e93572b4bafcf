"""cos(solar zenith) from ``fcn3_lightning.data.zenith`` against an independent solar-position code (pvlib's NREL SPA)."""

from __future__ import annotations

import numpy as np
import pytest

from fcn3_lightning.data.zenith import cos_zenith

pvlib = pytest.importorskip("pvlib")
pd = pytest.importorskip("pandas")

TOL = 1e-3  # acceptance: agreement to 1e-3 at 20 places and times; the climt formulas are good to ~0.01 deg
N_POINTS = 20


def _pvlib_cos_zenith(time: np.datetime64, lat: float, lon: float) -> tuple[float, float]:
    """cos(true geometric zenith, no refraction) and the equation of time (minutes) from pvlib's NREL SPA."""
    index = pd.DatetimeIndex([pd.Timestamp(time)]).tz_localize("UTC")
    lon_pm180 = (lon + 180.0) % 360.0 - 180.0  # pvlib's convention; ours takes [0, 360) as the grids do
    sp = pvlib.solarposition.get_solarposition(index, lat, lon_pm180, altitude=0.0, method="nrel_numpy")
    return float(np.cos(np.deg2rad(sp["zenith"].iloc[0]))), float(sp["equation_of_time"].iloc[0])


def _ours(time: np.datetime64, lat: float, lon: float) -> float:
    return float(cos_zenith(np.array([time], dtype="datetime64[ns]"), np.array([lat]), np.array([lon]))[0, 0, 0])


def _subsolar_noon(day: str, lat: float) -> tuple[np.datetime64, float, float]:
    """(12:00 UTC on ``day``, lat, the longitude where the sun culminates then): local solar noon is 12 UTC - EoT."""
    t = np.datetime64(f"{day}T12:00", "ns")
    _, eot_min = _pvlib_cos_zenith(t, 0.0, 0.0)
    return t, lat, (-eot_min / 4.0) % 360.0


def _cases() -> list[tuple[str, np.datetime64, float, float]]:
    edge = [
        ("north pole", np.datetime64("2003-06-21T06:00", "ns"), 90.0, 123.0),
        ("south pole", np.datetime64("1988-12-22T18:30", "ns"), -90.0, 0.0),
        ("lon 359.75", np.datetime64("2011-09-01T03:15", "ns"), 12.5, 359.75),
        ("date line", np.datetime64("1995-02-14T23:59", "ns"), -33.0, 180.0),
        ("equinox subsolar", *_subsolar_noon("2020-03-20", 0.0)),
        ("solstice subsolar", *_subsolar_noon("2021-06-21", 23.44)),
        ("equinox antisolar", np.datetime64("2020-03-20T00:00", "ns"), 0.0, 0.0),
    ]
    rng = np.random.default_rng(20250101)
    start, end = np.datetime64("1979-01-01", "s"), np.datetime64("2026-01-01", "s")
    n = N_POINTS - len(edge)
    seconds = rng.integers(0, int((end - start) / np.timedelta64(1, "s")), size=n)
    lats = rng.uniform(-90.0, 90.0, size=n)
    lons = rng.uniform(0.0, 360.0, size=n)
    rand = [
        (f"random {i}", (start + np.timedelta64(int(s), "s")).astype("datetime64[ns]"), float(la), float(lo))
        for i, (s, la, lo) in enumerate(zip(seconds, lats, lons, strict=True))
    ]
    return edge + rand


def test_cos_zenith_matches_pvlib() -> None:
    cases = _cases()
    assert len(cases) == N_POINTS
    rows = []
    for name, t, lat, lon in cases:
        ours, ref = _ours(t, lat, lon), _pvlib_cos_zenith(t, lat, lon)[0]
        rows.append((name, str(t)[:16], lat, lon, ours, ref, abs(ours - ref)))
    diffs = np.array([r[-1] for r in rows])
    print(f"\ncos zenith vs pvlib nrel_numpy at {len(rows)} points: max |diff| = {diffs.max():.3e}")
    bad = [r for r in rows if not r[-1] <= TOL]
    assert not bad, "cos zenith differs from pvlib by more than 1e-3 at:\n" + "\n".join(map(str, bad))
    by_name = {r[0]: r for r in rows}
    # the hand-picked cases are what they claim to be: sun overhead / directly underfoot
    assert by_name["equinox subsolar"][4] > 0.9999 and by_name["solstice subsolar"][4] > 0.9999
    assert by_name["equinox antisolar"][4] < -0.999
    assert any(r[4] < 0 for r in rows) and any(r[4] > 0 for r in rows)  # both day and night side are covered


def test_grid_shape_and_ordering() -> None:
    times = np.array(["2001-01-01T00", "2010-07-15T06", "2024-10-01T18"], dtype="datetime64[ns]")
    lat = np.linspace(-90.0, 90.0, 7)
    lon = np.arange(0.0, 360.0, 45.0)
    grid = cos_zenith(times, lat, lon)
    assert grid.shape == (3, 7, 8) and grid.dtype == np.float64
    # every grid point is the point-wise value: time on axis 0, latitude on 1, longitude on 2
    for i, t in enumerate(times):
        for j, la in enumerate(lat):
            for k, lo in enumerate(lon):
                assert grid[i, j, k] == pytest.approx(_ours(t, la, lo), abs=1e-12)
    # a north-to-south grid (ERA5/WB2 order) gives the latitude-flipped field; same for reversed longitudes
    np.testing.assert_allclose(cos_zenith(times, lat[::-1], lon), grid[:, ::-1, :], rtol=0, atol=1e-12)
    np.testing.assert_allclose(cos_zenith(times, lat, lon[::-1]), grid[:, :, ::-1], rtol=0, atol=1e-12)
    # longitudes are periodic: [-180, 180) and [0, 360) grids agree
    np.testing.assert_allclose(cos_zenith(times, lat, lon - 360.0), grid, rtol=0, atol=1e-12)
    # a single time (scalar) still gives a leading time axis
    assert cos_zenith(times[1], lat, lon).shape == (1, 7, 8)


def test_not_clipped_on_night_side() -> None:
    t = np.array(["2017-01-01T12:00"], dtype="datetime64[ns]")
    lat = np.linspace(-90.0, 90.0, 61)
    lon = np.arange(0.0, 360.0, 3.0)
    field = cos_zenith(t, lat, lon)[0]
    assert field.min() < -0.99 and field.max() > 0.99  # raw value in [-1, 1]: no clipping at 0, no rescaling
    assert np.all(np.abs(field) <= 1.0 + 1e-12)
    assert (field < 0).mean() == pytest.approx(0.5, abs=0.05)  # half the globe is dark
    # the antipode sees the sun exactly opposite: cos z(-lat, lon + 180) == -cos z(lat, lon)
    antipode = cos_zenith(t, -lat, (lon + 180.0) % 360.0)[0]
    np.testing.assert_allclose(antipode, -field, rtol=0, atol=1e-12)
