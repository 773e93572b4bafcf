"""How the auxiliary inputs are computed: where this project and the reference's model packages differ.

A network sees at inference the inputs it was trained on only if they are computed the same way. Two of
FCN3's auxiliary inputs are computed slightly differently by this project and by the reference code that
writes the published model packages:

- cos zenith (``xzen``): float64 here, float32 from float32 days in the reference packages (up to ~2e-3 apart);
- orography (``xoro``): standardised with the population std in float64 here, with the sample (unbiased)
  std in float32 in the reference packages.

A model trained here keeps :data:`PROJECT`; a model loaded from a reference package keeps
:data:`REFERENCE_PACKAGE`, and an exported package records which one its network was trained with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

ZENITH_DTYPES = ("float64", "float32")
OROGRAPHY_STDS = ("population", "sample")


@dataclass(frozen=True)
class InputConventions:
    """``zenith_dtype``: "float64" or "float32"; ``orography_std``: "population" (float64) or "sample" (float32, unbiased)."""

    zenith_dtype: str = "float64"
    orography_std: str = "population"

    def __post_init__(self) -> None:
        if self.zenith_dtype not in ZENITH_DTYPES:
            raise ValueError(f"input convention zenith_dtype must be one of {ZENITH_DTYPES}, got {self.zenith_dtype!r}")
        if self.orography_std not in OROGRAPHY_STDS:
            raise ValueError(f"input convention orography_std must be one of {OROGRAPHY_STDS}, got {self.orography_std!r}")

    @property
    def zenith_numpy_dtype(self) -> type[np.floating]:
        return np.float32 if self.zenith_dtype == "float32" else np.float64

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> InputConventions:
        if d is None:
            return PROJECT
        unknown = sorted(set(d) - {"zenith_dtype", "orography_std"})
        if unknown:
            raise ValueError(f"unknown input convention keys {unknown}")
        return cls(**d)


#: what this project trains with
PROJECT = InputConventions()
#: what the reference's model packages compute (``makani.models.model_package``)
REFERENCE_PACKAGE = InputConventions(zenith_dtype="float32", orography_std="sample")
