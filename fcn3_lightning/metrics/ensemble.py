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
from fcn3_lightning.metrics.regions import region_weights


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


class CRPS(GriddedMetric):
    """Fair CRPS: ``crps_skill`` = mean_t <(1/M) sum |X_m - o|>, ``crps_spread`` = mean_t <(1/(M(M-1))) sum |X_i - X_j|>,
    ``crps`` = skill - spread / 2."""

    ensemble = True
    min_members = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_states("skill", "spread")

    def update(self, pred: Tensor, target: Tensor) -> None:
        x, o = self._check_pair(pred, target)
        skill, spread = fair_crps_parts(x, o)
        self._accumulate(x.shape[0], skill=self._spatial_mean(skill), spread=self._spatial_mean(spread))

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
    """

    ensemble = True
    min_members = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_states("se", "var", "debiased", "sqrt_se", "sqrt_var")

    def update(self, pred: Tensor, target: Tensor) -> None:
        x, o = self._check_pair(pred, target)
        m = x.shape[1]
        var, mean = torch.var_mean(x, dim=1, correction=1)
        e = mean - o
        se = self._spatial_mean(e * e)
        sv = self._spatial_mean(var)
        self._accumulate(x.shape[0], se=se, var=sv, debiased=se - sv / m, sqrt_se=se.sqrt(), sqrt_var=sv.sqrt())

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
    in stored order), ``energy_score`` = mean_t (skill - spread / 2)."""

    ensemble = True
    min_members = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_states("skill", "spread")

    def update(self, pred: Tensor, target: Tensor) -> None:
        x, o = self._check_pair(pred, target)
        e = x - o.unsqueeze(1)
        d = x[:, 1:] - x[:, :-1]
        skill = self._spatial_mean(e * e).sqrt().mean(1)
        spread = self._spatial_mean(d * d).sqrt().mean(1)
        self._accumulate(x.shape[0], skill=skill, spread=spread)

    def compute(self) -> dict[str, Tensor]:
        skill, spread = self._mean("skill"), self._mean("spread")
        return {"energy_score": skill - 0.5 * spread, "energy_score_skill": skill, "energy_score_spread": spread}


class RankHistogram(GriddedMetric):
    """Rank of the truth among the members (0 ... M, ties broken uniformly at random, as WB2 does), one-hot in
    M + 1 bins, averaged over forecasts and over each region's points: ``rank_histogram_latweighted_spatial_mean``
    (area weights) and ``rank_histogram_unweighted_spatial_mean``, each ``(region, lead, channel, M + 1)``.

    ``n_members`` must be given, since the states' size depends on it; ``seed`` seeds the tie-breaking.
    """

    ensemble = True
    min_members = 2

    def __init__(self, *args: Any, n_members: int, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if n_members < 2:
            raise ValueError(f"RankHistogram needs an ensemble of at least 2 members, got n_members={n_members}")
        self.n_members = n_members
        self.seed = seed
        self._fixed_members = True
        self._generator: torch.Generator | None = None
        w = region_weights(self.lat, self.lon, self.regions, self.land_sea_mask, area=False)
        w = torch.as_tensor(w[:, self.tile[0], self.tile[1]], dtype=self.compute_dtype)
        self.register_buffer("uniform_weights", w, persistent=False)
        self._add_states("latweighted", "unweighted", shape=(*self.state_shape, n_members + 1))

    def update(self, pred: Tensor, target: Tensor) -> None:
        x, o = self._check_pair(pred, target)
        self._accumulate_ranks(x.shape[0], self._onehot_ranks(x, o))

    def _onehot_ranks(self, x: Tensor, o: Tensor) -> Tensor:
        """The truth's rank among the members, one-hot ``(B, L, C, h, w, M + 1)`` in the compute dtype."""
        if x.shape[1] != self.n_members:
            raise ValueError(f"RankHistogram was built for {self.n_members} members, pred has {x.shape[1]} (dim 1)")
        if self._generator is None or self._generator.device != x.device:
            self._generator = torch.Generator(device=x.device).manual_seed(self.seed)
        o1 = o.unsqueeze(1)
        below = (x < o1).sum(1)
        ties = (x == o1).sum(1)
        u = torch.rand(below.shape, generator=self._generator, device=x.device, dtype=torch.float64)
        rank = below + torch.minimum((u * (ties + 1)).long(), ties)
        return torch.nn.functional.one_hot(rank, self.n_members + 1).to(self.compute_dtype)

    def _accumulate_ranks(self, n: int, onehot: Tensor) -> None:
        """Add the spatial means of one-hot ranks ``(B, L, C, h, w, K)`` to the states."""
        onehot = onehot.movedim(-1, -3)  # (B, L, C, K, h, w)
        lat = self._spatial_mean(onehot)  # (B, L, C, K, R)
        uni = self._spatial_mean(onehot, self.uniform_weights)
        self._accumulate(n, latweighted=lat.movedim(-2, -1), unweighted=uni.movedim(-2, -1))

    def _accumulate(self, n: int, **sums: Tensor) -> None:
        # states are (R, L, C, K): move the region axis of (B, L, C, R, K) sums first
        if not self._counts_here:
            return
        for name, value in sums.items():
            setattr(self, name, getattr(self, name) + value.sum(0).movedim(-2, 0))
        self.n_forecasts += n

    def compute(self) -> dict[str, Tensor]:
        return {
            "rank_histogram_latweighted_spatial_mean": self._mean("latweighted"),
            "rank_histogram_unweighted_spatial_mean": self._mean("unweighted"),
        }
