"""A callback that makes one rank of a multi-process fit fail (tests/test_parallel_failure.py injects it via the CLI).

Every rank writes its pid to ``<out_dir>/pid<rank>`` at setup (so the test can check that none survives); rank
``rank`` writes the time of the failure to ``<out_dir>/raised`` and raises at its first training batch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L

MESSAGE = "injected failure on rank {rank}"


class RaiseOnRank(L.Callback):
    def __init__(self, rank: int = 2, out_dir: str = "."):
        self.rank, self.out_dir = rank, Path(out_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"pid{trainer.global_rank}").write_text(str(os.getpid()))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_rank == self.rank:
            (self.out_dir / "raised").write_text(repr(time.time()))
            raise RuntimeError(MESSAGE.format(rank=self.rank))
