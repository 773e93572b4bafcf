"""SEEPS (Stable Equitable Error in Probability Space) for 24-hour precipitation, as WeatherBench2 scores it.

Per grid point, forecast and truth fall into the categories dry (x < 0.25 mm), light (0.25 mm < x < w) and
heavy (x >= w), w the climatology's ``total_precipitation_24hr_seeps_threshold`` at the valid time's
(dayofyear, hour). With p1 the climatology's ``..._seeps_dry_fraction`` averaged over all its hours and days,
the score is 1/2 S[forecast category, observed category] with

    S = [[0, 1/(1-p1), 4/(1-p1)], [1/p1, 0, 3/(1-p1)], [1/p1 + 3/(2+p1), 3/(2+p1), 0]],

written as WB2 writes it: the sum over both category indicator vectors, so a value in no category (exactly
0.25 mm) scores 0. Points with p1 <= 0.1 or p1 >= 0.85 are excluded: the spatial mean of each field runs over
the remaining points of the region, their area weights renormalised (WB2's NaN-skipping average); so do points
where the forecast or the truth is NaN (``--skipna``). Then the mean over forecasts, as for every score.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from fcn3_lightning.metrics.base import GriddedMetric

#: WB2's dry threshold: 0.25 mm in metres
DRY_THRESHOLD_M = 0.25 / 1000.0


def scoring_matrix(p1: np.ndarray, min_p1: float = 0.1, max_p1: float = 0.85) -> np.ndarray:
    """1/2 S ``(3 forecast categories, 3 observed categories, lat, lon)``; NaN where p1 is out of (min_p1, max_p1)."""
    p1 = np.asarray(p1, dtype=np.float32)  # WB2's mean of a float32 field
    valid = (p1 > np.float32(min_p1)) & (p1 < np.float32(max_p1))
    p = np.where(valid, p1, 0.5).astype(np.float64)  # placeholder where invalid: no division by zero
    zero = np.zeros_like(p)
    s = 0.5 * np.stack(
        [
            np.stack([zero, 1 / (1 - p), 4 / (1 - p)]),
            np.stack([1 / p, zero, 3 / (1 - p)]),
            np.stack([1 / p + 3 / (2 + p), 3 / (2 + p), zero]),
        ]
    )
    s[:, :, ~valid] = np.nan
    return s


class SEEPS(GriddedMetric):
    """``seeps`` = mean_t <1/2 S[cat(f), cat(o)]> over the points with valid p1 (see the module docstring).

    Args:
        p1: the dry fraction ``(lat, lon)`` of the full grid (climatology mean over hours and days).
        dry_threshold: dry below this (m); WB2's 0.25 mm.
        *args, **kwargs: as :class:`~fcn3_lightning.metrics.base.GriddedMetric` (channels: the precipitation ones).

    ``update(pred, target, wet_threshold)``, all ``(batch, lead, channel, lat, lon)``; categories are decided in
    the inputs' dtype (WB2 compares the float32 data with float32 thresholds).
    """

    def __init__(
        self, *args: Any, p1: np.ndarray, dry_threshold: float = DRY_THRESHOLD_M, min_p1: float = 0.1, max_p1: float = 0.85, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        p1 = np.asarray(p1)
        if p1.shape != (self.lat.size, self.lon.size):
            raise ValueError(f"SEEPS: p1 has shape {p1.shape}, the grid is {(self.lat.size, self.lon.size)} (latitude, longitude)")
        s = scoring_matrix(p1, min_p1, max_p1)[:, :, self.tile[0], self.tile[1]]
        self.register_buffer("scoring", torch.as_tensor(s, dtype=self.compute_dtype), persistent=False)
        self.dry_threshold = float(dry_threshold)
        self._add_states("seeps")

    @staticmethod
    def _categories(x: Tensor, wet: Tensor, dry_threshold: float) -> tuple[Tensor, Tensor, Tensor]:
        dry_t = torch.tensor(dry_threshold, dtype=x.dtype, device=x.device)
        wet = wet.to(x.dtype)
        return x < dry_t, (x > dry_t) & (x < wet), x >= wet

    def update(self, pred: Tensor, target: Tensor, wet_threshold: Tensor) -> None:
        self.check("wet_threshold", wet_threshold, ensemble=False)
        f, o = self._check_pair(pred, target)
        fc = [c.to(self.compute_dtype) for c in self._categories(pred, wet_threshold, self.dry_threshold)]
        oc = [c.to(self.compute_dtype) for c in self._categories(target, wet_threshold, self.dry_threshold)]
        s = self.scoring
        # sum_ij f_i S_ij o_j without the zero diagonal; NaN S (excluded p1) makes the whole point NaN
        score = (
            fc[0] * (oc[1] * s[0, 1] + oc[2] * s[0, 2])
            + fc[1] * (oc[0] * s[1, 0] + oc[2] * s[1, 2])
            + fc[2] * (oc[0] * s[2, 0] + oc[1] * s[2, 1])
        )
        score = torch.where(torch.isnan(f) | torch.isnan(o), torch.full_like(score, float("nan")), score)
        finite = torch.isfinite(score)
        num = self.spatial_mean(torch.where(finite, score, torch.zeros_like(score)))
        den = self.spatial_mean(finite.to(score.dtype))
        self._accumulate(f.shape[0], seeps=num / den)

    def compute(self) -> dict[str, Tensor]:
        return {"seeps_24hr": self._mean("seeps")}
