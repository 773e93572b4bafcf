"""A forecaster ready to step: the network with everything around it, and the one path from a file on disk to it.

:func:`load_forecaster` takes any of

- a model package folder in the published FCN3 layout (:mod:`fcn3_lightning.package`);
- a reference (Makani) checkpoint with its ``config.json`` (``config=``; a ``config.json`` in the checkpoint's
  package folder is found by itself);
- a model file from ``convert`` (everything embedded), or an older network-only model file;
- a checkpoint of this project (Lightning ``.ckpt``),

and returns a :class:`Forecaster` that knows its channels, grid, time step, normalisation, static fields, noise
settings and input conventions. ``predict``, ``convert`` and ``export`` build their forecaster here; the files
themselves are read (and told apart) by :mod:`fcn3_lightning.checkpoint`. A package brings its own statistics and
static fields; a checkpoint of this project (or a network-only file) takes them from its training data store, as
training did.

Conventions: a forecaster computes its inputs the way its network was trained (see
:mod:`fcn3_lightning.data.conventions`): a published package with float32 cos zenith and the sample std for the
orography, a model of this project with ours. An exported package records which.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fcn3_lightning.channels import STATIC_AUX
from fcn3_lightning.checkpoint import INPUTS_KEY, ModelInputs, NetworkFile, plain, read_network
from fcn3_lightning.data.conventions import PROJECT, InputConventions
from fcn3_lightning.data.statics import static_channels
from fcn3_lightning.data.stats import ChannelStats, Normalizer, check_units, default_modes, merge_statistics
from fcn3_lightning.data.zenith import cos_zenith
from fcn3_lightning.io import atomic_torch_save
from fcn3_lightning.kernels import check_disco_kernels
from fcn3_lightning.model.build import FORECASTER_FORMAT as FORMAT
from fcn3_lightning.model.build import model_kwargs, save_model
from fcn3_lightning.model.channel_map import MappingReport, fresh_network, map_state_dict, mapped_settings
from fcn3_lightning.model.fcn3 import FCN3
from fcn3_lightning.model.noise import NoiseSettings, NoiseStreams
from fcn3_lightning.model.rollout import EnsembleForecaster, keyed_streams
from fcn3_lightning.package import package_config, write_package
from fcn3_lightning.paths import StoreLocation, store_location

#: validation's noise key: inference draws exactly the noise that validation draws for the same sample id
NOISE_KEY = 0
#: FCN3Module's default noise seed, and the reference's
DEFAULT_NOISE_SEED = 333
_SAMPLE_ID_EPOCH = np.datetime64("1900-01-01T00:00:00", "s")


def noise_sample_id(time: np.datetime64 | str) -> int:
    """The noise streams' sample id of a forecast: its initial time in whole seconds since 1900-01-01T00 UTC."""
    seconds = int((np.datetime64(time, "s") - _SAMPLE_ID_EPOCH) / np.timedelta64(1, "s"))
    if seconds < 0:
        raise ValueError(f"initial time {time} is before 1900-01-01: it has no noise sample id")
    return seconds


def _times(time: Any, batch: int) -> np.ndarray:
    """One datetime64[ns] per sample: a single time is shared by the whole batch."""
    t = np.atleast_1d(np.asarray(time, dtype="datetime64[ns]"))
    if t.ndim != 1 or t.size not in (1, batch):
        raise ValueError(f"time: give one time or one per sample ({batch}), got shape {t.shape}")
    return np.broadcast_to(t, (batch,)) if t.size == 1 else t


