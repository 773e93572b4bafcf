"""Cosine of the solar zenith angle, computed analytically (reference section 1.2, ``xzen``).

The sun's position follows the low-precision formulas the reference uses (climt's
``zenith_angle``): mean anomaly, ecliptic longitude and obliquity as polynomials in Julian
centuries since 2000-01-01 12:00 UTC, then right ascension and declination, and the local hour
angle from Greenwich mean sidereal time. Accurate to about 0.01 degrees; the raw value in
[-1, 1] is returned (not clipped at 0, not normalised), as the model was trained with.

Precision is a convention of the model, not a detail: this project trains with the formula in float64,
the reference's model packages compute it in float32 from the time in float32 days (up to ~2e-3 apart,
mostly from sidereal time). A published package's network was trained on the float32 values, so
:func:`cos_zenith` takes ``dtype`` and a loaded package asks for ``float32`` (see :mod:`fcn3_lightning.package`).
"""

from __future__ import annotations

import numpy as np

_J2000 = np.datetime64("2000-01-01T12:00:00", "ns")


def _julian_centuries(times: np.ndarray, dtype: type[np.floating]) -> np.ndarray:
    days = (np.asarray(times, dtype="datetime64[ns]") - _J2000) / np.timedelta64(1, "D")
    # float32: the days are rounded first (~40 s at 2020), as the reference's packages do
    return days.astype(dtype) / dtype(36525.0)


def sun_position(times: np.ndarray, dtype: type[np.floating] = np.float64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right ascension, declination and Greenwich mean sidereal time (radians) at UTC ``times``.

    Every intermediate is ``dtype`` (numpy's Python scalars do not promote float32 arrays).
    """
    jc = _julian_centuries(times, dtype)
    mean_anomaly = np.deg2rad(357.52910 + 35999.05030 * jc - 0.0001559 * jc**2 - 0.00000048 * jc**3)
    mean_longitude = np.deg2rad(280.46645 + 36000.76983 * jc + 0.0003032 * jc**2)
    centre = np.deg2rad(
        (1.914600 - 0.004817 * jc - 0.000014 * jc**2) * np.sin(mean_anomaly)
        + (0.019993 - 0.000101 * jc) * np.sin(2 * mean_anomaly)
        + 0.000290 * np.sin(3 * mean_anomaly)
    )
    ecliptic_longitude = mean_longitude + centre
    obliquity = np.deg2rad(
        23.0
        + 26.0 / 60
        + 21.406 / 3600.0
        - (46.836769 * jc - 0.0001831 * jc**2 + 0.00200340 * jc**3 - 0.576e-6 * jc**4 - 4.34e-8 * jc**5) / 3600.0
    )
    x = np.cos(ecliptic_longitude)
    y = np.cos(obliquity) * np.sin(ecliptic_longitude)
    z = np.sin(obliquity) * np.sin(ecliptic_longitude)
    r = np.sqrt(1.0 - z * z)
    declination = np.arctan2(z, r)
    right_ascension = 2 * np.arctan2(y, x + r)
    # GMST in seconds of time (IAU 1982); 240 s of time per degree
    gmst_s = 67310.54841 + jc * (876600 * 3600 + 8640184.812866 + jc * (0.093104 - jc * 6.2e-6))
    gmst = np.deg2rad(gmst_s / 240.0) % (2 * np.pi)
    return right_ascension, declination, gmst


def cos_zenith(times: np.ndarray, lat_deg: np.ndarray, lon_deg: np.ndarray, dtype: type[np.floating] = np.float64) -> np.ndarray:
    """cos(solar zenith angle) for every time and grid point: shape ``(T, nlat, nlon)``, ``dtype``.

    ``times`` are UTC valid times (datetime64), ``lat_deg``/``lon_deg`` the 1-D grid coordinates.
    ``dtype``: float64 (this project's convention) or float32 (the reference packages').
    """
    times = np.atleast_1d(np.asarray(times, dtype="datetime64[ns]"))
    ra, dec, gmst = (a[:, None, None] for a in sun_position(times, dtype))
    lat = np.deg2rad(np.asarray(lat_deg, dtype=dtype))[None, :, None]
    lon = np.deg2rad(np.asarray(lon_deg, dtype=dtype))[None, None, :]
    hour_angle = (gmst - ra) + lon
    return np.sin(lat) * np.sin(dec) + np.cos(lat) * np.cos(dec) * np.cos(hour_angle)
