"""The embedded default world: a small, deterministic, physically driven dataset in the WeatherBench2 layout.

Users without ERA5 still get real dynamics to train on. The world is a forced-dissipative
shallow-water atmosphere on the rotating, Earth-sized sphere, read as the 500 hPa surface, which
carries a water-vapour tracer:

* **Dynamics**: the rotating shallow-water equations in vorticity/divergence form, spectral
  (T31 at the default 33x64 output; at least T31, at most T63) on an alias-free Gaussian grid.
  Time stepping is semi-implicit: 3rd-order Adams-Bashforth for advection and forcing, off-centred
  Crank-Nicolson for the gravity-wave terms (so the 30 min time step is set by the winds, not by
  the 240 m/s gravity waves), implicit del^8 hyperdiffusion. The free surface is the 500 hPa
  height: ``geopotential = g * h``, about 5750 m on average.
* **Sun**: the layer relaxes (12 days) towards a zonal radiative-equilibrium height profile and is
  heated by the real top-of-atmosphere insolation, ``max(cos zenith, 0)`` at the simulated UTC time
  (from :func:`fcn3_lightning.data.zenith.sun_position`), 50 % more over land. That gives seasons, a
  diurnal tide (5 m on average, up to 10 m) and land-sea contrasts, so the cos-zenith input is informative.
* **Weather**: eddies are stirred by a random vorticity forcing (wavenumbers 10-24, mostly in the
  mid-latitude storm tracks) with AR(1) memory of 2 days, and removed by Rayleigh drag (15 days over
  the ocean, 5 over land) and hyperdiffusion. The flow is turbulent (small differences double in
  about 3 days) and statistically stationary over any number of years.
* **Surface**: random smooth continents (``land_sea_mask`` 0 over open ocean, 1 inland, fractional
  along the coasts, ~30 % land) with mountains up to 3 km (``geopotential_at_surface``, 0 over the
  ocean) that the layer feels as (scaled-down) bottom topography.
* **Water**: total column water vapour is advected in flux form, evaporates towards 80 % of a
  saturation value (mostly over the ocean, more under the sun) and rains out above 90 % of it. The
  saturation value grows exponentially with the layer height up to 70 kg m^-2 (a thick, warm column
  holds more water, Clausius-Clapeyron style), so the tracer is tied to the dynamics.

The stored trajectory is one continuous 6-hourly time axis after a discarded spin-up, written once to
a Zarr store in the WB2 schema that :class:`fcn3_lightning.data.store.WB2Store` reads. All random
numbers come from seeded NumPy generators and the integration runs single-threaded, so the same
seed gives bit-identical arrays (on the same machine and library versions).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr

from fcn3_lightning.channels import WB2_UNITS
from fcn3_lightning.data.zenith import sun_position
from fcn3_lightning.io import publish_folder
from fcn3_lightning.progress import progress_bar

#: bump whenever the generated data change: it is part of the cache file name, so stale caches are never reused
GENERATOR_VERSION = "1"

#: the default world's channels in this project's naming (FCN3 order: surface first, then u, v, z)
DEFAULT_WORLD_CHANNELS: tuple[str, ...] = ("tcwv", "u500", "v500", "z500")

#: inclusive (start, end) valid times of the recommended splits of the default (3-year) world
DEFAULT_WORLD_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("2000-01-01T00:00:00", "2001-12-31T18:00:00"),
    "valid": ("2002-01-01T00:00:00", "2002-06-30T18:00:00"),
    "test": ("2002-07-01T00:00:00", "2002-12-31T18:00:00"),
}

DEFAULT_SEED = 0
DEFAULT_YEARS = 3.0
DEFAULT_START = "2000-01-01"
DEFAULT_NLAT, DEFAULT_NLON = 33, 64
DEFAULT_SPINUP_DAYS = 90.0
STEP_HOURS = 6
LEVEL_HPA = 500

EARTH_RADIUS = 6.37122e6  # m
OMEGA = 7.292e-5  # rad/s
GRAVITY = 9.80616  # m/s^2
DAY = 86400.0  # s

_BLOCK = 240  # outputs per Zarr append: bounds memory for long or fine worlds
_RANDOM_LMAX = 32  # random patterns are drawn at T31 whatever the truncation, so the world does not depend on it
_DTYPE = torch.float32  # the time integration; precision far beyond the model's own errors, and twice as fast


@dataclass(frozen=True)
class _Physics:
    """Parameters of the world; changing any of them changes the data, so bump GENERATOR_VERSION."""

    dt_max: float = 1800.0  # s at T31 (scaled with the truncation): advective CFL of ~70 m/s winds with AB3
    mean_depth: float = 5750.0  # m: global-mean 500 hPa height
    implicit_depth: float = 6400.0  # m: reference depth of the implicit terms; above any actual depth, for stability
    off_centering: float = 0.6  # implicit weight of the gravity-wave terms (0.5 = Crank-Nicolson); > 0.5 damps the fastest
    eq_contrast: float = 1000.0  # m: equator-to-pole drop of the radiative-equilibrium height
    tau_rad: float = 12.0 * DAY
    sun_heating: float = 1.2e-3  # m/s of layer thickening per unit of max(cos zenith, 0), ...
    land_heating: float = 0.5  # ... this fraction more over land (low heat capacity)
    tau_drag_ocean: float = 15.0 * DAY
    tau_drag_land: float = 5.0 * DAY
    topo_scale: float = 0.25  # fraction of the mountains the 500 hPa layer feels as bottom topography
    force_lmin: int = 10  # stochastic vorticity forcing in total wavenumbers lmin..lmax (synoptic scales)
    force_lmax: int = 24
    force_amp: float = 3e-10  # s^-2: rms vorticity tendency of the forcing (before the storm-track envelope)
    force_memory: float = 2.0 * DAY  # AR(1) decorrelation time of the forcing
    tau_hyper: float = 12.0 * 3600.0  # e-folding time of the smallest resolved scale under del^8
    q_ref: float = 70.0  # kg/m^2: saturation column water at (and above) the reference height
    h_ref: float = 5880.0  # m
    q_scale_height: float = 800.0 / math.log(10.0)  # m: saturation drops tenfold per 800 m of layer height
    rh_evap: float = 0.8  # evaporation relaxes towards this fraction of saturation ...
    tau_evap: float = 3.0 * DAY  # ... on this time scale over the ocean (daily-mean sun)
    land_evap: float = 0.3  # evaporation efficiency over land relative to the ocean
    rh_rain: float = 0.9  # rain-out above this fraction of saturation ...
    tau_rain: float = 3.0 * 3600.0  # ... on this time scale (>= 3 steps: AB3 needs decay rates < 0.55 / dt)
    tau_fill: float = 3.0 * 3600.0  # negative undershoots of the spectral tracer are filled on this time scale


# --------------------------------------------------------------------------------------------------
# spherical harmonics: orthonormal, no Condon-Shortley phase (torch-harmonics' "ortho", csphase=False)
# --------------------------------------------------------------------------------------------------


def _legendre(nl: int, nm: int, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P[m, l, k]: orthonormal associated Legendre functions at ``mu = sin(lat)``; Q = P / cos(lat) for m >= 1.

    Q has its own recurrence, seeded without the division, so it is exact at the poles (where only
    m = 1 survives): that keeps the winds well defined on a grid with pole rows.
    """
    mu = np.asarray(mu, dtype=np.float64)
    cos = np.sqrt(np.clip(1.0 - mu * mu, 0.0, None))
    p = np.zeros((nm, nl, mu.size))
    q = np.zeros((nm, nl, mu.size))
    diag = np.full(mu.size, 1.0 / math.sqrt(4.0 * math.pi))
    for m in range(min(nm, nl)):
        q_diag = None
        if m > 0:
            q_diag = math.sqrt((2 * m + 1) / (2 * m)) * diag
            diag = q_diag * cos
        for table, seed in ((p, diag), (q, q_diag)):
            if seed is None:
                continue
            table[m, m] = seed
            for ell in range(m + 1, nl):
                a = math.sqrt((4 * ell * ell - 1) / (ell * ell - m * m))
                b = math.sqrt(((ell - 1) ** 2 - m * m) / (4 * (ell - 1) ** 2 - 1))
                table[m, ell] = a * (mu * table[m, ell - 1] - (b * table[m, ell - 2] if ell - 2 >= m else 0.0))
    return p, q


