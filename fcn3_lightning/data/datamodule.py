"""The LightningDataModule for WB2-style Zarr stores: samples of (input state, n targets at +6 h, +12 h, ...).

A sample is a dict of float32 tensors (normalised), for one input time ``t``::

    input   (C, h, w)        state at t
    target  (n, C, h, w)     states at t + k * step, k = 1..n
    zenith  (n + 1, h, w)    cos zenith at t and at every target time (the aux input of each step)
    time    ()               t as int64 nanoseconds since 1970 (UTC)
    index   ()               the sample's index in its split (unique: it keys the sample's noise streams)

A store with an ensemble-member dimension ``number`` (several equally plausible analyses of the same
times, e.g. the ERA5 EDA members) serves every (member, input time) pair as a sample, its input and
targets from that one member: see :class:`ForecastDataset`.

``h, w`` are the whole grid or a latitude/longitude tile (spatial model parallelism reads only its
tile: in a Trainer, the one the strategy's layout gives this rank,
:func:`~fcn3_lightning.parallel.strategy.layout_of`). Static auxiliary fields (orography, land-sea mask) are the same for every sample:
``datamodule.static`` holds them, tiled like the samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from fcn3_lightning.channels import FCN3_AUX_CHANNELS, FCN3_CHANNELS, STATIC_AUX, check_aux_channels
from fcn3_lightning.data.sampler import EpochShuffleSampler
from fcn3_lightning.data.statics import LAND_SEA_MASK_VARIABLE, OROGRAPHY_VARIABLE, static_channels
from fcn3_lightning.data.stats import ChannelStats, Normalizer, check_units, compute_stats, default_modes, merge_statistics
from fcn3_lightning.data.store import WB2Store
from fcn3_lightning.data.zenith import cos_zenith
from fcn3_lightning.memory import keep_freed_memory
from fcn3_lightning.parallel.strategy import layout_of
from fcn3_lightning.paths import StoreError, store_location


def loader_worker_init(worker_id: int) -> None:
    """A loader worker only reads: glibc keeps the buffers it frees (Zarr chunks, HTTP bodies, decoded blocks) in the heap for
    the next sample instead of unmapping them and zero-filling fresh pages on the next touch (:func:`keep_freed_memory`).
    That page-fault churn cost about a third of a worker's CPU per sample (``bench/loader.py``), and over HTTP, where every
    chunk also arrives in 256 KiB socket reads, more: the per-request client overhead was mostly page faults."""
    keep_freed_memory()


class ForecastDataset(Dataset):
    """Samples whose input and every target lie in ``start .. end`` of the store.

    On a store with ensemble members (:attr:`WB2Store.members`) every member is a sample source of its own
    (members as extra samples), member-major: sample ``index`` is member ``index // n_times`` at input time
    ``starts[index % n_times]``, with ``n_times = len(starts)``. Member 0's samples keep the indices (and so
    the noise streams) they would have in a store of that member alone. Input and targets of a sample always
    come from its member; ``time`` is the input's valid time, so the members of one time share it.
    """

    def __init__(
        self,
        store: WB2Store,
        normalizer: Normalizer,
        start: str,
        end: str,
        n_targets: int,
        *,
        lat: slice = slice(None),
        lon: slice = slice(None),
        init_every_hours: int | None = None,
        on_device: bool = False,
    ):
        if n_targets < 0:
            raise ValueError(f"n_targets must be >= 0, got {n_targets}")
        self.store, self.normalizer, self.n_targets = store, normalizer, n_targets
        # on_device: leave normalisation and the NaN check to the data module's on-device hook; the
        # loader then does little beyond the Zarr read (bench/loader.py)
        self.on_device = on_device
        self.lat, self.lon = lat, lon
        i0, i1 = store.index_range(start, end)
        last = i1 - n_targets * store.stride
        starts = np.arange(i0, last + 1)
        if init_every_hours:
            hours = (store.times[starts] - store.times[0]) / np.timedelta64(1, "h")
            starts = starts[hours % init_every_hours == 0]
        if starts.size == 0:
            raise ValueError(
                f"{store.path}: no sample with {n_targets} targets of {store.step_hours} h fits in {start} .. {end} "
                f"({i1 - i0 + 1} store times)"
            )
        self.starts = starts
        self.members = store.members  # None: a store without a member dimension, one sample per input time
        self._lat_deg, self._lon_deg = store.lat[lat], store.lon[lon]

    def __len__(self) -> int:
        return int(self.starts.size) * (self.members or 1)

    def member(self, index: int) -> int | None:
        """The member (position on the store's ``number`` axis) of sample ``index``; None for a store without members."""
        return None if self.members is None else int(index) // self.starts.size

    def start(self, index: int) -> int:
        """The store time index of sample ``index``'s input."""
        return int(self.starts[int(index) % self.starts.size])

    def times(self, index: int) -> np.ndarray:
        """Valid times of the input and the targets of sample ``index``."""
        t = self.start(index) + self.store.stride * np.arange(self.n_targets + 1)
        return self.store.times[t]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([index])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A whole collated batch, read straight into one buffer (in shared memory inside a loader worker).

        The DataLoader calls this instead of ``__getitem__`` per sample; reading into the batch
        buffer saves the copy that stacking samples would cost (a 721x1440 sample is ~600 MB).
        """
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"sample index {i} out of range for {len(self)} samples")
        steps = self.n_targets + 1
        h, w = self._lat_deg.size, self._lon_deg.size
        buf = _empty((len(indices), steps, len(self.normalizer.channels), h, w))
        zen = _empty((len(indices), steps, h, w))
        for b, i in enumerate(indices):
            t_idx = self.start(i) + self.store.stride * np.arange(steps)
            x = buf[b].numpy()
            self.store.read(t_idx, self.lat, self.lon, member=self.member(i), check_finite=not self.on_device, out=x)
            if not self.on_device:
                self.normalizer.normalize(x, out=x)
            zen[b] = torch.from_numpy(cos_zenith(self.store.times[t_idx], self._lat_deg, self._lon_deg))
        return {
            "input": buf[:, 0],
            "target": buf[:, 1:],
            "zenith": zen,
            "time": torch.from_numpy(self.store.times[[self.start(i) for i in indices]].astype(np.int64)),
            "index": torch.as_tensor(list(indices), dtype=torch.int64),
        }


class WB2DataModule(L.LightningDataModule):
    """ERA5 (or any WB2-style store) for training, validation and testing; the default world when no path is given.

    Args:
        data_path: the Zarr store, a local path or a URL (``https://``, ``gs://``, ``s3://``: read in place, concurrently);
            None uses the embedded default world (generated once into a cache).
        storage_options: fsspec options for a URL ``data_path`` (default: anonymous for gs:// and s3://; see
            :mod:`fcn3_lightning.paths`).
        channels: prognostic channels; default FCN3's 72 (the default world's own list without a path).
        aux_channels: auxiliary model inputs in order; only ``xzen`` and the static ones come from here.
        stats_path: statistics file from ``python -m fcn3_lightning stats``; default ``<store>.stats.json`` (required
            for a URL ``data_path``: nothing is written into a bucket).
        train_range, valid_range, test_range: inclusive (start, end) dates of each split.
        step_hours: model step; the store's cadence must divide it (stride over hourly stores).
        train_rollout, valid_rollout: number of targets per sample.
        init_every_hours: only use input times on this cadence (e.g. 6 on an hourly store); default every time.
        batch_size, num_workers: per-process loader settings.
    """

    def __init__(
        self,
        data_path: str | None = None,
        channels: list[str] | None = None,
        aux_channels: list[str] | None = None,
        stats_path: str | None = None,
        train_range: tuple[str, str] | None = None,
        valid_range: tuple[str, str] | None = None,
        test_range: tuple[str, str] | None = None,
        step_hours: int = 6,
        train_rollout: int = 1,
        valid_rollout: int = 4,
        init_every_hours: int | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        storage_options: dict | None = None,
    ):
        super().__init__()
        if data_path is not None:  # a bad location or a URL without its statistics fails here, before any training setup
            location = store_location(data_path, "data.data_path", storage_options)
            if location.remote and not stats_path:
                raise StoreError(
                    f"data.data_path {data_path} is a URL: its statistics cannot be written next to it; compute them once into a "
                    f"local file (python -m fcn3_lightning stats --data {data_path} --start ... --end ... --out era5.stats.json) "
                    "and pass data.stats_path"
                )
        self.save_hyperparameters()
        self.default_world = data_path is None
        if self.default_world:
            from fcn3_lightning.data.default_world import DEFAULT_WORLD_CHANNELS, DEFAULT_WORLD_SPLITS

            channels = channels or list(DEFAULT_WORLD_CHANNELS)
            train_range = train_range or DEFAULT_WORLD_SPLITS["train"]
            valid_range = valid_range or DEFAULT_WORLD_SPLITS["valid"]
            test_range = test_range or DEFAULT_WORLD_SPLITS["test"]
        self.channels = list(channels or FCN3_CHANNELS)
        self.aux_channels = list(FCN3_AUX_CHANNELS if aux_channels is None else aux_channels)
        check_aux_channels(self.aux_channels)
        self.ranges = {"train": train_range, "valid": valid_range, "test": test_range}
        self.lat, self.lon = slice(None), slice(None)
        self._store: WB2Store | None = None
        self._normalizer: Normalizer | None = None
        self._stats: tuple[ChannelStats, dict[str, str]] | None = None  # a model's own (fine-tuning), else the store's
        self._raw_static: tuple[np.ndarray | None, np.ndarray | None] | None = None
        self.datasets: dict[str, ForecastDataset] = {}

    # --- the store, statistics and static fields ---------------------------------------------------

    @property
    def store(self) -> WB2Store:
        if self._store is None:
            path = self.hparams.data_path
            if path is None:
                from fcn3_lightning.data.default_world import ensure_default_world

                path = ensure_default_world(seed=self.hparams.seed)
            options = self.hparams.storage_options if self.hparams.data_path is not None else None
            self._store = WB2Store(path, self.channels, step_hours=self.hparams.step_hours, storage_options=options)
        return self._store

    @property
    def stats_path(self) -> Path:
        if self.hparams.stats_path:
            return Path(self.hparams.stats_path)
        return self.store.location.stats_sibling()  # a local store here: a URL without stats_path was refused in __init__

    def data_statistics(self) -> ChannelStats:
        """The store's statistics file (``stats_path``), checked against the channels and the grid."""
        path = self.stats_path
        if not path.is_file() and self.default_world:  # the default world computes its own, once
            start, end = self.ranges["train"]
            compute_stats(self.store, start, end).save(path)
        stats = ChannelStats.load(path)
        stats.check_compatible(self.channels, self.store.lat, self.store.lon, where=str(path))
        return stats

    @property
    def statistics(self) -> tuple[ChannelStats, dict[str, str]]:
        """The statistics and normalisation modes the samples are normalised with."""
        if self._stats is None:
            self._stats = (self.data_statistics(), default_modes(self.channels))
        return self._stats

    @property
    def normalizer(self) -> Normalizer:
        if self._normalizer is None:
            stats, modes = self.statistics
            self._normalizer = stats.normalizer(self.channels, modes)
        return self._normalizer

    def use_model_statistics(self, stats: ChannelStats, modes: dict[str, str], source: str) -> list[str]:
        """Normalise as a model was trained (fine-tuning): its statistics and modes for the channels it has, the
        store's for the others; the tendency statistics (loss weights) stay the store's. A channel whose scale differs
        from the model's by orders of magnitude (other units) raises here. Returns the channels taken from the store."""
        data = self.data_statistics()
        check_units(data, stats, [c for c in self.channels if c in stats.channels], source, str(self.stats_path))
        merged, new = merge_statistics(stats, data, self.channels)
        self._stats = (merged, {c: modes.get(c, default_modes([c])[c]) if c not in new else default_modes([c])[c] for c in self.channels})
        self._normalizer = None
        self.datasets.clear()
        return new

    def use_static_fields(self, orography: np.ndarray | None, land_sea_mask: np.ndarray | None) -> None:
        """Raw static fields (surface geopotential, land-sea mask) to use instead of the store's: a model's own."""
        self._raw_static = (orography, land_sea_mask)

    def raw_static_fields(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The raw (orography, land-sea mask) the auxiliary channels are made from (None where none is needed)."""
        if self._raw_static is not None:
            return self._raw_static
        wanted = set(self.aux_channels) & set(STATIC_AUX)
        oro = self.store.read_static(OROGRAPHY_VARIABLE) if "xoro" in wanted else None
        lsm = self.store.read_static(LAND_SEA_MASK_VARIABLE) if wanted & {"xlsml", "xlsms"} else None
        return oro, lsm

    @property
    def static(self) -> torch.Tensor:
        """Static auxiliary channels (orography, land-sea one-hot) of the current tile: ``(S, h, w)``."""
        full = static_channels(self.aux_channels, self.store.shape, *self.raw_static_fields())
        return torch.from_numpy(np.ascontiguousarray(full[:, self.lat, self.lon]))

    def set_tile(self, lat: slice, lon: slice) -> None:
        """Read only this latitude/longitude tile (indices of the 90N-first grid) from now on."""
        if (lat, lon) != (self.lat, self.lon):
            self.lat, self.lon = lat, lon
            self.datasets.clear()

    # --- Lightning hooks -----------------------------------------------------------------------------

    def dataset(self, split: str) -> ForecastDataset:
        if split not in self.datasets:
            rng = self.ranges[split]
            if rng is None:
                raise ValueError(f"no {split}_range configured for {self.store.path}")
            n = self.hparams.train_rollout if split == "train" else self.hparams.valid_rollout
            self.datasets[split] = ForecastDataset(
                self.store,
                self.normalizer,
                rng[0],
                rng[1],
                n,
                lat=self.lat,
                lon=self.lon,
                init_every_hours=self.hparams.init_every_hours,
                on_device=True,
            )
        return self.datasets[split]

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict[str, torch.Tensor]:
        """Normalise on the device (cheap there; the loader stays at the raw Zarr read rate) and refuse NaN/Inf."""
        return normalize_batch(batch, self.normalizer, self.channels, self.hparams.step_hours)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:  # every sample is read on the tile the strategy's layout gives this rank
            self.set_tile(*layout_of(self.trainer.strategy).tile(self.store.shape))
        splits = {"fit": ["train", "valid"], "validate": ["valid"], "test": ["test"], "predict": ["test"]}.get(stage or "fit", [])
        for split in splits:
            self.dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        workers = self.hparams.num_workers
        dataset = self.dataset(split)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            # the order depends on (seed, epoch) only: a resumed run replays the uninterrupted run's order
            sampler=EpochShuffleSampler(len(dataset), self.hparams.seed) if shuffle else None,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=loader_worker_init if workers else None,
            pin_memory=torch.cuda.is_available(),
            drop_last=shuffle,
            collate_fn=collate_batch,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def normalize_batch(
    batch: dict[str, torch.Tensor], normalizer: Normalizer, channels: list[str], step_hours: int
) -> dict[str, torch.Tensor]:
    """Normalise ``input`` and ``target`` of a collated batch of physical values; NaN/Inf raise, naming channel and time."""
    for key, steps in (("input", 0), ("target", 1)):
        v = batch[key]
        if not torch.isfinite(v).all():
            b, *rest = (int(i) for i in torch.nonzero(~torch.isfinite(v))[0])
            k, c = (rest[0] + steps, rest[1]) if key == "target" else (0, rest[0])
            when = np.datetime64(int(batch["time"][b]), "ns") + np.timedelta64(k * step_hours, "h")
            raise ValueError(f"NaN/Inf in the data: channel {channels[c]} at time {when} (sample {int(batch['index'][b])})")
        batch[key] = normalizer.normalize(v, axis=-3)
    return batch


def collate_batch(batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pass through batches built by :meth:`ForecastDataset.__getitems__`; collate lists of samples as usual."""
    return batch if isinstance(batch, dict) else default_collate(batch)


def _empty(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor; allocated in shared memory inside a loader worker (as default_collate
    does), so the batch crosses to the main process without another copy."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    storage = torch.empty(0, dtype=torch.float32)._typed_storage()._new_shared(int(np.prod(shape)), device="cpu")
    return torch.empty(0, dtype=torch.float32).new(storage).view(shape)
