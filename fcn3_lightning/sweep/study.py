"""A sweep worker: prepares the trials' fit config once, then asks Optuna for trials and fits them until the study
holds ``n_trials`` trials (all workers together) or ``timeout`` has passed.

Every worker of a study runs this same loop against the shared storage; a file lock in ``<out>/<study>/`` makes
"count the trials, ask for a new one" atomic, so workers together run exactly ``n_trials`` and trial numbers are
never duplicated (Optuna numbers trials in the storage). Rerunning resumes: the study is loaded, the trials it
holds count, and a dead worker's RUNNING trials are failed by the heartbeat check.
"""

from __future__ import annotations

import copy
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from fcn3_lightning.io import atomic_path
from fcn3_lightning.sweep.fitconfig import FitConfig
from fcn3_lightning.sweep.folder import claim
from fcn3_lightning.sweep.heartbeat import Heartbeat, fail_stale_trials, wait_for_dead_trials
from fcn3_lightning.sweep.objective import ObjectiveReporter, run_fit
from fcn3_lightning.sweep.plots import save_plots
from fcn3_lightning.sweep.space import SweepError, SweepSpec, get_key, set_key, unknown_key_error
from fcn3_lightning.sweep.storage import file_lock, make_storage
from fcn3_lightning.sweep.tracking import RUN_ATTR, Tracking

CONFIG_ATTR = "fit_config"  # the trial's config as best.yaml would hold it
SPEC_ATTR = "objective"
LOCK_NAME = ".sweep.lock"


@dataclass
class SweepOptions:
    spec: SweepSpec
    storage: str
    out: Path
    study_name: str
    n_trials: int | None = None
    timeout: float | None = None
    tracking_uri: str | None = None
    heartbeat_interval: float = 10.0
    grace_period: float = 60.0
    fit_args: list[str] = field(default_factory=list)


@dataclass
class SweepResult:
    study: optuna.Study
    best_yaml: Path | None
    plots: list[Path]
    ran: list[int]  # trial numbers run by this worker


