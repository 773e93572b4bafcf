"""What the plotting callbacks read from a validation run: the module's forecasts, the grid, units, and the globe.

:class:`~fcn3_lightning.training.module.FCN3Module`'s ``validation_step`` returns ``{"prediction", "target"}``
(every member, normalised, on this rank's tile); the callbacks receive it in ``on_validation_batch_end``. Under
:class:`~fcn3_lightning.parallel.strategy.SpatialParallelStrategy` a rank holds a latitude/longitude tile: the maps
gather the whole globe (a collective of the spatial group, so every rank calls it), the metrics sum over the tiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from fcn3_lightning.callbacks.plotting import PlotJobs
from lightning.pytorch.utilities import rank_zero_info

from fcn3_lightning.channels import display_units, parse_channel
from fcn3_lightning.parallel.strategy import layout_of


@dataclass(frozen=True)
class ForecastGrid:
    """The validation forecasts' layout: channels, lead times, the full grid, this rank's tile and the units."""

    channels: list[str]
    lead_hours: list[float]
    lat: np.ndarray  # full grid, 90N first
    lon: np.ndarray
    tile: tuple[slice, slice]  # from the strategy's layout (the whole grid without a split)
    spatial_group: Any  # the group completing the tile (None without a split)
    units: dict[str, str]  # for labels (mathtext exponents)
    earth: bool  # real Earth data (coastlines make sense), not the synthetic default world
    n_members: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.lat.size, self.lon.size


def forecast_grid(trainer: L.Trainer, pl_module: L.LightningModule) -> ForecastGrid:
    """The layout of ``pl_module``'s validation forecasts (call after ``configure_model``: from ``on_fit_start`` on)."""
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "store") or getattr(pl_module, "scores", None) is None:
        raise TypeError(
            "the fcn3_lightning plotting callbacks need FCN3Module with the WB2DataModule (channels, grid and lead times), "
            f"got {type(pl_module).__name__} with {type(dm).__name__}"
        )
    store = dm.store
    units = {}
    for c in pl_module.channels:
        attrs = store.dataset[parse_channel(c).long_name].attrs
        units[c] = display_units(str(attrs.get("units", "units not in the store")), mathtext=True)
    layout = layout_of(trainer.strategy)
    hp = pl_module.hparams
    return ForecastGrid(
        channels=list(pl_module.channels),
        lead_hours=list(pl_module.scores.lead_hours),
        lat=np.asarray(store.lat),
        lon=np.asarray(store.lon),
        tile=layout.tile(store.shape),
        spatial_group=layout.spatial_group,
        units=units,
        earth=not getattr(dm, "default_world", False),
        n_members=int(hp.valid_ensemble_size or hp.ensemble_size),
    )


def forecast_outputs(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prediction, target)`` from a validation step's outputs, with a clear error for a module that returns none."""
    if not isinstance(outputs, dict) or "prediction" not in outputs or "target" not in outputs:
        raise TypeError(
            "the fcn3_lightning plotting callbacks need validation_step to return {'prediction', 'target'} "
            f"(FCN3Module does), got {type(outputs).__name__}"
        )
    return outputs["prediction"].detach(), outputs["target"].detach()


def physical(pl_module: L.LightningModule, x: torch.Tensor, index: Sequence[int]) -> torch.Tensor:
    """Channels ``index`` of normalised fields ``(..., C, h, w)`` in physical units (channel axis -3)."""
    idx = torch.as_tensor(list(index), device=x.device)
    return pl_module.normalizer.denormalize(x.index_select(-3, idx), axis=-3, index=index)


def ensemble_spread(pl_module: L.LightningModule, x: torch.Tensor, index: Sequence[int], dim: int = 0) -> torch.Tensor:
    """The standard deviation over the members (axis ``dim``, ddof 1) of channels ``index`` of normalised fields, in
    physical units: the normalised spread times the channel's scale. The offset cancels in a spread; adding it first
    would leave a float32 difference of large numbers (z500 ~ 58,000 m2 s-2, one ulp 0.004, for spreads of ~10)."""
    idx = torch.as_tensor(list(index), device=x.device)
    return pl_module.normalizer.denormalize(torch.std(x.index_select(-3, idx), dim=dim, correction=1), axis=-3, index=index, shift=False)