def _eps(ell: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip((ell * ell - m * m) / (4.0 * ell * ell - 1.0), 0.0, None))


class _Transforms:
    """Spectral transforms between complex coefficients ``(F, M, L)`` and grids ``(F, nlat, nlon)``.

    A real FFT in longitude and one batched matrix product per zonal wavenumber, with the same
    coefficient convention as torch-harmonics' ``RealSHT(..., csphase=False)``. Besides scalars it
    has the tables for winds (dP/dlat and P/cos) and for divergence and curl of vector fields.
    """

    def __init__(self, lat: np.ndarray, nlon: int, lmax: int, mmax: int, weights: np.ndarray | None = None):
        self.nlon, self.lmax, self.mmax = nlon, lmax, mmax
        mu = np.sin(lat)
        cos = np.sqrt(np.clip(1.0 - mu * mu, 0.0, None))
        p, q = _legendre(lmax + 1, mmax, mu)  # one extra degree for the derivative recurrence
        ell = np.arange(lmax, dtype=np.float64)[None, :, None]
        m = np.arange(mmax, dtype=np.float64)[:, None, None]
        # (1 - mu^2) dP/dmu = -l eps(l+1) P(l+1) + (l+1) eps(l) P(l-1), and dP/dlat is that over cos(lat)
        prev = lambda x: np.concatenate([np.zeros_like(x[:, :1]), x[:, : lmax - 1]], axis=1)  # noqa: E731
        h = -ell * _eps(ell + 1, m) * p[:, 1:] + (ell + 1) * _eps(ell, m) * prev(p)
        dlat = -ell * _eps(ell + 1, m) * q[:, 1:] + (ell + 1) * _eps(ell, m) * prev(q)
        with np.errstate(divide="ignore", invalid="ignore"):
            dlat[0] = np.where(cos > 0, h[0] / cos, 0.0)  # m = 0: a zonal field is flat at the pole
        p, q = p[:, :lmax], q[:, :lmax]
        self.p, self.dlat, self.qc = (torch.from_numpy(np.ascontiguousarray(x)) for x in (p, dlat, q))
        if weights is not None:
            w = 2.0 * math.pi * weights  # Gaussian quadrature on [-1, 1] times the longitude integral
            # analysis tables (M, K, 3L): [P | P/cos | dP/dlat], the last two for divergence and curl
            self.w = torch.from_numpy(np.ascontiguousarray((np.concatenate([p, q, dlat], axis=1) * w).transpose(0, 2, 1)))
        self.im = torch.arange(mmax, dtype=torch.float64).reshape(mmax, 1) * 1j

    def synth(self, c: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
        """``(F, M, Lx)`` complex coefficients times ``(M, Lx, K)`` functions -> ``(F, K, nlon)`` grid."""
        f, m, lx = c.shape
        x = torch.view_as_real(c).permute(1, 0, 3, 2).reshape(m, 2 * f, lx)
        y = torch.bmm(x, mat).reshape(m, f, 2, -1).permute(1, 3, 0, 2).contiguous()
        return torch.fft.irfft(torch.view_as_complex(y), n=self.nlon, dim=-1, norm="forward")

    def scalars(self, c: torch.Tensor) -> torch.Tensor:
        return self.synth(c, self.p)

    def winds(self, psi: torch.Tensor, chi: torch.Tensor) -> torch.Tensor:
        """``(2, B, K, nlon)`` eastward and northward wind from streamfunction and velocity potential ``(B, M, L)``."""
        # u = (-d psi/dlat + d chi/dlon / cos) / a,  v = (d psi/dlon / cos + d chi/dlat) / a
        mat = torch.cat([self.dlat, self.qc], dim=1)
        u_in = torch.cat([-psi, self.im * chi], dim=-1)
        v_in = torch.cat([chi, self.im * psi], dim=-1)
        return self.synth(torch.cat([u_in, v_in]), mat).reshape(2, psi.shape[0], -1, self.nlon) / EARTH_RADIUS

    def analysis(self, g: torch.Tensor) -> torch.Tensor:
        """``(F, K, nlon)`` grid -> ``(F, M, L)`` coefficients (Gaussian grids only)."""
        f, k, _ = g.shape
        spec = torch.fft.rfft(g, dim=-1, norm="forward")[..., : self.mmax]
        x = torch.view_as_real(spec).permute(2, 0, 3, 1).reshape(self.mmax, 2 * f, k)
        y = torch.bmm(x, self.w[..., : self.lmax]).reshape(self.mmax, f, 2, -1).permute(1, 0, 3, 2).contiguous()
        return torch.view_as_complex(y)


# --------------------------------------------------------------------------------------------------
# the world: geography, forcing and the semi-implicit shallow-water integrator
# --------------------------------------------------------------------------------------------------


def _truncation(nlat: int, nlon: int) -> int:
    """Number of spectral degrees: T31 at least, finer when the output grid can show more, T63 at most (cost)."""
    return min(64, max(32, min(nlat - 1, nlon // 2)))


def _random_spectrum(rng: np.random.Generator, lmax: int, lo: int, hi: int, slope: float) -> torch.Tensor:
    """Complex Gaussian coefficients ``(1, M, L)``, rms ~ l^slope for lo <= l <= hi, drawn at a fixed size."""
    n = _RANDOM_LMAX
    re, im = rng.standard_normal((2, n, n))
    m = np.arange(n)[:, None]
    ell = np.arange(n)[None, :]
    amp = np.where((ell >= m) & (ell >= lo) & (ell <= hi), np.maximum(ell, 1.0) ** slope, 0.0)
    # m = 0 coefficients of a real field are real; unit variance per real degree of freedom
    c = amp * np.where(m == 0, re, math.sqrt(0.5) * (re + 1j * im))
    out = np.zeros((lmax, lmax), dtype=np.complex128)
    k = min(n, lmax)
    out[:k, :k] = c[:k, :k]
    return torch.from_numpy(out)[None]


class _World:
    """Geography, forcing and state of one world; :meth:`advance` integrates one 6-hour output interval."""

    def __init__(self, seed: int, nlat: int, nlon: int, start: np.datetime64, physics: _Physics | None = None):
        self.ph = ph = physics or _Physics()
        self.lmax = lmax = _truncation(nlat, nlon)
        # internal Gaussian grid free of aliasing in quadratic terms (3/2 rule), 90N first
        self.nlon_i = 3 * lmax
        self.nlat_i = self.nlon_i // 2
        mu, w = np.polynomial.legendre.leggauss(self.nlat_i)
        mu, w = mu[::-1].copy(), w[::-1].copy()
        lat_i = np.arcsin(mu)
        lon_i = np.arange(self.nlon_i) * 2.0 * math.pi / self.nlon_i
        self.tr = _Transforms(lat_i, self.nlon_i, lmax, lmax, w)
        self.lat_out = np.linspace(90.0, -90.0, nlat)
        self.lon_out = np.arange(nlon) * 360.0 / nlon
        self.tr_out = _Transforms(np.deg2rad(self.lat_out), nlon, lmax, min(lmax, nlon // 2))

        # the largest time step that divides 6 h and respects the advective CFL at this truncation
        self.n_sub = math.ceil(STEP_HOURS * 3600.0 / (ph.dt_max * 32.0 / lmax))
        self.dt = STEP_HOURS * 3600.0 / self.n_sub

        ell = torch.arange(lmax, dtype=torch.float64).reshape(1, lmax)
        self.k2 = ell * (ell + 1) / EARTH_RADIUS**2  # minus the Laplacian
        self.invlap = torch.where(ell > 0, -1.0 / torch.where(ell > 0, self.k2, 1.0), 0.0)
        self.phibar = GRAVITY * ph.mean_depth
        self.phi_ref = GRAVITY * ph.implicit_depth

        geo_rng, self.force_rng, init_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
        self._geography(geo_rng, w)

        full = lambda x: torch.from_numpy(np.array(np.broadcast_to(x, (self.nlat_i, self.nlon_i))))  # noqa: E731
        sin_i, cos_i = np.sin(lat_i)[:, None], np.cos(lat_i)[:, None]
        self.coriolis = full(2.0 * OMEGA * sin_i)
        # cos zenith = a sin(lat) + b cos(lat) cos(lon) + c cos(lat) sin(lon): three fixed fields, see _sun
        self.sun_basis = torch.stack([full(sin_i), full(cos_i * np.cos(lon_i)), full(cos_i * np.sin(lon_i))]).reshape(3, -1)
        # radiative-equilibrium height anomaly: zonal, zero global mean (sin^2 averages to 1/3 on the sphere)
        self.phi_eq = full(GRAVITY * ph.eq_contrast * (1.0 / 3.0 - sin_i**2))
        lsm = self.lsm_i
        self.heating = GRAVITY * ph.sun_heating * (1.0 + ph.land_heating * lsm)
        self.drag = 1.0 / ph.tau_drag_ocean + lsm * (1.0 / ph.tau_drag_land - 1.0 / ph.tau_drag_ocean)
        self.evap_eff = ((1.0 - lsm) + ph.land_evap * lsm) / ph.tau_evap
        # saturation q_ref * exp((h - h_ref) / scale), h = (phibar + phi) / g, capped at q_ref: exp(min(slope phi + offset, log q_ref))
        self.q_sat_slope = 1.0 / (GRAVITY * ph.q_scale_height)
        self.q_sat_offset = math.log(ph.q_ref) + (ph.mean_depth - ph.h_ref) / ph.q_scale_height
        self.q_sat_log_max = math.log(ph.q_ref)

        # forcing: mid-latitude storm tracks plus a weaker stirring everywhere
        self.force_envelope = full((0.25 + np.exp(-(((np.abs(np.rad2deg(lat_i)) - 45.0) / 15.0) ** 2)))[:, None])
        band = np.arange(ph.force_lmin, ph.force_lmax + 1)
        self.force_norm = math.sqrt(4.0 * math.pi / np.sum(2 * band + 1))  # unit rms on the sphere before the envelope
        self.force_r = math.exp(-STEP_HOURS * 3600.0 / ph.force_memory)
        self.force = self._force_draw()

        # initial state: at rest, flat, uniformly moist, a whisper of vorticity; the spin-up forgets it
        state = torch.zeros(4, lmax, lmax, dtype=torch.complex128)
        state[3, 0, 0] = 15.0 * math.sqrt(4.0 * math.pi)
        state[0] += 1e-7 * _random_spectrum(init_rng, lmax, 1, 20, 0.0)[0]
        self.time = start
        self._setup_dynamics(state)

    # --- static fields -------------------------------------------------------------------------------

    def _geography(self, rng: np.random.Generator, w: np.ndarray) -> None:
        """Smooth random continents (30 % of the area) with mountain ranges, on both grids."""
        lmax = self.lmax
        continents = _random_spectrum(rng, lmax, 1, 10, -1.0)
        ridges = _random_spectrum(rng, lmax, 6, 20, 0.0)

        def fields(tr: _Transforms) -> tuple[np.ndarray, np.ndarray]:
            c = tr.scalars(torch.cat([continents, ridges])[:, : tr.mmax]).numpy()
            return c[0], c[1]

        c_i, r_i = fields(self.tr)
        area = np.broadcast_to(w[:, None], c_i.shape).ravel()
        order = np.argsort(c_i.ravel(), kind="stable")
        cdf = np.cumsum(area[order]) / area.sum()
        threshold = c_i.ravel()[order][np.searchsorted(cdf, 0.7)]
        std = float(np.sqrt(np.sum(area * c_i.ravel() ** 2) / area.sum()))
        r_std = float(np.sqrt(np.sum(area * r_i.ravel() ** 2) / area.sum()))

        def statics(c: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            s = (c - threshold) / std
            lsm = np.clip(0.5 + s / 0.3, 0.0, 1.0)  # a narrow band of fractional coastal cells
            height = 3000.0 * np.clip(s / 1.2, 0.0, 1.0) ** 1.5 / (1.0 + np.exp(-2.0 * r / r_std))
            return lsm, height  # height is 0 wherever s <= 0, which includes all of the ocean

        lsm_i, height_i = statics(c_i, r_i)
        self.lsm_i = torch.from_numpy(lsm_i)
        self.lsm_out, height_out = statics(*fields(self.tr_out))
        self.orography_out = GRAVITY * height_out
        # the dynamics see a spectrally smoothed, scaled-down copy of the mountains
        spec = self.tr.analysis(torch.from_numpy(height_i)[None])
        smooth = spec * torch.exp(-((torch.arange(lmax, dtype=torch.float64) / 21.0) ** 2))
        phis = GRAVITY * self.ph.topo_scale * self.tr.scalars(smooth)[0]
        # the explicit mass flux is (phi - phis + phibar - phi_ref) v; the rest, phi_ref * div, is implicit
        self.depth_offset = phis + (self.phi_ref - self.phibar)

    # --- forcing -------------------------------------------------------------------------------------

    def _force_draw(self) -> torch.Tensor:
        """A fresh unit-rms vorticity forcing pattern, shaped by the storm-track envelope."""
        xi = _random_spectrum(self.force_rng, self.lmax, self.ph.force_lmin, self.ph.force_lmax, 0.0) * self.force_norm
        spec = self.tr.analysis(self.tr.scalars(xi) * self.force_envelope)[0]
        spec[0, 0] = 0.0  # vorticity has zero global mean
        return spec

    @staticmethod
    def _sun(times: np.ndarray) -> np.ndarray:
        """(a, b, c) per time with cos zenith = a sin(lat) + b cos(lat) cos(lon) + c cos(lat) sin(lon).

        The same sun as :func:`fcn3_lightning.data.zenith.cos_zenith`, whose hour angle is
        gmst + lon - ra: expanding cos(hour angle) separates the time from the longitude.
        """
        ra, dec, gmst = sun_position(times)
        hour = gmst - ra
        return np.stack([np.sin(dec), np.cos(dec) * np.cos(hour), -np.cos(dec) * np.sin(hour)], axis=1)

    # --- dynamics ------------------------------------------------------------------------------------
    #
    # The integrator keeps the spectral state as a real tensor (M, 2, 4, L): zonal wavenumber, real or
    # imaginary part, field (vorticity, divergence, geopotential anomaly, water), degree. In that layout
    # both Legendre transforms are batched matrix products on views of the state, and a time step is
    # two FFTs, four small matrix products and a few dozen grid-point operations.

    def _setup_dynamics(self, state: torch.Tensor) -> None:
        tr, lmax, dt, a = self.tr, self.lmax, self.dt, EARTH_RADIUS
        dtype = _DTYPE

        def table(x: torch.Tensor) -> torch.Tensor:
            # high-order Legendre functions underflow near the poles; as float32 denormals they would only cost time
            return torch.where(x.abs() < 1e-20 * x.abs().max(), 0.0, x).contiguous().to(dtype)

        self.p_dyn = table(tr.p)
        # [-psi, i m chi] and [chi, i m psi], stacked along the degree, times [dP/dlat ; P/cos] / a are u and v
        self.w_uv = table(torch.cat([tr.dlat, tr.qc], dim=1) / a)
        # analysis: scalars onto P; vector components onto [P/cos | dP/dlat] / a, the halves of divergence and curl
        self.w_scalar = table(tr.w[..., :lmax])
        self.w_vector = table(tr.w[..., lmax:] / a)
        m = torch.arange(lmax, dtype=torch.float64)
        self.msign = torch.stack([-m, m], dim=1).reshape(lmax, 2, 1, 1).to(dtype)  # i m (x + i y) = -m y + i m x
        sign = torch.tensor([-1.0, 1.0], dtype=torch.float64).reshape(1, 1, 2, 1)
        self.invlap_signed = (self.invlap.reshape(1, 1, 1, lmax) * sign).to(dtype)  # -> [-psi, chi]
        self.msign_signed = self.msign * sign.to(dtype)  # i m of [-psi, chi] with the sign undone: [i m psi, i m chi]
        self.k2_3 = self.k2.reshape(1, 1, lmax)
        self.k2_dyn = self.k2_3.to(dtype)
        # implicit del^8 hyperdiffusion; vorticity and divergence have no global mean
        ell = torch.arange(lmax, dtype=torch.float64)
        hyper = torch.exp(-dt / self.ph.tau_hyper * (ell * (ell + 1) / (lmax * (lmax - 1))) ** 4).repeat(4, 1)
        hyper[0:2, 0] = 0.0
        self.hyper = hyper.reshape(1, 1, 4, lmax).to(dtype)
        # work buffers, allocated once: fresh ~100 kB tensors every step cost page faults
        k, n = self.nlat_i, self.nlon_i
        self.buf_fourier = torch.zeros(6, k, n // 2 + 1, dtype=torch.complex64)  # zero-padded Fourier modes
        self.buf_scal = torch.empty(lmax, 8, k, dtype=dtype)
        self.buf_wind = torch.empty(lmax, 4, k, dtype=dtype)
        self.buf_grid = torch.empty(6, k, n, dtype=dtype)
        self.buf_phys = torch.empty(9, k, n, dtype=dtype)
        self.buf_spec = torch.empty(9, k, n // 2 + 1, dtype=torch.complex64)
        self.buf_xs = torch.empty(lmax, 2, 3, k, dtype=dtype)
        self.buf_xv = torch.empty(lmax, 2, 6, k, dtype=dtype)
        self.buf_sc = torch.empty(lmax, 6, lmax, dtype=dtype)
        self.buf_vec = torch.empty(lmax, 12, 2 * lmax, dtype=dtype)
        for name in ("coriolis", "sun_basis", "phi_eq", "heating", "drag", "evap_eff", "depth_offset"):
            setattr(self, name, getattr(self, name).to(dtype))
        self.s = self._to_native(state)
        self.hist = torch.zeros(3, *self.s.shape, dtype=dtype)  # ring buffer of tendencies for AB3
        self.n_steps = 0
        # Adams-Bashforth weights (times dt) by ring slot: Euler first, then AB2, then AB3
        self.ab = {}
        for slot in range(3):
            for stage, coef in enumerate(([1.0], [1.5, -0.5], [23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0])):
                w = torch.zeros(1, 3, dtype=dtype)
                for back, c in enumerate(coef):
                    w[0, (slot - back) % 3] = c * dt
                self.ab[slot, stage] = w

    @staticmethod
    def _to_native(c: torch.Tensor) -> torch.Tensor:
        """complex (F, M, L) -> real (M, 2, F, L) in the integration dtype."""
        return torch.view_as_real(c).permute(1, 3, 0, 2).contiguous().to(_DTYPE)

    @property
    def state(self) -> torch.Tensor:
        """The spectral state as complex128 ``(4, M, L)``: vorticity, divergence, geopotential anomaly, water."""
        return torch.view_as_complex(self.s.double().permute(2, 0, 3, 1).contiguous())

    def _tendency(self, s: torch.Tensor, sun_heat: torch.Tensor, sun_evap: torch.Tensor, force: torch.Tensor, tend: torch.Tensor) -> None:
        """Write d(state)/dt without the implicit gravity-wave terms and the hyperdiffusion into ``tend``."""
        ph, lmax, k = self.ph, self.lmax, self.nlat_i
        # --- to the grid: vorticity, (divergence), geopotential, water, and (u, v) from psi and chi
        scal = torch.bmm(s.reshape(lmax, 8, lmax), self.p_dyn, out=self.buf_scal).view(lmax, 2, 4, k)
        ps = s[:, :, 0:2] * self.invlap_signed
        wind_in = torch.cat([ps, (ps.flip(1) * self.msign_signed).flip(2)], dim=3).view(lmax, 4, 2 * lmax)
        wind = torch.bmm(wind_in, self.w_uv, out=self.buf_wind).view(lmax, 2, 2, k)
        fourier = torch.view_as_real(self.buf_fourier)
        fourier[:4, :, :lmax].copy_(scal.permute(2, 3, 0, 1))
        fourier[4:, :, :lmax].copy_(wind.permute(2, 3, 0, 1))
        grid = torch.fft.irfft(self.buf_fourier, n=self.nlon_i, dim=-1, norm="forward", out=self.buf_grid)
        zeta, phi, q, u, v = grid[0], grid[2], grid[3], grid[4], grid[5]

        # --- grid-point physics. Analysed: kinetic energy, heating, water source, then the zonal and
        # then the meridional components of the momentum, mass and water fluxes
        out = self.buf_phys
        absvort = zeta + self.coriolis
        # vorticity flux and Rayleigh drag as one vector, (z + f) v - k x (drag v): its -div and curl are the
        # vorticity and divergence tendencies of -(z + f) k x v - drag v
        torch.mul(absvort, u, out=out[3]).addcmul_(self.drag, v)
        torch.mul(absvort, v, out=out[6]).addcmul_(self.drag, u, value=-1.0)
        depth = phi - self.depth_offset
        torch.mul(depth, u, out=out[4])
        torch.mul(depth, v, out=out[7])
        torch.mul(q, u, out=out[5])
        torch.mul(q, v, out=out[8])
        torch.mul(u, u, out=out[0]).addcmul_(v, v).mul_(0.5)
        torch.add(sun_heat, self.phi_eq - phi, alpha=1.0 / ph.tau_rad, out=out[1])
        q_pos = q.clamp(min=0.0)
        q_sat = phi.mul(self.q_sat_slope).add_(self.q_sat_offset).clamp_(max=self.q_sat_log_max).exp_()
        evap = (q_sat * ph.rh_evap - q_pos).clamp_(min=0.0).mul_(sun_evap)
        rain = (q_pos - q_sat * ph.rh_rain).clamp_(min=0.0)
        # spectral advection undershoots below zero next to sharp moisture edges: such holes are filled back up
        torch.add(evap, rain, alpha=-1.0 / ph.tau_rain, out=out[2]).add_(q_pos - q, alpha=1.0 / ph.tau_fill)

        # --- back to spectral space
        spec = torch.fft.rfft(out, dim=-1, norm="forward", out=self.buf_spec)
        spec = torch.view_as_real(spec[..., :lmax]).permute(2, 3, 0, 1)
        self.buf_xs.copy_(spec[:, :, :3])
        self.buf_xv.copy_(spec[:, :, 3:])
        sc = torch.bmm(self.buf_xs.view(lmax, 6, k), self.w_scalar, out=self.buf_sc).view(lmax, 2, 3, lmax)
        vec = torch.bmm(self.buf_xv.view(lmax, 12, k), self.w_vector, out=self.buf_vec).view(lmax, 2, 6, 2 * lmax)
        sc[0, :, 1, 0] = 0.0  # no global-mean heating: the forcing neither creates nor destroys mass
        # divergence = i m <A_u, P/cos> - <A_v, dP/dlat>, curl = i m <A_v, P/cos> + <A_u, dP/dlat> (both / a)
        div = vec[:, :, 0:3, :lmax].flip(1) * self.msign - vec[:, :, 3:6, lmax:]
        curl = vec[:, :, 3, :lmax].flip(1) * self.msign[..., 0] + vec[:, :, 0, lmax:]
        torch.sub(force, div[:, :, 0], out=tend[:, :, 0])
        torch.addcmul(curl, self.k2_dyn, sc[:, :, 0], out=tend[:, :, 1])  # ... - Laplacian(kinetic energy)
        torch.sub(sc[:, :, 1:3], div[:, :, 1:3], out=tend[:, :, 2:4])

    def advance(self) -> None:
        """Integrate one 6-hour output interval (``n_sub`` time steps)."""
        ph, dt, phi_ref = self.ph, self.dt, self.phi_ref
        beta, gamma = ph.off_centering * dt, (1.0 - ph.off_centering) * dt
        beta_k2, gamma_k2 = (beta * self.k2_3).to(_DTYPE), (gamma * self.k2_3).to(_DTYPE)
        denom = (1.0 / (1.0 + beta * beta * phi_ref * self.k2_3)).to(_DTYPE)
        # the sun at every step of the interval at once
        step = np.timedelta64(int(round(dt)), "s")
        coef = torch.from_numpy(self._sun(self.time + step * np.arange(self.n_sub))).to(_DTYPE)
        insolation = (coef @ self.sun_basis).reshape(self.n_sub, self.nlat_i, self.nlon_i).clamp_(min=0.0)
        sun_heat = (insolation - 0.25) * self.heating  # 1/4 is the global mean of the insolation
        sun_evap = (insolation * 2.4 + 0.4) * self.evap_eff  # 1 on the global mean
        # the forcing moves linearly to the next AR(1) pattern over the interval: jumps would shake off gravity waves
        nxt = self.force_r * self.force + math.sqrt(1.0 - self.force_r**2) * self._force_draw()
        f0, f1 = (ph.force_amp * self._to_native(f[None])[:, :, 0] for f in (self.force, nxt))
        s = self.s
        for i in range(self.n_sub):
            slot = self.n_steps % 3
            self._tendency(s, sun_heat[i], sun_evap[i], torch.lerp(f0, f1, i / self.n_sub), self.hist[slot])
            new = torch.addmm(s.reshape(1, -1), self.ab[slot, min(self.n_steps, 2)], self.hist.reshape(3, -1)).reshape(s.shape)
            # off-centred implicit gravity-wave pair: d(div)/dt = k2 phi, d(phi)/dt = -phi_ref div
            div_new, phi_new = new[:, :, 1], new[:, :, 2]
            a = torch.addcmul(div_new, gamma_k2, s[:, :, 2])
            b = torch.add(phi_new, s[:, :, 1], alpha=-gamma * phi_ref)
            torch.addcmul(a, beta_k2, b, out=div_new).mul_(denom)
            torch.add(b, div_new, alpha=-beta * phi_ref, out=phi_new)
            s = new.mul_(self.hyper)
            self.n_steps += 1
        self.s = s
        self.force = nxt
        self.time = self.time + np.timedelta64(STEP_HOURS, "h")

    # --- output --------------------------------------------------------------------------------------

    def to_output(self, states: torch.Tensor) -> dict[str, np.ndarray]:
        """Spectral states ``(T, 4, M, L)`` -> the stored variables on the output grid, float32."""
        mmax, t = self.tr_out.mmax, states.shape[0]
        s = states[:, :, :mmax]
        scal = self.tr_out.scalars(s[:, 2:4].reshape(2 * t, mmax, self.lmax)).reshape(t, 2, self.lat_out.size, -1)
        uv = self.tr_out.winds(self.invlap * s[:, 0], self.invlap * s[:, 1])
        return {
            "geopotential": (scal[:, 0] + self.phibar).numpy().astype(np.float32),
            "u_component_of_wind": uv[0].numpy().astype(np.float32),
            "v_component_of_wind": uv[1].numpy().astype(np.float32),
            # the truncated spectral tracer can dip slightly below zero between the model's grid points: clip
            "total_column_water_vapour": scal[:, 1].clamp(min=0.0).numpy().astype(np.float32),
        }


# --------------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------------

_VARIABLES: dict[str, dict[str, str]] = {
    name: {"units": WB2_UNITS[name], **attrs}
    for name, attrs in {
        "geopotential": {"long_name": "Geopotential", "standard_name": "geopotential"},
        "u_component_of_wind": {"long_name": "U component of wind", "standard_name": "eastward_wind"},
        "v_component_of_wind": {"long_name": "V component of wind", "standard_name": "northward_wind"},
        "total_column_water_vapour": {
            "long_name": "Total column vertically-integrated water vapour",
            "standard_name": "lwe_thickness_of_atmosphere_mass_content_of_water_vapor",
        },
        "geopotential_at_surface": {"long_name": "Geopotential at surface", "standard_name": "surface_geopotential"},
        "land_sea_mask": {"long_name": "Land-sea mask", "standard_name": "land_binary_mask"},
    }.items()
}
_LEVEL_VARIABLES = ("geopotential", "u_component_of_wind", "v_component_of_wind")


def _time_axis(start: pd.Timestamp, years: float) -> pd.DatetimeIndex:
    """6-hourly valid times from ``start`` for ``years`` calendar years (whole years, then 365.25-day fractions)."""
    whole = int(years)
    end = start + pd.DateOffset(years=whole) + pd.Timedelta(days=(years - whole) * 365.25)
    return pd.date_range(start, end, freq=f"{STEP_HOURS}h", inclusive="left")


def _iso(t: pd.Timestamp) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S")


def _recommended_splits(times: pd.DatetimeIndex, years: float) -> dict[str, tuple[str, str]]:
    """Train on the first 2/3 of the span, validate on the next 1/6, test on the last 1/6.

    Boundaries fall on calendar months when the span is a whole number of months (the default 3 years
    give DEFAULT_WORLD_SPLITS), else on the first 00 UTC at or after each fraction of the time axis.
    """
    n, start = len(times), times[0]
    months = years * 12.0
    bounds: list[int] = []
    if abs(months - round(months)) < 1e-9:
        for frac in (2.0 / 3.0, 5.0 / 6.0):
            b = start + pd.DateOffset(months=int(math.floor(months * frac + 0.5)))
            bounds.append(int(times.searchsorted(b)))
    if not (bounds and 0 < bounds[0] < bounds[1] < n):
        per_day = 24 // STEP_HOURS
        offset = (-times[0].hour // STEP_HOURS) % per_day  # index of the first 00 UTC
        bounds = [offset + per_day * math.ceil((n * frac - offset) / per_day) for frac in (2.0 / 3.0, 5.0 / 6.0)]
        if not 0 < bounds[0] < bounds[1] < n:
            bounds = [math.ceil(n * 2.0 / 3.0), math.ceil(n * 5.0 / 6.0)]
    i1, i2 = bounds
    return {
        "train": (_iso(times[0]), _iso(times[i1 - 1])),
        "valid": (_iso(times[i1]), _iso(times[i2 - 1])),
        "test": (_iso(times[i2]), _iso(times[n - 1])),
    }


def _write_block(store: Path, world: _World, states: list[torch.Tensor], times: pd.DatetimeIndex, attrs: dict, *, first: bool) -> None:
    """Append one block of time steps to the store; the first block creates it, with the static fields."""
    fields = world.to_output(torch.stack(states))
    lat, lon = world.lat_out, world.lon_out
    data_vars = {}
    for name, values in fields.items():
        dims: tuple[str, ...] = ("time", "latitude", "longitude")
        if name in _LEVEL_VARIABLES:
            dims, values = ("time", "level", "latitude", "longitude"), values[:, None]
        data_vars[name] = (dims, values, _VARIABLES[name])
    coords = {
        "time": ("time", times.values.astype("datetime64[ns]"), {"long_name": "time", "standard_name": "time"}),
        "level": ("level", np.array([LEVEL_HPA], dtype=np.int64), {"units": "millibars", "long_name": "pressure_level"}),
        "latitude": ("latitude", lat, {"units": "degrees_north", "long_name": "latitude", "standard_name": "latitude"}),
        "longitude": ("longitude", lon, {"units": "degrees_east", "long_name": "longitude", "standard_name": "longitude"}),
    }
    if not first:
        # (an append rewrites the global attributes with the appended dataset's, so they come along every time)
        xr.Dataset(data_vars, coords=coords, attrs=attrs).to_zarr(store, append_dim="time", consolidated=True, zarr_format=2)
        return
    static = {"geopotential_at_surface": world.orography_out, "land_sea_mask": world.lsm_out}
    for name, values in static.items():
        data_vars[name] = (("latitude", "longitude"), values.astype(np.float32), _VARIABLES[name])
    ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    # one chunk per time step and field: the data loader reads a handful of random times at once
    encoding = {name: {"chunks": (1,) * (ds[name].ndim - 2) + (lat.size, lon.size)} for name in ds.data_vars}
    encoding["time"] = {"units": f"hours since {_iso(times[0])}", "calendar": "proleptic_gregorian", "dtype": "int64"}
    ds.to_zarr(store, mode="w-", consolidated=True, zarr_format=2, encoding=encoding)


def _is_store(path: Path) -> bool:
    """Whether ``path`` is a complete store: they are only ever published whole, consolidated metadata included."""
    return (path / ".zmetadata").is_file()


def _publish(tmp: Path, path: Path, *, replace: bool) -> None:
    """Publish the finished store ``tmp`` at ``path`` (:func:`~fcn3_lightning.io.publish_folder`); without ``replace``,
    a complete store that another process published there first is kept."""
    existed = path.exists() or path.is_symlink()
    try:
        publish_folder(tmp, path, replace=replace)
    except OSError:
        if (replace and existed) or not _is_store(path):
            raise
        # another process published the same (deterministic) world first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _check_arguments(
    seed: int, years: float, nlat: int, nlon: int, start: str, spinup_days: float
) -> tuple[pd.Timestamp, pd.DatetimeIndex]:
    for name, value in (("seed", seed), ("nlat", nlat), ("nlon", nlon)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if isinstance(years, bool) or not (isinstance(years, numbers.Real) and math.isfinite(years) and years > 0):
        raise ValueError(f"years must be a positive number, got {years!r}")
    if nlat < 9 or nlon < 16:
        raise ValueError(f"grid {nlat}x{nlon} is too small: need nlat >= 9 and nlon >= 16 (default {DEFAULT_NLAT}x{DEFAULT_NLON})")
    if nlon % 2:
        raise ValueError(f"nlon must be even (longitudes 0 .. 360 - 360/nlon), got {nlon}")
    if isinstance(spinup_days, bool) or not (isinstance(spinup_days, numbers.Real) and math.isfinite(spinup_days) and spinup_days >= 0):
        raise ValueError(f"spinup_days must be >= 0, got {spinup_days!r}")
    try:
        t0 = pd.Timestamp(start)
    except (ValueError, TypeError) as e:
        raise ValueError(f"start {start!r} is not a date: {e}") from e
    if t0.tzinfo is not None:
        raise ValueError(f"start must be a naive UTC time, got {start!r}")
    if t0 != t0.floor(f"{STEP_HOURS}h"):
        raise ValueError(f"start must fall on a {STEP_HOURS}-hour boundary (00, 06, 12 or 18 UTC), got {start!r}")
    times = _time_axis(t0, float(years))
    if len(times) < 8:
        raise ValueError(f"years={years} gives {len(times)} time steps; need at least 8 (2 days) for train/valid/test splits")
    return t0, times


def generate_default_world(
    path: str | os.PathLike,
    *,
    seed: int = DEFAULT_SEED,
    years: float = DEFAULT_YEARS,
    nlat: int = DEFAULT_NLAT,
    nlon: int = DEFAULT_NLON,
    start: str = DEFAULT_START,
    progress: bool = True,
    spinup_days: float = DEFAULT_SPINUP_DAYS,
) -> Path:
    """Simulate the default world and write it as a WB2-style Zarr store at ``path`` (replacing what is there).

    Args:
        path: the store to write. It appears complete or not at all: the store is written into a
            temporary folder next to it and renamed into place.
        seed: picks the continents, the initial whisper of vorticity and the forcing sequence.
        years: length of the stored 6-hourly trajectory in (calendar) years.
        nlat, nlon: output grid, equiangular with both poles (latitude 90 .. -90, longitude 0 .. 360 - 360/nlon).
        start: first stored valid time (UTC, on a 6-hour boundary); the spin-up runs before it.
        progress: show progress on stderr (a bar on a terminal, a line every 10 % in a log).
        spinup_days: simulated days discarded before ``start`` so the stored data are statistically stationary.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return _generate(Path(path), seed, years, nlat, nlon, start, progress, spinup_days, replace=True)


def _generate(
    path: Path, seed: int, years: float, nlat: int, nlon: int, start: str, progress: bool, spinup_days: float, *, replace: bool
) -> Path:
    t0, times = _check_arguments(seed, years, nlat, nlon, start, spinup_days)
    n_spin = int(round(spinup_days * 24 / STEP_HOURS))
    attrs = {
        "title": "fcn3_lightning default world",
        "description": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "source": "fcn3_lightning.data.default_world.generate_default_world",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "years": float(years),
        "spinup_days": float(spinup_days),
        "channels": json.dumps(list(DEFAULT_WORLD_CHANNELS)),
        "recommended_splits": json.dumps(_recommended_splits(times, float(years))),
        "physics": json.dumps(asdict(_Physics())),
        "truncation": f"T{_truncation(nlat, nlon) - 1}",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible reductions; a T31 step is too small to gain from threads anyway
    started = time.monotonic()
    if progress:
        print(
            f"default world: simulating {years:g} years ({len(times)} states, 6-hourly) on a {nlat}x{nlon} grid after a "
            f"{spinup_days:g}-day spin-up, into {path}",
            file=sys.stderr,
            flush=True,
        )
    try:
        world = _World(seed, nlat, nlon, np.datetime64(t0 - pd.Timedelta(hours=STEP_HOURS * n_spin), "ns"))
        with progress_bar(n_spin + len(times), f"default world {path.name}", "6h steps", disable=not progress) as bar:
            for k in range(n_spin):
                bar.set_postfix_str(f"spin-up day {(k + 1) * STEP_HOURS / 24:g} of {spinup_days:g}", refresh=False)
                world.advance()
                bar.update()
            states: list[torch.Tensor] = []
            days = len(times) * STEP_HOURS / 24
            for i in range(len(times)):
                bar.set_postfix_str(f"simulated day {(i + 1) * STEP_HOURS / 24:g} of {days:g} (stored every 6 h)", refresh=False)
                states.append(world.state)
                if len(states) == _BLOCK or i == len(times) - 1:
                    _write_block(tmp, world, states, times[i + 1 - len(states) : i + 1], attrs, first=i < _BLOCK)
                    states = []
                if i < len(times) - 1:
                    world.advance()
                bar.update()
        _publish(tmp, path, replace=replace)
        if progress:
            print(f"default world: wrote {path} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return path


def default_world_path(seed: int = DEFAULT_SEED) -> Path:
    """Cache location of the default world: ``$FCN3_LIGHTNING_CACHE`` or ``~/.cache/fcn3_lightning``.

    The file name holds the generator version and the seed, so a changed generator never reuses a stale cache.
    """
    root = os.environ.get("FCN3_LIGHTNING_CACHE") or Path.home() / ".cache" / "fcn3_lightning"
    return Path(root).expanduser() / f"default_world_v{GENERATOR_VERSION}_seed{seed}.zarr"


def ensure_default_world(seed: int = DEFAULT_SEED) -> Path:
    """The cached default world, generated on first use (about a minute on 2 CPU cores).

    Safe when several processes start at once: each writes its own temporary store and the first
    rename wins; the others find the target in place and discard theirs (the worlds are identical).
    """
    path = default_world_path(seed)
    if _is_store(path):
        return path
    # anything else at the path (not a complete store) is replaced
    return _generate(path, seed, DEFAULT_YEARS, DEFAULT_NLAT, DEFAULT_NLON, DEFAULT_START, True, DEFAULT_SPINUP_DAYS, replace=path.exists())
