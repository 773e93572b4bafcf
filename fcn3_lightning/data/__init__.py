"""Data: WeatherBench2-style Zarr reading, normalisation statistics, auxiliary inputs, the default world."""

from typing import Any

from fcn3_lightning.data.stats import ChannelStats, Normalizer, compute_stats
from fcn3_lightning.data.store import WB2Store
from fcn3_lightning.data.zenith import cos_zenith

__all__ = ["ChannelStats", "ForecastDataset", "Normalizer", "WB2DataModule", "WB2Store", "compute_stats", "cos_zenith"]


def __getattr__(name: str) -> Any:
    # the data module imports Lightning (seconds); commands that only read stores should not pay for it
    if name in ("ForecastDataset", "WB2DataModule"):
        from fcn3_lightning.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
