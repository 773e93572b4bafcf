"""Small extensions of the metric classes for the harness, without changing their formulas.

* :class:`SkipNaN`: with ``--skipna``, non-finite points drop out of each field's spatial mean (the region's
  area weights renormalised over the remaining points, as WB2's NaN-skipping averages do);
* :class:`Recording`: keeps the per-forecast spatial means of the recorded regions (the ``_temporal`` rows), and
  :func:`per_forecast` turns them into per-forecast scores with the class's own ``compute`` formulas;
* :class:`NaNRankHistogram`: the rank histogram with NaN points excluded (a NaN compares false, so the plain
  class would count it in bin 0);
* :func:`shared_region_weights`: metric objects built inside it compute their region weights once and share them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

import fcn3_lightning.metrics.base as _base
import fcn3_lightning.metrics.ensemble as _ensemble
from fcn3_lightning.metrics.base import GriddedMetric
from fcn3_lightning.metrics.ensemble import RankHistogram
from fcn3_lightning.metrics.regions import region_weights


class SkipNaN:
    """Mixin (before a :class:`GriddedMetric` class): NaN-skipping spatial means."""

    def _spatial_mean(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        finite = torch.isfinite(x)
        if bool(finite.all()):
            return super()._spatial_mean(x, weights)  # type: ignore[misc]
        num = super()._spatial_mean(torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)), weights)  # type: ignore[misc]
        den = super()._spatial_mean(finite.to(x.dtype), weights)  # type: ignore[misc]
        return num / den


class Recording:
    """Mixin: ``record_regions`` (indices into the metric's regions) set -> ``recorded`` holds the last update's
    per-forecast ``(B, region, lead, channel)`` sums of those regions."""

    record_regions: list[int] | None = None
    recorded: dict[str, Tensor] | None = None

    def _accumulate(self, n: int, **sums: Tensor) -> None:
        if self.record_regions:
            idx = torch.as_tensor(self.record_regions, dtype=torch.long, device=next(iter(sums.values())).device)
            self.recorded = {k: v.index_select(-1, idx).movedim(-1, 1).detach().clone() for k, v in sums.items()}
        super()._accumulate(n, **sums)  # type: ignore[misc]


class NaNRankHistogram(RankHistogram):
    """:class:`RankHistogram` whose one-hot ranks are NaN where the truth or a member is NaN (then skipped)."""

    def update(self, pred: Tensor, target: Tensor) -> None:
        x, o = self._check_pair(pred, target)
        invalid = ~torch.isfinite(o) | ~torch.isfinite(x).all(1)
        onehot = self._onehot_ranks(x, o).masked_fill(invalid.unsqueeze(-1), float("nan"))
        self._accumulate_ranks(x.shape[0], onehot)


@cache
def variant(cls: type[GriddedMetric], skipna: bool, record: bool) -> type[GriddedMetric]:
    """``cls`` with the :class:`SkipNaN` and/or :class:`Recording` mixins (one class object per combination)."""
    if skipna and issubclass(cls, RankHistogram):
        cls = NaNRankHistogram
    bases: tuple[type, ...] = ((Recording,) if record else ()) + ((SkipNaN,) if skipna else ()) + (cls,)
    if len(bases) == 1:
        return cls
    return type(f"{cls.__name__}{'Recorded' if record else ''}{'SkipNaN' if skipna else ''}", bases, {})


def per_forecast(metric: GriddedMetric) -> dict[str, Tensor]:
    """Per-forecast scores ``(B, region, lead, channel)`` of the last update's recorded regions.

    The class's own ``compute`` (unwrapped: no torchmetrics caching or syncing) runs on states that hold one
    forecast each, with (batch x recorded region) in place of the region axis and a forecast count of 1; the
    metric's accumulated states are restored afterwards.
    """
    recorded: dict[str, Any] | None = getattr(metric, "recorded", None)
    if not recorded:
        raise RuntimeError(f"{type(metric).__name__} recorded nothing (record_regions unset or no update)")
    first = next(iter(recorded.values()))
    b, r = first.shape[:2]
    flat = (b * r, *first.shape[2:])
    saved = {name: getattr(metric, name) for name in [*recorded, "n_forecasts"]}
    try:
        for name, value in recorded.items():
            setattr(metric, name, value.reshape(b * r, *value.shape[2:]))
        metric.n_forecasts = torch.ones((), dtype=metric.compute_dtype, device=first.device)
        values = type(metric).compute(metric)
    finally:
        for name, value in saved.items():
            setattr(metric, name, value)
    return {k: v.reshape(first.shape) for k, v in values.items() if v.shape == flat}


@contextlib.contextmanager
def shared_region_weights(memo: dict[tuple, np.ndarray] | None = None) -> Iterator[None]:
    """Memoise ``region_weights`` for the metric objects constructed inside (the same function and values).

    Every metric object computes its ``(regions, lat, lon)`` weights in ``__init__`` (~10 ms, 3.7 MB for 16 regions
    at 1.5 degrees); the harness builds ~15 objects per channel group and lead range, hundreds in all. Inside this
    context the weights of equal arguments are computed once and the objects' float64 buffers share that memory
    (``torch.as_tensor`` of the same array); pass the same ``memo`` to share across contexts. Restored on exit;
    not thread-safe (construct in one thread).
    """
    memo = {} if memo is None else memo

    def cached(lat: Any, lon: Any, regions: Any, land_sea_mask: Any = None, *, area: bool = True) -> np.ndarray:
        lsm = None if land_sea_mask is None else np.asarray(land_sea_mask, dtype=np.float64)
        key = (
            np.asarray(lat, dtype=np.float64).tobytes(),
            np.asarray(lon, dtype=np.float64).tobytes(),
            tuple(getattr(r, "name", r) for r in regions),
            tuple(r for r in regions if not isinstance(r, str)),
            None if lsm is None else lsm.tobytes(),
            area,
        )
        if key not in memo:
            memo[key] = region_weights(lat, lon, regions, land_sea_mask, area=area)
        return memo[key]

    saved = (_base.region_weights, _ensemble.region_weights)
    _base.region_weights = _ensemble.region_weights = cached  # type: ignore[assignment]
    try:
        yield
    finally:
        _base.region_weights, _ensemble.region_weights = saved
