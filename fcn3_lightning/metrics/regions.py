"""WeatherBench2's evaluation regions as area-weight masks.

A region is a union of inclusive latitude ranges times a union of inclusive longitude ranges (0-360), as
WB2 selects them by label; the land regions multiply the area weights by the fractional land-sea mask.
:func:`region_weights` turns regions into per-point weights that sum to 1 over the region, so a weighted
sum is WB2's area-weighted spatial mean and a latitude or longitude tile of the weights gives the tile's
additive share of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fcn3_lightning.grid import cell_area_weights

# label selection is inclusive; a little slack absorbs float noise in stored coordinates
_EPS = 1e-6

Range = tuple[float, float]


@dataclass(frozen=True)
class Region:
    """Inclusive latitude and longitude (0-360) ranges; several ranges form a union; ``None`` = everything."""

    name: str
    lat: tuple[Range, ...] | None = None
    lon: tuple[Range, ...] | None = None
    land: bool = False

    def mask(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """Boolean ``(nlat, nlon)`` membership of the grid points."""
        in_lat = _in_ranges(np.asarray(lat, dtype=np.float64), self.lat)
        in_lon = _in_ranges(np.mod(np.asarray(lon, dtype=np.float64), 360.0), self.lon)
        return in_lat[:, None] & in_lon[None, :]


def _in_ranges(x: np.ndarray, ranges: tuple[Range, ...] | None) -> np.ndarray:
    if ranges is None:
        return np.ones(x.shape, dtype=bool)
    out = np.zeros(x.shape, dtype=bool)
    for lo, hi in ranges:
        out |= (x >= lo - _EPS) & (x <= hi + _EPS)
    return out


_NORTH, _SOUTH = (20.0, 90.0), (-90.0, -20.0)
#: WB2's predefined regions (``weatherbench2.regions``) and the land regions of its evaluation configs.
REGIONS: dict[str, Region] = {
    r.name: r
    for r in (
        Region("global"),
        Region("tropics", lat=((-20.0, 20.0),)),
        Region("extra-tropics", lat=(_SOUTH, _NORTH)),
        Region("northern-hemisphere", lat=(_NORTH,)),
        Region("southern-hemisphere", lat=(_SOUTH,)),
        Region("europe", lat=((35.0, 75.0),), lon=((347.5, 360.0), (0.0, 42.5))),
        Region("north-america", lat=((25.0, 60.0),), lon=((240.0, 285.0),)),
        Region("north-atlantic", lat=((25.0, 65.0),), lon=((290.0, 350.0),)),
        Region("north-pacific", lat=((25.0, 60.0),), lon=((145.0, 230.0),)),
        Region("east-asia", lat=((25.0, 60.0),), lon=((102.5, 150.0),)),
        Region("ausnz", lat=((-45.0, -12.5),), lon=((120.0, 175.0),)),
        Region("arctic", lat=((60.0, 90.0),)),
        Region("antarctic", lat=((-90.0, -60.0),)),
        Region("global_land", land=True),
        Region("tropics_land", lat=((-20.0, 20.0),), land=True),
        Region("extra-tropics_land", lat=(_SOUTH, _NORTH), land=True),
    )
}


#: the regions WeatherBench-X's public benchmark adds (``public_benchmark/run_benchmark_evaluation.py``); not scored by
#: default, named by ``evaluate --preset wbx`` or ``--regions``
WBX_EXTRA_REGIONS: dict[str, Region] = {
    r.name: r
    for r in (
        Region("northern-africa", lat=((5.0, 32.5),), lon=((347.5, 360.0), (0.0, 37.5))),
        Region("southern-africa", lat=((-30.0, 5.0),), lon=((12.5, 37.5),)),
        Region("south-america", lat=((-40.0, 5.0),), lon=((285.0, 315.0),)),
        Region("west-asia", lat=((15.0, 60.0),), lon=((42.5, 102.5),)),
        Region("south-east-asia", lat=((-12.5, 25.0),), lon=((95.0, 125.0),)),
    )
}
#: every region known by name
ALL_REGIONS: dict[str, Region] = {**REGIONS, **WBX_EXTRA_REGIONS}
#: WeatherBench-X's public benchmark regions: WB2's slice regions without extra-tropics, plus its own five
WBX_REGIONS: tuple[str, ...] = tuple(n for n in REGIONS if n != "extra-tropics" and not REGIONS[n].land) + tuple(WBX_EXTRA_REGIONS)


def resolve_regions(regions: Sequence[str | Region]) -> list[Region]:
    """Look up region names in :data:`ALL_REGIONS`; :class:`Region` objects pass through."""
    if isinstance(regions, str | Region):
        regions = [regions]
    out = []
    for r in regions:
        if isinstance(r, Region):
            out.append(r)
        elif r in ALL_REGIONS:
            out.append(ALL_REGIONS[r])
        else:
            raise ValueError(f"unknown region {r!r}; known regions: {', '.join(ALL_REGIONS)} (or pass a Region)")
    if not out:
        raise ValueError("no regions given; use e.g. regions=['global']")
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate region names in {names}")
    return out


def region_weights(
    lat: np.ndarray, lon: np.ndarray, regions: Sequence[str | Region], land_sea_mask: np.ndarray | None = None, *, area: bool = True
) -> np.ndarray:
    """Weights ``(R, nlat, nlon)`` (float64), each region's summing to 1: cell-edge area weights x membership (x land fraction).

    ``area=False`` weighs every grid point of the region alike (WB2's "unweighted" spatial means).
    """
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if lon.ndim != 1 or lon.size < 1:
        raise ValueError(f"longitude must be a 1-D array, got shape {lon.shape}")
    base = np.broadcast_to((cell_area_weights(lat) if area else np.ones(lat.size))[:, None], (lat.size, lon.size))
    out = np.empty((len(regions), lat.size, lon.size))
    for i, region in enumerate(resolve_regions(regions)):
        w = base * region.mask(lat, lon)
        if region.land:
            if land_sea_mask is None:
                raise ValueError(f"region {region.name!r} needs the land-sea mask (pass land_sea_mask)")
            lsm = np.asarray(land_sea_mask, dtype=np.float64)
            if lsm.shape != w.shape:
                raise ValueError(f"land_sea_mask has shape {lsm.shape}, the grid is {w.shape} (latitude, longitude)")
            if not np.all(np.isfinite(lsm)) or lsm.min() < 0 or lsm.max() > 1:
                raise ValueError("land_sea_mask must be a land fraction in [0, 1] without NaN")
            w = w * lsm
        total = w.sum()
        if not total > 0:
            raise ValueError(f"region {region.name!r} contains no grid point of this grid (or no land)")
        out[i] = w / total
    return out


class RegionWeights:
    """:func:`region_weights`, computed once per distinct grid, regions, mask and ``area`` and then shared.

    A metric object computes its ``(regions, lat, lon)`` weights when it is built (~10 ms, 3.7 MB for 16 regions at
    1.5 degrees); the evaluation harness builds ~15 objects per channel group and lead range, hundreds in all. Metric
    objects given the same instance (``weights_cache=``) compute equal weights once, and their float64 buffers share
    that memory (``torch.as_tensor`` of the same array). Not thread-safe: build the metrics in one thread.
    """

    def __init__(self) -> None:
        self.memo: dict[tuple, np.ndarray] = {}

    def __call__(
        self,
        lat: np.ndarray,
        lon: np.ndarray,
        regions: Sequence[str | Region],
        land_sea_mask: np.ndarray | None = None,
        *,
        area: bool = True,
    ) -> np.ndarray:
        lsm = None if land_sea_mask is None else np.asarray(land_sea_mask, dtype=np.float64)
        key = (
            np.asarray(lat, dtype=np.float64).tobytes(),
            np.asarray(lon, dtype=np.float64).tobytes(),
            tuple(getattr(r, "name", r) for r in regions),
            tuple(r for r in regions if not isinstance(r, str)),
            None if lsm is None else lsm.tobytes(),
            area,
        )
        if key not in self.memo:
            self.memo[key] = region_weights(lat, lon, regions, land_sea_mask, area=area)
        return self.memo[key]
