"""fcn3-lightning: train, fine-tune and evaluate FourCastNet 3 with PyTorch Lightning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Forecaster", "load_forecaster"]

if TYPE_CHECKING:
    from fcn3_lightning.forecaster import Forecaster, load_forecaster


def __getattr__(name: str) -> Any:
    # torch and torch-harmonics load on first use, so `python -m fcn3_lightning --help` stays quick
    if name in __all__:
        from fcn3_lightning import forecaster

        return getattr(forecaster, name)
    raise AttributeError(f"module 'fcn3_lightning' has no attribute {name!r}")
