"""The real command line end to end: ``python -m fcn3_lightning fit|validate`` in subprocesses on a small synthetic store.

Resuming after ``kill -9`` must reproduce the uninterrupted run, ``validate`` on the best checkpoint must
reproduce the validation scores logged during fit, MLflow must hold what users look for, and bad configs
must fail with an error that names the culprit. Every test has its own working directory, so MLflow's
``mlruns.db`` and ``runs/`` land there; each fit makes its own run folder ``runs/<run name>`` (``runs/latest`` points at it).
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tiny_net import FIT_NET
from wb2_synthetic import make_store

from fcn3_lightning.data import WB2Store, compute_stats

CHANNELS = ["tcwv", "u500", "v500", "z500"]
TRAIN = ["2000-01-01", "2000-01-20T18"]  # the first 80 of 120 six-hourly times
VALID = ["2000-01-21", "2000-01-30T18"]
EPOCHS, BATCHES = 3, 4
LATEST_CKPTS = Path("runs/latest/checkpoints")  # the last fit started in a working directory (fcn3_lightning.runs)
TINY = {
    "trainer": {"max_epochs": EPOCHS, "limit_train_batches": BATCHES, "limit_val_batches": 2, "log_every_n_steps": 1},
    "model": {
        "net": FIT_NET,
        "ensemble_size": 2,
    },
    "data": {"channels": CHANNELS, "train_range": TRAIN, "valid_range": VALID, "batch_size": 2, "train_rollout": 1, "valid_rollout": 2},
}
ENV = {
    **os.environ,
    "COLUMNS": "200",  # Lightning's metric table (rich) must not wrap the names
    # if the CLI starts MLflow's system metrics monitor, sample often enough for a short run to record some
    "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
}


class Setup:
    def __init__(self, root: Path):
        self.store, _ = make_store(root / "era.zarr", CHANNELS, n_times=120, cadence_hours=6, nlat=17, nlon=32)
        compute_stats(WB2Store(self.store, CHANNELS), *TRAIN, progress=False).save(f"{self.store}.stats.json")
        self.config = root / "tiny.yaml"
        self.config.write_text(yaml.safe_dump(TINY))

    def argv(self, command: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "fcn3_lightning", command, "--config", str(self.config), "--data.data_path", str(self.store), *extra]

    def run(self, command: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
        cwd.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(self.argv(command, *extra), cwd=cwd, capture_output=True, text=True, env=ENV, timeout=300)
        assert res.returncode == 0, f"{command} {extra} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
        return res


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    return Setup(tmp_path_factory.mktemp("fit_cli"))


@pytest.fixture(scope="module")
def run_a(setup: Setup, tmp_path_factory) -> Path:
    """An uninterrupted fit of EPOCHS epochs; returns its working directory."""
    cwd = tmp_path_factory.mktemp("run_a")
    t0 = time.perf_counter()
    setup.run("fit", cwd)
    print(f"uninterrupted fit: {time.perf_counter() - t0:.1f} s")
    return cwd


def _run_folder(cwd: Path) -> Path:
    """The one run folder a working directory holds: what runs/latest points at, and nothing beside it."""
    folders = sorted(p.name for p in (cwd / "runs").iterdir())
    latest = (cwd / "runs" / "latest").resolve()
    assert folders == sorted(["latest", latest.name]), f"expected one run folder and runs/latest in {cwd / 'runs'}: {folders}"
    return latest


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _mlflow(cwd: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlruns.db'}")
    exp = client.get_experiment_by_name("fcn3")
    assert exp is not None, f"no MLflow experiment 'fcn3' in {cwd / 'mlruns.db'}"
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()

    def real(t: torch.Tensor) -> torch.Tensor:  # the spectral weights are complex
        return (torch.view_as_real(t) if t.is_complex() else t).double()

    return max((real(a[k]) - real(b[k])).abs().max().item() for k in a if a[k].numel())


def _leftovers(cwd: Path) -> list[Path]:
    """Temporary or hidden files under runs/: what a write interrupted by the kill could leave behind."""
    return [p for p in (cwd / "runs").rglob("*") if p.is_file() and (p.name.startswith(".") or ".tmp" in p.name)]


def test_resume_after_kill_9_equals_the_uninterrupted_run(setup, run_a, tmp_path):
    cwd = tmp_path / "run_b"
    cwd.mkdir()
    last = cwd / LATEST_CKPTS / "last.ckpt"  # runs/latest exists from the start of the fit
    with open(cwd / "killed.out", "w") as out, open(cwd / "killed.err", "w") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(setup.argv("fit"), cwd=cwd, stdout=out, stderr=err, env=ENV)
        try:
            deadline = time.monotonic() + 240
            while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            # the checkpoint is renamed into place whole, so its existence means epoch 0 is saved; kill right away
            os.kill(proc.pid, signal.SIGKILL)
            print(f"killed after {time.monotonic() - t0:.1f} s")
        finally:
            proc.kill()
            proc.wait()
    log = (cwd / "killed.err").read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill ({proc.returncode}):\n{log}"
    assert last.exists(), f"no checkpoint before the run was killed:\n{log}"
    killed_at = _load(last)
    assert killed_at["epoch"] == 0 and killed_at["global_step"] == BATCHES, "the kill did not land after the first epoch"
    assert not _leftovers(cwd), f"partial files after the kill: {_leftovers(cwd)}"

    folder = _run_folder(cwd)
    assert killed_at["run_name"] == folder.name, (killed_at["run_name"], folder)
    t0 = time.perf_counter()
    setup.run("fit", cwd, "--ckpt_path", str(LATEST_CKPTS / "last.ckpt"))  # the README's resume command
    print(f"resumed fit: {time.perf_counter() - t0:.1f} s")

    assert _run_folder(cwd) == folder, "the resumed fit must continue in the killed fit's folder"
    files = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert files == ["best.ckpt", "last.ckpt"], files
    assert not _leftovers(cwd), f"partial files left: {_leftovers(cwd)}"
    a, b = _load(_run_folder(run_a) / "checkpoints" / "last.ckpt"), _load(last)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (EPOCHS - 1, EPOCHS * BATCHES)
    diff = _max_diff(a["state_dict"], b["state_dict"])
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys()
    opt_diff = max(_max_diff(opt_a[i], opt_b[i]) for i in opt_a)
    print(f"resume vs uninterrupted: max |diff| of the weights {diff:.3g}, of Adam's state {opt_diff:.3g}")
    assert diff <= 1e-6 and opt_diff <= 1e-6, (diff, opt_diff)
    # the best checkpoint is the same one too: ModelCheckpoint's state survived the kill
    best_a, best_b = _load(_run_folder(run_a) / "checkpoints" / "best.ckpt"), _load(folder / "checkpoints" / "best.ckpt")
    assert best_a["epoch"] == best_b["epoch"] and _max_diff(best_a["state_dict"], best_b["state_dict"]) <= 1e-6
    # MLflow: the resumed fit continues the killed fit's run (its id travels in the checkpoint)
    _, runs = _mlflow(cwd)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_id, r.info.status) for r in runs]
    assert runs[0].info.run_id == killed_at["mlflow_run_id"] and runs[0].info.run_name == folder.name


_TABLE_ROW = re.compile(r"^[│|]\s*(\S+)\s*[│|]\s*(\S+)\s*[│|]\s*$")


def test_validate_on_the_best_checkpoint_reproduces_the_logged_metrics(setup, run_a, tmp_path):
    client, runs = _mlflow(run_a)
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    history = {k: client.get_metric_history(run_id, k) for k in ("val/crps", "val/loss", "val/persistence_mae")}
    assert len(history["val/crps"]) == EPOCHS
    best = min(history["val/crps"], key=lambda m: m.value)
    logged = {k: next(m.value for m in h if m.step == best.step) for k, h in history.items()}
    best_ckpt = _run_folder(run_a) / "checkpoints" / "best.ckpt"
    assert _load(best_ckpt)["global_step"] == best.step + 1  # logged at the epoch's last step

    res = setup.run("validate", tmp_path, "--ckpt_path", str(best_ckpt))
    table = {m[1]: float(m[2]) for line in res.stdout.splitlines() if (m := _TABLE_ROW.match(line.strip())) and m[1].startswith("val/")}
    _, vruns = _mlflow(tmp_path)
    assert len(vruns) == 1
    # a run of its own, marked as validation of the training run (not the training run's name)
    tags, training = vruns[0].data.tags, runs[0]
    assert vruns[0].info.run_name.startswith(f"validate-{training.info.run_name}-"), vruns[0].info.run_name
    assert tags["fcn3.command"] == "validate" and tags["fcn3.checkpoint"] == str(best_ckpt.resolve()), tags
    assert tags["fcn3.training_run_id"] == run_id and tags["fcn3.training_run_name"] == training.info.run_name, tags
    for key, want in logged.items():
        got_table, got_mlflow = table[key], vruns[0].data.metrics[key]
        print(f"{key}: fit {want!r}, validate {got_table!r} (table) {got_mlflow!r} (MLflow)")
        assert math.isclose(got_table, want, rel_tol=1e-6), (key, want, got_table)
        assert math.isclose(got_mlflow, want, rel_tol=1e-6), (key, want, got_mlflow)


def test_mlflow_has_params_metrics_and_artifacts(run_a, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client, runs = _mlflow(run_a)
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.ensemble_size"] == "2" and params["model.net.num_layers"] == "2", params
    assert params["data.channels"] == str(CHANNELS) and params["trainer.max_epochs"] == str(EPOCHS)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(EPOCHS * BATCHES)), steps  # every step (log_every_n_steps 1)
    scores = ("val/crps/z500/6h", "val/ensemble_mean_rmse/u500/12h", "val/ensemble_spread/tcwv/6h")
    scores += ("val/spread_skill_ratio/v500/6h", "val/bias/z500/12h")
    for key in ("val/crps", "val/crps_lead6h", "val/crps_lead12h", *scores):
        assert len(client.get_metric_history(run.info.run_id, key)) == EPOCHS, key

    def walk(path: str | None = None) -> list[str]:
        out = []
        for a in client.list_artifacts(run.info.run_id, path):
            out += walk(a.path) if a.is_dir else [a.path]
        return out

    artifacts = walk()
    assert {"config.yaml", "best/best.ckpt", "last/last.ckpt"} <= set(artifacts), artifacts
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
    assert config["model"]["ensemble_size"] == 2 and config["data"]["data_path"].endswith("era.zarr")
    ckpt = _load(Path(client.download_artifacts(run.info.run_id, "last/last.ckpt", str(tmp_path))))
    assert ckpt["global_step"] == EPOCHS * BATCHES


def test_mlflow_records_system_metrics(run_a):
    # MLflow starts its monitor only in mlflow.start_run(); the CLI starts it for Lightning's client-made run
    _, runs = _mlflow(run_a)
    system = sorted(k for k in runs[0].data.metrics if k.startswith("system/"))
    if not system:
        pytest.fail("no system/ metrics in the fit's MLflow run")
    assert any("cpu" in k for k in system), system


BAD = {
    "unknown key": (["--model.no_such_key", "1"], ["no_such_key"]),
    "unknown key in YAML": (["--config", "{bad_yaml}"], ["no_such_yaml_key"]),
    "stats of other channels": (["--data.stats_path", "{other_stats}"], ["other.stats.json", "v500"]),
    "fair CRPS with one member": (["--model.ensemble_size", "1", "--model.crps", "fair"], ["fair CRPS", "at least 2 members"]),
    "channel not in the store": (["--data.channels", '["z500", "r500"]'], ["r500", "not in the store"]),
}


def test_bad_configs_exit_nonzero_naming_the_culprit(setup, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(yaml.safe_dump({"model": {"no_such_yaml_key": 3}}))
    other, _ = make_store(tmp_path / "other.zarr", ["tcwv", "u500", "z500"], n_times=8, nlat=17, nlon=32)
    other_stats = tmp_path / "other.stats.json"
    compute_stats(WB2Store(other, ["tcwv", "u500", "z500"]), "2000-01-01", "2000-01-02", progress=False).save(other_stats)
    procs = {}
    for i, (name, (extra, _)) in enumerate(BAD.items()):  # all at once: each is mostly start-up time
        cwd = tmp_path / f"case{i}"
        cwd.mkdir()
        extra = [e.format(bad_yaml=bad_yaml, other_stats=other_stats) for e in extra]
        with open(cwd / "stderr.txt", "w") as err:  # a file, not a pipe: no process blocks on a full pipe
            procs[name] = (subprocess.Popen(setup.argv("fit", *extra), cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, env=ENV), cwd)
    failures = []
    for name, (proc, cwd) in procs.items():
        proc.wait(timeout=300)
        stderr = (cwd / "stderr.txt").read_text()
        wanted = BAD[name][1]
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        print(f"{name}: exit {proc.returncode}: {tail}")
        if proc.returncode == 0 or not all(w in stderr for w in wanted):
            failures.append(f"{name}: exit {proc.returncode}, wanted {wanted} in stderr:\n{stderr[-2000:]}")
    # a run that fails before it writes anything takes back the folders its start made
    written = [str(p) for p in tmp_path.glob("case*/runs/**/*")]
    assert not failures and not written, "\n\n".join(failures + [f"left behind: {written}"])
