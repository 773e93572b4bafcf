"""FCN3 model packages: the folder layout NVIDIA publishes FourCastNet 3 in (HuggingFace ``nvidia/fourcastnet3``, NGC),
written by the reference code (Makani) and served by Earth2Studio.

A package holds everything inference needs besides the initial state::

    config.json                              run parameters: network settings, grid, channels, normalisation
                                             modes, auxiliary inputs, noise, time step
    metadata.json                            the reference's entry point (not read here)
    global_means.npy, global_stds.npy,       statistics over ``data_channel_names``, shape (1, C_data, 1, 1);
    mins.npy, maxs.npy                       ``in_channels``/``out_channels`` index the model's channels in them
    orography.nc (``Z``), land_mask.nc (``LSM``)  static fields, shape (1, nlat, nlon)
    training_checkpoints/best_ckpt_mp0.tar   ``{"model_state": {"model.<reference name>": tensor}}``

:func:`read_package` checks all of it and returns a :class:`Package`; :func:`write_package` writes one (from a
model of this project or a loaded package) so that the reference code and Earth2Studio load it unchanged: the
network settings written out in full, no ``inp_shape``/``out_shape``/``inp_chans``/``out_chans`` (the reference
loader passes those itself and fails on duplicates), stats as (1, C, 1, 1) arrays, the checkpoint loadable with
``torch.load(weights_only=True)`` and strictly by name. Our own additions (``time_diff_stds.npy``, the
``fcn3_lightning`` block of ``config.json``) are ignored by the reference.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcn3_lightning.data.conventions import REFERENCE_PACKAGE, InputConventions
from fcn3_lightning.data.stats import ChannelStats
from fcn3_lightning.io import give_default_mode, publish_folder
from fcn3_lightning.model.convert import (
    EXTENSION_KEYS,
    kwargs_to_reference_config,
    ours_to_reference_state_dict,
    reference_config_to_kwargs,
)
from fcn3_lightning.model.noise import NoiseSettings

CONFIG = "config.json"
METADATA = "metadata.json"
CHECKPOINT = "training_checkpoints/best_ckpt_mp0.tar"
STATS_FILES = {"mean": "global_means.npy", "std": "global_stds.npy", "min": "mins.npy", "max": "maxs.npy"}
#: config keys that name the statistics files; the reference loader reads a file only where its key is not null
STATS_KEYS = {"mean": "global_means_path", "std": "global_stds_path", "min": "min_path", "max": "max_path"}
#: written by this project's export only (the reference loader ignores it): the loss's channel weights need it
TIME_DIFF_STDS = "time_diff_stds.npy"
OROGRAPHY = ("orography.nc", "Z")
LAND_MASK = ("land_mask.nc", "LSM")
#: what a package's config.json says about this project (ignored by the reference code)
OWN_KEY = "fcn3_lightning"
#: reference config keys whose presence makes the reference loader fail (it passes these itself)
FORBIDDEN_KEYS = ("inp_shape", "out_shape", "inp_chans", "out_chans")
#: the reference's package entry point (metadata.json)
ENTRYPOINT = {"entrypoint": {"name": "makani.models.model_package:load_time_loop"}}


class PackageError(ValueError):
    """A model package that cannot be read: the message names the file and what is wrong with it."""


@dataclass
class Package:
    """A model package read from disk, checked, in this project's terms.

    ``stats`` covers the package's ``data_channel_names`` (which may hold more channels than the model, e.g. ``sp``)
    and keeps the files' dtype in ``stats.source["dtype"]``; ``normalization`` gives the mode of every model channel.
    ``orography``/``land_sea_mask`` are the raw fields (surface geopotential, mask in [0, 1]) on the grid, 90N first.
    """

    path: Path
    config: dict[str, Any]
    net_kwargs: dict[str, Any]
    channels: list[str]
    stats: ChannelStats
    normalization: dict[str, str]
    lat: np.ndarray
    lon: np.ndarray
    step_hours: int
    orography: np.ndarray | None
    land_sea_mask: np.ndarray | None
    noise: NoiseSettings | None
    conventions: InputConventions

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT


def is_package(path: str | Path) -> bool:
    """A folder with a ``config.json``: what :func:`read_package` expects."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file()


