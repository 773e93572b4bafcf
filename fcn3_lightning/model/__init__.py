"""FourCastNet 3 as plain PyTorch modules (no Lightning here)."""

from fcn3_lightning.model.build import build_model, load_model, save_model
from fcn3_lightning.model.convert import load_reference_state_dict, model_from_reference_config, ours_to_reference_state_dict
from fcn3_lightning.model.fcn3 import FCN3
from fcn3_lightning.model.layers import SERIAL, SphericalLayers, parameters_on_meta
from fcn3_lightning.model.noise import NoiseStreams, SphericalDiffusionNoise
from fcn3_lightning.model.rollout import EnsembleForecaster, keyed_streams

__all__ = [
    "FCN3",
    "EnsembleForecaster",
    "SERIAL",
    "NoiseStreams",
    "SphericalDiffusionNoise",
    "SphericalLayers",
    "build_model",
    "keyed_streams",
    "load_model",
    "load_reference_state_dict",
    "model_from_reference_config",
    "ours_to_reference_state_dict",
    "parameters_on_meta",
    "save_model",
]
