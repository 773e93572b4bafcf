"""Lightning callbacks that show what a weather model does while it trains, each logging to MLflow.

* :class:`ForecastMaps`: truth, a member, the ensemble mean and the spread of a fixed validation sample.
* :class:`SpectraPlots`: angular power spectra of members vs truth, their ratio, ``val/spectral_ratio_high_k``.
* :class:`Calibration`: spread-skill ratio vs lead time and rank histograms.
* :class:`NonFiniteGuard`, :class:`Throughput`, :class:`GradNorm`: training health.
* :class:`AutoProgressBar`: Lightning's rich bar on a terminal, plain progress lines in a log or a pipe.

Plots are drawn on global rank 0 only, on a background thread; each callback has a frequency and ``enabled``.
"""

from fcn3_lightning.callbacks.calibration import Calibration
from fcn3_lightning.callbacks.health import GradNorm, NonFiniteError, NonFiniteGuard, Throughput
from fcn3_lightning.callbacks.maps import ForecastMaps
from fcn3_lightning.callbacks.progress import AutoProgressBar
from fcn3_lightning.callbacks.spectra import SpectraPlots

__all__ = ["AutoProgressBar", "Calibration", "ForecastMaps", "GradNorm", "NonFiniteError", "NonFiniteGuard", "SpectraPlots", "Throughput"]
