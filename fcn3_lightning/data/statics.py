"""Static auxiliary inputs: orography and the land-sea mask one-hot (reference section 1.2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fcn3_lightning.channels import STATIC_AUX
from fcn3_lightning.data.conventions import PROJECT, InputConventions
from fcn3_lightning.data.store import WB2Store

#: WB2 names of the static variables the auxiliary channels come from
OROGRAPHY_VARIABLE = "geopotential_at_surface"
LAND_SEA_MASK_VARIABLE = "land_sea_mask"


def orography_channel(z_surface: np.ndarray, conventions: InputConventions = PROJECT) -> np.ndarray:
    """Min-max scale to [0, 1], then standardise with the plain (unweighted) global mean and std.

    ``conventions.orography_std``: "population" (float64, this project) or "sample" (float32 with the unbiased
    std, as the reference's model packages compute it).
    """
    span = z_surface.max() - z_surface.min()
    x = (z_surface - z_surface.min()) / (span if span > 0 else 1.0)
    if conventions.orography_std == "sample":
        t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        return ((t - t.mean()) / (t.std() + 1e-6)).numpy()
    return (x - x.mean()) / (x.std() + 1e-6)


def land_sea_channels(lsm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's "floor" one-hot: only lsm == 1 counts as land; (1[lsm < 1], 1[lsm == 1])."""
    land = np.floor(lsm).astype(np.int64) == 1
    return (~land).astype(np.float64), land.astype(np.float64)


def static_channels(
    aux_channels: Sequence[str],
    shape: tuple[int, int],
    orography: np.ndarray | None = None,
    land_sea_mask: np.ndarray | None = None,
    conventions: InputConventions = PROJECT,
) -> np.ndarray:
    """The static auxiliary channels among ``aux_channels``, in their order: ``(S, nlat, nlon)`` float32 (90N first),
    from the raw fields (surface geopotential, land-sea mask in [0, 1]) on the ``shape`` grid.

    Computed on the whole globe (the orography's scaling uses global extrema and moments), so a
    latitude/longitude tile of the result is what every spatial rank must see.
    """
    wanted = [a for a in aux_channels if a in STATIC_AUX]
    fields: dict[str, np.ndarray] = {}
    for name, field, needed in (
        ("orography", orography, "xoro" in wanted),
        ("land-sea mask", land_sea_mask, bool({"xlsml", "xlsms"} & set(wanted))),
    ):
        if needed and field is None:
            raise ValueError(f"the auxiliary channels {wanted} need the {name}, which was not given")
        if needed and tuple(field.shape) != tuple(shape):
            raise ValueError(f"the {name} has shape {tuple(field.shape)}, expected the grid {tuple(shape)}")
    if "xoro" in wanted:
        fields["xoro"] = orography_channel(orography, conventions)
    if "xlsml" in wanted or "xlsms" in wanted:
        fields["xlsml"], fields["xlsms"] = land_sea_channels(land_sea_mask)
    if not wanted:
        return np.zeros((0, *shape), dtype=np.float32)
    return np.stack([fields[a] for a in wanted]).astype(np.float32)


def static_fields(store: WB2Store, aux_channels: Sequence[str], conventions: InputConventions = PROJECT) -> np.ndarray:
    """:func:`static_channels` from the store's ``geopotential_at_surface`` and ``land_sea_mask``."""
    wanted = set(aux_channels) & set(STATIC_AUX)
    oro = store.read_static(OROGRAPHY_VARIABLE) if "xoro" in wanted else None
    lsm = store.read_static(LAND_SEA_MASK_VARIABLE) if wanted & {"xlsml", "xlsms"} else None
    return static_channels(aux_channels, store.shape, oro, lsm, conventions)
