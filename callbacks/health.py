"""Training health: a NaN/Inf guard on the loss and the gradients, throughput and peak memory, gradient norms.

(The learning rate is logged by Lightning's ``LearningRateMonitor``, already in ``configs/base.yaml``.)
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from fcn3_lightning.parallel import grad_norm
from fcn3_lightning.parallel.strategy import layout_of


class NonFiniteError(RuntimeError):
    """Training produced a NaN or Inf loss or gradient; raised by :class:`NonFiniteGuard`."""


def _log_metrics(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    # straight to the loggers (rank 0 only): these values keep their own cadence, not Lightning's log_every_n_steps
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def _every(n: int, what: str) -> int:
    if n < 0:
        raise ValueError(f"{what} must be >= 0 (0 = off), got {n}")
    return int(n)


class NonFiniteGuard(L.Callback):
    """Stops training at the first non-finite loss or gradient, before the bad update touches the weights.

    The loss is checked before the backward pass, the gradients (after their reduction over the ranks) before the
    optimizer step. On a non-finite value every rank saves ``<dirpath>/before_nonfinite_step<k>.ckpt`` (the weights
    after the ``k`` good steps ``0 ... k-1``, i.e. before step ``k``'s update) and raises :class:`NonFiniteError`,
    naming the global step and the first non-finite tensor (``loss`` or ``grad of <parameter>``); the process exits
    non-zero. The decision is all-reduced, so all ranks stop together.

    Args:
        check_every_n_steps: check on every n-th optimizer step (1: every step; 0: never).
        check_gradients: also check the gradients (one norm over all of them, then the culprit's name).
        dirpath: where the checkpoint goes (default: the ModelCheckpoint's directory, else ``<default_root_dir>/checkpoints``).
        enabled: False turns the guard off.
    """

    def __init__(self, check_every_n_steps: int = 1, check_gradients: bool = True, dirpath: str | None = None, enabled: bool = True):
        self.every = _every(check_every_n_steps if enabled else 0, "NonFiniteGuard.check_every_n_steps")
        self.check_gradients = check_gradients
        self.dirpath = dirpath

    def _due(self, trainer: L.Trainer) -> bool:
        return self.every > 0 and trainer.global_step % self.every == 0

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not self._due(trainer):
            return
        bad = not bool(torch.isfinite(loss.detach()).all())
        self._stop_if(trainer, bad, f"loss (value {loss.detach().flatten()[:4].tolist()})" if bad else "")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self.check_gradients or not self._due(trainer):
            return
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        bad, what = False, ""
        if named:
            total = torch.nn.utils.get_total_norm([g for _, g in named])  # one fused norm; the culprit only on failure
            if not bool(torch.isfinite(total)):
                name = next(n for n, g in named if not bool(torch.isfinite(g).all()))
                bad, what = True, f"grad of {name}"
        self._stop_if(trainer, bad, what)

    def _stop_if(self, trainer: L.Trainer, bad: bool, what: str) -> None:
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):  # any rank: every rank stops
            return
        step = trainer.global_step
        path = self._dirpath(trainer) / f"before_nonfinite_step{step}.ckpt"
        trainer.save_checkpoint(path)  # collective; the weights have not been updated by step `step`
        where = f"non-finite {what}" if bad else "a non-finite loss or gradient on another rank"
        epoch, batch = trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1
        raise NonFiniteError(
            f"{where} at global step {step} (epoch {epoch}, batch {batch}): training stopped before this step's update. "
            f"The weights of the last good step are saved in {path} (global_step {step}); resume with --ckpt_path {path} "
            "after lowering the learning rate or fixing the data."
        )

    def _dirpath(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        cb = trainer.checkpoint_callback
        if cb is not None and getattr(cb, "dirpath", None):
            return Path(cb.dirpath)
        return Path(trainer.default_root_dir) / "checkpoints"


class Throughput(L.Callback):
    """Training throughput and memory: ``perf/samples_per_s`` (distinct samples over all data-parallel replicas),
    ``perf/s_per_step`` and ``perf/peak_memory_mb`` (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS)
    every ``log_every_n_steps`` steps, and a console line per epoch. A step's time runs from the end of the previous
    step (data loading included) to the end of this one; time spent in validation is not counted.

    Args:
        log_every_n_steps: logging cadence (default: the trainer's ``log_every_n_steps``; 0: never).
        print_every_n_epochs: console summary cadence (0: never).
        enabled: False turns the callback off.
    """

    def __init__(self, log_every_n_steps: int | None = None, print_every_n_epochs: int = 1, enabled: bool = True):
        self.log_every = None if log_every_n_steps is None else _every(log_every_n_steps, "Throughput.log_every_n_steps")
        self.print_every = _every(print_every_n_epochs, "Throughput.print_every_n_epochs")
        self.enabled = enabled
        self._t: float | None = None
        self._window = [0.0, 0, 0]  # seconds, steps, samples since the last log
        self._epoch = [0.0, 0, 0]

    def _replicas(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        return layout_of(trainer.strategy).sizes.batch  # ranks that read distinct samples

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t, self._window, self._epoch = None, [0.0, 0, 0], [0.0, 0, 0]

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t = None  # the next step's clock starts at its own start, not at the end of the one before validation

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.enabled and self._t is None:
            self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.enabled or self._t is None:
            return
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        n = int(batch["input"].shape[0]) * self._replicas(trainer, pl_module)
        for acc in (self._window, self._epoch):
            acc[0] += dt
            acc[1] += 1
            acc[2] += n
        every = trainer.log_every_n_steps if self.log_every is None else self.log_every
        if every and trainer.global_step % every == 0 and self._window[1]:
            s, k, samples = self._window
            metrics = {"perf/samples_per_s": samples / s, "perf/s_per_step": s / k, "perf/peak_memory_mb": self.peak_memory_mb(pl_module)}
            _log_metrics(trainer, metrics)
            self._window = [0.0, 0, 0]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        s, k, samples = self._epoch
        if not self.enabled or not k or not self.print_every or (trainer.current_epoch + 1) % self.print_every:
            return
        kind = "CUDA max allocated" if pl_module.device.type == "cuda" else "peak RSS"
        rank_zero_info(
            f"epoch {trainer.current_epoch} throughput: {samples / s:.2f} samples/s, {s / k:.3f} s/step over {k} steps, "
            f"{kind} {self.peak_memory_mb(pl_module):.0f} MB (rank 0)"
        )

    @staticmethod
    def peak_memory_mb(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            return torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class GradNorm(L.Callback):
    """Logs ``train/grad_norm``: the total norm of the gradients before clipping (the full model's under the
    spatial-parallel strategy, every shard counted once), every ``log_every_n_steps`` optimizer steps.

    Args:
        log_every_n_steps: cadence (default: the trainer's ``log_every_n_steps``; 0: never).
        norm_type: the norm's order.
        enabled: False turns the callback off.
    """

    def __init__(self, log_every_n_steps: int | None = None, norm_type: float = 2.0, enabled: bool = True):
        self.log_every = None if log_every_n_steps is None else _every(log_every_n_steps, "GradNorm.log_every_n_steps")
        self.norm_type = float(norm_type)
        self.enabled = enabled
        self.last: float | None = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        every = trainer.log_every_n_steps if self.log_every is None else self.log_every
        if not self.enabled or not every or trainer.global_step % every:
            return
        layout = layout_of(trainer.strategy)
        if layout.model_parallel:  # collective: the shards' partial norms add up over the tiles
            total = grad_norm(pl_module, layout, self.norm_type, trainer.strategy.reduction_tags)
        else:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            total = torch.nn.utils.get_total_norm(grads, self.norm_type) if grads else torch.zeros(())
        self.last = float(total)
        _log_metrics(trainer, {"train/grad_norm": self.last})
