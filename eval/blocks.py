"""Channel groups and blocks: the unit of reading and of scoring (laid out by :func:`.plan.layout_groups` and
:func:`.plan.layout_blocks`, read by :mod:`.load`, scored by :mod:`.score`).

Variables are packed into channel groups (whole variables with all their levels; the wind components with their
speed, so the wind vectors can be scored), as many as fit the block budget (``Options.block_mb``) over all lead
times. Each group is read in blocks of (a few inits) x (a range of lead times) x (its channels), aligned with the
forecast's chunks, so nothing larger than a block is ever in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from fcn3_lightning.eval.data import Channel


@dataclass
class Group:
    """Channels scored together: whole variables (with all their levels), wind components with their speed."""

    index: int
    channels: list[Channel]
    seeps: list[int] = field(default_factory=list)
    vectors: list[tuple[Channel, int, int]] = field(default_factory=list)  # (vector, u position, v position)
    spectra: list[int] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.channels]


@dataclass
class Block:
    """One read and one update: some scored inits x some scored leads of one group."""

    group: int
    inits: np.ndarray  # indices into the scored inits
    leads: np.ndarray  # indices into the scored leads
    key: tuple[int, int]  # (group, first lead index): which metric set
