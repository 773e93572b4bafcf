"""What a checkpoint or model file holds: the one module that reads them and tells their kinds apart.

A source is one of

- a model package folder in the published FCN3 layout (:mod:`fcn3_lightning.package`), or a reference (Makani)
  checkpoint (with its ``config.json``, or inside its package folder);
- a model file of this project (:data:`~fcn3_lightning.model.build.FORECASTER_FORMAT` from ``convert``, or a
  network-only :data:`~fcn3_lightning.model.build.FORMAT` file);
- a Lightning checkpoint of this project (``.ckpt``), which may embed its :class:`ModelInputs`;
- a bare state dict in our layout (given a network to take the architecture from).

:func:`read_network` reads the architecture and the weights, :func:`network_settings` only the architecture,
:func:`model_inputs` only the statistics and static fields. :func:`fcn3_lightning.forecaster.load_forecaster` builds a
forecaster from what :func:`read_network` returns; training reads ``--model.init_from`` and its checkpoints' model inputs
here too. The bytes themselves are read by :func:`fcn3_lightning.io.read_checkpoint`, the one call of ``torch.load`` on a
user's file (it sits below the network, whose own loaders use it too).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcn3_lightning.data.stats import ChannelStats, default_modes
from fcn3_lightning.io import read_checkpoint
from fcn3_lightning.model.build import FORECASTER_FORMAT as FORMAT
from fcn3_lightning.model.build import FORMAT as NETWORK_FORMAT
from fcn3_lightning.model.build import model_kwargs
from fcn3_lightning.model.convert import convert_reference_state_dict, reference_config_to_kwargs, reference_to_ours
from fcn3_lightning.model.fcn3 import FCN3
from fcn3_lightning.package import Package, is_package, read_package

#: the prefix of the network's weights in a Lightning checkpoint of this project (FCN3Module.forecaster.net)
_LIGHTNING_PREFIX = "forecaster.net."


def plain(d: Any) -> Any:
    """Tuples as lists, recursively (a model file is loaded with ``weights_only=True``)."""
    if isinstance(d, Mapping):
        return {k: plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [plain(v) for v in d]
    return d


@dataclass
class NetworkFile:
    """A network read from disk, before its surroundings: kind, architecture and weights in our layout."""

    kind: str  # "package", "forecaster", "network", "lightning", "reference"
    path: Path
    net_kwargs: dict[str, Any] | None  # None for a Lightning checkpoint (channels and grid come from its data)
    state_dict: dict[str, torch.Tensor]
    blob: dict[str, Any]  # the file's other contents (hyper-parameters, embedded statistics, ...)
    package: Package | None = None


def _load(path: Path) -> Any:
    # memory-mapped: only the metadata is read here; the weights are copied once, into the network
    return read_checkpoint(path, "checkpoint or model file", mmap=True)


def _package_of(checkpoint: Path) -> Path | None:
    """The package folder a checkpoint sits in (``<package>/training_checkpoints/best_ckpt_mp0.tar``), if any."""
    folder = checkpoint.parent.parent if checkpoint.parent.name == "training_checkpoints" else checkpoint.parent
    return folder if is_package(folder) else None


#: FCN3 keyword arguments that come from the data, not from a network's settings
DATA_SETTINGS = ("inp_shape", "channel_names", "aux_channel_names")


def network_settings(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """What a source says about its network, cheaply (no weights are read): ``(settings, data)`` where ``settings`` are
    the architecture's FCN3 keyword arguments and ``data`` its channels and grid (``DATA_SETTINGS``; may be partial);
    None for a source that does not describe its network (a bare state dict)."""
    path = Path(path)
    if path.is_dir():
        kwargs = read_package(path).net_kwargs if is_package(path) else None
    elif path.is_file():
        blob = _load(path)
        if not isinstance(blob, dict):
            return None
        if blob.get("format") in (FORMAT, NETWORK_FORMAT):
            kwargs = dict(blob["config"])
        elif isinstance(blob.get("hyper_parameters"), Mapping):
            kwargs = model_kwargs(dict(blob["hyper_parameters"].get("net") or {}))
            dm = blob.get("datamodule_hyper_parameters") or {}
            for key, value in (("channel_names", dm.get("channels")), ("aux_channel_names", dm.get("aux_channels"))):
                if value is not None:
                    kwargs[key] = list(value)
        else:
            package = _package_of(path)
            kwargs = read_package(package).net_kwargs if package is not None else None
    else:
        raise FileNotFoundError(f"{path} does not exist")
    if kwargs is None:
        return None
    kwargs = plain(kwargs)
    return {k: v for k, v in kwargs.items() if k not in DATA_SETTINGS}, {k: kwargs[k] for k in DATA_SETTINGS if k in kwargs}


def read_network(path: str | Path, *, config: str | Path | None = None, like: FCN3 | None = None) -> NetworkFile:
    """Read a network (architecture + weights) from any supported source; see :func:`load_forecaster`.

    ``like``: for a bare reference state dict without its config (``init_from``), the network whose architecture
    it is taken to have.
    """
    path = Path(path)
    if path.is_dir():
        if not is_package(path):
            raise ValueError(f"{path} is a folder but not a model package: config.json is missing")
        pkg = read_package(path)
        return _reference_network(pkg.checkpoint, pkg.config, "package", pkg)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    blob = _load(path)
    if not isinstance(blob, dict):
        raise ValueError(f"{path} is not a checkpoint, model file or state dict")
    if blob.get("format") == FORMAT:
        return NetworkFile("forecaster", path, dict(blob["config"]), dict(blob["state_dict"]), blob)
    if blob.get("format") == NETWORK_FORMAT:
        return NetworkFile("network", path, dict(blob["config"]), dict(blob["state_dict"]), blob)
    if isinstance(blob.get("state_dict"), Mapping) and any(str(k).startswith(_LIGHTNING_PREFIX) for k in blob["state_dict"]):
        sd = {k[len(_LIGHTNING_PREFIX) :]: v for k, v in blob["state_dict"].items() if k.startswith(_LIGHTNING_PREFIX)}
        return NetworkFile("lightning", path, None, sd, blob)
    state = blob.get("model_state", blob)
    names = [k.removeprefix("module.").removeprefix("model.") for k in state]
    if not any(reference_to_ours(n) is not None and ("_conv." in n or ".fwd." in n) for n in names):
        # a bare state dict in our own layout: its architecture is the target network's, if there is one
        if like is not None and any(n in like.state_dict() for n in state):
            return NetworkFile("network", path, None, dict(state), {})
        raise ValueError(
            f"{path} is neither a checkpoint nor a model file of this project, nor a reference (Makani) checkpoint: for a bare "
            "state dict pass its architecture with --config config.json, or convert it first (python -m fcn3_lightning convert)"
        )
    package = _package_of(path)
    if config is None and package is not None:
        pkg = read_package(package)
        return _reference_network(path, pkg.config, "package", pkg, blob)
    if config is None and like is not None:
        try:
            state = convert_reference_state_dict(blob, like)
        except ValueError as e:
            raise ValueError(f"init_from {path} does not fit the network (check the channel list and the model settings): {e}") from e
        return NetworkFile("reference", path, None, state, {})
    if config is None:
        raise ValueError(
            f"{path} is a reference (Makani) checkpoint: pass its architecture with --config config.json "
            "(or give the package folder it belongs to)"
        )
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"reference config {config} does not exist")
    try:
        cfg = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"reference config {config} is not valid JSON: {e}") from e
    if is_package(config.parent) and "data_channel_names" in cfg:
        pkg = read_package(config.parent)
        return _reference_network(path, pkg.config, "package", pkg, blob)
    try:
        kwargs = reference_config_to_kwargs(cfg)
    except ValueError as e:
        raise ValueError(f"{config}: {e}") from e
    return _reference_network(path, cfg, "reference", None, blob, kwargs)


def _reference_network(
    checkpoint: Path,
    config: Mapping[str, Any],
    kind: str,
    package: Package | None,
    blob: Any = None,
    kwargs: dict[str, Any] | None = None,
) -> NetworkFile:
    kwargs = kwargs if kwargs is not None else package.net_kwargs  # type: ignore[union-attr]
    blob = blob if blob is not None else _load(checkpoint)
    net = FCN3(**kwargs)
    try:
        state = convert_reference_state_dict(blob, net)
    except ValueError as e:
        where = f"{package.path / 'config.json'}" if package is not None else "its config"
        raise ValueError(f"the weights in {checkpoint} do not fit the network described by {where}: {e}") from e
    return NetworkFile(kind, package.path if package is not None else checkpoint, kwargs, state, {}, package)


#: the key under which a checkpoint of this project embeds its model inputs (statistics, static fields)
INPUTS_KEY = "model_inputs"


@dataclass
class ModelInputs:
    """What a network was trained with besides its weights: the statistics and normalisation modes of its channels
    and the raw static fields (surface geopotential, land-sea mask in [0, 1]) on its grid (90N first)."""

    stats: ChannelStats
    normalization: dict[str, str]
    orography: np.ndarray | None = None
    land_sea_mask: np.ndarray | None = None
    source: str = ""

    def to_checkpoint(self) -> dict[str, Any]:
        arr = {
            k: None if v is None else torch.from_numpy(np.ascontiguousarray(v))
            for k, v in (("orography", self.orography), ("land_sea_mask", self.land_sea_mask))
        }
        return {"stats": asdict(self.stats), "normalization": dict(self.normalization), "source": self.source, **arr}

    @classmethod
    def from_checkpoint(cls, blob: Mapping[str, Any]) -> ModelInputs:
        arr = {k: None if blob.get(k) is None else np.asarray(blob[k]) for k in ("orography", "land_sea_mask")}
        return cls(ChannelStats(**blob["stats"]), dict(blob["normalization"]), source=str(blob.get("source", "")), **arr)


def model_inputs(path: str | Path) -> ModelInputs | None:
    """The statistics and static fields a source was trained with, where it carries them (a model package, a model
    file from ``convert``, a checkpoint of this project that embeds them); None otherwise. Reads no weights."""
    path = Path(path)
    if path.is_dir():
        if not is_package(path):
            return None
        pkg = read_package(path)
        return ModelInputs(pkg.stats, dict(pkg.normalization), pkg.orography, pkg.land_sea_mask, f"model package {pkg.path}")
    blob = _load(path)
    if not isinstance(blob, dict):
        return None
    if blob.get("format") == FORMAT:
        arr = {k: None if blob.get(k) is None else np.asarray(blob[k]) for k in ("orography", "land_sea_mask")}
        stats = ChannelStats(**blob["stats"])
        modes = blob.get("normalization") or default_modes(blob["config"]["channel_names"])
        return ModelInputs(stats, dict(modes), source=f"model file {path}", **arr)
    if isinstance(blob.get(INPUTS_KEY), Mapping):
        return ModelInputs.from_checkpoint(blob[INPUTS_KEY])
    package = _package_of(path)
    return model_inputs(package) if package is not None else None
