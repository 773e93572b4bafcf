"""Normalisation statistics per channel, and the normaliser that uses them (reference section 1.3).

Statistics are area-weighted (WB2 cell-area weights), accumulated in float64 over every store time
of the training range (and every member of a store with an ensemble-member dimension, the samples the
model trains on): mean, std, min, max, and the mean and std of the tendency over one model step (within
a member). Water channels (q*, tcwv) are min-max scaled with their minimum set to 0, everything else is
z-scored; standard deviations are floored at 1e-4 (in physical units), as in the reference.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fcn3_lightning.channels import parse_channel
from fcn3_lightning.data.store import WB2Store
from fcn3_lightning.grid import cell_area_weights
from fcn3_lightning.io import atomic_path
from fcn3_lightning.progress import progress_bar

FORMAT = "fcn3_lightning.stats/v1"
STD_FLOOR = 1e-4


class _Moments:
    """Weighted mean and second central moment per channel, merged chunk by chunk (Chan et al.)."""

    def __init__(self, n_channels: int):
        self.weight = 0.0
        self.mean = np.zeros(n_channels)
        self.m2 = np.zeros(n_channels)

    def update(self, x: np.ndarray, w: np.ndarray) -> None:
        """``x`` (T, C, H, W) float64, ``w`` (H, W) area weights."""
        wsum = w.sum() * x.shape[0]
        mean = np.einsum("tchw,hw->c", x, w) / wsum
        m2 = np.einsum("tchw,hw->c", (x - mean[None, :, None, None]) ** 2, w)
        total = self.weight + wsum
        delta = mean - self.mean
        self.mean = self.mean + delta * (wsum / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.weight * wsum / total)
        self.weight = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.weight)


@dataclass
class ChannelStats:
    """Statistics of a channel list on one grid, as written by ``python -m fcn3_lightning stats``."""

    channels: list[str]
    grid: dict
    source: dict = field(default_factory=dict)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    min: list[float] = field(default_factory=list)
    max: list[float] = field(default_factory=list)
    time_diff_mean: list[float] = field(default_factory=list)
    time_diff_std: list[float] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> ChannelStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"stats file {path} does not exist (write one with: python -m fcn3_lightning stats ...)")
        blob = json.loads(path.read_text())
        if blob.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} stats file")
        return cls(**blob)

    def check_compatible(self, channels: Sequence[str], lat: np.ndarray, lon: np.ndarray, where: str = "stats") -> None:
        """Refuse statistics computed for other channels or another grid (it would silently mis-scale)."""
        missing = [c for c in channels if c not in self.channels]
        if missing:
            raise ValueError(f"{where}: computed for channels {self.channels}, which lack {missing}")
        grid = _grid_signature(lat, lon)
        if grid != self.grid:
            raise ValueError(f"{where}: computed on grid {self.grid}, but the data grid is {grid}")

    def normalizer(self, channels: Sequence[str], modes: dict[str, str] | None = None) -> Normalizer:
        """The normaliser of ``channels``: ``modes`` maps a channel to "minmax" or "zscore" (a model package's
        ``normalization``); without it, min-max for the water channels (q*, r*, tcwv) and z-score otherwise."""
        missing = [c for c in channels if c not in self.channels]
        if missing:
            raise ValueError(f"the statistics ({self.source.get('file', 'stats')}) have no channels {missing}")
        idx = [self.channels.index(c) for c in channels]
        modes = default_modes(channels) if modes is None else modes
        bad = {c: m for c, m in modes.items() if m not in ("minmax", "zscore")}
        if bad:
            raise ValueError(f"unknown normalisation modes {bad}; expected 'minmax' or 'zscore'")
        minmax = np.array([modes.get(c, "zscore") == "minmax" for c in channels])
        mean, std = np.array(self.mean)[idx], np.array(self.std)[idx]
        lo, hi = np.array(self.min)[idx], np.array(self.max)[idx]
        offset = np.where(minmax, lo, mean)
        scale = np.where(minmax, hi - lo, std)
        if np.any(scale <= 0):
            bad_channels = [channels[i] for i in np.flatnonzero(scale <= 0)]
            raise ValueError(f"channels {bad_channels} have zero range in the statistics; they cannot be normalised")
        tendency = np.array(self.time_diff_std)[idx] if self.time_diff_std else None
        return Normalizer(list(channels), offset, scale, tendency)


#: a channel whose spread in the data differs from a model's statistics by this factor or more is in other units
UNITS_FACTOR = 5.0
_UNIT_HINTS = (
    (9.80665, "geopotential height (m) vs geopotential (m2 s-2)"),
    (100.0, "Pa vs hPa"),
    (1000.0, "kg kg-1 vs g kg-1, or m vs mm"),
)


def check_units(data: ChannelStats, model: ChannelStats, channels: Sequence[str], model_source: str, data_source: str) -> None:
    """Refuse data whose channels are in other units than a model's statistics (its spread differs by a factor of
    ``UNITS_FACTOR`` or more), naming each channel, both figures and the likely mix-up; say loudly (without refusing)
    where the spread agrees but the mean lies more than 10 of the model's standard deviations away (an offset
    such as K vs degC, or another climate)."""
    bad, far = [], []
    for c in channels:
        i, j = data.channels.index(c), model.channels.index(c)
        ds, ms = float(data.std[i]), float(model.std[j])
        ratio = ds / ms if ms > 0 else float("inf")
        if not 1 / UNITS_FACTOR < ratio < UNITS_FACTOR:
            # the nearest usual mix-up within a factor of 2 (the model's statistics are of another period or data)
            factor = max(ratio, 1 / ratio)
            hint = next(
                (h for f, h in sorted(_UNIT_HINTS, key=lambda fh: abs(np.log(factor / fh[0]))) if abs(np.log(factor / f)) < np.log(2)), None
            )
            bad.append(
                f"{c}: std {ds:.4g} in the data, {ms:.4g} in the model's statistics (x{ratio:.3g})"
                + (f", as between {hint}" if hint else "")
            )
        elif abs(float(data.mean[i]) - float(model.mean[j])) > 10 * ms:
            far.append(f"{c} (mean {float(data.mean[i]):.4g} vs {float(model.mean[j]):.4g}, std {ms:.4g})")
    if bad:
        raise ValueError(
            f"the data ({data_source}) and the model ({model_source}) disagree in units: "
            + "; ".join(bad[:6])
            + (f"; and {len(bad) - 6} more channels" if len(bad) > 6 else "")
            + ". Convert the "
            "data to the model's units (the model's statistics define what its inputs mean)"
        )
    if far:
        print(
            f"WARNING: the data ({data_source}) lies far from the model's statistics ({model_source}) for {', '.join(far)}: "
            "same spread, another mean. Check the units (e.g. K vs degC); the model normalises these channels as it was trained",
            flush=True,
        )


def merge_statistics(model: ChannelStats, data: ChannelStats, channels: Sequence[str]) -> tuple[ChannelStats, list[str]]:
    """Statistics of ``channels``: a model's where it has the channel, the data's for the others (new channels); the
    tendency statistics are always the data's (they weight the loss on this data). Returns them and the new channels."""
    new = [c for c in channels if c not in model.channels]
    out = ChannelStats(
        list(channels),
        dict(data.grid),
        {"model": dict(model.source), "data": dict(data.source), "from_data": new},
    )
    for key in ("mean", "std", "min", "max"):
        setattr(
            out, key, [float(getattr(data if c in new else model, key)[(data if c in new else model).channels.index(c)]) for c in channels]
        )
    for key in ("time_diff_mean", "time_diff_std"):
        values = getattr(data, key)
        setattr(out, key, [float(values[data.channels.index(c)]) for c in channels] if values else [])
    return out, new


