"""One trial = one ``fit`` of a complete config, in this process, through the project's LightningCLI."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import optuna
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from fcn3_lightning.cli import BASE_CONFIG, FCN3CLI, MLflowConfig
from fcn3_lightning.data.datamodule import WB2DataModule
from fcn3_lightning.io import atomic_path
from fcn3_lightning.sweep.space import SweepError
from fcn3_lightning.training.module import FCN3Module


class ObjectiveReporter(Callback):
    """After every validation (every ``report_every_n_steps`` training steps): report the objective to Optuna at
    the global step and stop the fit when the pruner says so. The sanity check only verifies that validation logs
    the metric at all, so a misnamed objective fails within seconds."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric = trial, metric
        self.curve: dict[int, float] = {}
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = trainer.callback_metrics
        if self.metric not in metrics:
            available = sorted(k for k in metrics if k.startswith("val/"))
            raise SweepError(f"objective.metric {self.metric!r} is not logged by validation; it logs: {available}")
        if trainer.sanity_checking:
            return
        value, step = float(metrics[self.metric]), trainer.global_step
        self.curve[step] = value
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.pruned_at = step
            trainer.should_stop = True  # ends the fit cleanly (checkpoints, MLflow) instead of raising through Lightning


def run_fit(reporter: ObjectiveReporter, config_yaml: str, trial_dir: Path) -> None:
    """Fit with ``config_yaml`` (written to ``trial_dir/config.yaml``), reporting through ``reporter``.

    Raises :class:`optuna.TrialPruned` when the pruner stopped the fit, :class:`SweepError` when validation never ran.
    """
    trial, metric = reporter.trial, reporter.metric
    path = trial_dir / "config.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(config_yaml)
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")  # as run_cli does
    # args come from the sweep, not sys.argv: Lightning warns about both being present
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        FCN3CLI(
            FCN3Module,
            WB2DataModule,
            save_config_callback=MLflowConfig,
            parser_kwargs={"fit": {"default_config_files": [str(BASE_CONFIG)]}},
            trainer_defaults={"callbacks": [reporter]},  # added to the config's callbacks, not part of the config
            args=["fit", "--config", str(path)],
        )
    except SystemExit as e:  # the parser rejected the config (it was checked before, so this is unexpected)
        raise SweepError(f"trial {trial.number}: fit rejected {path} (exit {e.code})") from e
    if reporter.pruned_at is not None:
        raise optuna.TrialPruned(f"pruned at step {reporter.pruned_at} ({metric} = {reporter.curve[reporter.pruned_at]:.6g})")
    if not reporter.curve:
        raise SweepError(
            f"trial {trial.number}: no validation ran, so {metric} was never reported: report_every_n_steps must not exceed "
            "the trial's training steps (trainer.max_steps)"
        )
