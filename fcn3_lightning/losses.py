"""FCN3's ensemble training loss: area-weighted pointwise CRPS plus a spectral CRPS on |SHT| coefficients.

Plain torch (no Lightning), so the same code serves training, validation and tests:

* :func:`crps_ensemble` -- pointwise CRPS of an ensemble ("cdf" = empirical-CDF CRPS, "fair" = almost-fair
  CRPS_alpha), O(M log M) by sorting the members;
* :func:`~fcn3_lightning.grid.quadrature_weights` and :func:`spatial_crps` -- the area-weighted global mean of the pointwise CRPS;
* :class:`SpectralCRPS` -- the same kernel on the magnitudes of the spherical-harmonic coefficients;
* :func:`channel_weights` -- the reference's "auto" per-channel weights with tendency normalisation;
* :class:`EnsembleCRPSLoss` -- everything composed over channels and rollout steps.

All quantities are in normalised units; the formulas follow the reference description (section 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fcn3_lightning.channels import parse_channel
from fcn3_lightning.grid import quadrature_weights
from fcn3_lightning.model.layers import SERIAL, SphericalLayers
from fcn3_lightning.precision import at_least_float32, float32_region

#: CRPS kernels: "cdf" (standard CRPS of the empirical CDF) and "fair" (almost-fair CRPS_alpha).
CRPS_KINDS: tuple[str, ...] = ("cdf", "fair")
#: Reference names accepted as aliases (the reference calls the almost-fair kernel "skillspread").
_KIND_ALIASES = {"skillspread": "fair"}
#: Spectral CRPS definitions: as FCN3 was trained ("release") or as the reference code has it now ("head").
SPECTRAL_NORMALIZATIONS: tuple[str, ...] = ("release", "head")
MULTISTEP_WEIGHTINGS: tuple[str, ...] = ("intended", "reference")
#: Floor on the tendency std in physical units (reference value; it strongly down-weights upper-level q).
TENDENCY_STD_FLOOR = 1e-4

# Surface channels with the 0.1 "auto" base weight; t2m gets 1.0 and level channels 0.001 * hPa.
_AUTO_SURFACE_01 = frozenset({"u10m", "v10m", "u100m", "v100m", "msl", "tcwv", "tp", "sp", "sst"})
_AUTO_LEVEL_PREFIXES = frozenset({"z", "u", "v", "t", "r", "q"})


def _check_kind(kind: str, alpha: float) -> str:
    kind = _KIND_ALIASES.get(kind, kind)
    if kind not in CRPS_KINDS:
        raise ValueError(f"unknown CRPS kind {kind!r}; expected one of {CRPS_KINDS} (or 'skillspread' for 'fair')")
    if kind == "fair" and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"almost-fair CRPS needs 0 <= alpha <= 1 (1 = fair, 0 = standard), got alpha={alpha}")
    return kind


def check_ensemble_size(n_members: int, kind: str) -> None:
    """Raise if ``kind`` cannot score an ensemble of ``n_members`` (fair CRPS needs at least 2 members)."""
    kind = _KIND_ALIASES.get(kind, kind)
    if n_members < 1:
        raise ValueError("the ensemble is empty (0 members along the member dimension)")
    if kind == "fair" and n_members < 2:
        raise ValueError(
            f"fair CRPS needs at least 2 members, got an ensemble of {n_members}: its spread term divides by M(M-1); "
            "use kind='cdf' (standard CRPS, = MAE for one member) or a larger ensemble"
        )


def crps_ensemble(pred: Tensor, obs: Tensor, *, member_dim: int = 1, kind: str = "fair", alpha: float = 1.0) -> Tensor:
    """Pointwise CRPS of the ensemble ``pred`` (members along ``member_dim``) against ``obs``.

    ``obs`` must have the shape of ``pred`` with ``member_dim`` removed; so does the result. With M members,
    skill = (1/M) sum_i |x_i - y| and S = sum_{i,j} |x_i - x_j| = 2 sum_r (2r - M - 1) x_(r) (members sorted,
    r = 1..M), which costs O(M log M) instead of the O(M^2) pairwise sum:

    * ``kind="cdf"``: CRPS of the empirical CDF, skill - S / (2 M^2); one member gives |x - y|;
    * ``kind="fair"``: almost-fair CRPS_alpha = skill - 0.5 (M - 1 + alpha) / (M^2 (M - 1)) S; alpha = 1 is the
      fair (unbiased) CRPS, alpha = 0 the "cdf" one. Needs M >= 2.

    Differentiable (through ``torch.sort``); computed in the input dtype.
    """
    kind = _check_kind(kind, alpha)
    if not pred.is_floating_point() or not obs.is_floating_point():
        raise TypeError(f"CRPS needs floating-point tensors, got pred {pred.dtype} and obs {obs.dtype}")
    if not -pred.ndim <= member_dim < pred.ndim:
        raise ValueError(f"member_dim={member_dim} is out of range for pred of shape {tuple(pred.shape)}")
    dim = member_dim % pred.ndim
    expected = pred.shape[:dim] + pred.shape[dim + 1 :]
    if obs.shape != expected:
        raise ValueError(
            f"obs has shape {tuple(obs.shape)} but must equal pred's shape {tuple(pred.shape)} with member_dim={member_dim} "
            f"removed: {tuple(expected)}"
        )
    m = pred.shape[dim]
    check_ensemble_size(m, kind)

    skill = (pred - obs.unsqueeze(dim)).abs().mean(dim)
    if m == 1:
        return skill
    coef = 1.0 / (2.0 * m * m) if kind == "cdf" else 0.5 * (m - 1 + alpha) / (m * m * (m - 1))
    # Rank weights 2 (2r - M - 1) with the kernel's coefficient folded in: one multiply-add over the members.
    r = torch.arange(1, m + 1, device=pred.device, dtype=pred.dtype)
    rank_w = (coef * 2.0) * (2.0 * r - (m + 1))
    rank_w = rank_w.reshape((m,) + (1,) * (pred.ndim - dim - 1))
    spread = (torch.sort(pred, dim=dim).values * rank_w).sum(dim)
    return skill - spread


def spatial_crps(pred: Tensor, obs: Tensor, weights: Tensor, kind: str = "fair", alpha: float = 1.0) -> Tensor:
    """Area-weighted mean of the pointwise CRPS: ``sum_{h,w} q_hw crps_hw``.

    pred (B, M, ..., H, W), obs (B, ..., H, W), weights broadcastable to (H, W), e.g. :func:`~fcn3_lightning.grid.quadrature_weights`
    (or its rows for a latitude tile). Returns (B, ...), e.g. (B, C) for pred (B, M, C, H, W).
    """
    if pred.ndim < 4:
        raise ValueError(f"pred must be (B, M, ..., H, W) with at least 4 dims, got shape {tuple(pred.shape)}")
    grid = pred.shape[-2:]
    if weights.ndim > 2 or any(n not in (1, g) for n, g in zip(weights.shape[::-1], grid[::-1], strict=False)):
        raise ValueError(f"weights of shape {tuple(weights.shape)} do not broadcast to the grid {tuple(grid)}")
    crps = crps_ensemble(pred, obs, member_dim=1, kind=kind, alpha=alpha)
    # Summing ~10^6 points in half precision loses the loss's low digits: accumulate in fp32 at least.
    crps = at_least_float32(crps)
    return (crps * weights.to(device=crps.device, dtype=crps.dtype)).sum((-2, -1))


class SpectralCRPS(nn.Module):
    """CRPS of the magnitudes of the spherical-harmonic coefficients, summed over (l, m) per channel.

    Per channel: orthonormal real SHT (built through the layer factory, in fp32 or fp64 with autocast off) of
    every member and of the target; |c_lm|; the pointwise CRPS kernel on each (l, m) as a scalar; a sum over
    (l, m) with weight w_m = 1 for m = 0 and 2 for m > 0 (the multiplicity of +-m). Entries with m > l are
    zero for every member and the target and add nothing. Normalisations (reference section 3.3):

    * ``"release"`` (what FCN3 was trained with): lmax = mmax = nlat (mmax clipped to the grid's nlon//2 + 1;
      torch-harmonics then truncates triangularly, lmax = mmax), coefficients / (4 pi), weights {1, 2}.
      On 721 x 1440 this scores l = 0..720, beyond the grid's band limit, as the release did.
    * ``"head"`` (the reference code since 2026-04): lmax = mmax = (nlat - 1)//2 (the equiangular band limit,
      360 on 721 latitudes), coefficients / sqrt(4 pi), weights {1, 2} / (4 pi).

    ``lmax`` overrides the default number of degrees (torch-harmonics convention: l = 0..lmax-1) for either
    normalisation. With a distributed layer factory the SHT returns a local (l, m) chunk: the m weights follow
    its ``mmax_offset``, and the caller all-reduces the per-rank sums.
    """

    def __init__(
        self,
        img_shape: Sequence[int],
        *,
        grid: str = "equiangular",
        lmax: int | None = None,
        normalization: str = "release",
        layers: SphericalLayers = SERIAL,
    ) -> None:
        super().__init__()
        nlat, nlon = (int(s) for s in img_shape)
        if normalization == "release":
            degrees = nlat if lmax is None else lmax
            coeff_scale, mode_scale = 1.0 / (4.0 * math.pi), 1.0
        elif normalization == "head":
            degrees = (nlat - 1) // 2 if lmax is None else lmax
            coeff_scale, mode_scale = 1.0 / math.sqrt(4.0 * math.pi), 1.0 / (4.0 * math.pi)
        else:
            raise ValueError(f"unknown spectral normalization {normalization!r}; expected one of {SPECTRAL_NORMALIZATIONS}")
        if degrees < 1:
            raise ValueError(f"the spectral CRPS needs lmax >= 1, got {degrees} (img_shape={tuple(img_shape)})")
        # torch-harmonics does not clip an explicit mmax to the number of Fourier modes the grid has.
        mmax = min(degrees, nlon // 2 + 1)
        self.img_shape = (nlat, nlon)
        self.normalization = normalization
        self.coeff_scale = coeff_scale
        self.sht = layers.sht((nlat, nlon), lmax=degrees, mmax=mmax, grid=grid)
        self.distributed = layers.distributed
        # Orders held by this SHT: all of them serially, a contiguous chunk for a distributed twin.
        m_offset = int(getattr(self.sht, "mmax_offset", 0))
        m_count = int(getattr(self.sht, "mmax_local", self.sht.mmax))
        m = torch.arange(m_offset, m_offset + m_count)
        mode_weights = torch.where(m == 0, 1.0, 2.0).double() * mode_scale  # fp64, cast at use
        self.register_buffer("mode_weights", mode_weights, persistent=False)

    @property
    def lmax(self) -> int:
        return int(self.sht.lmax)

    @property
    def mmax(self) -> int:
        return int(self.sht.mmax)

    def _magnitudes(self, x: Tensor) -> Tensor:
        # The SHT runs in fp32 (fp64 kept) with autocast off (fcn3_lightning.precision): half-precision FFT/Legendre
        # sums are too coarse.
        with float32_region(x):
            return (self.sht(at_least_float32(x)) * self.coeff_scale).abs()

    def coefficient_crps(self, pred: Tensor, obs: Tensor, kind: str = "fair", alpha: float = 1.0) -> Tensor:
        """Unweighted CRPS of each |c_lm|: pred (B, M, C, H, W), obs (B, C, H, W) -> (B, C, lmax, mmax)."""
        if pred.ndim != 5 or obs.ndim != 4:
            raise ValueError(
                f"spectral CRPS needs pred (B, M, C, H, W) and obs (B, C, H, W), got {tuple(pred.shape)} and {tuple(obs.shape)}"
            )
        b, m, c, h, w = pred.shape
        if obs.shape != (b, c, h, w):
            raise ValueError(f"obs has shape {tuple(obs.shape)}, expected {(b, c, h, w)} to match pred {tuple(pred.shape)}")
        if not self.distributed and (h, w) != self.img_shape:
            raise ValueError(f"the spectral CRPS was built for a {self.img_shape} grid, got fields of {(h, w)}")
        check_ensemble_size(m, _check_kind(kind, alpha))
        # Two SHT calls rather than one on cat([obs, pred]): no copy of the whole ensemble.
        cp = self._magnitudes(pred.reshape(b * m, c, h, w))
        co = self._magnitudes(obs)
        cp = cp.reshape(b, m, *cp.shape[1:])
        return crps_ensemble(cp, co, member_dim=1, kind=kind, alpha=alpha)

    def forward(self, pred: Tensor, obs: Tensor, kind: str = "fair", alpha: float = 1.0) -> Tensor:
        """Per-channel spectral CRPS: pred (B, M, C, H, W), obs (B, C, H, W) -> (B, C)."""
        crps = self.coefficient_crps(pred, obs, kind, alpha)
        return (crps * self.mode_weights.to(crps.dtype)).sum((-2, -1))


def _auto_base_weight(name: str) -> float:
    ch = parse_channel(name)
    if ch.level is not None and ch.variable in _AUTO_LEVEL_PREFIXES:
        return 0.001 * ch.level
    if ch.name == "t2m":
        return 1.0
    if ch.name in _AUTO_SURFACE_01:
        return 0.1
    return 0.01


def channel_weights(
    channels: Sequence[str],
    scale: Sequence[float] | Tensor,
    time_diff_std: Sequence[float] | Tensor,
    mode: str = "auto",
) -> Tensor:
    """Per-channel loss weights w_c (reference section 3.4), shape (C,), default float dtype.

    ``mode="auto"``: base weights (u10m, v10m, u100m, v100m, msl, tcwv, tp, sp, sst: 0.1; t2m: 1.0; level channels
    z/u/v/t/r/q: 0.001 x pressure in hPa; anything else: 0.01), normalised to sum 1 over ``channels``, then times
    scale_c / max(time_diff_std_c, 1e-4): each channel's error in units of its typical 6-hour tendency (``scale``
    is the normalisation scale, ``time_diff_std`` the std of the time differences, both in physical units).
    ``mode="constant"``: 1/C for every channel, no tendency scaling.
    """
    names = list(channels)
    n = len(names)
    if n == 0:
        raise ValueError("channel_weights needs at least one channel")
    if mode == "constant":
        return torch.full((n,), 1.0 / n, dtype=torch.get_default_dtype())
    if mode != "auto":
        raise ValueError(f"unknown channel weight mode {mode!r}; expected 'auto' or 'constant'")
    scale_a = np.asarray(torch.as_tensor(scale, dtype=torch.float64).cpu(), dtype=np.float64).reshape(-1)
    tdstd_a = np.asarray(torch.as_tensor(time_diff_std, dtype=torch.float64).cpu(), dtype=np.float64).reshape(-1)
    if scale_a.size != n or tdstd_a.size != n:
        raise ValueError(f"channel_weights got {n} channels but {scale_a.size} scales and {tdstd_a.size} time-difference stds")
    if not (np.all(np.isfinite(scale_a)) and np.all(np.isfinite(tdstd_a))):
        raise ValueError("scale and time_diff_std must be finite")
    base = np.array([_auto_base_weight(c) for c in names])
    w = base / base.sum() * scale_a / np.maximum(tdstd_a, TENDENCY_STD_FLOOR)
    return torch.as_tensor(w, dtype=torch.get_default_dtype())


class EnsembleCRPSLoss(nn.Module):
    """FCN3's training loss over a rollout of S steps (reference sections 3.1-3.5).

    L = mean_b sum_s (1/S) sum_c [w_c CRPS_spatial(b, s, c) + spectral_weight w_c CRPS_spectral(b, s, c)]

    with CRPS_spatial the area-weighted mean of the pointwise CRPS (:func:`spatial_crps`) and CRPS_spectral the
    :class:`SpectralCRPS`. forward(pred (B, M, S, C, H, W), obs (B, S, C, H, W)) returns ``(loss, details)``;
    a single step may also be given as pred (B, M, C, H, W), obs (B, C, H, W). ``details`` holds the batch-mean,
    detached per-step, per-channel terms: ``"spatial_crps"`` (S, C) and, unless spectral_weight == 0,
    ``"spectral_crps"`` (S, C).

    ``multistep_weighting``:

    * ``"intended"``: every step's spatial term gets w_c and every step's spectral term spectral_weight * w_c,
      as the formula above says.
    * ``"reference"``: the reference code's quirk, reproduced exactly: the weight vector is
      [w_spatial (C), w_spectral (C)] tiled S times, but the loss vector is laid out
      [spatial(step 0), ..., spatial(step S-1), spectral(step 0), ..., spectral(step S-1)] (C entries each).
      Block k of the losses thus gets w_spatial for even k and w_spectral for odd k: with S = 4, the spatial
      CRPS of steps 1 and 3 is weighted spectral_weight * w_c and the spectral CRPS of steps 0 and 2 the full
      w_c. FCN3's 4-step stage 2 and fine-tuning trained this way. Both agree for S = 1.

    Low-precision inputs are scored in fp32, with autocast off (:mod:`fcn3_lightning.precision`). ``quadrature``
    overrides the spatial weights (e.g. the rows of a latitude tile); by default
    :func:`~fcn3_lightning.grid.quadrature_weights` of ``img_shape`` and ``grid``.
    """

    def __init__(
        self,
        img_shape: Sequence[int],
        channel_weights: Tensor | Sequence[float],
        *,
        kind: str = "fair",
        alpha: float = 1.0,
        spectral_weight: float = 0.1,
        spectral_normalization: str = "release",
        multistep_weighting: str = "intended",
        grid: str = "equiangular",
        spectral_lmax: int | None = None,
        quadrature: Tensor | None = None,
        layers: SphericalLayers = SERIAL,
    ) -> None:
        super().__init__()
        self.kind = _check_kind(kind, alpha)
        self.alpha = float(alpha)
        if multistep_weighting not in MULTISTEP_WEIGHTINGS:
            raise ValueError(f"unknown multistep_weighting {multistep_weighting!r}; expected one of {MULTISTEP_WEIGHTINGS}")
        self.multistep_weighting = multistep_weighting
        self.spectral_weight = float(spectral_weight)
        self.img_shape = tuple(int(s) for s in img_shape)
        if len(self.img_shape) != 2:
            raise ValueError(f"img_shape must be (nlat, nlon), got {tuple(img_shape)}")
        # Weights are kept in fp64 and cast to the computation dtype at use: no rounding of fp64 losses.
        w = torch.as_tensor(channel_weights, dtype=torch.float64)
        if w.ndim != 1 or w.numel() == 0:
            raise ValueError(f"channel_weights must be a non-empty 1-D tensor (C,), got shape {tuple(w.shape)}")
        self.register_buffer("channel_weights", w.clone(), persistent=False)
        if quadrature is None:
            q = quadrature_weights(*self.img_shape, grid=grid, dtype=torch.float64)
        else:
            q = torch.as_tensor(quadrature, dtype=torch.float64)
        self.register_buffer("quadrature", q.clone(), persistent=False)
        self.distributed = layers.distributed
        # A zero spectral weight skips the SHTs entirely (they dominate the loss's cost).
        self.spectral: SpectralCRPS | None = None
        if self.spectral_weight != 0.0:
            self.spectral = SpectralCRPS(self.img_shape, grid=grid, lmax=spectral_lmax, normalization=spectral_normalization, layers=layers)

    @property
    def n_channels(self) -> int:
        return self.channel_weights.numel()

    def _check(self, pred: Tensor, obs: Tensor) -> tuple[Tensor, Tensor]:
        if pred.ndim == 5 and obs.ndim == 4:  # one step without a step dimension
            pred, obs = pred.unsqueeze(2), obs.unsqueeze(1)
        if pred.ndim != 6 or obs.ndim != 5:
            raise ValueError(
                f"EnsembleCRPSLoss needs pred (B, M, S, C, H, W) and obs (B, S, C, H, W) (or one step: (B, M, C, H, W) and "
                f"(B, C, H, W)), got pred {tuple(pred.shape)} and obs {tuple(obs.shape)}"
            )
        b, m, s, c, h, w = pred.shape
        if obs.shape != (b, s, c, h, w):
            raise ValueError(
                f"obs has shape {tuple(obs.shape)}, expected {(b, s, c, h, w)} to match pred (B, M, S, C, H, W) = {tuple(pred.shape)}"
            )
        if c != self.n_channels:
            raise ValueError(f"the loss has {self.n_channels} channel weights but the fields have {c} channels")
        check_ensemble_size(m, self.kind)
        if not self.distributed and (h, w) != self.img_shape:
            raise ValueError(f"the loss was built for a {self.img_shape} grid, got fields of {(h, w)}")
        # CRPS sums and sorts are scored in fp32 at least (bf16 keeps ~3 significant digits).
        return at_least_float32(pred), at_least_float32(obs)

    def forward(self, pred: Tensor, obs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # the whole loss in fp32 with autocast off: the rule of fcn3_lightning.precision
        with float32_region(pred):
            return self._forward(*self._check(pred, obs))

    def _forward(self, pred: Tensor, obs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        b, _, s, c, _, _ = pred.shape
        spatial = spatial_crps(pred, obs, self.quadrature, self.kind, self.alpha)  # (B, S, C)
        details = {"spatial_crps": spatial.detach().mean(0)}
        if self.spectral is not None:
            spectral = torch.stack([self.spectral(pred[:, :, i], obs[:, i], self.kind, self.alpha) for i in range(s)], dim=1)
            details["spectral_crps"] = spectral.detach().mean(0)
        else:
            spectral = torch.zeros_like(spatial)

        w = self.channel_weights.to(spatial.dtype)
        w_spatial, w_spectral = w, self.spectral_weight * w
        if self.multistep_weighting == "intended":
            per_sample = (spatial * w_spatial).sum((-2, -1)) + (spectral * w_spectral).sum((-2, -1))
        else:
            # Reference layout: losses [spatial(s0..sN), spectral(s0..sN)] against weights [w_spatial, w_spectral] * S.
            losses = torch.cat([spatial.reshape(b, s * c), spectral.reshape(b, s * c)], dim=1)
            weights = torch.cat([w_spatial, w_spectral]).repeat(s)
            per_sample = (losses * weights).sum(-1)
        # Constant step weights 1/S.
        loss = (per_sample / s).mean()
        return loss, details