def gather_globe(trainer: L.Trainer, x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The whole globe of a tiled field ``(..., h, w)``; collective over the spatial group (every rank must call it)."""
    return layout_of(trainer.strategy).gather_tiles(x.contiguous(), shape)


def pick_channels(requested: Sequence[str] | None, available: Sequence[str], default: Sequence[str], what: str) -> list[str]:
    """The requested channels (each must exist), or ``default``."""
    if requested is None:
        return list(default)
    missing = [c for c in requested if c not in available]
    if missing:
        raise ValueError(f"{what}: channels {missing} are not among the model's channels {list(available)}")
    return list(requested)


def pick_leads(requested: Sequence[float] | None, lead_hours: Sequence[float], default: Sequence[int], what: str) -> list[int]:
    """Indices of the requested lead times (hours; each must be one of the rollout's), or ``default``."""
    if requested is None:
        return list(default)
    out = []
    for h in requested:
        if float(h) not in lead_hours:
            raise ValueError(f"{what}: lead time {h} h is not one of the validation rollout's lead times {list(lead_hours)} h")
        out.append(list(lead_hours).index(float(h)))
    return out


class EveryNValidations:
    """Frequency bookkeeping: due on every ``n``-th validation run of the training run (sanity checks excluded), and
    on the last validation of a ``fit`` (so that a run shorter than ``n`` validations, or one whose length is not a
    multiple of ``n``, ends with plots) and the one of ``validate``; ``n = 0`` never.

    ``count`` is the number of validation runs so far; the callbacks save it in the checkpoint (their
    ``state_dict``), so a resumed run keeps the cadence of the run it continues instead of starting from zero.
    """

    def __init__(self, n: int, what: str):
        if n < 0:
            raise ValueError(f"{what}: every_n_validations must be >= 0 (0 = off), got {n}")
        self.n = int(n)
        self.count = 0
        self.due = False
        self.last_seen: int | None = None  # global step of the latest validation run of this fit
        self.last_due: int | None = None  # ... and of the latest one that was due

    def start(self, trainer: L.Trainer) -> bool:
        """Call at ``on_validation_epoch_start``; returns (and remembers) whether this run is due."""
        if trainer.sanity_checking or self.n == 0:
            self.due = False
            return False
        self.count += 1
        self.due = self.count % self.n == 0 or final_validation(trainer)
        self.last_seen = trainer.global_step
        if self.due:
            self.last_due = trainer.global_step
        return self.due


def final_validation(trainer: L.Trainer) -> bool:
    """Whether the validation run that starts now is the last one: that of ``validate``, or in ``fit`` the one after
    the last training batch that ``max_steps`` or ``max_epochs`` allow. (A stop the trainer cannot foresee, such as
    early stopping or ``max_time``, is not; :meth:`ValidationPlots.on_fit_end` says when it left the last one undrawn.)
    """
    if trainer.state.fn != "fit":
        return True
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    if trainer.max_epochs in (None, -1) or trainer.current_epoch + 1 < trainer.max_epochs:
        return False
    batches = trainer.num_training_batches
    done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    return batches != float("inf") and done >= batches


class ValidationPlots(L.Callback):
    """What the plotting callbacks share: the frequency, the background plot jobs, and being configured from the
    module and data at the start of ``fit`` (or of ``validate``). Subclasses implement :meth:`_configure`."""

    def __init__(self, name: str, every_n_validations: int, enabled: bool, background: bool, dpi: int):
        self.every = EveryNValidations(every_n_validations if enabled else 0, name)
        self.jobs = PlotJobs(background)
        self.dpi = dpi
        self.grid: ForecastGrid | None = None

    def _configure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise TypeError(f"{type(self).__name__} must define _configure")

    @property
    def state_key(self) -> str:
        # two instances of one class (e.g. maps of other channels appended on the command line) keep separate counts
        return self._generate_state_key(
            channels=getattr(self, "requested_channels", None), lead_hours=getattr(self, "requested_leads", None)
        )

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.every.count}  # saved in the checkpoint: a resumed run keeps the cadence

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.every.count = int(state_dict.get("validations", 0))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._configure(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.grid is None:  # `validate` without `fit`
            self._configure(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.jobs.raise_errors()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.jobs.wait()  # every PNG is in the MLflow run before the logger closes it
        e = self.every
        if e.n and e.last_seen is not None and e.last_seen != e.last_due:
            latest = f"the latest are of step {e.last_due}" if e.last_due is not None else "this run drew none"
            rank_zero_info(
                f"{type(self).__name__}: the last validation of this fit (step {e.last_seen}) was not drawn: every_n_validations="
                f"{e.n}, and the run stopped where the trainer could not foresee it (early stopping, max_time); {latest}"
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.jobs.wait()
