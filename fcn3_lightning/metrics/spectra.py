"""Spectra as metrics: WeatherBench2's zonal energy spectrum and the angular power spectrum per degree l.

Both average the spectra of the individual fields (and, for an ensemble, of the individual members) over
forecasts. Under spatial sharding a rank transforms its tile (longitude sums with the tile's phases,
latitude sums with the tile's quadrature weights); the partial transforms add up over ``spatial_group``
before any power is taken.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor
from torch_harmonics.legendre import legpoly

from fcn3_lightning.grid import sphere_quadrature
from fcn3_lightning.metrics.base import GriddedMetric

#: Earth radius of WB2's ZonalEnergySpectrum (m)
EARTH_RADIUS_M = 6_367_500.0


def _check_longitudes(lon: np.ndarray) -> None:
    n = lon.size
    step = np.diff(lon)
    if n < 2 or not np.allclose(step, 360.0 / n, rtol=0, atol=1e-6 * 360.0 / n):
        raise ValueError(
            f"spectra need {n} equally spaced longitudes covering 360 degrees (step {360.0 / max(n, 1)}), "
            f"got steps {np.unique(step.round(6))[:5]}"
        )


class _SpectrumMetric(GriddedMetric):
    """Spectra: states ``(lead, channel, ...)``; inputs with a member dimension when ``ensemble=True``."""

    def __init__(self, *args: Any, ensemble: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("regions", ("global",))
        super().__init__(*args, **kwargs)
        self.ensemble = ensemble
        _check_longitudes(self.lon)
        j = torch.arange(self.tile[1].start, self.tile[1].stop, dtype=torch.float64)
        self._lon_index = j  # global longitude indices of the tile, for the tile's DFT phases

    def _dft(self, x: Tensor, n_modes: int) -> Tensor:
        """(1/nlon) sum_j x_j exp(-2 pi i k j / nlon) for k < n_modes over the (tile's) longitudes."""
        if not self.sharded:
            return torch.fft.rfft(x, dim=-1, norm="forward")[..., :n_modes]
        nlon = self.lon.size
        k = torch.arange(n_modes, dtype=torch.float64)
        phase = -2.0 * math.pi * torch.outer(self._lon_index, k) / nlon
        ctype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
        e = (torch.polar(torch.ones_like(phase), phase) / nlon).to(device=x.device, dtype=ctype)
        return x.to(e.dtype) @ e

    def _all_reduce(self, z: Tensor) -> Tensor:
        if self.sharded:
            r = torch.view_as_real(z).contiguous()
            dist.all_reduce(r, group=self.spatial_group)
            z = torch.view_as_complex(r)
        return z

    def _member_mean(self, s: Tensor) -> Tensor:
        return s.mean(1) if self.ensemble else s

    def _input(self, x: Tensor) -> Tensor:
        self.check("field", x, ensemble=self.ensemble)
        return x.to(self.compute_dtype)


class ZonalEnergySpectrum(_SpectrumMetric):
    """WB2's ``ZonalEnergySpectrum`` per latitude circle: F_k = (1/L) sum_l f_l e^{-2 pi i k l / L},
    S_0 = C |F_0|^2 and S_k = 2 C |F_k|^2 for k = 1 ... L/2 (Nyquist doubled too), C = 2 pi R cos(latitude);
    units m x (unit)^2. ``update(field)`` with ``(batch, [member,] lead, channel, lat, lon)``; ``compute()``
    returns ``zonal_energy_spectrum`` ``(lead, channel, latitude, wavenumber)`` averaged over fields (and members).
    """

    def __init__(self, *args: Any, radius: float = EARTH_RADIUS_M, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.n_modes = self.lon.size // 2 + 1
        circ = 2.0 * math.pi * radius * np.cos(np.deg2rad(self.lat))
        factor = np.full(self.n_modes, 2.0)
        factor[0] = 1.0
        self.register_buffer("scale", torch.as_tensor(circ[:, None] * factor[None, :], dtype=self.compute_dtype), persistent=False)
        self._add_states("power", shape=(len(self.lead_hours), len(self.channels), self.lat.size, self.n_modes))

    def update(self, field: Tensor) -> None:
        x = self._input(field)
        f = self._dft(x, self.n_modes)  # (..., h, K)
        rows = self.tile[0]
        if self.sharded:
            full = f.new_zeros((*f.shape[:-2], self.lat.size, self.n_modes))
            full[..., rows, :] = f
            f, rows = self._all_reduce(full), slice(0, self.lat.size)
        if not self._counts_here:
            return
        s = (f.real**2 + f.imag**2) * self.scale[rows]
        self.power[..., rows, :] += self._member_mean(s).sum(0)
        self.n_forecasts += x.shape[0]

    def compute(self) -> dict[str, Tensor]:
        return {"zonal_energy_spectrum": self._mean("power")}

    def to_dataframe(self, values: dict[str, Tensor] | None = None) -> pd.DataFrame:
        """Long form: lead_time_hours, channel, latitude, zonal_wavenumber, value."""
        s = (self.compute() if values is None else values)["zonal_energy_spectrum"].detach().cpu().double().numpy()
        names = ["lead_time_hours", "channel", "latitude", "zonal_wavenumber"]
        idx = pd.MultiIndex.from_product([self.lead_hours, self.channels, self.lat, np.arange(self.n_modes)], names=names)
        return pd.DataFrame({"value": s.reshape(-1)}, index=idx).reset_index()


class AngularPowerSpectrum(_SpectrumMetric):
    """Angular power spectrum per total wavenumber l: P_l = (1/4 pi) sum_m w_m |a_lm|^2 with a_lm = <f, Y_lm>
    for orthonormal real-field spherical harmonics, w_0 = 1 and w_m = 2 (m > 0: the m and -m multiplicity).

    Normalised so that sum_l P_l is the area mean of f^2 (Parseval) for fields band-limited below the
    grid's degree. ``update(field)`` with ``(batch, [member,] lead, channel, lat, lon)``; ``compute()`` returns
    ``angular_power_spectrum`` ``(lead, channel, degree)``. The Legendre table costs mmax x lmax x nlat numbers.
    """

    def __init__(self, *args: Any, lmax: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        nlat, nlon = self.lat.size, self.lon.size
        self.lmax = min(nlat, nlon // 2) if lmax is None else int(lmax)
        if not 1 <= self.lmax <= nlat:
            raise ValueError(f"lmax={lmax} must be in 1 ... nlat={nlat}")
        # no Nyquist order: its real-FFT coefficient is not that of a +-m pair
        self.mmax = min(self.lmax, (nlon + 1) // 2)
        q = sphere_quadrature(self.lat)
        x = torch.as_tensor(np.sin(np.deg2rad(self.lat)), dtype=torch.float64)
        p = legpoly(self.mmax, self.lmax, x, norm="ortho", csphase=True)  # (m, l, nlat)
        w = 2.0 * math.pi * p * torch.as_tensor(q)[None, None, :]
        self.register_buffer("legendre", w[..., self.tile[0]].to(self.compute_dtype).contiguous(), persistent=False)
        mult = torch.full((self.mmax,), 2.0, dtype=self.compute_dtype)
        mult[0] = 1.0
        self.register_buffer("multiplicity", mult / (4.0 * math.pi), persistent=False)
        self._add_states("power", shape=(len(self.lead_hours), len(self.channels), self.lmax))

    def coefficients(self, x: Tensor) -> Tensor:
        """a_lm ``(..., l, m)`` of fields ``(..., lat, lon)`` (this rank's partial sums when sharded)."""
        f = self._dft(x, self.mmax)  # (..., h, m)
        w = self.legendre.to(x.dtype)
        return torch.complex(torch.einsum("...km,mlk->...lm", f.real, w), torch.einsum("...km,mlk->...lm", f.imag, w))

    def update(self, field: Tensor) -> None:
        x = self._input(field)
        a = self._all_reduce(self.coefficients(x))
        if not self._counts_here:
            return
        p = ((a.real**2 + a.imag**2) * self.multiplicity).sum(-1)  # (..., l)
        self.power += self._member_mean(p).sum(0)
        self.n_forecasts += x.shape[0]

    def compute(self) -> dict[str, Tensor]:
        return {"angular_power_spectrum": self._mean("power")}

    def to_dataframe(self, values: dict[str, Tensor] | None = None) -> pd.DataFrame:
        """Long form: lead_time_hours, channel, degree, value."""
        s = (self.compute() if values is None else values)["angular_power_spectrum"].detach().cpu().double().numpy()
        names = ["lead_time_hours", "channel", "degree"]
        idx = pd.MultiIndex.from_product([self.lead_hours, self.channels, np.arange(self.lmax)], names=names)
        return pd.DataFrame({"value": s.reshape(-1)}, index=idx).reset_index()
