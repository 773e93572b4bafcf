"""Derived variables: wind speed from its components, and WB2's wind-vector scores.

WeatherBench2 names (``weatherbench2.derived_variables``): ``10m_wind_speed`` / ``wind_speed`` (per level) is
``sqrt(u^2 + v^2)`` of the stored components, computed in the data's dtype; the wind vector
``10m_wind_vector`` / ``wind_vector`` (per level) is scored with the squared error summed over both
components. The same rule covers any prefix with both components (``100m_`` for the 100 m wind).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from fcn3_lightning.metrics.base import GriddedMetric

#: prefixes of the wind component pairs: "{prefix}u_component_of_wind", "{prefix}v_component_of_wind"
WIND_PREFIXES: tuple[str, ...] = ("10m_", "100m_", "")


@dataclass(frozen=True)
class Wind:
    """One wind family: its components, its speed and its vector's names."""

    prefix: str

    @property
    def u(self) -> str:
        return f"{self.prefix}u_component_of_wind"

    @property
    def v(self) -> str:
        return f"{self.prefix}v_component_of_wind"

    @property
    def speed(self) -> str:
        return f"{self.prefix}wind_speed"

    @property
    def vector(self) -> str:
        return f"{self.prefix}wind_vector"


WINDS: tuple[Wind, ...] = tuple(Wind(p) for p in WIND_PREFIXES)


def wind_of(variable: str) -> Wind | None:
    """The wind family a variable (component, speed or vector) belongs to, if any."""
    for w in WINDS:
        if variable in (w.u, w.v, w.speed, w.vector):
            return w
    return None


def wind_speed(u: np.ndarray, v: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """sqrt(u^2 + v^2) in the inputs' dtype (WB2 computes the derived speed in the stored float32)."""
    return np.sqrt(u * u + v * v, out=out)


class WindVectorScores(GriddedMetric):
    """WB2's vector wind scores: ``mse`` = mean_t <(du)^2 + (dv)^2>, ``rmse`` = sqrt(mse),
    ``rmse_sqrt_before_time_avg`` = mean_t sqrt<(du)^2 + (dv)^2>, d the forecast error of each component.

    ``update(pred_u, pred_v, target_u, target_v)``, all ``(batch, lead, channel, lat, lon)``: channel i holds
    the components of vector i (one per level); ``compute()`` returns ``(region, lead, channel)`` tensors.
    ``update_from_means(se=)``: the spatial mean of (du)^2 + (dv)^2.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_states("se", "sqrt_se")

    def update(self, pred_u: Tensor, pred_v: Tensor, target_u: Tensor, target_v: Tensor) -> None:
        fu, ou = self._check_pair(pred_u, target_u)
        fv, ov = self._check_pair(pred_v, target_v)
        du, dv = fu - ou, fv - ov
        self._add_means(se=self.spatial_mean(du * du + dv * dv))

    def _add_means(self, se: Tensor) -> None:
        self._accumulate(se.shape[0], se=se, sqrt_se=se.sqrt())

    def compute(self) -> dict[str, Tensor]:
        mse = self._mean("se")
        return {"mse": mse, "rmse": mse.sqrt(), "rmse_sqrt_before_time_avg": self._mean("sqrt_se")}
