"""``python -m fcn3_lightning fit|validate|test|predict``: LightningCLI over FCN3Module and WB2DataModule.

Defaults (``configs/base.yaml`` is read first): the embedded default world, a small FCN3, MLflow
tracking in a local SQLite store, the best checkpoint by validation CRPS plus the last one, written
atomically. Stage configs layer on top: ``fit --config configs/stage1.yaml``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from fcn3_lightning.data.datamodule import WB2DataModule
from fcn3_lightning.training.module import FCN3Module

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE_CONFIG = CONFIGS / "base.yaml"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}." if prefix or k else ""))
    else:
        out[prefix.rstrip(".")] = d
    return out


class MLflowConfig(SaveConfigCallback):
    """The MLflow side of a run: the resolved config (``config.yaml`` artifact and flattened params), system
    metrics (CPU, memory, GPU) while the run lasts, and the run id in every checkpoint so a resumed fit logs
    into the same run."""

    def __init__(self, parser: LightningArgumentParser, config: Any, **kwargs: Any):
        super().__init__(parser, config, save_to_log_dir=False, **kwargs)
        self._monitor: Any = None

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        # ckpt_path is how this process started, not part of the experiment (and changes when a fit resumes)
        skip = ("_", "config", "ckpt_path")
        params = {k: str(v)[:500] for k, v in _flatten(self.config.as_dict()).items() if not k.startswith(skip)}
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_text(logger.run_id, text, "config.yaml")
                logged = logger.experiment.get_run(logger.run_id).data.params  # a resumed run has them already
                logger.log_hyperparams({k: v for k, v in params.items() if k not in logged})
                self._start_system_metrics(logger)

    def _start_system_metrics(self, logger: MLFlowLogger) -> None:
        # MLflow only starts its monitor inside mlflow.start_run(); Lightning creates runs through the client
        if self._monitor is not None or os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() == "false":
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        interval = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", 10))
        self._monitor = SystemMetricsMonitor(
            logger.run_id, sampling_interval=interval, resume_logging=True, tracking_uri=logger._tracking_uri
        )
        self._monitor.start()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                checkpoint["mlflow_run_id"] = logger.run_id

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


def prepare_sqlite_store(uri: str) -> None:
    """Create (or migrate) a local SQLite MLflow store in one process at a time.

    Every rank of a multi-process run instantiates the logger, and MLflow creates the schema of a new SQLite store
    on first use: without the lock, several processes do it at once and fail ("duplicate column name").
    """
    if not uri.startswith("sqlite:///"):
        return
    from mlflow.tracking import MlflowClient

    path = Path(uri[len("sqlite:///") :])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): single-process runs need no lock
            pass
        MlflowClient(uri).search_experiments(max_results=1)  # touches the store: creates or migrates the schema


class FCN3CLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--mlflow_tracking_uri", type=str | None, default=None, help="MLflow tracking URI (default: sqlite:///mlruns.db)"
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        uri = cfg.get("mlflow_tracking_uri")
        logger = cfg.trainer.get("logger")
        # trainer.logger may also be a bool (--trainer.logger false) or a list
        mlflow = not isinstance(logger, bool | list) and logger is not None and "MLFlowLogger" in str(logger.get("class_path", ""))
        if uri and mlflow:
            logger["init_args"]["tracking_uri"] = uri
        if mlflow:
            prepare_sqlite_store(str(logger["init_args"].get("tracking_uri") or ""))
        # checkpoints live in <default_root_dir>/checkpoints unless a config says otherwise, so that
        # `--ckpt_path last` finds them from a new process and each curriculum stage keeps its own
        root = cfg.trainer.get("default_root_dir") or "."
        ckpt_dir = None
        for cb in cfg.trainer.get("callbacks") or []:
            if "ModelCheckpoint" in str(cb.get("class_path", "")):
                if not cb["init_args"].get("dirpath"):
                    cb["init_args"]["dirpath"] = str(Path(root) / "checkpoints")
                ckpt_dir = Path(cb["init_args"]["dirpath"])
        # a resumed fit continues its MLflow run (the run id travels in the checkpoint)
        ckpt = cfg.get("ckpt_path")
        if self.subcommand == "fit" and ckpt and mlflow:
            path = ckpt_dir / "last.ckpt" if ckpt == "last" and ckpt_dir is not None else Path(ckpt)
            if path.is_file() and not logger["init_args"].get("run_id"):
                import torch

                run_id = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("mlflow_run_id")
                if run_id:
                    logger["init_args"]["run_id"] = run_id


def run_cli(args: list[str] | None = None) -> FCN3CLI:
    # MLflow records CPU/GPU/memory of the run alongside the metrics (needs psutil)
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    return FCN3CLI(
        FCN3Module,
        WB2DataModule,
        save_config_callback=MLflowConfig,
        parser_kwargs={cmd: {"default_config_files": [str(BASE_CONFIG)]} for cmd in ("fit", "validate", "test", "predict")},
        args=None if args == sys.argv[1:] else args,  # LightningCLI warns when both are given
    )


STAGES = [CONFIGS / "stage1.yaml", CONFIGS / "stage2.yaml", CONFIGS / "finetune.yaml"]


def run_curriculum(stages: list[str] | None = None, extra: list[str] | None = None) -> list[str]:
    """Run ``fit`` stage after stage, each starting from the previous stage's best weights (weights only).

    ``extra`` arguments apply to every stage (e.g. ``--trainer.max_epochs 1``). Returns the best checkpoints.
    """
    stages = stages or [str(p) for p in STAGES]
    best: list[str] = []
    for i, stage in enumerate(stages):
        args = ["fit", "--config", str(stage), *(extra or [])]
        if best:
            args += ["--model.init_from", best[-1]]
        print(f"curriculum: stage {i + 1}/{len(stages)}: {stage}" + (f" (from {best[-1]})" if best else ""), flush=True)
        cli = run_cli(args)
        ckpt = cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path
        if not ckpt:
            raise RuntimeError(f"curriculum: stage {stage} wrote no checkpoint to hand on")
        best.append(ckpt)
    return best