def default_modes(channels: Sequence[str]) -> dict[str, str]:
    """This project's normalisation rule: "minmax" for the water channels (q*, r*, tcwv), "zscore" otherwise."""
    return {c: "minmax" if parse_channel(c).is_water else "zscore" for c in channels}


@dataclass
class Normalizer:
    """x_normalised = (x - offset) / scale per channel (min-max for water channels, z-score otherwise).

    ``time_diff_std``: std of the one-step tendencies (the loss's channel weights); None where the statistics
    have none (a reference model package carries only means, stds, minima and maxima).
    """

    channels: list[str]
    offset: np.ndarray
    scale: np.ndarray
    time_diff_std: np.ndarray | None = None

    def normalize(self, x: np.ndarray | torch.Tensor, axis: int = -3, *, out: np.ndarray | None = None) -> np.ndarray | torch.Tensor:
        """Normalise along the channel ``axis``; ``out=x`` works in place (numpy; the loader's hot path)."""
        shape = [1] * x.ndim
        shape[axis] = -1
        if isinstance(x, torch.Tensor):
            offset = torch.as_tensor(self.offset, dtype=x.dtype, device=x.device).reshape(shape)
            inv_scale = torch.as_tensor(1.0 / self.scale, dtype=x.dtype, device=x.device).reshape(shape)
            return (x - offset) * inv_scale
        offset = self.offset.reshape(shape).astype(x.dtype)
        inv_scale = (1.0 / self.scale).reshape(shape).astype(x.dtype)
        out = np.subtract(x, offset, out=out)
        return np.multiply(out, inv_scale, out=out)

    def denormalize(
        self, x: torch.Tensor | np.ndarray, axis: int = -3, index: Sequence[int] | None = None, *, shift: bool = True
    ) -> torch.Tensor | np.ndarray:
        """Physical values ``x * scale + offset`` of normalised ``x`` along the channel ``axis``.

        ``index``: the channels (positions in :attr:`channels`) that ``x`` holds, default all of them. ``shift=False``:
        ``x * scale`` only, for a spread or a difference, in which the offset cancels.
        """
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, offset = (self.scale, self.offset) if index is None else (self.scale[list(index)], self.offset[list(index)])
        if isinstance(x, torch.Tensor):
            scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device).reshape(shape)
            if not shift:
                return x * scale
            offset = torch.as_tensor(offset, dtype=x.dtype, device=x.device).reshape(shape)
            return x * scale + offset
        if not shift:
            return x * scale.reshape(shape)
        return x * scale.reshape(shape) + offset.reshape(shape)


