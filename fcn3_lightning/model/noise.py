"""FCN3's stochastic latent noise: spherical diffusion noise with an AR(1) time evolution.

Re-implements ``makani/models/noise.py::DiffusionNoiseS2`` as configured for FCN3 (reference
section 2.8). Each of the ``C`` noise channels is a Gaussian random field on the sphere whose
spectrum is that of the heat kernel at "time" ``kT_c = 0.5 (L_c / R)^2``, i.e. a field with
correlation length ``L_c``; in time it is an AR(1) process with coefficient ``phi = exp(-lambd)``.

The state lives in spectral space, a complex tensor ``(N, C, lmax, mmax)`` with one row per noise
stream (a (sample, member) pair), and is mapped to the grid with an inverse real SHT built through
the :class:`SphericalLayers` factory. The random numbers come from :class:`NoiseStreams`: one
private CPU generator per (sample, member), so a given (seed, sample, member) always yields the same
field whatever else is in the batch and whatever device the model runs on.

Under spatial parallelism (the layers factory of :mod:`fcn3_lightning.parallel`) every rank draws the same full
spectral innovation as the serial run (the streams are per (sample, member), not per rank), keeps only its (l, m)
chunk of the state (l split over the polar group, m over the azimuth group, as the distributed inverse SHT takes
it) and maps that chunk to its tile of the grid: the gathered tiles are the serial field.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fcn3_lightning.model.layers import GRIDS, SERIAL, SphericalLayers
from fcn3_lightning.precision import float32_region

#: FCN3 uses eight noise channels (length scales 50 km doubling up to 6400 km).
DEFAULT_N_CHANNELS = 8


def default_length_scales_km(n_channels: int = DEFAULT_N_CHANNELS) -> tuple[float, ...]:
    """``50 * 2**c`` km for ``c = 0 .. n_channels - 1`` (the reference's kT values invert to these)."""
    return tuple(50.0 * 2.0**c for c in range(n_channels))


class NoiseStreams:
    """Independent, reproducible Gaussian random streams, one per (sample, member).

    Streams are ordered sample-major, member-minor (``stream = i_sample * n_members + member``),
    matching the ensemble members folded into the batch dimension. Each stream owns a CPU
    ``torch.Generator`` seeded from ``numpy.random.SeedSequence([seed, sample_id, member_key])``:
    SeedSequence hashes the whole key, so streams are statistically independent (unlike
    ``seed + offset`` schemes, whose neighbouring seeds may be correlated or collide), and the draw
    for one stream does not depend on which other samples share the batch.

    With ``antithetic=True`` members ``2k`` and ``2k + 1`` share the key ``k`` and member ``2k``
    negates its draws, so each pair is centred (the reference's ``centered: True``).

    ``member_offset``: the global id of the first member. Under ensemble parallelism each rank holds members
    ``offset .. offset + n_members - 1`` of the whole ensemble and must draw exactly their streams; antithetic
    pairing is by global id, so a pair split over two ranks still shares its key.
    """

    def __init__(self, seed: int, sample_ids: Sequence[int], n_members: int, *, antithetic: bool = False, member_offset: int = 0) -> None:
        seed = _as_nonneg_int(seed, "seed")
        sample_ids = [_as_nonneg_int(s, "sample id") for s in sample_ids]
        if not sample_ids:
            raise ValueError("NoiseStreams needs at least one sample id, got an empty sequence")
        if len(set(sample_ids)) != len(sample_ids):
            # Duplicates would silently give two batch entries identical noise.
            raise ValueError(f"sample ids must be distinct, got {sample_ids}")
        n_members = _as_nonneg_int(n_members, "n_members")
        if n_members < 1:
            raise ValueError(f"n_members must be >= 1, got {n_members}")
        member_offset = _as_nonneg_int(member_offset, "member_offset")
        if antithetic and member_offset == 0 and n_members % 2:
            # with an offset this is a shard of a larger ensemble: only the global member count must be even
            raise ValueError(f"antithetic (centred) noise pairs members, so n_members must be even, got {n_members}")

        self.seed = seed
        self.sample_ids = tuple(sample_ids)
        self.n_members = n_members
        self.antithetic = antithetic
        self.member_offset = member_offset

        self._generators: list[torch.Generator] = []
        signs: list[float] = []
        for sample_id in self.sample_ids:
            for member in range(member_offset, member_offset + n_members):
                # as in the reference, the even member of a pair negates its draws
                key, sign = (member // 2, 1.0 if member % 2 else -1.0) if antithetic else (member, 1.0)
                # Both members of an antithetic pair get their own generator with the same seed, so
                # they stay in lock-step as long as every draw has the same shape for all streams.
                state = np.random.SeedSequence([seed, sample_id, key]).generate_state(1, dtype=np.uint64)[0]
                gen = torch.Generator(device="cpu")
                gen.manual_seed(int(state))
                self._generators.append(gen)
                signs.append(sign)
        self._signs = torch.tensor(signs, dtype=torch.float32)

    @property
    def n_streams(self) -> int:
        return len(self._generators)

    def normal(self, shape: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
        """Standard normal draws of shape ``(n_streams, *shape)`` in float32.

        Drawn on the CPU generators and then moved to ``device``, so the numbers do not depend on
        the device (CUDA generators produce different sequences from CPU ones).
        """
        shape = tuple(int(s) for s in shape)
        draws = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in self._generators])
        if self.antithetic:
            draws *= self._signs.view(-1, *([1] * len(shape)))
        return draws.to(device) if device is not None else draws

    def subset(self, m0: int, m1: int) -> NoiseStreams:
        """Members ``m0 .. m1 - 1`` of a one-sample set of streams, sharing their generators (a member batch of a
        forecast: each generator is then drawn from by that batch only)."""
        if len(self.sample_ids) != 1 or not 0 <= m0 < m1 <= self.n_members:
            raise ValueError(f"subset({m0}, {m1}) of {self!r}: needs one sample and 0 <= m0 < m1 <= n_members")
        sub = copy.copy(self)
        sub._generators = self._generators[m0:m1]
        sub._signs = self._signs[m0:m1]
        sub.n_members = m1 - m0
        sub.member_offset = self.member_offset + m0
        return sub

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(seed={self.seed}, sample_ids={list(self.sample_ids)}, "
            f"n_members={self.n_members}, antithetic={self.antithetic}"
            + (f", member_offset={self.member_offset})" if self.member_offset else ")")
        )


class SphericalDiffusionNoise(nn.Module):
    """Spectral AR(1) state of spherical diffusion noise and its map to the grid (``DiffusionNoiseS2``).

    Per channel ``c`` and degree ``l`` the innovation std is
    ``sigma_{c,l} = sqrt(4 pi) sigma sqrt(0.5 (1 - phi^2) / F0norm_c) exp(-0.5 kT_c l (l + 1))`` with
    ``F0norm_c = sum_{l=1}^{lmax-1} (2l+1) exp(-kT_c l (l + 1))``, so that the stationary field has
    (approximately, see below) unit pointwise variance. The ``l = 0`` mode is zeroed: it is not in the
    normalisation sum, and keeping it would add ``0.5 / F0norm_c`` to the variance (0.37 for the
    6400 km channel).

    The normalisation counts every (l, m >= 0) coefficient as a full complex mode, but the iSHT drops
    the imaginary part of the ``m = 0`` coefficients. The pointwise variance is therefore ~``sigma**2``
    in the tropics, falls towards the poles (to exactly ``sigma**2 / 2`` at the poles) and, for the
    largest scales whose power sits in ``l = 1, 2``, already at mid-latitudes (std ~0.87 at 45 degrees
    for 6400 km). This is inherited from the reference.

    With a distributed ``layers`` factory the state holds this rank's (l, m) chunk only (:attr:`state_shape`,
    :attr:`l_slice`, :attr:`m_slice`) and :meth:`to_grid` returns this rank's tile of the field.
    """

    sigma_l: Tensor

    def __init__(
        self,
        img_shape: tuple[int, int],
        *,
        grid: str = "equiangular",
        n_channels: int = DEFAULT_N_CHANNELS,
        length_scales_km: Sequence[float] | None = None,
        sigma: float = 1.0,
        lambd: float = 1.0,
        lmax: int | None = None,
        earth_radius_km: float = 6370.0,
        layers: SphericalLayers = SERIAL,
    ) -> None:
        super().__init__()
        if len(img_shape) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in img_shape):
            raise ValueError(f"img_shape must be two ints (nlat, nlon), got {img_shape!r}")
        nlat, nlon = int(img_shape[0]), int(img_shape[1])
        if nlat < 2 or nlon < 2:
            raise ValueError(f"img_shape must be at least (2, 2), got {img_shape!r}")
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; expected one of {GRIDS}")
        if n_channels < 1:
            raise ValueError(f"n_channels must be >= 1, got {n_channels}")
        if length_scales_km is None:
            length_scales_km = default_length_scales_km(n_channels)
        length_scales_km = tuple(float(x) for x in length_scales_km)
        if len(length_scales_km) != n_channels:
            raise ValueError(
                f"n_channels={n_channels} does not match len(length_scales_km)={len(length_scales_km)} ({list(length_scales_km)})"
            )
        if not all(x > 0 and math.isfinite(x) for x in length_scales_km):
            raise ValueError(f"length scales must be positive and finite, got {list(length_scales_km)}")
        if not earth_radius_km > 0:
            raise ValueError(f"earth_radius_km must be positive, got {earth_radius_km}")
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if not lambd > 0:
            # lambd = 0 gives phi = 1: a random walk with no stationary distribution (1 - phi^2 = 0).
            raise ValueError(f"lambd must be > 0 (phi = exp(-lambd) < 1), got {lambd}")
        if lmax is not None and lmax < 2:
            raise ValueError(f"lmax must be >= 2 (l = 0 is dropped, so lmax = 1 leaves no modes), got {lmax}")

        self.img_shape = (nlat, nlon)
        self.grid = grid
        self.n_channels = n_channels
        self.length_scales_km = length_scales_km
        self.sigma = float(sigma)
        self.lambd = float(lambd)
        self.earth_radius_km = float(earth_radius_km)
        self.phi = math.exp(-self.lambd)
        self.kT = tuple(0.5 * (length / self.earth_radius_km) ** 2 for length in length_scales_km)

        # Release behaviour: lmax = mmax = nlat (721 at 721x1440; torch-harmonics >= 0.9 would
        # default to 361, cutting the 50 km channel at ~13% of its l = 0 amplitude). Clip to the
        # longitude Nyquist limit nlon // 2 + 1 ourselves: truncate_sht only applies it when mmax is
        # not given, and orders beyond it would be dropped silently by the irfft while still counted
        # in F0norm. (No-op on the 721x1440 data grid.) Read the effective values back from the module.
        requested = min(nlat if lmax is None else int(lmax), nlon // 2 + 1)
        self.isht = layers.isht(self.img_shape, lmax=requested, mmax=requested, grid=grid)
        self.lmax: int = int(self.isht.lmax)
        self.mmax: int = int(self.isht.mmax)
        if self.lmax < 2:
            raise ValueError(f"effective lmax={self.lmax} for img_shape={self.img_shape} leaves no modes with l >= 1")
        self.distributed = bool(layers.distributed)
        self.local_img_shape = layers.local_shape(self.img_shape)
        if self.distributed:
            # torch-harmonics' distributed iSHT takes the (l_local, m_local) chunk: l split over the polar group,
            # m over the azimuth group (compute_split_shapes chunks, in group-rank order)
            l0, m0 = int(self.isht.lmax_offset), int(self.isht.mmax_offset)
            self.l_slice = slice(l0, l0 + int(self.isht.lmax_local))
            self.m_slice = slice(m0, m0 + int(self.isht.mmax_local))
        else:
            self.l_slice, self.m_slice = slice(0, self.lmax), slice(0, self.mmax)

        # float64 for the normalisation sums; at 721 degrees and kT ~ 3e-5 they are large and smooth.
        ell = torch.arange(self.lmax, dtype=torch.float64)
        kT = torch.tensor(self.kT, dtype=torch.float64).unsqueeze(-1)  # (C, 1)
        decay = torch.exp(-kT * ell * (ell + 1))  # (C, lmax)
        f0norm = ((2 * ell[1:] + 1) * decay[:, 1:]).sum(-1, keepdim=True)  # (C, 1)
        sigma_l = math.sqrt(4 * math.pi) * self.sigma * torch.sqrt(0.5 * (1 - self.phi**2) / f0norm) * torch.sqrt(decay)
        sigma_l[:, 0] = 0.0
        # Non-persistent: fully determined by the constructor arguments, so not part of checkpoints.
        self.register_buffer("sigma_l", sigma_l.to(torch.float32).unsqueeze(-1), persistent=False)  # (C, lmax, 1)

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """Per-stream spectral state shape held here: ``(C, lmax, mmax)``, or this rank's ``(C, l_local, m_local)`` chunk."""
        return (self.n_channels, self.l_slice.stop - self.l_slice.start, self.m_slice.stop - self.m_slice.start)

    @property
    def full_state_shape(self) -> tuple[int, int, int]:
        """Per-stream shape of the whole spectral state ``(C, lmax, mmax)`` (what is drawn, on every rank)."""
        return (self.n_channels, self.lmax, self.mmax)

    def _innovation(self, streams: NoiseStreams, scale: float = 1.0) -> Tensor:
        """``scale * sigma_l * xi`` as a real (N, C, lmax, mmax, 2) tensor (the reference's [re, im] layout).

        Real and imaginary parts of every (l, m) are drawn, including m > l entries, which the iSHT
        ignores. The arithmetic stays on the real view: complex elementwise ops are an order of
        magnitude slower on CPU and this runs before every model step.

        Distributed: the full innovation is drawn (the same numbers as the serial run, the streams being per
        (sample, member)) and this rank's (l, m) chunk kept, so only the chunk outlives the call.
        """
        xi = streams.normal((*self.full_state_shape, 2), device=self.sigma_l.device)
        sigma_l = self.sigma_l
        if self.distributed:
            xi = xi[:, :, self.l_slice, self.m_slice].contiguous()
            sigma_l = sigma_l[:, self.l_slice]
        return xi.mul_((scale * sigma_l).unsqueeze(-1))

    def stationary(self, streams: NoiseStreams) -> Tensor:
        """A fresh draw from the stationary distribution: ``sigma_l xi / sqrt(1 - phi^2)``, complex64 (N, C, lmax, mmax)."""
        return torch.view_as_complex(self._innovation(streams, 1.0 / math.sqrt(1.0 - self.phi**2)))

    def ar1_step(self, state: Tensor, streams: NoiseStreams) -> Tensor:
        """One AR(1) step ``s <- phi s + sigma_l xi``; returns a new state, ``state`` is untouched."""
        expected = (streams.n_streams, *self.state_shape)
        if tuple(state.shape) != expected:
            raise ValueError(f"state has shape {tuple(state.shape)}, expected {expected} (n_streams, C, lmax, mmax)")
        if not state.is_complex():
            raise TypeError(f"state must be complex, got {state.dtype}")
        innovation = self._innovation(streams)
        return torch.view_as_complex(innovation.add_(torch.view_as_real(state.to(torch.complex64)), alpha=self.phi))

    def to_grid(self, state: Tensor) -> Tensor:
        """Inverse real SHT of the state: (N, C, lmax, mmax) complex -> (N, C, nlat, nlon) float32.

        Distributed: this rank's (N, C, l_local, m_local) chunk -> its (N, C, nlat_local, nlon_local) tile
        (collective over the polar and azimuth groups).
        """
        if tuple(state.shape[-3:]) != self.state_shape:
            raise ValueError(
                f"state has trailing shape {tuple(state.shape[-3:])}, expected {self.state_shape} (C, lmax, mmax)"
                + (" (this rank's chunk)" if self.distributed else "")
            )
        # fp32 regardless of any surrounding autocast (the rule of fcn3_lightning.precision): reduced-precision
        # iFFTs need power-of-two nlon and would degrade the high-degree content of the field.
        with float32_region(state):
            return self.isht(state.to(torch.complex64)).to(torch.float32)

    def extra_repr(self) -> str:
        return (
            f"img_shape={self.img_shape}, grid={self.grid!r}, n_channels={self.n_channels}, lmax={self.lmax}, mmax={self.mmax}, "
            f"length_scales_km={list(self.length_scales_km)}, sigma={self.sigma}, lambd={self.lambd}"
            + (f", l_slice={self.l_slice}, m_slice={self.m_slice}" if self.distributed else "")
        )


def _as_nonneg_int(value: object, name: str) -> int:
    # SeedSequence only takes non-negative integers; reject bools and floats rather than truncate them.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return int(value)


@dataclass(frozen=True)
class NoiseSettings:
    """Everything that fixes a forecaster's latent noise: the process (channels, length scales, sigma, AR(1) lambd),
    whether members come in antithetic (centred) pairs, and the base seed of the streams.

    ``length_scales_km`` None means FCN3's (50 km doubling); a reference package gives ``kT`` instead
    (:meth:`from_kT`), ``kT = 0.5 (L / R)^2``.
    """

    n_channels: int = DEFAULT_N_CHANNELS
    length_scales_km: tuple[float, ...] | None = None
    sigma: float = 1.0
    lambd: float = 1.0
    earth_radius_km: float = 6370.0
    antithetic: bool = False
    seed: int = 333

    @classmethod
    def from_kT(cls, kT: Sequence[float], earth_radius_km: float = 6370.0, **kwargs: object) -> NoiseSettings:
        kT = [float(k) for k in kT]
        if not all(k > 0 and math.isfinite(k) for k in kT):
            raise ValueError(f"noise kT must be positive and finite, got {kT}")
        scales = tuple(earth_radius_km * math.sqrt(2.0 * k) for k in kT)
        return cls(n_channels=len(kT), length_scales_km=scales, earth_radius_km=earth_radius_km, **kwargs)  # type: ignore[arg-type]

    @property
    def kT(self) -> tuple[float, ...]:
        scales = self.length_scales_km or default_length_scales_km(self.n_channels)
        return tuple(0.5 * (s / self.earth_radius_km) ** 2 for s in scales)

    def process(self, img_shape: tuple[int, int], layers: SphericalLayers = SERIAL) -> SphericalDiffusionNoise:
        """The noise process on the ``img_shape`` data grid."""
        return SphericalDiffusionNoise(
            img_shape,
            n_channels=self.n_channels,
            length_scales_km=self.length_scales_km,
            sigma=self.sigma,
            lambd=self.lambd,
            earth_radius_km=self.earth_radius_km,
            layers=layers,
        )

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["length_scales_km"] = None if self.length_scales_km is None else list(self.length_scales_km)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> NoiseSettings:
        d = dict(d)
        if d.get("length_scales_km") is not None:
            d["length_scales_km"] = tuple(float(x) for x in d["length_scales_km"])  # type: ignore[union-attr]
        return cls(**d)  # type: ignore[arg-type]
