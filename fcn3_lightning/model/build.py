"""Build the network from a YAML config and save/load it with its architecture."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from fcn3_lightning.io import atomic_torch_save, read_checkpoint
from fcn3_lightning.model.fcn3 import FCN3
from fcn3_lightning.model.layers import parameters_on_meta

FORMAT = "fcn3_lightning.model/v1"
#: a model file with the network and everything around it (statistics, static fields, noise; see
#: :mod:`fcn3_lightning.forecaster`): what ``convert`` writes; :func:`load_model` reads its network too
FORECASTER_FORMAT = "fcn3_lightning.forecaster/v1"


def model_kwargs(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments from a model YAML (LightningCLI ``class_path``/``init_args`` form or a plain mapping)."""
    source = str(config) if isinstance(config, (str, Path)) else "model config"
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist")
        config = yaml.safe_load(path.read_text()) or {}
    config = dict(config)
    if "class_path" in config:
        if config["class_path"].rsplit(".", 1)[-1] != "FCN3":
            raise ValueError(f"{source}: class_path {config['class_path']!r} is not fcn3_lightning.model.FCN3")
        config = dict(config.get("init_args") or {})
    allowed = set(inspect.signature(FCN3.__init__).parameters) - {"self", "layers"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"{source}: unknown model option(s) {unknown}; known options: {sorted(allowed)}")
    return config


def build_model(config: str | Path | Mapping[str, Any], *, meta: bool = False, **overrides: Any) -> FCN3:
    """Build FCN3 from a config; ``meta=True`` puts the parameters on the meta device (no memory)."""
    kwargs = {**model_kwargs(config), **overrides}
    if meta:
        with parameters_on_meta():
            return FCN3(**kwargs)
    return FCN3(**kwargs)


def save_model(model: FCN3, kwargs: Mapping[str, Any], path: str | Path) -> None:
    """Write weights and the architecture that produced them, atomically."""
    atomic_torch_save({"format": FORMAT, "config": dict(kwargs), "state_dict": model.state_dict()}, path)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> FCN3:
    """Rebuild a network saved by :func:`save_model` (or the ``convert`` command)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    blob = read_checkpoint(path, "model file", map_location=map_location, mmap=False)
    if not isinstance(blob, dict) or blob.get("format") not in (FORMAT, FORECASTER_FORMAT):
        raise ValueError(f"{path} is not a {FORMAT} file (for reference-layout checkpoints use the convert command)")
    model = FCN3(**blob["config"])
    model.load_state_dict(blob["state_dict"])
    return model
