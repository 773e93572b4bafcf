"""What the member benchmarks share (``member_batch.py``, ``shared_encoders.py``): an FCN3-architecture network per
grid and a wall-clock timer that waits for the GPU."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from fcn3_lightning.model.fcn3 import FCN3


def bench_network(h: int, w: int, embed: int) -> FCN3:
    """FCN3's architecture on an ``h`` x ``w`` grid (72 + 12 channels): the default world's 4 blocks, a global one every
    2, below 100 latitudes; FCN3's 10 blocks, a global one every 5, above. Seeded, so every run builds the same weights."""
    small = h < 100
    torch.manual_seed(0)
    return FCN3(
        inp_shape=(h, w),
        atmo_embed_dim=embed,
        surf_embed_dim=embed,
        aux_embed_dim=8,
        num_layers=4 if small else 10,
        sfno_block_frequency=2 if small else 5,
    )


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes, CUDA work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t
