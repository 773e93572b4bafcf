"""Area weights on the sphere: the one home of every latitude weighting rule in this project.

Three rules, each for its own job (they differ on purpose, and the results depend on which is used):

* :func:`cell_area_weights` -- WeatherBench2's cell areas (sin of the cell edges): the area-weighted means of
  data statistics, metrics, regions and bounds, as WB2 scores them;
* :func:`quadrature_weights` -- the training loss's quadrature (the reference's "naive" sin rule on the
  equiangular grid, Gauss weights on the Legendre-Gauss grid), normalised over the whole grid;
* :func:`sphere_quadrature` -- exact quadrature in x = sin(latitude) (Clenshaw-Curtis, Fejer, Gauss-Legendre)
  for the spherical-harmonic transform of the angular power spectrum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch_harmonics.quadrature import clenshaw_curtiss_weights


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


def quadrature_weights(nlat: int, nlon: int, grid: str = "equiangular", *, dtype: torch.dtype | None = None) -> Tensor:
    """Per-latitude quadrature weights q, shape ``(nlat, 1)``, such that q summed over all nlat x nlon points is 1.

    ``sum_points q * f`` is then the area-weighted global mean of f. On the equiangular grid (poles included,
    north to south) this is the reference's "naive" rule q ~ sin(colatitude), 0 at the poles; on the
    Legendre-Gauss grid the Gauss weights. Rows can be sliced for a latitude tile. ``dtype`` defaults to
    torch's default float dtype.
    """
    if nlon < 1:
        raise ValueError(f"nlon must be positive, got {nlon}")
    if grid == "equiangular":
        if nlat < 3:
            raise ValueError(f"the equiangular rule needs nlat >= 3 (both poles weigh 0), got nlat={nlat}")
        k = np.arange(nlat)
        # sin(pi - x) = sin(x): folding the index makes the weights exactly symmetric and exactly 0 at both poles.
        q = np.sin(np.pi * np.minimum(k, nlat - 1 - k) / (nlat - 1))
    elif grid == "legendre-gauss":
        if nlat < 1:
            raise ValueError(f"nlat must be positive, got {nlat}")
        q = np.polynomial.legendre.leggauss(nlat)[1]
    else:
        raise ValueError(f"quadrature_weights supports grid 'equiangular' (naive sin rule) or 'legendre-gauss', got {grid!r}")
    q = q / (q.sum() * nlon)
    return torch.as_tensor(q, dtype=dtype or torch.get_default_dtype()).unsqueeze(-1)


def sphere_quadrature(lat: Sequence[float] | np.ndarray) -> np.ndarray:
    """Quadrature weights for integrals over x = sin(latitude) in [-1, 1] on the given latitudes (any order).

    Recognises the equiangular grid with poles (Clenshaw-Curtis), the equiangular grid without poles
    (WB2's 1.40625/2.8125/5.625 degree grids; Fejer's first rule) and the Gaussian grid (Gauss-Legendre).
    Each rule integrates polynomials up to degree nlat - 1 exactly, so the transform of a field band-limited
    to degree L is exact for degrees l <= nlat - 1 - L.
    """
    lat = np.asarray(lat, dtype=np.float64)
    n = lat.size
    order = np.argsort(lat)
    la = lat[order]
    w = np.empty(n)
    if np.allclose(la, np.linspace(-90.0, 90.0, n), atol=1e-6):
        _, cw = clenshaw_curtiss_weights(n, -1.0, 1.0)
        cw = np.asarray(cw, dtype=np.float64)
        w[order] = cw if np.isclose(cw.sum(), 2.0) else cw / cw.sum() * 2.0
        # CC nodes are symmetric, so the order of the returned weights does not matter beyond the symmetry
        return w
    d = 180.0 / n
    if np.allclose(la, -90.0 + d * (np.arange(n) + 0.5), atol=1e-6):
        theta = np.pi * (np.arange(n) + 0.5) / n
        j = np.arange(1, n // 2 + 1)
        w_sorted = (2.0 / n) * (1.0 - 2.0 * (np.cos(2.0 * np.outer(theta, j)) / (4.0 * j**2 - 1.0)).sum(1))
        w[order] = w_sorted[::-1]  # theta increases from the north pole; la increases from the south
        return w
    x, gw = np.polynomial.legendre.leggauss(n)
    if np.allclose(np.sin(np.deg2rad(la)), x, atol=1e-6):
        w[order] = gw
        return w
    raise ValueError(
        f"latitudes {la[:3]} ... {la[-3:]} ({n} points) are neither an equiangular grid (with or without poles) nor a "
        "Gaussian grid: no exact quadrature for the angular power spectrum"
    )