def _file(root: Path, name: str) -> Path:
    p = root / name
    if not p.is_file():
        raise PackageError(f"model package {root}: {name} is missing")
    return p


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise PackageError(f"model package file {path} is not a readable .npy array: {e}") from e


def _read_nc_field(path: Path, variable: str, shape: tuple[int, int]) -> np.ndarray:
    """``variable[0]`` of a netCDF4 (HDF5) file, checked against the grid (the reference reads it with h5py)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if variable not in f:
                raise PackageError(f"model package file {path} has no variable {variable!r} (it has {sorted(f)})")
            data = np.asarray(f[variable])
    except OSError as e:
        raise PackageError(f"model package file {path} is not a readable netCDF4/HDF5 file: {e}") from e
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if tuple(data.shape) != tuple(shape):
        raise PackageError(f"model package file {path}: {variable} has shape {tuple(data.shape)}, expected the grid {tuple(shape)}")
    return data


def _noise_settings(config: Mapping[str, Any], where: str, n_noise: int, step_hours: float) -> NoiseSettings | None:
    spec = config.get("input_noise")
    if spec is None:
        if n_noise:
            raise PackageError(f"{where}: aux_channel_names has {n_noise} noise channels but input_noise is not set")
        return None
    if spec.get("type", "diffusion") != "diffusion" or spec.get("mode", "concatenate") != "concatenate":
        raise PackageError(
            f"{where}: input_noise type {spec.get('type')!r}, mode {spec.get('mode')!r} is not supported "
            "(FCN3's is type 'diffusion', mode 'concatenate')"
        )
    n = int(spec.get("n_channels", n_noise))
    kT = spec.get("kT", 0.5 * (100 / 6370) ** 2)
    kT = [float(kT)] * n if np.isscalar(kT) else [float(k) for k in kT]
    if len(kT) != n or n != n_noise:
        raise PackageError(f"{where}: input_noise has n_channels {n} and {len(kT)} kT values, aux_channel_names {n_noise} noise channels")
    lambd = float(spec.get("lambd", step_hours / 6.0))  # the reference's default: tau = 6 h
    return NoiseSettings.from_kT(kT, sigma=float(spec.get("sigma", 1.0)), lambd=lambd, antithetic=bool(spec.get("centered", False)))


def read_package(path: str | Path) -> Package:
    """Read and check a model package folder; every problem raises :class:`PackageError` naming the file."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model package {root} does not exist")
    cfg_path = _file(root, CONFIG)
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"model package {cfg_path} is not valid JSON: {e}") from e
    where = str(cfg_path)
    try:
        net_kwargs = reference_config_to_kwargs(config)
    except ValueError as e:
        raise PackageError(f"{where}: {e}") from e
    shape = tuple(net_kwargs["inp_shape"])
    channels = list(config["channel_names"])
    for key in ("data_channel_names", "in_channels", "out_channels"):
        if key not in config:
            raise PackageError(f"{where} lacks {key!r}")
    data_channels = list(config["data_channel_names"])
    in_ch, out_ch = list(config["in_channels"]), list(config["out_channels"])
    if in_ch != out_ch:
        raise PackageError(f"{where}: in_channels and out_channels differ; FCN3 predicts exactly its input channels")
    if any(not 0 <= i < len(data_channels) for i in in_ch) or [data_channels[i] for i in in_ch] != channels:
        raise PackageError(f"{where}: data_channel_names[in_channels] is not channel_names (the stats would be mis-assigned)")
    if int(config.get("n_history", 0)) != 0:
        raise PackageError(f"{where}: n_history {config['n_history']} is not supported (FCN3 takes one state)")

    arrays: dict[str, np.ndarray] = {}
    for stat, name in STATS_FILES.items():
        a = _load_npy(_file(root, name))
        if a.shape != (1, len(data_channels), 1, 1):
            raise PackageError(
                f"model package file {root / name} has shape {a.shape}, expected (1, {len(data_channels)}, 1, 1) "
                f"(one value per data channel in data_channel_names)"
            )
        arrays[stat] = a.reshape(-1)
    tendency: list[float] = []
    if (root / TIME_DIFF_STDS).is_file():
        t = _load_npy(root / TIME_DIFF_STDS)
        if t.shape != (1, len(data_channels), 1, 1):
            raise PackageError(f"model package file {root / TIME_DIFF_STDS} has shape {t.shape}, expected (1, {len(data_channels)}, 1, 1)")
        tendency = t.reshape(-1).astype(np.float64).tolist()
    dtype = str(np.result_type(*arrays.values()))
    lat = np.asarray(config.get("lat", np.linspace(90, -90, shape[0])), dtype=np.float64)
    lon = np.asarray(config.get("lon", np.linspace(0, 360, shape[1], endpoint=False)), dtype=np.float64)
    if lat.shape != (shape[0],) or lon.shape != (shape[1],):
        raise PackageError(f"{where}: lat/lon have {lat.size}/{lon.size} values for the grid {shape}")
    stats = ChannelStats(
        channels=data_channels,
        grid={"nlat": int(lat.size), "nlon": int(lon.size), "lat": [float(lat[0]), float(lat[-1])], "lon": [float(lon[0]), float(lon[-1])]},
        source={"file": str(root), "dtype": dtype},
        mean=arrays["mean"].astype(np.float64).tolist(),
        std=arrays["std"].astype(np.float64).tolist(),
        min=arrays["min"].astype(np.float64).tolist(),
        max=arrays["max"].astype(np.float64).tolist(),
        time_diff_std=tendency,
    )
    norm = config.get("normalization", "zscore")
    if isinstance(norm, str):
        if norm not in ("zscore", "minmax"):
            raise PackageError(f"{where}: normalization {norm!r} is not 'zscore', 'minmax' or a per-channel dict")
        modes = {c: norm for c in channels}
    else:
        modes = {c: str(norm.get(c, "zscore")) for c in channels}
    try:
        stats.normalizer(channels, modes)  # checks the modes and that no scale is zero
    except ValueError as e:
        raise PackageError(f"model package {root}: {e}") from e

    aux = list(net_kwargs.get("aux_channel_names", []))
    if bool(config.get("add_zenith", False)) != ("xzen" in aux):
        raise PackageError(f"{where}: add_zenith is {config.get('add_zenith')} but aux_channel_names {aux}")
    orography = land_sea_mask = None
    if config.get("add_orography", False):
        orography = _read_nc_field(_file(root, OROGRAPHY[0]), OROGRAPHY[1], shape)
    if config.get("add_landmask", False):
        preprocessing = config.get("landmask_preprocessing", "floor")
        if preprocessing != "floor":
            raise PackageError(f"{where}: landmask_preprocessing {preprocessing!r} is not supported (FCN3's is 'floor')")
        land_sea_mask = _read_nc_field(_file(root, LAND_MASK[0]), LAND_MASK[1], shape)
    if ("xoro" in aux) != (orography is not None) or (bool({"xlsml", "xlsms"} & set(aux))) != (land_sea_mask is not None):
        raise PackageError(f"{where}: add_orography/add_landmask disagree with aux_channel_names {aux}")
    step_hours = float(config.get("dt", 1)) * float(config.get("dhours", 6))
    if step_hours != int(step_hours) or step_hours <= 0:
        raise PackageError(f"{where}: the model step dt * dhours = {step_hours} h is not a positive whole number of hours")
    n_noise = sum(a.startswith("xnoise") for a in aux)
    noise = _noise_settings(config, where, n_noise, step_hours)
    own = config.get(OWN_KEY) or {}
    conventions = InputConventions.from_dict(own["input_conventions"]) if "input_conventions" in own else REFERENCE_PACKAGE
    if noise is not None and isinstance(own.get("noise"), dict):
        # our export also writes the exact settings (kT -> length scale is not exact in floating point); used only
        # where they agree with the reference's own keys, which stay the truth
        exact = NoiseSettings.from_dict(own["noise"])
        same = np.allclose(exact.kT, noise.kT, rtol=1e-9, atol=0) and (exact.sigma, exact.lambd, exact.antithetic) == (
            noise.sigma,
            noise.lambd,
            noise.antithetic,
        )
        noise = exact if same else NoiseSettings.from_dict({**noise.to_dict(), "seed": exact.seed})
    _file(root, CHECKPOINT)
    return Package(
        path=root,
        config=config,
        net_kwargs=net_kwargs,
        channels=channels,
        stats=stats,
        normalization=modes,
        lat=lat,
        lon=lon,
        step_hours=int(step_hours),
        orography=orography,
        land_sea_mask=land_sea_mask,
        noise=noise,
        conventions=conventions,
    )


