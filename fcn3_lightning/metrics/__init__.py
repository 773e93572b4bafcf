"""TorchMetrics implementations of WeatherBench2's scores, correct under data parallelism and spatial sharding.

* :mod:`.deterministic`: :class:`DeterministicScores` (MSE, RMSE, bias, MAE), :class:`ACC`,
  :class:`PredictionActivity` (WeatherBench-X's);
* :mod:`.ensemble`: :class:`CRPS` (fair, with skill and spread), :class:`SpreadSkill`, :class:`EnergyScore`,
  :class:`RankHistogram`;
* :mod:`.spectra`: :class:`ZonalEnergySpectrum` (WB2's), :class:`AngularPowerSpectrum` (per degree l);
* :mod:`.regions`: WB2's regions as weight masks; the climatology :class:`ACC` needs at the valid times comes from
  :meth:`fcn3_lightning.eval.climatology.ZarrClimatology.at` (the one reader of WB2 climatologies);
* :mod:`.suite`: the set of scores logged during validation.
"""

from fcn3_lightning.metrics.base import GriddedMetric
from fcn3_lightning.metrics.deterministic import ACC, DeterministicScores, PredictionActivity
from fcn3_lightning.metrics.ensemble import CRPS, EnergyScore, RankHistogram, SpreadSkill, fair_crps_parts
from fcn3_lightning.metrics.regions import REGIONS, Region, region_weights
from fcn3_lightning.metrics.spectra import AngularPowerSpectrum, ZonalEnergySpectrum

__all__ = [
    "ACC",
    "CRPS",
    "REGIONS",
    "AngularPowerSpectrum",
    "DeterministicScores",
    "EnergyScore",
    "GriddedMetric",
    "PredictionActivity",
    "RankHistogram",
    "Region",
    "SpreadSkill",
    "ZonalEnergySpectrum",
    "fair_crps_parts",
    "region_weights",
]
