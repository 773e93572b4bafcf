"""The scores a training run logs while validating: WeatherBench2's definitions, per lead time and channel.

They are the same metric classes the evaluation harness uses, so a number logged during training equals
the number the harness computes afterwards on the same forecasts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor, nn

from fcn3_lightning.metrics.base import GriddedMetric, Tile
from fcn3_lightning.metrics.deterministic import DeterministicScores
from fcn3_lightning.metrics.ensemble import CRPS, EnergyScore, SpreadSkill

#: the scores of each ensemble metric class, in the order of its ``compute`` (the harness's rows use them too)
CRPS_SCORES = ("crps", "crps_skill", "crps_spread")
SPREAD_SKILL_SCORES = (
    "ensemble_mean_mse",
    "ensemble_mean_rmse",
    "debiased_ensemble_mean_mse",
    "debiased_ensemble_mean_rmse",
    "ensemble_variance",
    "ensemble_spread",
    "spread_skill_ratio",
    "spread_skill_ratio_fortin_corrected",
    "spread_skill_ratio_debiased",
)
ENERGY_SCORES = ("energy_score", "energy_score_skill", "energy_score_spread")

#: which metric class provides each score (deterministic scores are those of the ensemble mean)
PROVIDERS: dict[str, type[GriddedMetric]] = {
    **dict.fromkeys(CRPS_SCORES, CRPS),
    **dict.fromkeys(SPREAD_SKILL_SCORES, SpreadSkill),
    **dict.fromkeys(ENERGY_SCORES, EnergyScore),
    **dict.fromkeys(("bias", "mae"), DeterministicScores),
}
# spread_skill_ratio is WB2's plain ratio (calibrated at sqrt(M/(M+1))); the Fortin-corrected one is 1 when calibrated
DEFAULT_SCORES = ("crps", "ensemble_mean_rmse", "ensemble_spread", "spread_skill_ratio", "spread_skill_ratio_fortin_corrected", "bias")


def lead_label(hours: float) -> str:
    return f"{hours:g}h"


class ValidationScores(nn.Module):
    """Ensemble scores of ``(batch, member, lead, channel, lat, lon)`` forecasts in physical units.

    :meth:`compute` returns flat names ``{score}/{channel}/{lead}`` (``{score}/{region}/{channel}/{lead}``
    for regions other than global), each synced over the processes.
    """

    def __init__(
        self,
        lat: np.ndarray,
        lon: np.ndarray,
        channels: Sequence[str],
        lead_hours: Sequence[float],
        scores: Sequence[str] = DEFAULT_SCORES,
        *,
        regions: Sequence[str] = ("global",),
        tile: Tile | None = None,
        spatial_group: Any = None,
    ) -> None:
        super().__init__()
        unknown = [s for s in scores if s not in PROVIDERS]
        if unknown:
            raise ValueError(f"unknown validation scores {unknown}; choose from {sorted(PROVIDERS)}")
        self.scores = list(scores)
        kw = dict(regions=regions, tile=tile, spatial_group=spatial_group)
        classes = list(dict.fromkeys(PROVIDERS[s] for s in self.scores))
        self.metrics = nn.ModuleList(cls(lat, lon, channels, lead_hours, **kw) for cls in classes)
        self.channels = list(channels)
        self.lead_hours = list(lead_hours)
        self.regions = list(regions)

    def update(self, pred: Tensor, target: Tensor) -> None:
        mean = None
        for m in self.metrics:
            if m.ensemble:
                m.update(pred, target)
            else:
                mean = pred.mean(1) if mean is None else mean
                m.update(mean, target)

    def compute(self) -> dict[str, Tensor]:
        values: dict[str, Tensor] = {}
        for m in self.metrics:
            values.update(m.compute())
        out = {}
        for score in self.scores:
            v = values[score]  # (region, lead, channel)
            for r, region in enumerate(self.regions):
                prefix = score if region == "global" else f"{score}/{region}"
                for lead, hours in enumerate(self.lead_hours):
                    for c, channel in enumerate(self.channels):
                        out[f"{prefix}/{channel}/{lead_label(hours)}"] = v[r, lead, c]
        return out

    def reset(self) -> None:
        for m in self.metrics:
            m.reset()

    @property
    def updated(self) -> bool:
        return all(m.update_count > 0 for m in self.metrics)