def _mlflow_logger(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    logger = cfg["trainer"].get("logger")
    if not isinstance(logger, dict) or "MLFlowLogger" not in str(logger.get("class_path", "")):
        raise SweepError(f"{where}: trainer.logger must be lightning.pytorch.loggers.MLFlowLogger (each trial is a nested MLflow run)")
    return logger.setdefault("init_args", {})


def prepare_config(spec: SweepSpec, fit: FitConfig, opts: SweepOptions) -> tuple[dict[str, Any], str]:
    """The config every trial starts from (fit defaults + base files + fit options + overrides + the sweep's own
    settings), with every searched key checked; returns it and the MLflow tracking URI."""
    where = str(spec.path)
    cfg = fit.resolved()
    for key, value in spec.overrides.items():
        try:
            set_key(cfg, key, copy.deepcopy(value))
        except KeyError:
            raise unknown_key_error(f"{where}: overrides", key, cfg, "the resolved fit config") from None
    for key in spec.params:
        try:
            get_key(cfg, key)
        except KeyError:
            raise unknown_key_error(f"{where}: params", key, cfg, "the resolved fit config") from None
    logger = _mlflow_logger(cfg, where)
    if opts.tracking_uri:
        logger["tracking_uri"] = opts.tracking_uri
    cfg["mlflow_tracking_uri"] = None  # the logger holds the URI; best.yaml should too
    logger["tracking_uri"] = logger.get("tracking_uri") or "sqlite:///mlruns.db"
    uri = _absolute(logger["tracking_uri"])
    trainer = cfg["trainer"]
    trainer["val_check_interval"] = spec.report_every_n_steps  # counted in training steps across epochs ...
    trainer["check_val_every_n_epoch"] = None  # ... which Lightning allows only without an epoch cadence
    max_steps = trainer.get("max_steps")
    if isinstance(max_steps, int) and 0 < max_steps < spec.report_every_n_steps:
        raise SweepError(
            f"{where}: report_every_n_steps ({spec.report_every_n_steps}) exceeds trainer.max_steps ({max_steps}): no trial would report"
        )
    # a value of the search space that the fit config does not accept fails here, not in trial 7
    for end, label in ((0, "low ends / first choices"), (1, "high ends / last choices")):
        probe = copy.deepcopy(cfg)
        for key, p in spec.params.items():
            set_key(probe, key, p.extremes()[end])
        fit.check(probe, f"{where}: params at their {label}")
    return cfg, uri


def _absolute(uri: str) -> str:
    """A relative SQLite URI made absolute: MLflow caches stores by URI, and the sweep's own client must not
    depend on the working directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return uri


def _trial_config(
    fit: FitConfig, cfg: dict[str, Any], params: dict[str, Any], root: Path | None, run_id: str | None, what: str, uri: str | None = None
) -> str:
    """The fit config of a trial (``run_id``: its nested MLflow run in the store at ``uri``, ``root``: its folder), or
    of best.yaml (``root`` None: each refit is a new run in a folder of its own, ``runs/fit-best-<UTC time>``)."""
    c = copy.deepcopy(cfg)
    for key, value in params.items():
        set_key(c, key, value)
    c["trainer"]["default_root_dir"] = None if root is None else str(root)
    logger = c["trainer"]["logger"]["init_args"]
    logger["run_id"] = run_id
    if uri is not None:
        logger["tracking_uri"] = uri
    return fit.check(c, what)


def _count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False))


def write_best(study: optuna.Study, path: Path) -> Path | None:
    """The best completed trial's config, as ``fit --config`` takes it (None while no trial completed)."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return None
    best = study.best_trial
    with atomic_path(path) as tmp:
        header = f"# best trial {best.number} of study {study.study_name!r}: objective {best.value!r}, params {best.params}\n"
        tmp.write_text(header + best.user_attrs[CONFIG_ATTR])
    return path


def run_sweep(opts: SweepOptions) -> SweepResult:
    spec = opts.spec
    fit = FitConfig([*(f"--config={b}" for b in spec.base), *opts.fit_args])
    base_cfg, uri = prepare_config(spec, fit, opts)
    study_dir = opts.out / opts.study_name
    lock = study_dir / LOCK_NAME
    worker = f"{socket.gethostname()}:{os.getpid()}"
    interval, grace = opts.heartbeat_interval, opts.grace_period

    with file_lock(lock):  # one worker at a time creates the storage's tables, the study and the parent run
        storage = make_storage(opts.storage)
        study = optuna.create_study(
            storage=storage,
            study_name=opts.study_name,
            direction=spec.direction,
            sampler=spec.make_sampler(),
            pruner=spec.make_pruner(),
            load_if_exists=True,
        )
        objective = {"metric": spec.metric, "mode": spec.mode}
        stored = study.user_attrs.get(SPEC_ATTR)
        if stored is None:
            study.set_user_attr(SPEC_ATTR, objective)
        elif stored != objective or study.direction.name.lower() != spec.direction:
            raise SweepError(f"study {opts.study_name!r} in {opts.storage} optimises {stored}; {spec.path} asks for {objective}")
        claim(study_dir, study, storage, opts.storage)  # a folder of another study of the same name: stop before touching it
        logger = base_cfg["trainer"]["logger"]["init_args"]
        tracking = Tracking(uri, logger.get("experiment_name") or "lightning_logs", logger.get("artifact_location"))
        parent = tracking.parent_run(study, spec, opts.storage)

    print(
        f"sweep: study {opts.study_name!r} in {opts.storage} ({_count(study)} trials so far), worker {worker}, "
        f"objective {spec.mode} {spec.metric}, MLflow {uri} parent run {parent}",
        flush=True,
    )
    start = time.monotonic()
    own: set[int] = set()
    ran: list[int] = []
    while True:
        if opts.timeout is not None and time.monotonic() - start >= opts.timeout:
            print(f"sweep: --timeout {opts.timeout:g} s reached; no new trial", flush=True)
            break
        with file_lock(lock):  # "count, then ask" at once: workers together stop at exactly n_trials
            fail_stale_trials(study, storage, grace, tracking.fail_stale)
            if opts.n_trials is not None and _count(study) >= opts.n_trials:
                break
            study.sampler = spec.make_sampler(_count(study))  # the number the next trial gets
            trial = study.ask()
            trial.set_user_attr("worker", worker)
        own.add(trial._trial_id)
        ran.append(trial.number)
        _run_trial(study, trial, spec, fit, base_cfg, study_dir, tracking, parent, worker, storage, interval)

    wait_for_dead_trials(study, storage, interval, grace, own, tracking.fail_stale)
    with file_lock(lock):
        best = write_best(study, study_dir / "best.yaml")
        plots = save_plots(study, study_dir / "plots")
        trials = study.get_trials(deepcopy=False)
        busy = any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
        finished = not busy and (opts.n_trials is None or len(trials) >= opts.n_trials)
        tracking.summarize(parent, study, best, plots, finished)
    return SweepResult(study, best, plots, ran)


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    spec: SweepSpec,
    fit: FitConfig,
    base_cfg: dict[str, Any],
    study_dir: Path,
    tracking: Tracking,
    parent: str,
    worker: str,
    storage: optuna.storages.BaseStorage,
    interval: float,
) -> None:
    n = trial.number
    trial_dir = study_dir / f"trial_{n}"
    run_id = tracking.trial_run(parent, study, n, worker)
    trial.set_user_attr(RUN_ATTR, run_id)
    state, value, error, fatal = TrialState.FAIL, None, None, None
    reporter = ObjectiveReporter(trial, spec.metric)
    params: dict[str, Any] = {}
    t0 = time.monotonic()
    print(f"sweep: trial {n} started in {trial_dir}", flush=True)
    with Heartbeat(storage, trial._trial_id, interval) as heartbeat:
        try:
            params = {key: p.suggest(trial) for key, p in spec.params.items()}
            print(f"sweep: trial {n} params {params}", flush=True)
            # best.yaml: the same config without the trial's MLflow run, training into its own directory
            trial.set_user_attr(CONFIG_ATTR, _trial_config(fit, base_cfg, params, None, None, f"trial {n}"))
            config = _trial_config(fit, base_cfg, params, trial_dir, run_id, f"trial {n}", tracking.uri)
            run_fit(reporter, config, trial_dir)
            value = reporter.curve[max(reporter.curve)]  # the last validation's value (NaN: Optuna fails the trial)
            state = TrialState.COMPLETE
        except optuna.TrialPruned as e:
            state, error = TrialState.PRUNED, str(e)
        except SweepError as e:  # the sweep's configuration is wrong: no later trial would do better
            error, fatal = str(e), e
        except Exception as e:  # this trial's values failed (diverged, invalid combination, ...): the sweep goes on
            error = "".join(traceback.format_exception(e))
            print(f"sweep: trial {n} failed:\n{error}", flush=True)
        except KeyboardInterrupt:
            error = "interrupted"
            _tell(study, trial, TrialState.FAIL, None)
            tracking.end_trial(run_id, TrialState.FAIL, None, reporter.curve, params, error)
            raise
    curve = reporter.curve
    if heartbeat.lost:
        print(f"sweep: trial {n} was failed by another worker while it ran (missed heartbeats); its result is discarded", flush=True)
        tracking.end_trial(run_id, TrialState.FAIL, None, curve, params, "failed by another worker: missed heartbeats")
        return
    frozen_state = _tell(study, trial, state, value)
    tracking.end_trial(run_id, frozen_state, value if frozen_state == TrialState.COMPLETE else None, curve, params, error)
    shown = f" value {value:.6g}" if frozen_state == TrialState.COMPLETE else (f" ({error.splitlines()[-1]})" if error else "")
    print(f"sweep: trial {n} {frozen_state.name}{shown} after {time.monotonic() - t0:.0f} s", flush=True)
    if fatal is not None:
        raise fatal
    if frozen_state == TrialState.COMPLETE:
        with file_lock(study_dir / LOCK_NAME):
            write_best(study, study_dir / "best.yaml")


def _tell(study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None) -> TrialState:
    # skip_if_finished: another worker may have failed it meanwhile (missed heartbeats); the storage's state wins
    frozen = study.tell(trial, value if state == TrialState.COMPLETE else None, state=state, skip_if_finished=True)
    return frozen.state
