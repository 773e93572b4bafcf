"""Mixed precision: the one rule for what runs in float32.

Under ``--trainer.precision bf16-mixed`` (or ``16-mixed``) Lightning runs every step under ``torch.autocast``;
parameters, gradients and the optimiser state stay float32. Reduced precision is used where it is cheap and
harmless (the processor blocks' 1x1-convolution MLPs and their DISCO convolutions); these parts run in float32
with autocast off, whatever the trainer's precision, because bf16's ~3 significant digits are too coarse there:

1. **spherical transforms** -- every SHT and inverse SHT (the spectral blocks': torch-harmonics' ``SpectralConvS2``
   does it itself; the noise process's; the spectral CRPS's), the DISCO encoders and decoders and the
   latent -> data resampling that bracket the network (as in the reference);
2. **losses** -- the pointwise and the spectral CRPS (member sorts, sums over ~10^6 grid points);
3. **validation metrics** -- the CRPS / persistence scores of the LightningModule (float32) and the WeatherBench2
   scores (:mod:`fcn3_lightning.metrics`, float64).

Each of these opens :class:`float32_region` and casts its inputs with :func:`at_least_float32` (float64 stays
float64); ``tests/test_precision.py`` checks that they did, with forward hooks recording the dtypes under
``bf16-mixed``.
"""

from __future__ import annotations

import torch

#: dtypes that autocast produces and that the float32 parts refuse to compute in
LOW_PRECISION: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)

#: the parts that run in float32 under mixed precision (documentation; see the module docstring)
FLOAT32_PARTS: tuple[str, ...] = ("spherical transforms (SHTs, DISCO encoders/decoders, resampling)", "losses", "validation metrics")


class float32_region(torch.autocast):  # noqa: N801 -- used like torch.autocast, a context manager
    """Autocast disabled for ``x``'s device type: the ops inside run in the dtype of their inputs."""

    def __init__(self, x: torch.Tensor):
        super().__init__(device_type=x.device.type, enabled=False)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is float16/bfloat16 (complex half likewise to complex64); other dtypes unchanged."""
    if x.dtype in LOW_PRECISION:
        return x.float()
    if x.dtype in (torch.complex32,):
        return x.to(torch.complex64)
    return x
