"""``python -m fcn3_lightning fit|validate|test|curriculum``: LightningCLI over FCN3Module and WB2DataModule.

Defaults (``configs/base.yaml`` is read first): the embedded default world, a small FCN3, MLflow
tracking in a local SQLite store, the best checkpoint by validation CRPS plus the last one, written
atomically. Stage configs layer on top: ``fit --config configs/stage1.yaml``.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from fcn3_lightning.data.datamodule import WB2DataModule
from fcn3_lightning.io import read_checkpoint
from fcn3_lightning.kernels import check_disco_kernels
from fcn3_lightning.runs import (
    LATEST,
    RUNS_ROOT,
    Footprint,
    RunError,
    check_run_name,
    check_writable,
    is_rank_zero,
    lock_folder,
    new_run_folder,
    release_folder,
    slug,
    update_latest,
)
from fcn3_lightning.training.module import FCN3Module


def _shipped_configs() -> Path:
    """The configs folder as installed: the package ``fcn3_lightning.configs``, which pyproject.toml maps onto the
    top-level ``configs/`` (an editable install reads that folder, a regular one its copy in site-packages)."""
    try:
        root = Path(str(importlib.resources.files("fcn3_lightning.configs")))
    except ModuleNotFoundError:
        raise ImportError(
            "fcn3_lightning.configs (the configs/ folder) is not installed: this install predates it, reinstall (pip install -e .)"
        ) from None
    if not (root / "base.yaml").is_file():  # LightningCLI would silently skip a missing default config file
        raise ImportError(f"the default config {root / 'base.yaml'} is missing from this install of fcn3_lightning")
    return root


CONFIGS = _shipped_configs()
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
        checkpoint["run_name"] = self.config.get("run_name")  # which run a resume continues, which run validate scores
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "w")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise RunError(f"cannot write the MLflow store {path}: {e.strerror}") from None
    with lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): single-process runs need no lock
            pass
        MlflowClient(uri).search_experiments(max_results=1)  # touches the store: creates or migrates the schema


def check_run_exists(uri: str, run_id: str | None) -> None:
    """A resumed run continues its MLflow run: refuse, with the way out, a store that does not hold it (MLflow would
    fail deep inside the logger with a traceback)."""
    if not uri or not run_id:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).get_run(run_id)
    except MlflowException:
        raise RunError(
            f"the checkpoint continues MLflow run {run_id}, which the tracking store {uri} does not hold: resume in the "
            "working directory the run started in (a relative sqlite:/// store is relative to it), or pass its store with "
            "--trainer.logger.init_args.tracking_uri"
        ) from None


_LIGHTNING_CKPT_WORDS = ("best", "hpc", "registry")  # --ckpt_path values Lightning resolves itself


def _shown(path: Path) -> Path:
    """``path`` (absolute) relative to the working directory where it lies below it: what users typed and read."""
    try:
        return path.relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def _config_stems(cfg: Any) -> list[str]:
    """The names of the ``--config`` files, for a run name that says what the run is (``fit-stage1-...``)."""
    return [slug(Path(str(getattr(c, "relative", c))).stem) for c in cfg.get("config") or []]


class FCN3CLI(LightningCLI):
    """LightningCLI with MLflow and run folders: every run its own folder and MLflow run name (fcn3_lightning.runs)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--mlflow_tracking_uri", type=str | None, default=None, help="MLflow tracking URI (default: sqlite:///mlruns.db)"
        )
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="name of the run: its folder runs/<run_name> and its MLflow run name "
            "(default: a new name, e.g. fit-20261205-171705, UTC; --trainer.default_root_dir names the folder instead)",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        command = self.config.get("subcommand")
        ckpt = self.config[command].get("ckpt_path") if command else None
        if _is_checkpoint_file_arg(ckpt):  # LightningCLI reads its hyperparameters next: a bad file fails here, clearly
            _read_source_checkpoint(ckpt)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        uri = cfg.get("mlflow_tracking_uri")
        logger = cfg.trainer.get("logger")
        # trainer.logger may also be a bool (--trainer.logger false) or a list
        mlflow = not isinstance(logger, bool | list) and logger is not None and "MLFlowLogger" in str(logger.get("class_path", ""))
        if uri and mlflow:
            logger["init_args"]["tracking_uri"] = uri
        self.run = _prepare_run(str(self.subcommand), cfg, logger["init_args"] if mlflow else None)
        if mlflow:
            try:
                prepare_sqlite_store(str(logger["init_args"].get("tracking_uri") or ""))
                check_run_exists(str(logger["init_args"].get("tracking_uri") or ""), logger["init_args"].get("run_id"))
            except BaseException:
                self._abandon()
                raise

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except BaseException:
            self._abandon()
            raise

    # the subcommands, so that a run that fails before writing anything leaves no trace
    def fit(self, model: LightningModule, **kwargs: Any) -> None:
        self._guarded(self.trainer.fit, model, **kwargs)

    def validate(self, model: LightningModule, **kwargs: Any) -> None:
        self._guarded(self.trainer.validate, model, **kwargs)

    def test(self, model: LightningModule, **kwargs: Any) -> None:
        self._guarded(self.trainer.test, model, **kwargs)

    def _guarded(self, method: Any, model: LightningModule, **kwargs: Any) -> None:
        try:
            # on a GPU: torch-harmonics' DISCO CUDA kernels, or a clear stop (fcn3_lightning.kernels); no-op otherwise
            check_disco_kernels("cuda" if isinstance(self.trainer.accelerator, CUDAAccelerator) else "cpu")
            method(model, **kwargs)
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        """A run that failed: release its folder and take back what its start made, where the run wrote nothing."""
        run = getattr(self, "run", None)
        if run is not None:
            release_folder(run.folder)
            run.footprint.undo()

    def after_fit(self) -> None:
        self._finish()

    def after_validate(self) -> None:
        self._finish()

    def after_test(self) -> None:
        self._finish()

    def _finish(self) -> None:
        run = self.run
        if self.trainer.is_global_zero:
            cb = self.trainer.checkpoint_callback
            ckpts = ""
            if self.subcommand == "fit" and cb is not None:
                best, last = (Path(p).name if p else "-" for p in (cb.best_model_path, cb.last_model_path))
                ckpts = f": checkpoints in {run.checkpoint_dir} (best {best}, last {last})"
            print(f"{self.subcommand}: run {run.name} ended{ckpts}; run folder {run.folder}", flush=True)
        release_folder(run.folder)


