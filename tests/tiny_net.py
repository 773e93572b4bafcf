"""The tiny test networks, defined once (import them; ``tests/`` is on the path of every test module).

``NET`` is the tiny network of the exactness tests (parallel layers, rollouts and steps, checkpointing, shared
encoders, the converter's round trips): 3 blocks (spectral, DISCO, spectral) and unequal embedding widths, so that
every kind of block and parameter is there and shards come in every shape. On ``SHAPE`` (19 latitudes) the tiles of
every split the parallel tests use are uneven (10/9 rows under h = 2). ``FIT_NET`` is the smallest network the
training, callback and command-line tests fit in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: 4 channels on levels and 2 at the surface
CHANNELS = ["z500", "t500", "z850", "t850", "t2m", "tcwv"]
SHAPE = (19, 32)
NET = {"atmo_embed_dim": 4, "surf_embed_dim": 6, "aux_embed_dim": 3, "num_layers": 3, "sfno_block_frequency": 2}
FIT_NET = {"atmo_embed_dim": 4, "surf_embed_dim": 4, "aux_embed_dim": 2, "num_layers": 2, "sfno_block_frequency": 2}


def tiny_config(aux_channel_names: Sequence[str], **overrides: Any) -> dict[str, Any]:
    """FCN3's keyword arguments for the tiny network on ``SHAPE`` with ``CHANNELS`` and the given auxiliary channels."""
    return {"inp_shape": SHAPE, "channel_names": list(CHANNELS), "aux_channel_names": list(aux_channel_names), **NET, **overrides}