def _grid_signature(lat: np.ndarray, lon: np.ndarray) -> dict:
    return {"nlat": int(lat.size), "nlon": int(lon.size), "lat": [float(lat[0]), float(lat[-1])], "lon": [float(lon[0]), float(lon[-1])]}


def compute_stats(store: WB2Store, start: str, end: str, *, chunk: int | None = None, progress: bool = True) -> ChannelStats:
    """Statistics of ``store``'s channels over the store times in ``start .. end`` (inclusive).

    On a store with ensemble members (:attr:`WB2Store.members`) over every member and time of the range, each
    (member, time) weighted alike; a tendency is the difference of two times of the same member.
    ``chunk`` store times are read at once (default: as many as fit in about 256 MB of float64).
    """
    i0, i1 = store.index_range(start, end)
    n = i1 - i0 + 1
    if n <= store.stride:
        raise ValueError(f"the range {start} .. {end} holds {n} store times; tendencies need more than {store.stride}")
    w = np.broadcast_to(cell_area_weights(store.lat)[:, None], store.shape)
    c = len(store.channels)
    chunk = chunk or max(1, (256 << 20) // (8 * c * store.shape[0] * store.shape[1]))
    state, tend = _Moments(c), _Moments(c)
    lo, hi = np.full(c, np.inf), np.full(c, -np.inf)
    members = [None] if store.members is None else range(store.members)
    unit = "times" if store.members is None else "member times"
    bar = progress_bar(n * len(members), f"stats of {store.location.name}", unit, disable=not progress)  # lines, not a bar, in a log
    for member in members:
        carry = np.empty((0, c, *store.shape))  # the last `stride` times of the previous chunk, for tendencies
        for a in range(i0, i1 + 1, chunk):
            b = min(a + chunk, i1 + 1)
            x = store.read(range(a, b), member=member).astype(np.float64)
            state.update(x, w)
            lo, hi = np.minimum(lo, x.min(axis=(0, 2, 3))), np.maximum(hi, x.max(axis=(0, 2, 3)))
            both = np.concatenate([carry, x])
            if both.shape[0] > store.stride:
                tend.update(both[store.stride :] - both[: -store.stride], w)
            carry = both[-store.stride :]
            bar.update(b - a)
    bar.close()

    water = np.array([parse_channel(ch).is_water for ch in store.channels])
    lo = np.where(water, 0.0, lo)  # min-max water channels: 0 means physically zero water
    return ChannelStats(
        channels=list(store.channels),
        grid=_grid_signature(store.lat, store.lon),
        source={
            "store": str(store.path),
            "start": str(store.times[i0]),
            "end": str(store.times[i1]),
            "step_hours": store.step_hours,
            **({} if store.members is None else {"members": store.members}),
        },
        mean=state.mean.tolist(),
        std=np.maximum(state.std, STD_FLOOR).tolist(),
        min=lo.tolist(),
        max=hi.tolist(),
        time_diff_mean=tend.mean.tolist(),
        time_diff_std=np.maximum(tend.std, STD_FLOOR).tolist(),
    )