def _is_checkpoint_file_arg(ckpt: Any) -> bool:
    """Whether ``--ckpt_path`` names a file (not one of the words Lightning resolves itself, nor ``last``)."""
    return bool(ckpt) and ckpt not in (*_LIGHTNING_CKPT_WORDS, "last") and not str(ckpt).startswith("registry:")


def _read_source_checkpoint(path: str | Path) -> dict[str, Any]:
    blob = read_checkpoint(path, "checkpoint (--ckpt_path)")
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise RunError(f"--ckpt_path {path} is not a Lightning checkpoint of this project (a model file goes to --model.init_from)")
    return blob


@dataclass
class Run:
    name: str
    folder: Path
    checkpoint_dir: Path
    footprint: Footprint


def _prepare_run(command: str, cfg: Any, mlflow: dict[str, Any] | None) -> Run:
    """Choose this run's folder and name, check and lock the folder, and set them in ``cfg`` (trainer.default_root_dir,
    the checkpoint folder, ``run_name``) and in the MLflow logger's ``init_args`` (run name and tags, or the run id
    of the run a fit resumes). All before anything is built, so a bad folder costs no training time."""
    rank0 = is_rank_zero()
    made = Footprint()
    given_name = cfg.get("run_name")
    explicit: Path | None = None
    if given_name:
        explicit = RUNS_ROOT / check_run_name(given_name)
    if cfg.trainer.get("default_root_dir"):  # the user named the folder
        explicit = Path(cfg.trainer.default_root_dir)
    checkpoints = [cb for cb in cfg.trainer.get("callbacks") or [] if "ModelCheckpoint" in str(cb.get("class_path", ""))]
    configured_dir = next((Path(cb["init_args"]["dirpath"]) for cb in checkpoints if cb["init_args"].get("dirpath")), None)

    # the checkpoint to resume from or to score: the run it belongs to travels in the file
    ckpt = cfg.get("ckpt_path")
    source: dict[str, Any] = {}
    source_folder: Path | None = None
    if ckpt == "last":
        if explicit is None:
            latest = RUNS_ROOT / LATEST / "checkpoints" / "last.ckpt"
            raise RunError(
                f"--ckpt_path last needs the run: give the file (--ckpt_path {latest} resumes the latest run) or name the run "
                "(--run_name NAME --ckpt_path last)"
            )
        ckpt = str((configured_dir or explicit / "checkpoints") / "last.ckpt")
        if not Path(ckpt).is_file():
            raise RunError(f"--ckpt_path last: there is no {ckpt} to resume from")
    if _is_checkpoint_file_arg(ckpt):
        path = _shown(Path(ckpt).resolve())  # runs/latest/... -> the run's own folder
        blob = _read_source_checkpoint(path)
        source = {"path": path, "run_id": blob.get("mlflow_run_id"), "run_name": blob.get("run_name")}
        if path.parent.name == "checkpoints":
            source_folder = path.parent.parent
        source["run_name"] = source["run_name"] or (source_folder.name if source_folder else path.stem)
        cfg.ckpt_path = str(path)

    if explicit is not None:
        folder = explicit
    elif command == "fit" and source_folder is not None:
        folder = source_folder  # a resumed fit continues in its own folder
    elif command == "fit":
        folder = new_run_folder("-".join(["fit", *_config_stems(cfg)]), footprint=made)
    else:  # validate, test: a run of their own, named after what they score
        folder = new_run_folder("-".join([command, *([slug(source["run_name"])] if source else [])]), footprint=made)
    resumes_here = command == "fit" and bool(source) and source_folder is not None and source_folder.resolve() == folder.resolve()
    if given_name:
        name = given_name
    elif resumes_here and source.get("run_name"):
        name = source["run_name"]
    elif folder.resolve().parent.is_relative_to(RUNS_ROOT.resolve()):
        name = folder.resolve().relative_to(RUNS_ROOT.resolve()).as_posix()  # runs/<curriculum>/stage1 -> <curriculum>/stage1
    else:
        name = folder.name
    ckpt_dir = configured_dir or folder / "checkpoints"

    if rank0:  # the one process that writes
        try:
            _check_and_lock(command, folder, ckpt_dir if checkpoints else None, source, made)
        except BaseException:
            release_folder(folder)
            release_folder(ckpt_dir)
            made.undo()
            raise

    cfg.trainer.default_root_dir = str(folder)
    cfg.run_name = name
    for cb in checkpoints:
        cb["init_args"]["dirpath"] = str(ckpt_dir)
    if mlflow is not None:
        tags = {**(mlflow.get("tags") or {}), "fcn3.command": command, "fcn3.run_folder": str(folder.resolve())}
        if source:
            tags["fcn3.checkpoint"] = str(source["path"].resolve())
            if command != "fit" and source.get("run_id"):
                tags["fcn3.training_run_id"] = source["run_id"]
                tags["fcn3.training_run_name"] = source["run_name"]
            if command == "fit" and not resumes_here:
                tags["fcn3.resumed_from"] = str(source["path"].resolve())
        mlflow["tags"] = tags
        # the name is always ours: MLflow would otherwise draw one from Python's `random`, which seed_everything has
        # just seeded, so every run would get the same name
        mlflow["run_name"] = name
        if resumes_here and source.get("run_id") and not mlflow.get("run_id"):
            mlflow["run_id"] = source["run_id"]  # the run id and the weights come from the same file
    if rank0:
        what = f"resuming {source['path']}" if resumes_here else (f"from {source['path']}" if source else "")
        print(f"{command}: run {name} in {folder}" + (f" ({what})" if what else ""), flush=True)
    return Run(name, folder, ckpt_dir, made)


