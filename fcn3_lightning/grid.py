"""Latitude-longitude grid helpers shared by data statistics and metrics."""

from __future__ import annotations

import numpy as np


def cell_area_weights(lat_deg: np.ndarray) -> np.ndarray:
    """WeatherBench2's area weights: sin(upper edge) - sin(lower edge) of each latitude cell.

    Cell edges lie half-way between the latitude points and are clipped at the poles, so a pole
    row of an equiangular grid gets its (small) polar cap. Normalised to mean 1; order as given.
    """
    lat = np.asarray(lat_deg, dtype=np.float64)
    if lat.ndim != 1 or lat.size < 2:
        raise ValueError(f"latitude must be a 1-D array of at least 2 points, got shape {lat.shape}")
    ascending = lat[-1] > lat[0]
    la = lat if ascending else lat[::-1]
    if not np.all(np.diff(la) > 0):
        raise ValueError("latitude must be strictly monotonic")
    edges = np.concatenate([[-90.0], (la[1:] + la[:-1]) / 2, [90.0]])
    w = np.sin(np.deg2rad(edges[1:])) - np.sin(np.deg2rad(edges[:-1]))
    w = w / w.mean()
    return w if ascending else w[::-1]
