"""Static auxiliary inputs: orography and the land-sea mask one-hot (reference section 1.2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fcn3_lightning.data.store import WB2Store

#: WB2 names of the static variables the auxiliary channels come from
OROGRAPHY_VARIABLE = "geopotential_at_surface"
LAND_SEA_MASK_VARIABLE = "land_sea_mask"
STATIC_AUX = ("xoro", "xlsml", "xlsms")


def orography_channel(z_surface: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1], then standardise with the plain (unweighted) global mean and std."""
    span = z_surface.max() - z_surface.min()
    x = (z_surface - z_surface.min()) / (span if span > 0 else 1.0)
    return (x - x.mean()) / (x.std() + 1e-6)


def land_sea_channels(lsm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's "floor" one-hot: only lsm == 1 counts as land; (1[lsm < 1], 1[lsm == 1])."""
    land = np.floor(lsm).astype(np.int64) == 1
    return (~land).astype(np.float64), land.astype(np.float64)


def static_fields(store: WB2Store, aux_channels: Sequence[str]) -> np.ndarray:
    """The static auxiliary channels among ``aux_channels``, in their order: ``(S, nlat, nlon)`` float32 (90N first).

    Computed on the whole globe (the orography's scaling uses global extrema and moments), so a
    latitude/longitude tile of the result is what every spatial rank must see.
    """
    wanted = [a for a in aux_channels if a in STATIC_AUX]
    fields: dict[str, np.ndarray] = {}
    if "xoro" in wanted:
        fields["xoro"] = orography_channel(store.read_static(OROGRAPHY_VARIABLE))
    if "xlsml" in wanted or "xlsms" in wanted:
        fields["xlsml"], fields["xlsms"] = land_sea_channels(store.read_static(LAND_SEA_MASK_VARIABLE))
    if not wanted:
        return np.zeros((0, *store.shape), dtype=np.float32)
    return np.stack([fields[a] for a in wanted]).astype(np.float32)
