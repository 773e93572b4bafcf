"""The common machinery of the gridded forecast metrics: shapes, area weights, tiles and process groups.

Every metric follows WeatherBench2: a score is first reduced to one number per forecast (initial time)
by an area-weighted spatial mean over each region, and only then averaged over forecasts, separately
per region, lead time and channel. States are sums over forecasts plus a forecast count, so they add
across data-parallel ranks (torchmetrics' sum reduction over ``process_group``, by default the world).

Spatial sharding: a rank may hold only a latitude/longitude ``tile`` of the grid. Its weighted partial
sums are then all-reduced over ``spatial_group`` (the ranks that share the sample's tiles) before any
nonlinear step, so every per-forecast spatial mean is the full-grid one, and only the first rank of the
spatial group adds it to the state: counts are counted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torchmetrics import Metric

from fcn3_lightning.metrics.regions import Region, RegionWeights, region_weights, resolve_regions
from fcn3_lightning.parallel.comm import all_reduce_, group_rank

Tile = tuple[slice, slice]

_DIM_NAMES = ("batch", "member", "lead time", "channel", "latitude", "longitude")


def _full_tile(tile: Tile | None, nlat: int, nlon: int) -> Tile:
    if tile is None:
        return slice(0, nlat), slice(0, nlon)
    lat, lon = tile
    lat = slice(*lat.indices(nlat)[:2])
    lon = slice(*lon.indices(nlon)[:2])
    if lat.stop <= lat.start or lon.stop <= lon.start:
        raise ValueError(f"empty tile: latitude {lat}, longitude {lon} of a {nlat}x{nlon} grid")
    return lat, lon


class GriddedMetric(Metric):
    """Base class: per-(region, lead, channel) sums of per-forecast spatial means, and a forecast count.

    Args:
        lat, lon: the full grid's coordinates in degrees (any latitude order; longitudes equally spaced).
        channels: channel names, in the order of the inputs' channel dimension (labels only).
        lead_hours: lead time of each index of the inputs' lead dimension (labels and climatology lookups).
        regions: region names of :data:`~fcn3_lightning.metrics.regions.REGIONS` or :class:`Region` objects.
        land_sea_mask: fractional land-sea mask ``(nlat, nlon)`` for the land regions.
        tile: ``(lat_slice, lon_slice)`` of the full grid that this rank's inputs cover (default: all).
        spatial_group: process group of the ranks that hold the other tiles of the same samples; required
            when ``tile`` is not the full grid.
        dtype: computation dtype (float64: WB2's float32 numbers are reproduced to ~1e-7).
        skipna: non-finite points drop out of each field's spatial mean, the region's weights renormalised over the
            remaining points (WB2's NaN-skipping averages); a field without a finite point in a region gives NaN there.
        record_regions: indices into ``regions`` whose per-forecast values each update keeps (:attr:`recorded`, read by
            :meth:`per_forecast`); default none.
        weights_cache: a :class:`~fcn3_lightning.metrics.regions.RegionWeights` shared by many metric objects, so the
            region weights of one grid are computed and held once (default: computed for this object).
        **kwargs: torchmetrics options (``process_group``, ``sync_on_compute``, ...).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    #: whether inputs carry a member dimension after the batch dimension
    ensemble = False
    #: fewest members the metric accepts (ensemble metrics)
    min_members = 1

    def __init__(
        self,
        lat: Sequence[float] | np.ndarray,
        lon: Sequence[float] | np.ndarray,
        channels: Sequence[str],
        lead_hours: Sequence[float],
        *,
        regions: Sequence[str | Region] = ("global",),
        land_sea_mask: np.ndarray | None = None,
        tile: Tile | None = None,
        spatial_group: Any = None,
        dtype: torch.dtype = torch.float64,
        skipna: bool = False,
        record_regions: Sequence[int] | None = None,
        weights_cache: RegionWeights | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.lat = np.asarray(lat, dtype=np.float64)
        self.lon = np.asarray(lon, dtype=np.float64)
        self.channels = [str(c) for c in channels]
        self.lead_hours = [float(h) for h in lead_hours]
        if not self.channels:
            raise ValueError("channels is empty")
        if not self.lead_hours:
            raise ValueError("lead_hours is empty")
        if len(set(self.channels)) != len(self.channels):
            raise ValueError(f"duplicate channel names in {self.channels}")
        self.regions = resolve_regions(regions)
        self.region_names = [r.name for r in self.regions]
        nlat, nlon = self.lat.size, self.lon.size
        self.tile = _full_tile(tile, nlat, nlon)
        self.sharded = (self.tile[0].stop - self.tile[0].start, self.tile[1].stop - self.tile[1].start) != (nlat, nlon)
        if self.sharded and spatial_group is None:
            raise ValueError(
                f"inputs cover only the tile {self.tile} of the {nlat}x{nlon} grid: pass spatial_group, the process group "
                "of the ranks holding the other tiles, so that spatial means are taken over the whole grid"
            )
        # no group when the inputs cover the whole grid: the collectives below then do nothing
        self.spatial_group = spatial_group if self.sharded else None
        self.compute_dtype = dtype
        self.land_sea_mask = land_sea_mask
        self.skipna = bool(skipna)
        self.record_regions: list[int] | None = list(record_regions) if record_regions else None
        #: the last update's per-forecast ``(B, recorded region, ...)`` spatial means, when ``record_regions`` is set
        self.recorded: dict[str, Tensor] | None = None
        w = (weights_cache or region_weights)(self.lat, self.lon, self.regions, land_sea_mask)
        self.register_buffer("weights", torch.as_tensor(w[:, self.tile[0], self.tile[1]], dtype=dtype), persistent=False)
        self.add_state("n_forecasts", default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")
        # the ensemble size as a state, so that a rank without forecasts knows it after the sync
        self.add_state("members", default=torch.zeros((), dtype=dtype), dist_reduce_fx="max")
        self.n_members: int | None = None
        self._fixed_members = False

    def reset(self) -> None:
        super().reset()
        if not self._fixed_members:
            self.n_members = None

    # --- helpers for subclasses ---------------------------------------------------------------------

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return len(self.regions), len(self.lead_hours), len(self.channels)

    def _add_states(self, *names: str, shape: tuple[int, ...] | None = None) -> None:
        for name in names:
            self.add_state(name, default=torch.zeros(shape or self.state_shape, dtype=self.compute_dtype), dist_reduce_fx="sum")

    @property
    def local_shape(self) -> tuple[int, int]:
        return self.tile[0].stop - self.tile[0].start, self.tile[1].stop - self.tile[1].start

    def check(self, name: str, x: Tensor, ensemble: bool) -> None:
        """Raise a clear error unless ``x`` is (batch, [member,] lead, channel, lat, lon) of this metric."""
        dims = _DIM_NAMES if ensemble else _DIM_NAMES[:1] + _DIM_NAMES[2:]
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != len(dims):
            raise ValueError(
                f"{type(self).__name__}: {name} must have {len(dims)} dimensions ({', '.join(dims)}), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__}: {name} must be floating point, got {x.dtype}")
        expected = {
            "lead time": (len(self.lead_hours), f"lead_hours={self.lead_hours}"),
            "channel": (len(self.channels), f"channels={self.channels}"),
            "latitude": (self.local_shape[0], "its latitude tile" if self.sharded else f"{self.lat.size} latitudes"),
            "longitude": (self.local_shape[1], "its longitude tile" if self.sharded else f"{self.lon.size} longitudes"),
        }
        for i, dim in enumerate(dims):
            if dim in expected and x.shape[i] != expected[dim][0]:
                raise ValueError(
                    f"{type(self).__name__}: {name} has {x.shape[i]} along the {dim} dimension (dim {i} of {tuple(x.shape)}), "
                    f"the metric was built for {expected[dim][0]} ({expected[dim][1]})"
                )
        if ensemble:
            m = x.shape[1]
            if m < self.min_members:
                raise ValueError(
                    f"{type(self).__name__} is an ensemble metric and needs at least {self.min_members} members; "
                    f"{name} has {m} along the member dimension (dim 1 of {tuple(x.shape)})"
                )
            if self.n_members is not None and m != self.n_members:
                raise ValueError(f"{type(self).__name__}: {name} has {m} members, earlier updates had {self.n_members}")
            self.n_members = m
            self.members.fill_(m)

    def check_pair(self, pred: Tensor, target: Tensor, ensemble: bool | None = None) -> None:
        """Raise a clear error unless ``pred`` and ``target`` are inputs of this metric (and record the ensemble size)."""
        ensemble = self.ensemble if ensemble is None else ensemble
        self.check("target", target, ensemble=False)
        self.check("pred", pred, ensemble=ensemble)
        p_shape = pred.shape[:1] + pred.shape[2:] if ensemble else pred.shape
        if p_shape != target.shape:
            raise ValueError(
                f"{type(self).__name__}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ"
                + (" (beyond the member dimension 1 of pred)" if ensemble else "")
            )

    def _check_pair(self, pred: Tensor, target: Tensor, ensemble: bool | None = None) -> tuple[Tensor, Tensor]:
        self.check_pair(pred, target, ensemble)
        return pred.to(self.compute_dtype), target.to(self.compute_dtype)

    def reduce_tiles(self, x: Tensor) -> Tensor:
        """Sum this rank's partial spatial sums over the tiles of the sample (in place; nothing when unsharded)."""
        return all_reduce_(x, self.spatial_group)

    def spatial_mean(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """Per-region area-weighted means over the full grid: ``(..., lat, lon)`` -> ``(..., R)``.

        With ``skipna``, non-finite points drop out (the weights renormalised over the others). ``x`` in another
        dtype than the metric's (float32 pointwise work) is summed in the metric's dtype: a float32 GEMM's rounding
        depends on the block's shape (BLAS blocking), so scores of the same data blocked differently would differ by
        ~1e-6; in float64 they agree to ~1e-15. Converted in chunks, the float64 copy stays small.
        """
        if self.skipna:
            finite = torch.isfinite(x)
            if not bool(finite.all()):
                num = self._weighted_mean(torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)), weights)
                den = self._weighted_mean(finite.to(x.dtype), weights)
                return num / den
        return self._weighted_mean(x, weights)

    def _weighted_mean(self, x: Tensor, weights: Tensor | None) -> Tensor:
        w = self.weights if weights is None else weights
        if x.dtype != w.dtype and not self.sharded:
            # the einsum's product as (fields, points) @ (points, regions) in chunks of ~64 MB of float64
            *lead, h, wd = x.shape
            flat, wt = x.reshape(-1, h * wd), w.reshape(w.shape[0], h * wd).T
            step = max(1, (1 << 23) // (h * wd))
            out = torch.cat([flat[i : i + step].to(w.dtype) @ wt for i in range(0, flat.shape[0], step)])
            return out.reshape(*lead, w.shape[0])
        return self.reduce_tiles(torch.einsum("...hw,rhw->...r", x.to(w.dtype), w))

    @property
    def _counts_here(self) -> bool:
        """Whether this rank adds the (all-reduced) per-forecast values: the first rank of its spatial group only."""
        return group_rank(self.spatial_group) == 0

    #: the region axis of the per-forecast values given to :meth:`_accumulate` (moved first in the states)
    region_axis = -1

    def update_from_means(self, **means: Tensor) -> None:
        """Update from the per-forecast spatial means (:meth:`spatial_mean`, ``(batch, ..., region)``) of the
        pointwise quantities that :meth:`update` computes, named as the class's docstring lists them.

        The per-forecast formulas and the states are the class's own: a caller that computes the pointwise
        quantities another way (fused, compiled) gets the same scores. Validate the inputs with :meth:`check_pair`.
        """
        # the bookkeeping of torchmetrics' wrapped update (not a wrapped closure: copies and pickles of the metric
        # must not call back into the original object): drop the cached result, count the call
        self._computed = None
        self._update_count += 1
        with torch.no_grad():
            self._add_means(**means)

    def _add_means(self, **means: Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no update from spatial means")

    def _accumulate(self, n: int, **sums: Tensor) -> None:
        """Add per-forecast values ``(B, ..., R)`` (from :meth:`spatial_mean`) to states laid out ``(R, ...)``."""
        if self.record_regions:
            idx = torch.as_tensor(self.record_regions, dtype=torch.long, device=next(iter(sums.values())).device)
            self.recorded = {k: v.index_select(-1, idx).movedim(-1, 1).detach().clone() for k, v in sums.items()}
        if not self._counts_here:
            return
        for name, value in sums.items():
            total = value.sum(0)
            setattr(self, name, getattr(self, name) + total.movedim(self.region_axis, 0))
        self.n_forecasts += n

    def per_forecast(self) -> dict[str, Tensor]:
        """Per-forecast scores ``(B, region, lead, channel)`` of the last update's recorded regions.

        The class's own ``compute`` (unwrapped: no torchmetrics caching or syncing) runs on states that hold one
        forecast each, with (batch x recorded region) in place of the region axis and a forecast count of 1; the
        accumulated states are restored afterwards.
        """
        recorded = self.recorded
        if not recorded:
            raise RuntimeError(f"{type(self).__name__} recorded nothing (record_regions unset or no update)")
        first = next(iter(recorded.values()))
        b, r = first.shape[:2]
        flat = (b * r, *first.shape[2:])
        saved = {name: getattr(self, name) for name in [*recorded, "n_forecasts"]}
        try:
            for name, value in recorded.items():
                setattr(self, name, value.reshape(b * r, *value.shape[2:]))
            self.n_forecasts = torch.ones((), dtype=self.compute_dtype, device=first.device)
            values = type(self).compute(self)
        finally:
            for name, value in saved.items():
                setattr(self, name, value)
        return {k: v.reshape(first.shape) for k, v in values.items() if v.shape == flat}

    def _mean(self, name: str) -> Tensor:
        if not self.n_forecasts > 0:
            raise RuntimeError(f"{type(self).__name__}.compute() called before any update")
        return getattr(self, name) / self.n_forecasts

    # --- output -------------------------------------------------------------------------------------

    def to_dataframe(self, values: dict[str, Tensor] | None = None) -> pd.DataFrame:
        """Long-form table (metric, region, lead_time_hours, channel, value) of ``compute()``'s (R, L, C) results."""
        values = self.compute() if values is None else values
        rows = []
        for metric, v in values.items():
            a = v.detach().cpu().double().numpy()
            if a.shape != self.state_shape:
                continue
            for (r, lead, c), x in np.ndenumerate(a):
                rows.append((metric, self.region_names[r], self.lead_hours[lead], self.channels[c], float(x)))
        return pd.DataFrame(rows, columns=["metric", "region", "lead_time_hours", "channel", "value"])
