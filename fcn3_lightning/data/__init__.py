"""Data: WeatherBench2-style Zarr reading, normalisation statistics, auxiliary inputs, the default world."""

from fcn3_lightning.data.datamodule import ForecastDataset, WB2DataModule
from fcn3_lightning.data.stats import ChannelStats, Normalizer, compute_stats
from fcn3_lightning.data.store import WB2Store
from fcn3_lightning.data.zenith import cos_zenith

__all__ = ["ChannelStats", "ForecastDataset", "Normalizer", "WB2DataModule", "WB2Store", "compute_stats", "cos_zenith"]