def package_config(
    *,
    net_kwargs: Mapping[str, Any],
    stats: ChannelStats,
    normalization: Mapping[str, str],
    lat: np.ndarray,
    lon: np.ndarray,
    step_hours: int,
    noise: NoiseSettings | None,
    conventions: InputConventions,
    base: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``config.json`` for a model: ``base`` (a loaded package's own config, so a round trip keeps every key the
    reference wrote) updated with everything the reference loader and Earth2Studio read."""
    config = copy.deepcopy(dict(base or {}))
    for key in (*FORBIDDEN_KEYS, *EXTENSION_KEYS):  # the extension settings are written anew (or not at all) below
        config.pop(key, None)
    config.update(kwargs_to_reference_config(net_kwargs))
    channels = list(net_kwargs["channel_names"])
    aux = list(config["aux_channel_names"])
    nlat, nlon = int(lat.size), int(lon.size)
    if base is None or list(base.get("data_channel_names", [])) != list(stats.channels):
        config["data_channel_names"] = list(stats.channels)
    config["in_channels"] = config["out_channels"] = [stats.channels.index(c) for c in channels]
    config.update(
        N_in_channels=len(channels) + len(aux),
        N_out_channels=len(channels),
        N_in_predicted_channels=len(channels),
        N_target_channels=len(channels),
        n_history=0,
        n_future=0,
        batch_size=int(config.get("batch_size", 1)),
        dt=1,
        dhours=int(step_hours),
        lat=[float(x) for x in lat],
        lon=[float(x) for x in lon],
        add_zenith="xzen" in aux,
        add_orography="xoro" in aux,
        add_landmask=bool({"xlsml", "xlsms"} & set(aux)),
        history_normalization_mode=config.get("history_normalization_mode", "none"),
        data_grid_type=config.get("model_grid_type", "equiangular"),
    )
    for suffix in ("crop_shape", "local_shape"):
        config[f"img_{suffix}_x"], config[f"img_{suffix}_y"] = nlat, nlon
    config["img_local_shape_x_resampled"], config["img_local_shape_y_resampled"] = nlat, nlon
    for k in ("img_crop_offset_x", "img_crop_offset_y", "img_local_offset_x", "img_local_offset_y"):
        config[k] = 0
    old = dict(config.get("normalization") or {}) if isinstance(config.get("normalization"), dict) else {}
    config["normalization"] = {**old, **{c: m for c, m in normalization.items() if m == "minmax"}}
    for c, m in normalization.items():
        if m != "minmax":
            config["normalization"].pop(c, None)
    for stat, key in STATS_KEYS.items():
        config[key] = STATS_FILES[stat]  # non-null: the reference loads a statistics file only where its key is set
    if config["add_orography"]:
        config["orography_path"] = OROGRAPHY[0]
    if config["add_landmask"]:
        config["landmask_path"] = LAND_MASK[0]
        config["landmask_preprocessing"] = "floor"
    n_noise = sum(a.startswith("xnoise") for a in aux)
    if noise is not None:
        spec = dict(config.get("input_noise") or {})
        kT = [float(k) for k in noise.kT]
        if isinstance(spec.get("kT"), list) and np.allclose(spec["kT"], kT, rtol=1e-12, atol=0):
            kT = spec["kT"]  # keep the package's own numbers: a round trip writes back what it read
        spec.update(type="diffusion", mode="concatenate", n_channels=n_noise, kT=kT, sigma=noise.sigma, centered=noise.antithetic)
        spec["lambd"] = noise.lambd
        config["input_noise"] = spec
        config["n_noise_chan"] = n_noise
    else:
        config.pop("input_noise", None)
    config.setdefault("nettype", "FCN3")
    own = dict(config.get(OWN_KEY) or {})
    own["input_conventions"] = conventions.to_dict()
    if noise is not None:
        own["noise"] = noise.to_dict()
    if provenance:
        own["provenance"] = dict(provenance)
    config[OWN_KEY] = own
    return config


def _write_nc(path: Path, variable: str, field: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> None:
    """A netCDF4 file with ``variable`` (1, nlat, nlon), as the reference's static files (read with h5py there)."""
    import h5netcdf

    with h5netcdf.File(path, "w") as f:
        f.dimensions = {"time": 1, "latitude": lat.size, "longitude": lon.size}
        f.create_variable("latitude", ("latitude",), data=lat.astype(np.float64))
        f.create_variable("longitude", ("longitude",), data=lon.astype(np.float64))
        f.create_variable(variable, ("time", "latitude", "longitude"), data=field[None])


def write_package(
    out: str | Path,
    *,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    stats: ChannelStats,
    orography: np.ndarray | None,
    land_sea_mask: np.ndarray | None,
    lat: np.ndarray,
    lon: np.ndarray,
    overwrite: bool = False,
) -> Path:
    """Write a package folder atomically: built in a temporary folder beside ``out`` and renamed into place, so a
    failure half-way leaves nothing behind (and an existing package stays as it was until the rename).

    ``state_dict``: the network's parameters in this project's layout (converted to the reference layout here);
    ``config`` from :func:`package_config`.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"export: {out} exists (choose another --out, or --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        (tmp / CONFIG).write_text(json.dumps(config, indent=4, sort_keys=True))
        (tmp / METADATA).write_text(json.dumps(ENTRYPOINT, indent=4, sort_keys=True))
        dtype = np.dtype(stats.source.get("dtype", "float64"))
        for stat, name in STATS_FILES.items():
            values = np.asarray(getattr(stats, stat), dtype=np.float64).astype(dtype)
            np.save(tmp / name, values.reshape(1, -1, 1, 1))
        if stats.time_diff_std:
            np.save(tmp / TIME_DIFF_STDS, np.asarray(stats.time_diff_std, dtype=np.float64).astype(dtype).reshape(1, -1, 1, 1))
        if config.get("add_orography"):
            _write_nc(tmp / OROGRAPHY[0], OROGRAPHY[1], np.asarray(orography), lat, lon)
        if config.get("add_landmask"):
            _write_nc(tmp / LAND_MASK[0], LAND_MASK[1], np.asarray(land_sea_mask), lat, lon)
        model_state = {f"model.{k}": v.detach().cpu().contiguous() for k, v in ours_to_reference_state_dict(state_dict).items()}
        (tmp / CHECKPOINT).parent.mkdir()
        torch.save({"model_state": model_state}, tmp / CHECKPOINT)
        _give_default_modes(tmp)
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _give_default_modes(root: Path) -> None:
    """mkdtemp makes a private (0700) folder: give the package the modes the umask gives, like any other output."""
    for d, _, files in os.walk(root):
        give_default_mode(d)
        for f in files:
            give_default_mode(os.path.join(d, f))
