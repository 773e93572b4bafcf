"""Ensemble scores with WeatherBench2's definitions: fair CRPS, ensemble-mean skill and spread, energy score,
rank histogram.

Inputs: ``pred`` ``(batch, member, lead, channel, lat, lon)``, ``target`` ``(batch, lead, channel, lat, lon)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fcn3_lightning.metrics.base import GriddedMetric
from fcn3_lightning.metrics.regions import RegionWeights, region_weights


def fair_crps_parts(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Pointwise skill (1/M) sum_m |X_m - o| and spread (1/(M(M-1))) sum_ij |X_i - X_j| (members along dim 1).

    The spread uses the sorted members, sum_ij |x_i - x_j| = 2 sum_r (2r - M - 1) x_(r): O(M log M) time
    and O(M) memory per point instead of the O(M^2) pairwise sum. Sorting the errors X_m - o instead of
    the values keeps the sum free of the cancellation of large values (geopotential).
    """
    m = pred.shape[1]
    err = pred - target.unsqueeze(1)
    skill = err.abs().mean(1)
    r = torch.arange(1, m + 1, device=pred.device, dtype=pred.dtype)
    w = (2.0 * r - (m + 1)) * (2.0 / (m * (m - 1)))
    spread = torch.einsum("bm...,m->b...", torch.sort(err, dim=1).values, w)
    return skill, spread


def break_ties(below: Tensor, ties: Tensor, u: Tensor) -> Tensor:
    """The truth's rank among the members: ``below`` members under it plus a uniform draw among its ``ties`` + 1
    places (``u`` uniform in [0, 1)), as WB2 breaks ties."""
    return below + torch.minimum((u * (ties + 1)).long(), ties)


class CRPS(GriddedMetric):
    """Fair CRPS: ``crps_skill`` = mean_t <(1/M) sum |X_m - o|>, ``crps_spread`` = mean_t <(1/(M(M-1))) sum |X_i - X_j|>,
    ``crps`` = skill - spread / 2. ``update_from_means(skill=, spread=)``: the spatial means of the pointwise skill and
    spread of :func:`fair_crps_parts`."""

    ensemble = True
    min_members = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_states("skill", "spread")

    def update(self, pred: Tensor, target: Tensor) -> None:
        x, o = self._check_pair(pred, target)
        skill, spread = fair_crps_parts(x, o)
        self._add_means(skill=self.spatial_mean(skill), spread=self.spatial_mean(spread))

    def _add_means(self, skill: Tensor, spread: Tensor) -> None:
        self._accumulate(skill.shape[0], skill=skill, spread=spread)

    def compute(self) -> dict[str, Tensor]:
        skill, spread = self._mean("skill"), self._mean("spread")
        return {"crps": skill - 0.5 * spread, "crps_skill": skill, "crps_spread": spread}


class SpreadSkill(GriddedMetric):
    """Ensemble-mean error and ensemble spread, and their ratios.

    Time means of per-forecast spatial means: ``ensemble_mean_mse`` <(X̄ - o)^2>, ``ensemble_variance`` <s^2>
    (ddof 1), ``debiased_ensemble_mean_mse`` <(X̄ - o)^2 - s^2/M>; derived after the time mean:
    ``ensemble_mean_rmse``, ``ensemble_spread`` (sqrt of the variance), ``debiased_ensemble_mean_rmse`` (NaN if
    the debiased MSE is not positive), ``spread_skill_ratio`` = sqrt(variance / mse) (WB2's, uncorrected),
    ``spread_skill_ratio_fortin_corrected`` (x sqrt((M+1)/M)), ``spread_skill_ratio_debiased``; and the older
    per-forecast square roots ``ensemble_mean_rmse_sqrt_before_time_avg``, ``ensemble_stddev_sqrt_before_time_avg``
    and their ratio ``spread_skill_ratio_sqrt_before_time_avg``.

    ``update_from_means(se=, var=)``: the spatial means of (X̄ - o)^2 and s^2 (after :meth:`check_pair`, which
    records the ensemble size M).
    """

    ensemble = True
    min_members = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_states("se", "var", "debiased", "sqrt_se", "sqrt_var")

    def update(self, pred: Tensor, target: Tensor) -> None:
        x, o = self._check_pair(pred, target)
        var, mean = torch.var_mean(x, dim=1, correction=1)
        e = mean - o
        self._add_means(se=self.spatial_mean(e * e), var=self.spatial_mean(var))

    def _add_means(self, se: Tensor, var: Tensor) -> None:
        m = self.n_members
        if m is None:
            raise RuntimeError("SpreadSkill: the ensemble size is unknown; call check_pair(pred, target) first")
        self._accumulate(se.shape[0], se=se, var=var, debiased=se - var / m, sqrt_se=se.sqrt(), sqrt_var=var.sqrt())

    def compute(self) -> dict[str, Tensor]:
        mse, var, deb = self._mean("se"), self._mean("var"), self._mean("debiased")
        nan = torch.full_like(deb, math.nan)
        ratio = (var / mse).sqrt()
        rmse_sb, std_sb = self._mean("sqrt_se"), self._mean("sqrt_var")
        return {
            "ensemble_mean_mse": mse,
            "ensemble_mean_rmse": mse.sqrt(),
            "debiased_ensemble_mean_mse": deb,
            "debiased_ensemble_mean_rmse": torch.where(deb > 0, deb.clamp_min(0).sqrt(), nan),
            "ensemble_variance": var,
            "ensemble_spread": var.sqrt(),
            "spread_skill_ratio": ratio,
            "spread_skill_ratio_fortin_corrected": ratio * ((self.members + 1) / self.members).sqrt(),
            "spread_skill_ratio_debiased": torch.where(deb > 0, (var / deb.where(deb > 0, 1.0)).sqrt(), nan),
            "ensemble_mean_rmse_sqrt_before_time_avg": rmse_sb,
            "ensemble_stddev_sqrt_before_time_avg": std_sb,
            "spread_skill_ratio_sqrt_before_time_avg": std_sb / rmse_sb,
        }