class Forecaster(nn.Module):
    """FCN3 with its normalisation, static fields, cos zenith, noise process and time step.

    ``state`` tensors are in physical units, ``(batch, channels, lat, lon)`` with latitude north to south, in the
    order of :attr:`channels`; ``time`` is a ``numpy.datetime64`` (shared) or one per sample.

    Args:
        net: the network (its channels and grid are the forecaster's).
        net_kwargs: the network's constructor arguments (channels and grid included), for saving and export.
        stats: statistics covering at least the network's channels (a package's may cover more).
        normalization: "minmax"/"zscore" per channel (a package's); None: this project's rule (min-max for water,
            :func:`fcn3_lightning.data.stats.default_modes`).
        lat, lon: grid coordinates in degrees (latitude 90 to -90).
        step_hours: the model's time step.
        noise: the latent noise (None for a network without noise channels).
        conventions: how cos zenith and orography are computed (:mod:`fcn3_lightning.data.conventions`).
        orography, land_sea_mask: raw static fields (surface geopotential; mask in [0, 1]) on the grid, 90N first.
        source: where it came from (kind, files), for provenance.
        package_config: a loaded package's own ``config.json``, kept so that export writes back what was read.
    """

    def __init__(
        self,
        net: FCN3,
        *,
        net_kwargs: Mapping[str, Any],
        stats: ChannelStats,
        normalization: Mapping[str, str] | None,
        lat: np.ndarray,
        lon: np.ndarray,
        step_hours: int,
        noise: NoiseSettings | None,
        conventions: InputConventions = PROJECT,
        orography: np.ndarray | None = None,
        land_sea_mask: np.ndarray | None = None,
        source: Mapping[str, Any] | None = None,
        package_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(net.inp_shape)
        self.lat, self.lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
        if (self.lat.size, self.lon.size) != shape:
            raise ValueError(f"the grid has {self.lat.size} x {self.lon.size} points, the network {shape}")
        if not self.lat[0] > self.lat[-1]:
            raise ValueError("the forecaster's latitudes must run north to south (90 first)")
        n_noise = len(net.noise_channel_names)
        if bool(n_noise) != (noise is not None) or (noise is not None and noise.n_channels != n_noise):
            raise ValueError(f"the network has {n_noise} noise channels but the noise settings are {noise}")
        self.channels = list(net.layout.names)
        self.net_kwargs = plain(dict(net_kwargs))
        self.stats = stats
        self.normalization = dict(normalization) if normalization is not None else default_modes(self.channels)
        self.normalizer: Normalizer = stats.normalizer(self.channels, self.normalization)
        self.step_hours = int(step_hours)
        self.noise_settings = noise
        self.conventions = conventions
        self.orography = None if orography is None else np.asarray(orography)
        self.land_sea_mask = None if land_sea_mask is None else np.asarray(land_sea_mask)
        self.source = dict(source or {})
        self.package_config = copy.deepcopy(dict(package_config)) if package_config is not None else None
        static = static_channels(net.aux_channel_names, shape, self.orography, self.land_sea_mask, conventions)
        self.register_buffer("static", torch.from_numpy(static), persistent=False)
        self.ensemble = EnsembleForecaster(net, None if noise is None else noise.process(shape))

    # --- what it is ---------------------------------------------------------------------------------

    @property
    def net(self) -> FCN3:
        return self.ensemble.net

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.net.inp_shape)

    @property
    def aux_channels(self) -> list[str]:
        return list(self.net.aux_channel_names)

    @property
    def device(self) -> torch.device:
        return self.static.device

    @property
    def noise_seed(self) -> int:
        return DEFAULT_NOISE_SEED if self.noise_settings is None else self.noise_settings.seed

    # --- inputs -------------------------------------------------------------------------------------

    def zenith(self, time: Any, batch: int = 1) -> torch.Tensor:
        """cos zenith ``(batch, H, W)`` float32 at ``time`` (one time, or one per sample), in this model's convention."""
        z = cos_zenith(_times(time, batch), self.lat, self.lon, self.conventions.zenith_numpy_dtype)
        return torch.from_numpy(np.ascontiguousarray(z)).to(self.device, torch.float32)

    def normalize(self, state: torch.Tensor) -> torch.Tensor:
        return self.normalizer.normalize(state, axis=-3)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalizer.denormalize(x, axis=-3)

    def streams(self, time: Any, members: int, batch: int = 1) -> NoiseStreams | None:
        """Validation's noise streams for ``members`` members of each sample (key 0, sample id = its time)."""
        if self.noise_settings is None:
            return None
        ids = [noise_sample_id(t) for t in _times(time, batch)]
        return keyed_streams(self.noise_seed, NOISE_KEY, ids, members)

    def draw_noise(self, time: Any, batch: int = 1) -> torch.Tensor | None:
        """Stationary noise ``(batch, N, H, W)`` for one member per sample: what :meth:`step` uses when given none."""
        streams = self.streams(time, 1, batch)
        if streams is None:
            return None
        process = self.ensemble.noise
        with torch.no_grad():
            return process.to_grid(process.stationary(streams))

    def network_input(self, state: torch.Tensor, time: Any, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The normalised network input ``(B, C + A, H, W)``: the state, then the auxiliary channels in the network's order.

        ``noise`` ``(B, N, H, W)`` replaces the drawn noise (parity checks, reproducing another code's run); without it
        the stationary noise of validation for ``time`` is drawn (the same time gives the same noise).
        """
        self._check_state(state)
        b = state.shape[0]
        if self.ensemble.noise is not None:
            if noise is None:
                noise = self.draw_noise(time, b)
            n = self.noise_settings.n_channels
            if tuple(noise.shape) != (b, n, *self.shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(b, n, *self.shape)} (batch, noise channels, lat, lon)")
            noise = noise.to(self.device, torch.float32)
        elif noise is not None:
            raise ValueError("this network has no noise channels; pass noise=None")
        x = self.normalize(state.to(self.device, torch.float32))
        aux = self.ensemble.aux_inputs(self.zenith(time, b), noise, self.static, 1)
        return torch.cat([x, aux], dim=1)

    @torch.no_grad()
    def step(self, state: torch.Tensor, time: Any, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The state one model step (:attr:`step_hours`) after ``time``, in physical units (see :meth:`network_input`)."""
        return self.denormalize(self.net(self.network_input(state, time, noise)))

    def rollout(
        self, state: torch.Tensor, time: Any, members: int, steps: int, member_slice: slice | None = None
    ) -> Iterator[torch.Tensor]:
        """An ensemble forecast one step at a time: yields ``(B, M, C, H, W)`` in physical units for steps 1 .. ``steps``.

        Fresh stationary noise at the initial time (validation's streams: a forecast depends only on its initial
        time), an AR(1) step of the noise before every later step, the cos zenith of each step's input time.
        ``member_slice``: run only these of the ``members`` (each keeps its own noise stream).
        """
        self._check_state(state)
        b = state.shape[0]
        times = _times(time, b)
        streams = self.streams(times, members, b)
        members_here = members
        if member_slice is not None:
            m0, m1, _ = member_slice.indices(members)
            members_here = m1 - m0
            if streams is not None:
                streams = streams.subset(m0, m1)
        step = np.timedelta64(self.step_hours, "h")
        x0 = self.normalize(state.to(self.device, torch.float32))
        rollout = self.ensemble.steps(x0, lambda s: self.zenith(times + s * step, b), self.static, streams, steps, members_here)
        for _ in range(steps):
            with torch.inference_mode():  # per step only: a `with` spanning the yield would leak into the caller
                y = self.denormalize(next(rollout))
            yield y

    def _check_state(self, state: torch.Tensor) -> None:
        want = (len(self.channels), *self.shape)
        if state.ndim != 4 or tuple(state.shape[1:]) != want:
            raise ValueError(
                f"state has shape {tuple(state.shape)}, expected (batch, {', '.join(map(str, want))}): channels {self.channels}"
            )

    # --- writing ------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """A model file with everything (what ``convert`` writes; :func:`load_forecaster` reads it back)."""
        blob = {
            "format": FORMAT,
            "config": self.net_kwargs,
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "stats": asdict(self.stats),
            "normalization": self.normalization,
            "lat": self.lat.tolist(),
            "lon": self.lon.tolist(),
            "step_hours": self.step_hours,
            "noise": None if self.noise_settings is None else self.noise_settings.to_dict(),
            "conventions": self.conventions.to_dict(),
            "orography": None if self.orography is None else torch.from_numpy(np.ascontiguousarray(self.orography)),
            "land_sea_mask": None if self.land_sea_mask is None else torch.from_numpy(np.ascontiguousarray(self.land_sea_mask)),
            "source": plain(self.source),
            "package_config": self.package_config,
        }
        atomic_torch_save(blob, path)
        return Path(path)

    def export(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write a model package in the published layout (see :mod:`fcn3_lightning.package`)."""
        config = package_config(
            net_kwargs=self.net_kwargs,
            stats=self.stats,
            normalization=self.normalization,
            lat=self.lat,
            lon=self.lon,
            step_hours=self.step_hours,
            noise=self.noise_settings,
            conventions=self.conventions,
            base=self.package_config,
            provenance={k: v for k, v in self.source.items() if k in ("kind", "path")},
        )
        return write_package(
            out,
            config=config,
            state_dict=self.net.state_dict(),
            stats=self.stats,
            orography=self.orography,
            land_sea_mask=self.land_sea_mask,
            lat=self.lat,
            lon=self.lon,
            overwrite=overwrite,
        )


def load_forecaster(
    path: str | Path,
    device: str | torch.device | None = None,
    *,
    config: str | Path | None = None,
    data_path: str | Path | StoreLocation | None = None,
    stats_path: str | Path | None = None,
    noise_seed: int | None = None,
) -> Forecaster:
    """Load a forecaster from a package folder, a reference checkpoint (+ ``config``), a model file or a checkpoint.

    Args:
        path: the source (see the module docstring).
        device: "cpu", "cuda", ... (default: CUDA if available).
        config: the reference ``config.json`` of a reference checkpoint file outside its package folder.
        data_path: for sources without statistics and static fields (checkpoints of this project, network-only
            model files, bare reference checkpoints): the WB2 store (a path, a URL, or a
            :class:`~fcn3_lightning.paths.StoreLocation` carrying storage options) to take the static fields (and, by default,
            the statistics) from; default: the checkpoint's training store (the default world when there was none).
        stats_path: statistics for such sources (default: the checkpoint's, else ``<store>.stats.json``).
        noise_seed: base seed of the noise streams (default: the source's, else 333).
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_disco_kernels(dev)  # on CUDA: torch-harmonics' DISCO kernels, or a clear stop before the load (fcn3_lightning.kernels)
    f = _assemble(read_network(path, config=config), data_path, stats_path)
    if noise_seed is not None and f.noise_settings is not None:
        f.noise_settings = NoiseSettings.from_dict({**f.noise_settings.to_dict(), "seed": int(noise_seed)})
    return f.to(dev).eval()


def _assemble(src: NetworkFile, data_path: str | Path | StoreLocation | None, stats_path: str | Path | None) -> Forecaster:
    if src.kind == "package":
        return _from_package(src)
    if src.kind == "forecaster":
        return _from_model_file(src)
    return _from_store(src, data_path, stats_path)


def _build(src: NetworkFile, kwargs: dict[str, Any], **forecaster_kwargs: Any) -> Forecaster:
    net = FCN3(**kwargs)
    target = net.state_dict()
    missing = sorted(set(target) - set(src.state_dict))
    unexpected = sorted(set(src.state_dict) - set(target))
    misshapen = [
        f"{k}: {tuple(src.state_dict[k].shape)}, expected {tuple(v.shape)}"
        for k, v in target.items()
        if k in src.state_dict and src.state_dict[k].shape != v.shape
    ]
    if missing or unexpected or misshapen:
        raise ValueError(
            f"the weights in {src.path} do not fit the network for channels/grid {kwargs.get('inp_shape')}: "
            f"missing {missing}; unexpected {unexpected}; misshapen {misshapen}"
        )
    net.load_state_dict(src.state_dict)
    return Forecaster(net, net_kwargs=kwargs, **forecaster_kwargs)


def _from_package(src: NetworkFile) -> Forecaster:
    pkg = src.package
    assert pkg is not None
    files = [
        pkg.path / "config.json",
        pkg.checkpoint,
        *(pkg.path / n for n in ("global_means.npy", "global_stds.npy", "mins.npy", "maxs.npy")),
    ]
    return _build(
        src,
        pkg.net_kwargs,
        stats=pkg.stats,
        normalization=pkg.normalization,
        lat=pkg.lat,
        lon=pkg.lon,
        step_hours=pkg.step_hours,
        noise=pkg.noise,
        conventions=pkg.conventions,
        orography=pkg.orography,
        land_sea_mask=pkg.land_sea_mask,
        source={"kind": "package", "path": str(pkg.path.resolve()), "files": [str(p.resolve()) for p in files if p.is_file()]},
        package_config=pkg.config,
    )


def _from_model_file(src: NetworkFile) -> Forecaster:
    b = src.blob
    stats = ChannelStats(**b["stats"])
    arr = {k: (None if b.get(k) is None else np.asarray(b[k])) for k in ("orography", "land_sea_mask")}
    return _build(
        src,
        dict(b["config"]),
        stats=stats,
        normalization=b.get("normalization"),
        lat=np.asarray(b["lat"]),
        lon=np.asarray(b["lon"]),
        step_hours=int(b["step_hours"]),
        noise=None if b.get("noise") is None else NoiseSettings.from_dict(b["noise"]),
        conventions=InputConventions.from_dict(b.get("conventions")),
        source={**dict(b.get("source") or {}), "kind": "forecaster", "path": str(src.path.resolve()), "files": [str(src.path.resolve())]},
        package_config=b.get("package_config"),
        **arr,
    )


def _from_store(src: NetworkFile, data_path: str | Path | StoreLocation | None, stats_path: str | Path | None) -> Forecaster:
    """Statistics and static fields from a WB2 store: checkpoints of this project, network-only files, bare reference checkpoints."""
    from fcn3_lightning.channels import FCN3_AUX_CHANNELS, FCN3_CHANNELS
    from fcn3_lightning.data.default_world import ensure_default_world
    from fcn3_lightning.data.store import WB2Store

    step_hours, train_store, train_stats, world_seed, train_range = 6, None, None, 0, None
    noise = NoiseSettings()
    if src.kind == "lightning":
        hp = src.blob.get("hyper_parameters")
        dm = src.blob.get("datamodule_hyper_parameters")
        if hp is None:
            raise ValueError(f"{src.path}: the checkpoint holds no model settings (hyper_parameters); use a model file instead")
        if dm is None:
            raise ValueError(f"{src.path}: the checkpoint holds no data settings (datamodule_hyper_parameters); use a model file instead")
        world_seed = int(dm.get("seed") or 0)
        train_store = dm.get("data_path")
        if train_store is not None:  # a URL keeps the storage options it was trained with
            train_store = store_location(train_store, "the training store", dm.get("storage_options"))
        if train_store is None:
            from fcn3_lightning.data.default_world import DEFAULT_WORLD_CHANNELS

            channels = list(dm.get("channels") or DEFAULT_WORLD_CHANNELS)
        else:
            channels = list(dm.get("channels") or FCN3_CHANNELS)
        aux = list(FCN3_AUX_CHANNELS if dm.get("aux_channels") is None else dm["aux_channels"])
        step_hours = int(dm.get("step_hours") or 6)
        train_stats, train_range = dm.get("stats_path"), dm.get("train_range")
        lengths = hp.get("noise_length_scales_km")
        noise = NoiseSettings(
            n_channels=sum(a.startswith("xnoise") for a in aux) or 8,
            length_scales_km=None if lengths is None else tuple(lengths),
            sigma=float(hp.get("noise_sigma", 1.0)),
            lambd=float(hp.get("noise_lambd", 1.0)),
            antithetic=bool(hp.get("antithetic", False)),
            seed=int(hp.get("noise_seed", DEFAULT_NOISE_SEED)),
        )
        kwargs = None
        members = hp.get("valid_ensemble_size") or hp.get("ensemble_size")
    else:
        members = None
        kwargs = dict(src.net_kwargs or {})
        probe = FCN3(**kwargs)  # channels and grid of the file's network
        channels, aux = list(probe.layout.names), list(probe.aux_channel_names)
        noise = NoiseSettings(n_channels=len(probe.noise_channel_names) or 8)
        del probe

    explicit_data = data_path is not None
    if data_path is None:
        data_path = ensure_default_world(seed=world_seed) if train_store is None else train_store
    try:
        store = WB2Store(data_path, channels, step_hours=step_hours)
    except ValueError as e:
        raise ValueError(f"the channels {channels} of {src.path} do not fit the data store: {e}") from e
    if kwargs is None:
        hp = src.blob["hyper_parameters"]
        kwargs = {
            "inp_shape": list(store.shape),
            "channel_names": channels,
            "aux_channel_names": aux,
            **model_kwargs(dict(hp.get("net") or {})),
        }
    elif tuple(kwargs["inp_shape"]) != store.shape:
        raise ValueError(f"the network's grid {tuple(kwargs['inp_shape'])} differs from the data store's {store.shape} ({store.path})")

    embedded = src.blob.get(INPUTS_KEY) if src.kind == "lightning" and not stats_path else None
    if isinstance(embedded, Mapping):  # a checkpoint carries what it was trained with (fine-tuning: a source's inputs)
        inputs = ModelInputs.from_checkpoint(embedded)
        inputs.stats.check_compatible(channels, store.lat, store.lon, where=f"{src.path} (embedded statistics)")
        stats, normalization, oro, lsm, files = inputs.stats, inputs.normalization, inputs.orography, inputs.land_sea_mask, []
    else:
        stats, normalization, oro, lsm, found = _stats_and_statics(
            src, store, channels, aux, stats_path, train_stats, train_store, train_range, world_seed, explicit_data
        )
        files = [str(found.resolve())]
    n_noise = sum(a.startswith("xnoise") for a in aux)
    return _build(
        src,
        kwargs,
        stats=stats,
        normalization=normalization,
        lat=store.lat,
        lon=store.lon,
        step_hours=step_hours,
        noise=noise if n_noise else None,
        conventions=PROJECT,
        orography=oro,
        land_sea_mask=lsm,
        source={
            "kind": src.kind,
            "path": str(src.path.resolve()),
            "files": [str(src.path.resolve()), *files],
            "data": str(store.path),
            **({"members": int(members)} if members else {}),
        },
    )


def _stats_and_statics(
    src: NetworkFile,
    store: Any,
    channels: list[str],
    aux: list[str],
    stats_path: str | Path | None,
    train_stats: str | None,
    train_store: Any,
    train_range: Any,
    world_seed: int,
    explicit_data: bool,
) -> tuple[ChannelStats, None, np.ndarray | None, np.ndarray | None, Path]:
    """For a source without embedded inputs: the statistics file it was trained with (found, or computed once for
    the default world) and the store's static fields; normalisation modes by this project's rule (None)."""
    from fcn3_lightning.data.default_world import DEFAULT_WORLD_SPLITS, default_world_path
    from fcn3_lightning.data.statics import LAND_SEA_MASK_VARIABLE, OROGRAPHY_VARIABLE
    from fcn3_lightning.data.stats import compute_stats

    # the normaliser the network was trained with: the checkpoint's statistics where they can be found
    candidates = [Path(stats_path)] if stats_path else []
    if not stats_path:
        if train_stats:
            candidates.append(Path(train_stats))
        if src.kind == "lightning":
            if train_store is not None:
                sibling = train_store.stats_sibling()  # None for a remote training store
            else:
                world = default_world_path(world_seed)
                sibling = world.with_name(world.name + ".stats.json")
            candidates += [sibling] if sibling is not None else []
        if store.location.stats_sibling() is not None:  # a remote store has none: its statistics come with --stats
            candidates.append(store.location.stats_sibling())
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        if src.kind == "lightning" and train_store is None and not explicit_data and not stats_path:
            found = candidates[-1]  # the default world computes its statistics once, as the data module does
            compute_stats(store, *(train_range or DEFAULT_WORLD_SPLITS["train"])).save(found)
        else:
            raise FileNotFoundError(
                f"no normalisation statistics found (looked for {', '.join(map(str, dict.fromkeys(candidates)))}); "
                "pass --stats (written by: python -m fcn3_lightning stats)"
            )
    stats = ChannelStats.load(found)
    stats.check_compatible(channels, store.lat, store.lon, where=str(found))
    stats.source = {**stats.source, "file": str(found.resolve())}
    wanted = set(aux) & set(STATIC_AUX)
    oro = store.read_static(OROGRAPHY_VARIABLE) if "xoro" in wanted else None
    lsm = store.read_static(LAND_SEA_MASK_VARIABLE) if wanted & {"xlsml", "xlsms"} else None
    return stats, None, oro, lsm, found


def convert(
    source: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    data_path: str | Path | None = None,
    stats_path: str | Path | None = None,
    channels: Sequence[str] | None = None,
) -> str:
    """Write ``source`` as one model file of this project; returns what was written.

    ``channels``: map the network onto this channel list first (:func:`map_channels`; new channels take their
    statistics from ``stats_path``, or ``<data_path>.stats.json``), printing the mapping report.

    A package, a model file or a checkpoint of this project becomes a model file with everything (network,
    statistics, static fields, noise, conventions): ``load_forecaster`` and ``predict`` need nothing else. A bare
    reference checkpoint with only its architecture config becomes a network-only model file (``predict`` then takes
    the statistics and static fields from a data store, ``--data-path``/``--stats``).
    """
    src = read_network(source, config=config)
    if src.kind == "reference":
        net = FCN3(**src.net_kwargs)
        net.load_state_dict(src.state_dict)
        save_model(net, src.net_kwargs, out)
        return "network only: no statistics or static fields in the source"
    forecaster = _assemble(src, None if channels else data_path, None if channels else stats_path)
    if channels:
        stats_file = stats_path or (f"{data_path}.stats.json" if data_path else None)
        data_stats = ChannelStats.load(stats_file) if stats_file else None
        forecaster, report = map_channels(forecaster, channels, data_stats)
        print("channel mapping:\n  " + "\n  ".join(report.lines()), flush=True)
    forecaster.save(out)
    return "network, statistics, static fields and noise settings" + (f", mapped onto {len(channels)} channels" if channels else "")


def map_channels(
    forecaster: Forecaster, channels: Sequence[str], data_stats: ChannelStats | None = None
) -> tuple[Forecaster, MappingReport]:
    """The forecaster on another channel list (:mod:`fcn3_lightning.model.channel_map`): the same network for the
    channels it keeps, new variables and levels starting with no effect on them. New channels are normalised with
    ``data_stats`` (required for them), the others as the source was."""
    settings = mapped_settings(forecaster.net_kwargs, channels, forecaster.aux_channels)
    net = fresh_network(settings)
    state, report = map_state_dict(forecaster.net_kwargs, forecaster.net.state_dict(), net, settings)
    net.load_state_dict(state)
    stats = forecaster.stats
    new = [c for c in channels if c not in stats.channels]
    if new:
        if data_stats is None:
            raise ValueError(f"the new channels {new} need statistics: pass the data's (--stats, or --data-path with <store>.stats.json)")
        check_units(data_stats, stats, [c for c in channels if c not in new], forecaster.source.get("path", "the model"), "the data")
        stats, _ = merge_statistics(stats, data_stats, channels)
    modes = {c: forecaster.normalization.get(c) or default_modes([c])[c] for c in channels}
    for c in new:
        modes[c] = default_modes([c])[c]
    mapped = Forecaster(
        net,
        net_kwargs=settings,
        stats=stats,
        normalization=modes,
        lat=forecaster.lat,
        lon=forecaster.lon,
        step_hours=forecaster.step_hours,
        noise=forecaster.noise_settings,
        conventions=forecaster.conventions,
        orography=forecaster.orography,
        land_sea_mask=forecaster.land_sea_mask,
        source={**forecaster.source, "channel_mapping": report.to_dict()},
    )
    return mapped, report


def fingerprint(forecaster: Forecaster) -> str:
    """SHA-256 over the files a forecaster was read from (a rerun with other files is another forecast)."""
    h = hashlib.sha256()
    for name in forecaster.source.get("files", []):
        with open(name, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()