def _check_and_lock(command: str, folder: Path, ckpt_dir: Path | None, source: dict[str, Any], made: Footprint) -> None:
    """Rank 0: lock the run folder, check that it (and the checkpoint folder) can be written and that a fit does not
    mix with an earlier run's checkpoints, and point runs/latest at a new fit's folder."""
    lock_folder(folder, made)
    if command == "fit" and ckpt_dir is not None:
        if not ckpt_dir.resolve().is_relative_to(folder.resolve()):
            lock_folder(ckpt_dir, made)
        check_writable(ckpt_dir, "checkpoint folder", made)
        old = sorted(p.name for p in ckpt_dir.glob("*.ckpt"))
        if old and not (source and source["path"].resolve().parent == ckpt_dir.resolve()):
            raise RunError(
                f"checkpoint folder {ckpt_dir} already holds checkpoints of an earlier run ({', '.join(old[:3])}): resume it "
                f"with --ckpt_path {ckpt_dir / ('last.ckpt' if 'last.ckpt' in old else old[0])}, or start a new run "
                "(leave out --run_name / --trainer.default_root_dir, or name another)"
            )
    check_writable(folder, "run folder", made)
    if command == "fit" and folder.resolve().parent == RUNS_ROOT.resolve():
        update_latest(folder, made)


