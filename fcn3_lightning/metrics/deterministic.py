"""Deterministic scores with WeatherBench2's definitions: MSE, RMSE, bias, MAE and ACC; and WeatherBench-X's
prediction activity.

For an ensemble, score the member mean (``pred.mean(1)``), as WB2's ``ensemble_mean_deterministic``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fcn3_lightning.metrics.base import GriddedMetric


class DeterministicScores(GriddedMetric):
    """``mse`` = mean_t <(f-o)^2>, ``rmse`` = sqrt(mse) (after the time mean: the leaderboard RMSE),
    ``rmse_sqrt_before_time_avg`` = mean_t sqrt<(f-o)^2>, ``bias`` = mean_t <f-o>, ``mae`` = mean_t <|f-o|>.

    ``update(pred, target)`` with both ``(batch, lead, channel, lat, lon)``; ``compute()`` returns
    ``(region, lead, channel)`` tensors. ``update_from_means(se=, err=, ae=)``: the spatial means of (f-o)^2, f-o, |f-o|.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_states("se", "err", "ae", "sqrt_se")

    def update(self, pred: Tensor, target: Tensor) -> None:
        f, o = self._check_pair(pred, target)
        e = f - o
        self._add_means(se=self.spatial_mean(e * e), err=self.spatial_mean(e), ae=self.spatial_mean(e.abs()))

    def _add_means(self, se: Tensor, err: Tensor, ae: Tensor) -> None:
        self._accumulate(se.shape[0], se=se, err=err, ae=ae, sqrt_se=se.sqrt())

    def compute(self) -> dict[str, Tensor]:
        mse = self._mean("se")
        return {
            "mse": mse,
            "rmse": mse.sqrt(),
            "rmse_sqrt_before_time_avg": self._mean("sqrt_se"),
            "bias": self._mean("err"),
            "mae": self._mean("ae"),
        }


class ACC(GriddedMetric):
    """Anomaly correlation coefficient: per forecast the uncentred <f'o'> / sqrt(<f'^2><o'^2>) with
    f' = f - c, o' = o - c and c the climatology at the valid time, then the mean over forecasts.

    ``update(pred, target, climatology)``, all ``(batch, lead, channel, lat, lon)``; see
    :meth:`fcn3_lightning.eval.climatology.ZarrClimatology.at` for looking up ``c`` at the valid times.
    ``update_from_means(fo=, ff=, oo=)``: the spatial means of f'o', f'^2, o'^2.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_states("acc")

    def update(self, pred: Tensor, target: Tensor, climatology: Tensor) -> None:
        f, o = self._check_pair(pred, target)
        if not isinstance(climatology, Tensor):
            raise TypeError(f"ACC: climatology must be a torch.Tensor, got {type(climatology).__name__}")
        if climatology.ndim == 5 and climatology.shape[1] != target.shape[1]:
            raise ValueError(
                f"ACC: the climatology has {climatology.shape[1]} lead times but the forecast has {target.shape[1]} "
                f"(lead_hours={self.lead_hours}); give the climatology at every valid time"
            )
        self.check("climatology", climatology, ensemble=False)
        if climatology.shape != target.shape:
            raise ValueError(f"ACC: climatology {tuple(climatology.shape)} and target {tuple(target.shape)} differ")
        c = climatology.to(self.compute_dtype)
        fa, oa = f - c, o - c
        self._add_means(fo=self.spatial_mean(fa * oa), ff=self.spatial_mean(fa * fa), oo=self.spatial_mean(oa * oa))

    def _add_means(self, fo: Tensor, ff: Tensor, oo: Tensor) -> None:
        self._accumulate(fo.shape[0], acc=fo / (ff * oo).sqrt())

    def compute(self) -> dict[str, Tensor]:
        return {"acc": self._mean("acc")}


class PredictionActivity(GriddedMetric):
    """WeatherBench-X's ``PredictionActivity``: the root of the time-mean spatial mean of the squared forecast anomaly,
    ``prediction_activity`` = sqrt(mean_t <(f - c)^2>), c the climatology at the valid time (the square root after
    the time mean, as WBX takes it of its aggregated ``SquaredPredictionAnomaly``). A forecast that smooths towards the
    climatology loses activity.

    ``update(pred, climatology)``, both ``(batch, lead, channel, lat, lon)``; ``update_from_means(ff=)``: the spatial
    mean of f'^2.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_states("fa2")

    def update(self, pred: Tensor, climatology: Tensor) -> None:
        self.check("pred", pred, ensemble=False)
        self.check("climatology", climatology, ensemble=False)
        if climatology.shape != pred.shape:
            raise ValueError(f"PredictionActivity: climatology {tuple(climatology.shape)} and pred {tuple(pred.shape)} differ")
        f, c = pred.to(self.compute_dtype), climatology.to(self.compute_dtype)
        fa = f - c
        self._add_means(ff=self.spatial_mean(fa * fa))

    def _add_means(self, ff: Tensor) -> None:
        self._accumulate(ff.shape[0], fa2=ff)

    def compute(self) -> dict[str, Tensor]:
        return {"prediction_activity": self._mean("fa2").sqrt()}
