"""MLflow for a study: one parent run, shared by all its workers, and one nested run per trial.

The trial's fit logs into its nested run through Lightning's MLFlowLogger (``run_id``): the whole resolved config
as params, ``config.yaml``, every training and validation metric. The sweep adds the objective curve
(``objective`` at each reported step), the final value (``objective_final``) and the Optuna state (tag
``optuna.state``; run status FINISHED, KILLED when pruned, FAILED). The parent holds the search space, the best
trial and, as artifacts, ``best.yaml`` and Optuna's plots.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from fcn3_lightning.cli import prepare_sqlite_store
from fcn3_lightning.sweep.space import SweepError, SweepSpec

PARENT_ATTR = "mlflow_parent_run_id"
URI_ATTR = "mlflow_tracking_uri"
RUN_ATTR = "mlflow_run_id"
STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}


class Tracking:
    def __init__(self, uri: str, experiment_name: str, artifact_location: str | None = None):
        prepare_sqlite_store(uri)
        self.uri = uri
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment_name)
        if exp is None:
            try:
                self.experiment_id = self.client.create_experiment(experiment_name, artifact_location=artifact_location)
            except MlflowException:  # created meanwhile by another process
                exp = self.client.get_experiment_by_name(experiment_name)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            self.experiment_id = exp.experiment_id

    def parent_run(self, study: optuna.Study, spec: SweepSpec, storage: str) -> str:
        """The study's parent run: created by the first worker, found by the others (call under the study lock)."""
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id is None:
            tags = {"fcn3.sweep.study": study.study_name, "fcn3.sweep.storage": storage, "fcn3.sweep.file": str(spec.path)}
            run = self.client.create_run(self.experiment_id, run_name=study.study_name, tags=tags)
            run_id = run.info.run_id
            study.set_user_attr(PARENT_ATTR, run_id)
            study.set_user_attr(URI_ATTR, self.uri)
        else:
            try:
                run = self.client.get_run(run_id)
            except MlflowException as e:
                raise SweepError(
                    f"study {study.study_name!r}: its MLflow parent run {run_id} is not in {self.uri}; the study's workers "
                    f"log to {study.user_attrs.get(URI_ATTR)!r} (give that --tracking-uri)"
                ) from e
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")  # resumed
        logged = self.client.get_run(run_id).data.params
        params = [Param(k, v[:500]) for k, v in spec.summary().items() if k not in logged]
        changed = {k: (logged[k], v) for k, v in spec.summary().items() if k in logged and logged[k] != v[:500]}
        if changed:
            print(f"sweep: the search differs from the study's first run (MLflow keeps the first values): {changed}", flush=True)
        if params:
            self.client.log_batch(run_id, params=params)
        return run_id

    def trial_run(self, parent_id: str, study: optuna.Study, number: int, worker: str) -> str:
        tags = {
            "mlflow.parentRunId": parent_id,
            "fcn3.sweep.study": study.study_name,
            "optuna.trial": str(number),
            "optuna.worker": worker,
            "optuna.state": "RUNNING",
        }
        return self.client.create_run(self.experiment_id, run_name=f"trial_{number}", tags=tags).info.run_id

    def end_trial(
        self, run_id: str, state: TrialState, value: float | None, curve: dict[int, float], params: dict[str, Any], error: str | None
    ) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric("objective", v, now, step) for step, v in sorted(curve.items())]
        if value is not None:
            metrics.append(Metric("objective_final", value, now, max(curve, default=0)))
        tags = [RunTag("optuna.state", state.name)]
        tags += [RunTag(f"optuna.param.{k}", str(v)) for k, v in params.items()]
        if error:
            tags.append(RunTag("optuna.error", error[-4000:]))
        for i in range(0, len(metrics), 500):
            self.client.log_batch(run_id, metrics=metrics[i : i + 500])
        self.client.log_batch(run_id, tags=tags)
        self.client.set_terminated(run_id, STATUS.get(state, "FAILED"))

    def fail_stale(self, trial: FrozenTrial) -> None:
        """A dead worker's trial: its nested run is FAILED too."""
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id:
            self.client.set_tag(run_id, "optuna.state", TrialState.FAIL.name)
            self.client.set_tag(run_id, "optuna.error", "the worker died (no heartbeat)")
            self.client.set_terminated(run_id, "FAILED")

    def summarize(self, parent_id: str, study: optuna.Study, best_yaml: Path | None, plots: list[Path], finished: bool) -> None:
        trials = study.get_trials(deepcopy=False)
        counts = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        now = int(time.time() * 1000)
        step = len(trials)
        metrics = [Metric(f"trials_{s.name.lower()}", float(n), now, step) for s, n in counts.items()]
        tags = []
        if counts[TrialState.COMPLETE]:
            best = study.best_trial
            metrics.append(Metric("best_value", float(best.value), now, step))
            tags.append(RunTag("best_trial", str(best.number)))
            tags += [RunTag(f"best.{k}", str(v)) for k, v in best.params.items()]
            if best.user_attrs.get(RUN_ATTR):
                tags.append(RunTag("best_run_id", best.user_attrs[RUN_ATTR]))
        self.client.log_batch(parent_id, metrics=metrics, tags=tags)
        if best_yaml is not None:
            self.client.log_artifact(parent_id, str(best_yaml))
        for p in plots:
            self.client.log_artifact(parent_id, str(p), "plots")
        if finished:
            self.client.set_terminated(parent_id, "FINISHED")
