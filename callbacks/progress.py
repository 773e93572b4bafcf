"""Progress that shows wherever the output goes: Lightning's rich bar on a terminal, plain lines in a log.

A live bar redraws one screen region; written to a file or a pipe (a batch job's log, ``fit > log``) it draws
nothing until the run ends. There this bar prints a line every tenth of an epoch (and at least every few minutes),
and one at the end of every validation, with the step, the progress-bar metrics (``train/loss``, ``val/crps``) and
the rate.
"""

from __future__ import annotations

import math
import sys
import time
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"


class AutoProgressBar(RichProgressBar):
    """:class:`~lightning.pytorch.callbacks.RichProgressBar` on a terminal; progress lines on stdout where stdout is not one.

    Args:
        lines: True: always lines; False: always the rich bar; None (default): lines when stdout is not a terminal.
        every_fraction: a line every this fraction of an epoch's training batches (and after the last batch).
        every_seconds: ... and a line at least this often during training (long epochs); None: no time-based lines.
        refresh_rate, leave: the rich bar's (see :class:`~lightning.pytorch.callbacks.RichProgressBar`).
    """

    def __init__(
        self,
        lines: bool | None = None,
        every_fraction: float = 0.1,
        every_seconds: float | None = 300.0,
        refresh_rate: int = 1,
        leave: bool = False,
    ):
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        if not 0 < every_fraction <= 1:
            raise ValueError(f"AutoProgressBar: every_fraction must be in (0, 1], got {every_fraction}")
        if every_seconds is not None and every_seconds <= 0:
            raise ValueError(f"AutoProgressBar: every_seconds must be positive or null, got {every_seconds}")
        self.lines = (not sys.stdout.isatty()) if lines is None else bool(lines)
        self.every_fraction = float(every_fraction)
        self.every_seconds = every_seconds
        self._epoch_start = self._last_time = self._val_start = 0.0
        self._last_batch = 0

    @property
    def is_enabled(self) -> bool:  # the rich bar: off when printing lines
        return super().is_enabled and not self.lines

    @property
    def _printing(self) -> bool:
        return self.lines and self._enabled  # disable() turns lines off too (Lightning does so on ranks other than 0)

    def _metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        items = self.get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in items.items())

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._epoch_start = self._last_time = time.monotonic()
        self._last_batch = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._printing:
            return
        done, total, now = batch_idx + 1, self.total_train_batches, time.monotonic()
        known = isinstance(total, int) or (isinstance(total, float) and math.isfinite(total))
        every = max(1, round(self.every_fraction * total)) if known else 50
        due = done % every == 0 or (known and done >= total) or trainer.global_step >= trainer.max_steps > 0
        if not due and (self.every_seconds is None or now - self._last_time < self.every_seconds):
            return
        rate = (done - self._last_batch) / max(now - self._last_time, 1e-9)
        where = f"{done}/{int(total)} ({100 * done / total:.0f}%)" if known else f"{done}"
        left = f", {_duration((total - done) / rate)} left in the epoch" if known and rate > 0 else ""
        print(
            f"epoch {trainer.current_epoch} batch {where} step {trainer.global_step}: {self._metrics(trainer, pl_module)} | "
            f"{rate:.3g} steps/s, {_duration(now - self._epoch_start)} into the epoch{left}",
            flush=True,
        )
        self._last_time, self._last_batch = now, done

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._val_start = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._printing or trainer.sanity_checking:
            return
        took = time.monotonic() - self._val_start
        batches = int(sum(trainer.num_val_batches)) if trainer.num_val_batches else 0
        print(
            f"validation at epoch {trainer.current_epoch} step {trainer.global_step}: {self._metrics(trainer, pl_module)} "
            f"| {batches} batches in {took:.1f} s",
            flush=True,
        )
        self._last_time += took  # the next training line's rate counts training time only