class EnergyScore(GriddedMetric):
    """WB2's energy score over each field (one variable, level and lead; the norm is the area-weighted RMS over
    the region): skill = (1/M) sum_m ||X_m - o||, spread = (1/(M-1)) sum_m ||X_m - X_{m+1}|| (adjacent members
    in stored order), ``energy_score`` = mean_t (skill - spread / 2). ``update_from_means(se=, sd=)``: the spatial means
    ``(batch, member, ...)`` of each member's (X_m - o)^2 and of (X_{m+1} - X_m)^2."""

    ensemble = True
    min_members = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_states("skill", "spread")

    def update(self, pred: Tensor, target: Tensor) -> None:
        x, o = self._check_pair(pred, target)
        e = x - o.unsqueeze(1)
        d = x[:, 1:] - x[:, :-1]
        self._add_means(se=self.spatial_mean(e * e), sd=self.spatial_mean(d * d))

    def _add_means(self, se: Tensor, sd: Tensor) -> None:
        self._accumulate(se.shape[0], skill=se.sqrt().mean(1), spread=sd.sqrt().mean(1))

    def compute(self) -> dict[str, Tensor]:
        skill, spread = self._mean("skill"), self._mean("spread")
        return {"energy_score": skill - 0.5 * spread, "energy_score_skill": skill, "energy_score_spread": spread}


class RankHistogram(GriddedMetric):
    """Rank of the truth among the members (0 ... M, ties broken uniformly at random, as WB2 does), one-hot in
    M + 1 bins, averaged over forecasts and over each region's points: ``rank_histogram_latweighted_spatial_mean``
    (area weights) and ``rank_histogram_unweighted_spatial_mean``, each ``(region, lead, channel, M + 1)``.

    ``n_members`` must be given, since the states' size depends on it; ``seed`` seeds the tie-breaking. With ``skipna``,
    the points where the truth or a member is not finite are skipped (a NaN compares false: it would count in bin 0).
    ``update_from_means(latweighted=, unweighted=)``: the spatial means ``(batch, lead, channel, region, M + 1)`` of the
    one-hot ranks with the area weights and with :attr:`uniform_weights`.
    """

    ensemble = True
    min_members = 2
    region_axis = -2  # per-forecast values (B, L, C, R, K)

    def __init__(self, *args: Any, n_members: int, seed: int = 0, weights_cache: RegionWeights | None = None, **kwargs: Any) -> None:
        super().__init__(*args, weights_cache=weights_cache, **kwargs)
        if n_members < 2:
            raise ValueError(f"RankHistogram needs an ensemble of at least 2 members, got n_members={n_members}")
        self.n_members = n_members
        self.seed = seed
        self._fixed_members = True
        self._generator: torch.Generator | None = None
        w = (weights_cache or region_weights)(self.lat, self.lon, self.regions, self.land_sea_mask, area=False)
        w = torch.as_tensor(w[:, self.tile[0], self.tile[1]], dtype=self.compute_dtype)
        self.register_buffer("uniform_weights", w, persistent=False)
        self._add_states("latweighted", "unweighted", shape=(*self.state_shape, n_members + 1))

    def update(self, pred: Tensor, target: Tensor) -> None:
        x, o = self._check_pair(pred, target)
        onehot = self._onehot_ranks(x, o)
        if self.skipna:
            invalid = ~torch.isfinite(o) | ~torch.isfinite(x).all(1)
            onehot = onehot.masked_fill(invalid.unsqueeze(-1), float("nan"))
        self._accumulate_ranks(onehot)

    def tie_generator(self, device: torch.device) -> torch.Generator:
        """The generator of the tie-breaking draws on ``device`` (seeded with ``seed`` when first used there)."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def _onehot_ranks(self, x: Tensor, o: Tensor) -> Tensor:
        """The truth's rank among the members, one-hot ``(B, L, C, h, w, M + 1)`` in the compute dtype."""
        if x.shape[1] != self.n_members:
            raise ValueError(f"RankHistogram was built for {self.n_members} members, pred has {x.shape[1]} (dim 1)")
        generator = self.tie_generator(x.device)
        o1 = o.unsqueeze(1)
        below = (x < o1).sum(1)
        ties = (x == o1).sum(1)
        u = torch.rand(below.shape, generator=generator, device=x.device, dtype=torch.float64)
        rank = break_ties(below, ties, u)
        return torch.nn.functional.one_hot(rank, self.n_members + 1).to(self.compute_dtype)

    def _accumulate_ranks(self, onehot: Tensor) -> None:
        """Add the spatial means of one-hot ranks ``(B, L, C, h, w, K)`` to the states."""
        onehot = onehot.movedim(-1, -3)  # (B, L, C, K, h, w)
        lat = self.spatial_mean(onehot)  # (B, L, C, K, R)
        uni = self.spatial_mean(onehot, self.uniform_weights)
        self._add_means(latweighted=lat.movedim(-2, -1), unweighted=uni.movedim(-2, -1))

    def _add_means(self, latweighted: Tensor, unweighted: Tensor) -> None:
        # states are (R, L, C, K): region_axis moves the region axis of the (B, L, C, R, K) means first
        self._accumulate(latweighted.shape[0], latweighted=latweighted, unweighted=unweighted)

    def compute(self) -> dict[str, Tensor]:
        return {
            "rank_histogram_latweighted_spatial_mean": self._mean("latweighted"),
            "rank_histogram_unweighted_spatial_mean": self._mean("unweighted"),
        }