def run_cli(args: list[str] | None = None) -> FCN3CLI:
    # MLflow records CPU/GPU/memory of the run alongside the metrics (needs psutil)
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    return FCN3CLI(
        FCN3Module,
        WB2DataModule,
        save_config_callback=MLflowConfig,
        parser_kwargs={
            "prog": "python -m fcn3_lightning",  # what `fit --help` shows, as every other command
            **{cmd: {"default_config_files": [str(BASE_CONFIG)]} for cmd in ("fit", "validate", "test", "predict")},
        },
        args=None if args == sys.argv[1:] else args,  # LightningCLI warns when both are given
    )


STAGES = [CONFIGS / "stage1.yaml", CONFIGS / "stage2.yaml", CONFIGS / "finetune.yaml"]


def run_curriculum(
    stages: list[str] | None = None, extra: list[str] | None = None, *, name: str | None = None, root: str | None = None
) -> list[str]:
    """Run ``fit`` stage after stage, each starting from the previous stage's best weights (weights only).

    ``extra`` arguments apply to every stage (e.g. ``--trainer.max_epochs 1``). The stages of one curriculum live in
    one folder, ``runs/curriculum-<UTC time>/<stage>`` (``name``: ``runs/<name>/<stage>``; ``root``: ``<root>/<stage>``).
    Returns the best checkpoints.
    """
    stages = stages or [str(p) for p in STAGES]
    extra = list(extra or [])
    stems = [slug(Path(s).stem) for s in stages]
    if len(set(stems)) != len(stems):
        raise RunError(f"curriculum: stage configs must have different file names (each names its stage folder): {stages}")
    made = Footprint()  # taken back if the curriculum fails before a stage writes anything
    if root:
        folder = Path(root)
    elif name:
        folder = RUNS_ROOT / check_run_name(name)
    else:
        folder = new_run_folder("curriculum", footprint=made)
    try:
        if is_rank_zero():
            check_writable(folder, "curriculum folder", made)
            if folder.resolve().parent == RUNS_ROOT.resolve():
                update_latest(folder, made)
            print(f"curriculum: {len(stages)} stages in {folder}", flush=True)
        best: list[str] = []
        for i, (stage, stem) in enumerate(zip(stages, stems, strict=True)):
            args = ["fit", "--config", str(stage), *extra, "--trainer.default_root_dir", str(folder / stem)]
            if best:
                args += ["--model.init_from", best[-1]]
            print(f"curriculum: stage {i + 1}/{len(stages)}: {stage}" + (f" (from {best[-1]})" if best else ""), flush=True)
            cli = run_cli(args)
            ckpt = cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path
            if not ckpt:
                raise RuntimeError(f"curriculum: stage {stage} wrote no checkpoint to hand on")
            best.append(ckpt)
    except BaseException:
        made.undo()
        raise
    return best


def add_curriculum_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``curriculum`` on the ``python -m fcn3_lightning`` subparsers: its options here, every other option a
    fit option for every stage (``fit_options``: the command line hands them on as ``args.fit_args``)."""
    p = subparsers.add_parser(
        "curriculum",
        description="Runs `fit` for each stage config in turn, each stage starting from the previous stage's best weights "
        "(weights only). The stages live in one folder, runs/curriculum-<UTC time>/<stage>.",
        epilog="Every other option is a fit option for every stage (see `python -m fcn3_lightning fit --help`), "
        "e.g. --trainer.max_epochs 1.",
        allow_abbrev=False,  # unknown options are fit options: no prefix matching against the curriculum's own
    )
    default = " ".join(str(Path("configs") / s.name) for s in STAGES)
    p.add_argument("--stages", nargs="+", metavar="CONFIG", help=f"the stage configs, in order (default: {default})")
    p.add_argument("--run_name", help="the curriculum's folder runs/RUN_NAME/<stage> (default: runs/curriculum-<UTC time>)")
    p.add_argument(
        "--trainer.default_root_dir", dest="root", metavar="DIR", help="the curriculum's folder DIR/<stage> instead of one under runs/"
    )
    p.set_defaults(func=_curriculum, fit_options=True)
    return p


def _curriculum(args: argparse.Namespace) -> None:
    for best in run_curriculum(args.stages, args.fit_args, name=args.run_name, root=args.root):
        print(f"curriculum: {best}")
