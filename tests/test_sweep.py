"""``python -m fcn3_lightning sweep``: Optuna over tiny fits of the default world, with real storages, real MLflow
stores in tmp_path and real worker processes (two at once; one of them killed with SIGKILL)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from fcn3_lightning.__main__ import main as fcn3_main

ENV = {**os.environ, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "COLUMNS": "200"}
TINY = {
    "overrides": {
        "trainer.max_steps": 4,
        "trainer.limit_val_batches": 1,
        "trainer.log_every_n_steps": 1,
        "trainer.num_sanity_val_steps": 0,  # the objective metric is then checked at the first validation
        "trainer.logger.init_args.log_model": False,
        "trainer.callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"filename": "best", "monitor": "val/crps", "mode": "min", "save_top_k": 1},
            }
        ],
        "model.net": {"atmo_embed_dim": 4, "surf_embed_dim": 4, "aux_embed_dim": 2, "num_layers": 1, "sfno_block_frequency": 1},
        "model.ensemble_size": 2,
        "data.batch_size": 2,
        "data.train_rollout": 1,
        "data.valid_rollout": 1,
    },
    "objective": {"metric": "val/crps_lead6h", "mode": "min"},
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
    "report_every_n_steps": 2,
    "params": {"model.lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-2, "log": True}},
}


def _write(path: Path, **changes) -> Path:
    spec = yaml.safe_load(yaml.safe_dump(TINY))
    for key, value in changes.items():
        spec[key] = value
    path.write_text(yaml.safe_dump(spec))
    return path


def _argv(cwd: Path, *extra: str, config: str = "tiny.yaml") -> list[str]:
    return [sys.executable, "-m", "fcn3_lightning", "sweep", "--config", str(cwd / config), "--study-name", "s", *extra]


def _spawn(cwd: Path, name: str, argv: list[str]) -> subprocess.Popen:
    with open(cwd / f"{name}.out", "w") as out:  # a file, not a pipe: no process blocks on a full pipe
        return subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=ENV)


def _start(cwd: Path, name: str, *extra: str, config: str = "tiny.yaml") -> subprocess.Popen:
    return _spawn(cwd, name, _argv(cwd, *extra, config=config))


def _journal(path: Path) -> optuna.storages.BaseStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def _finish(proc: subprocess.Popen, cwd: Path, name: str, timeout: float = 400) -> str:
    proc.wait(timeout=timeout)
    log = (cwd / f"{name}.out").read_text()
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{log[-4000:]}"
    return log


def _mlflow_runs(cwd: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{cwd / 'mlruns.db'}")
    exp = client.get_experiment_by_name("fcn3")
    assert exp is not None
    return client, client.search_runs([exp.experiment_id])


def test_single_worker_prunes_tracks_in_mlflow_and_writes_best(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    # seeds 8, 9: trial 0 learns (lr 4e-3), trial 1 barely moves (lr 1e-5) and is worse than trial 0 at step 2
    _write(tmp_path / "tiny.yaml", sampler={"name": "random", "seed": 8})
    t0 = time.perf_counter()
    rc = fcn3_main(["sweep", "--config", "tiny.yaml", "--n-trials", "2", "--storage", "sqlite:///sweep.db", "--study-name", "one"])
    out = capsys.readouterr()
    print(f"single worker, 2 trials: {time.perf_counter() - t0:.0f} s")
    assert rc == 0, out.err[-3000:]
    study = optuna.load_study(study_name="one", storage="sqlite:///sweep.db")
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED], out.out[-3000:]
    assert list(study.trials[0].intermediate_values) == [2, 4]  # every report_every_n_steps training steps
    assert list(study.trials[1].intermediate_values) == [2]  # stopped at its first report

    best = tmp_path / "sweeps" / "one" / "best.yaml"
    cfg = yaml.safe_load(best.read_text())
    assert cfg["model"]["lr"] == study.best_params["model.lr"] and cfg["trainer"]["max_steps"] == 4
    assert cfg["trainer"]["logger"]["init_args"]["run_id"] is None
    assert cfg["trainer"]["default_root_dir"] is None  # a refit gets a run folder of its own

    client, runs = _mlflow_runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    nested = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in nested] == ["trial_0", "trial_1"]
    assert [(r.data.tags["optuna.state"], r.info.status) for r in nested] == [("COMPLETE", "FINISHED"), ("PRUNED", "KILLED")]
    for run, trial in zip(nested, study.trials, strict=True):
        assert float(run.data.params["model.lr"]) == pytest.approx(trial.params["model.lr"])
        curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "objective")}
        assert curve == pytest.approx(trial.intermediate_values)
        assert len(client.get_metric_history(run.info.run_id, "val/crps_lead6h")) == len(trial.intermediate_values)
    assert nested[0].data.metrics["objective_final"] == pytest.approx(study.best_value)
    assert parent.data.params["space.model.lr"] == "float [1e-05, 0.01] log" and parent.data.tags["best_trial"] == "0"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/intermediate_values.png", "plots/parallel_coordinate.png"} <= artifacts
    assert "param_importances needs" not in out.out and "plot param_importances skipped" in out.out  # 1 completed trial
    assert "best.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}


BAD = {
    "key not in the config": (
        {"params": {"model.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}}},
        ["model.learning_rate", "no such key", "tiny.yaml", "did you mean", "'model.lr'"],
    ),
    "empty range": ({"params": {"model.lr": {"type": "float", "low": 1e-2, "high": 1e-3}}}, ["params.model.lr", "empty range"]),
    "empty choices": ({"params": {"model.crps": {"type": "categorical", "choices": []}}}, ["params.model.crps", "empty"]),
    "metric not logged": ({"objective": {"metric": "val/crps_lead99h"}}, ["val/crps_lead99h", "not logged", "val/crps_lead6h"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_naming_the_culprit(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    changes, wanted = BAD[case]
    _write(tmp_path / "tiny.yaml", **changes)
    rc = fcn3_main(["sweep", "--config", "tiny.yaml", "--n-trials", "3", "--storage", "sqlite:///sweep.db"])
    err = capsys.readouterr().err
    print(f"{case}: exit {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    assert rc == 2 and all(w in err for w in wanted), err[-3000:]
    assert not (tmp_path / "sweeps" / "tiny" / "best.yaml").exists()
    if case == "metric not logged":  # found by the first trial's sanity validation; no further trial ran
        study = optuna.load_study(study_name="tiny", storage="sqlite:///sweep.db")
        assert [t.state for t in study.trials] == [TrialState.FAIL]


def test_two_workers_share_a_study_and_a_rerun_continues_it(tmp_path, monkeypatch, capsys):
    _write(tmp_path / "tiny.yaml")
    storage = f"journal:{tmp_path / 'sweep.journal'}"
    t0 = time.perf_counter()
    workers = [_start(tmp_path, f"w{i}", "--n-trials", "6", "--storage", storage) for i in range(2)]
    logs = [_finish(w, tmp_path, f"w{i}") for i, w in enumerate(workers)]
    print(f"two workers, 6 trials: {time.perf_counter() - t0:.0f} s")
    study = optuna.load_study(study_name="s", storage=_journal(tmp_path / "sweep.journal"))
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(6)), numbers
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials), [t.state for t in study.trials]
    by_worker = {t.user_attrs["worker"] for t in study.trials}
    assert len(by_worker) == 2, f"one worker ran every trial: {by_worker}\n{logs[0][-2000:]}"
    assert len({t.params["model.lr"] for t in study.trials}) == 6  # the workers' samplers do not repeat each other
    dirs = sorted(p.name for p in (tmp_path / "sweeps" / "s").glob("trial_*"))
    assert dirs == [f"trial_{n}" for n in range(6)]

    # rerun (in this process) with a larger total: the same study continues at trial 6
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    rc = fcn3_main(["sweep", "--config", "tiny.yaml", "--study-name", "s", "--n-trials", "7", "--storage", storage])
    log = capsys.readouterr().out
    assert rc == 0 and "(6 trials so far)" in log and "this worker ran [6]" in log, log[-3000:]
    study = optuna.load_study(study_name="s", storage=_journal(tmp_path / "sweep.journal"))
    assert [t.number for t in study.trials] == list(range(7))
    # the best config is a fit config as it stands, and each refit is a run of its own
    assert fcn3_main(["fit", "--config", "sweeps/s/best.yaml"]) == 0
    assert fcn3_main(["fit", "--config", "sweeps/s/best.yaml"]) == 0
    refits = sorted((tmp_path / "runs").glob("fit-best-*"))
    assert len(refits) == 2 and all((r / "checkpoints" / "best.ckpt").is_file() for r in refits), refits
    _, runs = _mlflow_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("fcn3.sweep.study") == "s" and "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1  # both workers and the rerun share one parent run
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in nested) == [f"trial_{n}" for n in range(7)]


def test_killed_worker_trial_ends_failed_and_the_other_finishes(tmp_path):
    _write(tmp_path / "tiny.yaml")
    # the victim's trials are long (300 steps), so it is killed in the middle of a fit, never just after one: with
    # 4-step trials the fit after the first report lasted about a second and the poll below could miss it
    _write(tmp_path / "victim.yaml", overrides={**TINY["overrides"], "trainer.max_steps": 300})
    storage = f"sqlite:///{tmp_path / 'sweep.db'}"
    extra = ("--n-trials", "3", "--storage", storage, "--heartbeat-interval", "1", "--grace-period", "4")
    victim, survivor = _start(tmp_path, "victim", *extra, config="victim.yaml"), None
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
            try:
                trials = optuna.load_study(study_name="s", storage=storage).get_trials(states=(TrialState.RUNNING,))
            except KeyError:  # the study does not exist yet
                continue
            for t in trials:  # kill in the middle of a fit: after its first report to the pruner
                if t.user_attrs.get("worker", "").endswith(f":{victim.pid}") and t.intermediate_values:
                    survivor = _start(tmp_path, "survivor", *extra)  # two workers at once, the victim mid-trial
                    time.sleep(1.0)
                    os.kill(victim.pid, signal.SIGKILL)
                    killed = t.number
    finally:
        victim.kill()
        victim.wait()
    assert killed is not None and survivor is not None, f"the victim never ran a trial:\n{(tmp_path / 'victim.out').read_text()[-3000:]}"
    log = _finish(survivor, tmp_path, "survivor")
    study = optuna.load_study(study_name="s", storage=storage)
    states = {t.number: t.state for t in study.trials}
    assert sorted(states) == list(range(3)), states
    assert states[killed] == TrialState.FAIL, (killed, states, log[-3000:])
    assert all(s in (TrialState.COMPLETE, TrialState.PRUNED) for n, s in states.items() if n != killed), states
    assert study.best_trial.state == TrialState.COMPLETE  # the study stays usable
    assert (tmp_path / "sweeps" / "s" / "best.yaml").is_file()
    _, runs = _mlflow_runs(tmp_path)
    run = next(r for r in runs if r.info.run_name == f"trial_{killed}")
    assert run.info.status == "FAILED" and run.data.tags["optuna.state"] == "FAIL"


def _run(cwd: Path, *extra: str, umask: int = 0o022) -> subprocess.CompletedProcess:
    """A sweep worker under ``umask`` (set in the child: the test does not depend on the runner's umask)."""
    return subprocess.run(
        _argv(cwd, *extra), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=400, preexec_fn=lambda: os.umask(umask)
    )


def test_a_study_of_the_same_name_in_another_storage_stops_before_touching_the_folder(tmp_path):
    _write(tmp_path / "tiny.yaml")
    first = _run(tmp_path, "--n-trials", "1", "--storage", f"sqlite:///{tmp_path / 'a.db'}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    folder = tmp_path / "sweeps" / "s"
    best = (folder / "best.yaml").read_bytes()
    before = sorted(p.name for p in folder.iterdir())
    modes = {name: oct(stat.S_IMODE((folder / name).stat().st_mode)) for name in ("best.yaml", "study.json", "trial_0", "plots")}
    print(f"sweep outputs under umask 022: {modes}")
    assert modes == {"best.yaml": "0o644", "study.json": "0o644", "trial_0": "0o755", "plots": "0o755"}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in (folder / "plots").iterdir()} == {"0o644"}

    # another study of the same name, in another storage, into the same folder: refused at once
    other = _run(tmp_path, "--n-trials", "1", "--storage", f"sqlite:///{tmp_path / 'b.db'}")
    err = other.stderr.strip().splitlines()
    print(f"second study: exit {other.returncode}: {err[-1] if err else ''}")
    assert other.returncode == 2, other.stdout[-3000:] + other.stderr[-3000:]
    line = err[-1]
    for word in ("sweeps/s belongs to", str(tmp_path / "a.db"), str(tmp_path / "b.db"), "--out", "--study-name"):
        assert word in line, line
    assert (folder / "best.yaml").read_bytes() == best and sorted(p.name for p in folder.iterdir()) == before
    assert optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'b.db'}").trials == []
    _, runs = _mlflow_runs(tmp_path)
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1  # no parent run for the refused study

    # the same study, under another spelling of its storage (relative path): shares the folder
    again = _run(tmp_path, "--n-trials", "1", "--storage", "sqlite:///a.db")
    assert again.returncode == 0 and "this worker ran []" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]


def test_a_folder_of_an_unrecorded_study_is_not_taken_by_a_new_one(tmp_path):
    """Folders written before they recorded their study: a new, empty study cannot be the one that wrote them."""
    from fcn3_lightning.sweep.folder import OWNER_FILE, claim
    from fcn3_lightning.sweep.space import SweepError
    from fcn3_lightning.sweep.storage import make_storage

    folder = tmp_path / "sweeps" / "s"
    (folder / "trial_0").mkdir(parents=True)
    url = f"sqlite:///{tmp_path / 'new.db'}"
    storage = make_storage(url)
    study = optuna.create_study(storage=storage, study_name="s")
    with pytest.raises(SweepError, match="holds trials of an earlier sweep whose study is not recorded"):
        claim(folder, study, storage, url)
    assert not (folder / OWNER_FILE).exists()
    study.add_trial(optuna.trial.create_trial(value=1.0))  # a study with trials (the one that wrote them): it claims the folder
    claim(folder, study, storage, url)
    assert (folder / OWNER_FILE).is_file()
