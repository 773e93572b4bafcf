"""Runs that never mix: every run its own folder and MLflow run name, a lock against a second writer, the processes
of one launch agree on the folder, and clear one-line errors (exit 2) for folders nobody can write and for
checkpoints that cannot be read. The real command line in subprocesses, a real MLflow store, real torchrun."""

from __future__ import annotations

import os
import signal
import stat
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
from fcn3_lightning.runs import RunError, check_run_name, claim_new_folder

TESTS = Path(__file__).resolve().parent
CHANNELS = ["tcwv", "u500", "v500", "z500"]
TRAIN, VALID = ["2000-01-01", "2000-01-08T18"], ["2000-01-09", "2000-01-12T18"]
TINY = {
    "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "log_every_n_steps": 1},
    "model": {
        "net": FIT_NET,
        "ensemble_size": 2,
    },
    "data": {"channels": CHANNELS, "train_range": TRAIN, "valid_range": VALID, "batch_size": 2, "valid_rollout": 1},
}
ENV = {**os.environ, "COLUMNS": "200", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """``fit`` options for a tiny model on a small synthetic store (absolute paths: any working directory)."""
    root = tmp_path_factory.mktemp("runs_store")
    store, _ = make_store(root / "era.zarr", CHANNELS, n_times=52, cadence_hours=6, nlat=17, nlon=32)
    compute_stats(WB2Store(store, CHANNELS), *TRAIN, progress=False).save(f"{store}.stats.json")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    return ["--config", str(config), "--data.data_path", str(store)]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fcn3_lightning", *args]


def test_help_lists_every_command():
    res = subprocess.run(_cli("--help"), capture_output=True, text=True, env={**ENV, "COLUMNS": "200"}, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for command in ("fit", "validate", "test", "curriculum", "sweep", "predict", "evaluate", "leaderboard", "stats", "convert"):
        line = next((ln for ln in lines if ln.split()[:1] == [command]), None)
        assert line is not None and len(line.split()) > 3, f"no help line for {command!r}:\n{res.stdout}"


def test_new_names_never_repeat_and_given_names_are_single_folders(tmp_path):
    stamp = "20261205-171705"  # two runs started in the same second
    got = [claim_new_folder(tmp_path / "runs", "fit", stamp) for _ in range(3)]
    assert [p.name for p in got] == [f"fit-{stamp}", f"fit-{stamp}-2", f"fit-{stamp}-3"]
    assert check_run_name("exp1_lr-3e-4.b") == "exp1_lr-3e-4.b"
    for bad in ("a/b", "../x", "latest", "", "with space"):
        with pytest.raises(RunError, match="run name"):
            check_run_name(bad)


def test_ten_fits_get_ten_folders_and_ten_mlflow_names(tiny, tmp_path):
    # in one process, as a notebook would: every fit seeds Python's `random` (seed_everything), from which MLflow
    # used to draw the run name, so all ten were called the same
    script = (
        "import sys\nfrom fcn3_lightning.cli import run_cli\n"
        "for i in range(10):\n"
        "    run_cli(['fit', *sys.argv[1:], '--trainer.max_steps', '1', '--trainer.limit_val_batches', '0'])\n"
    )
    res = subprocess.run([sys.executable, "-c", script, *tiny], cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fcn3").experiment_id])
    names = sorted(r.info.run_name for r in runs)
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    print(names)
    assert len(runs) == 10 and len(set(names)) == 10, names
    assert names == folders and all(n.startswith("fit-tiny-") for n in names), (names, folders)
    for r in runs:  # each run's own checkpoints, and its history only
        assert r.data.tags["fcn3.run_folder"] == str((tmp_path / "runs" / r.info.run_name).resolve())
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == [0]
        ckpt = torch.load(tmp_path / "runs" / r.info.run_name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["mlflow_run_id"] == r.info.run_id and ckpt["run_name"] == r.info.run_name
    assert (tmp_path / "runs" / "latest").resolve().name == max(names)


def test_a_second_fit_in_the_same_folder_stops_at_once(tiny, tmp_path):
    lock = tmp_path / "runs" / "same" / "run.lock"
    long = ["--trainer.max_epochs", "10000", "--run_name", "same"]
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen(_cli("fit", *tiny, *long), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, env=ENV)
    try:
        deadline = time.monotonic() + 300
        while first.poll() is None and time.monotonic() < deadline:
            if lock.is_file() and f"pid {first.pid} " in lock.read_text():
                break
            time.sleep(0.1)
        assert first.poll() is None, f"the first fit ended ({first.returncode}):\n{(tmp_path / 'first.err').read_text()[-3000:]}"
        t0 = time.perf_counter()
        argv = _cli("fit", *tiny, "--run_name", "same")
        second = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300)
        took = time.perf_counter() - t0
        assert first.poll() is None, "the first fit must go on"
        assert f"pid {first.pid} " in lock.read_text(), "the refused fit must leave the first one's folder and lock alone"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    message = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    print(f"second fit: exit {second.returncode} after {took:.1f} s (start-up included): {message}")
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert len(message) == 1 and "runs/same" in message[0] and f"pid {first.pid} " in message[0], second.stderr[-3000:]
    assert "Epoch" not in second.stdout + second.stderr


def test_the_ranks_of_a_torchrun_launch_agree_on_one_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", str(TESTS / "run_folder_worker.py"), str(out)]
    res = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = [(out / f"rank{r}.txt").read_text().split() for r in range(3)]
    print(got)
    assert got[0] == got[1] == got[2] and got[0][0] != got[0][1], got
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(Path(p).name for p in got[0])


def test_the_tasks_of_an_srun_step_agree_on_one_folder(tmp_path):
    script = "from fcn3_lightning.runs import new_run_folder; print(new_run_folder('fit'))"
    procs = []
    for rank in (1, 0):  # rank 1 first: it must not need rank 0's folder to exist, nor create it
        env = {**ENV, "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank), "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0"}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "TORCHELASTIC_RUN_ID"):
            env.pop(key, None)
        procs.append(subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120))
        if rank == 1:
            assert not (tmp_path / "runs").exists(), "only rank 0 creates the folder"
    assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
    assert [p.stdout.strip() for p in procs] == ["runs/fit-j4242.0"] * 2
    assert (tmp_path / "runs" / "fit-j4242.0").is_dir()


# --- errors: one line naming the file or folder, exit 2, no traceback ---------------------------------------------------


def _bad_files(root: Path) -> dict[str, Path]:
    good = root / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(10_000)}, "epoch": 0}, good)
    data = good.read_bytes()
    files = {"truncated": root / "truncated.ckpt", "random": root / "random.ckpt", "text": root / "text.ckpt"}
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["random"].write_bytes(os.urandom(4096))
    files["text"].write_text("model: fcn3\nepoch: 3\n" * 20)
    return files


def _check_one_line(name: str, res: subprocess.CompletedProcess, names: str) -> str:
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    ok = res.returncode == 2 and "Traceback" not in res.stderr and len(errors) == 1 and names in errors[0]
    ok = ok and res.stderr.strip().splitlines()[-1] == errors[0] and "weights_only" not in res.stderr
    assert ok, f"{name}: exit {res.returncode}, wanted one 'error:' line naming {names}:\n{res.stderr[-3000:]}"
    return errors[0]


def _run_all(cases: dict[str, tuple[list[str], dict]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """All at once (each is mostly start-up time), at most 5 together (memory)."""
    done: dict[str, subprocess.CompletedProcess] = {}
    items = list(cases.items())
    for i in range(0, len(items), 5):
        procs = {}
        for name, (argv, kw) in items[i : i + 5]:
            err = open(cwd / f"{name}.err", "w+")  # noqa: SIM115 - a file, not a pipe: no process blocks on a full pipe
            out = open(cwd / f"{name}.out", "w+")  # noqa: SIM115
            procs[name] = (subprocess.Popen(argv, stdout=out, stderr=err, text=True, **{"cwd": cwd, "env": ENV, **kw}), out, err)
        for name, (proc, out, err) in procs.items():
            proc.wait(timeout=600)
            out.seek(0), err.seek(0)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
            out.close(), err.close()
    return done


def test_errors_give_one_line_and_exit_2(tiny, tmp_path):
    files = _bad_files(tmp_path)
    taken = tmp_path / "taken"  # a folder with an earlier run's checkpoints
    (taken / "checkpoints").mkdir(parents=True)
    (taken / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's")
    predict = ["--init-times", "2000-01-10T00", "--steps", "1", "--output", str(tmp_path / "fc.zarr"), "--device", "cpu"]
    cases: dict[str, tuple[list[str], dict]] = {}
    for kind, path in files.items():
        cases[f"fit {kind}"] = (_cli("fit", *tiny, "--ckpt_path", str(path)), {})
        cases[f"validate {kind}"] = (_cli("validate", *tiny, "--ckpt_path", str(path)), {})
        cases[f"predict {kind}"] = (_cli("predict", "--checkpoint", str(path), *predict), {})
    cases["init_from random"] = (_cli("fit", *tiny, "--model.init_from", str(files["random"]), "--run_name", "init"), {})
    cases["ckpt_path last without a run"] = (_cli("fit", *tiny, "--ckpt_path", "last"), {})
    cases["ckpt_path last of a run without one"] = (_cli("fit", *tiny, "--ckpt_path", "last", "--run_name", "none"), {})
    cases["a folder with checkpoints"] = (_cli("fit", *tiny, "--trainer.default_root_dir", str(taken)), {})
    want = {f"{c} {kind}": str(path) for kind, path in files.items() for c in ("fit", "validate", "predict")}
    want["init_from random"] = str(files["random"])
    want["ckpt_path last without a run"] = "--ckpt_path runs/latest/checkpoints/last.ckpt"
    want["ckpt_path last of a run without one"] = "runs/none/checkpoints/last.ckpt"
    want["a folder with checkpoints"] = f"--ckpt_path {taken / 'checkpoints' / 'last.ckpt'}"  # the command that resumes it
    results = _run_all(cases, tmp_path)
    for name, res in results.items():
        print(f"{name}: exit {res.returncode}: {_check_one_line(name, res, want[name])}")
    assert not (tmp_path / "fc.zarr").exists() and not (tmp_path / "fc.zarr.partial").exists()
    assert not list(tmp_path.glob("runs/*/checkpoints/*.ckpt"))


def _drop_permission_override() -> None:
    """In the child, before exec: drop the capabilities by which root ignores file permissions (Linux)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: the exec'd program never gets them
            os._exit(97)


def _permissions_apply(readonly: Path) -> dict:
    """Subprocess options under which a read-only folder is read-only; skips where that cannot be arranged."""
    kw = {"preexec_fn": _drop_permission_override} if os.geteuid() == 0 else {}
    probe = subprocess.run([sys.executable, "-c", f"open({str(readonly / 'probe')!r}, 'w')"], capture_output=True, **kw)
    if probe.returncode == 0:
        (readonly / "probe").unlink()
        pytest.skip("this user can write to a read-only folder (root without a way to drop CAP_DAC_OVERRIDE)")
    return kw


def test_unwritable_folders_stop_before_any_training(tmp_path):
    top = tmp_path
    readonly, writable = top / "readonly", top / "writable"
    readonly.mkdir()
    (writable / "run" / "checkpoints").mkdir(parents=True)
    readonly.chmod(0o555)
    (writable / "run" / "checkpoints").chmod(0o555)
    store = f"sqlite:///{writable / 'mlruns.db'}"
    kw = _permissions_apply(readonly)
    common = ["--mlflow_tracking_uri", store]
    cases = {
        "run folder": (_cli("fit", *common, "--trainer.default_root_dir", str(readonly / "run")), {**kw, "cwd": writable}),
        "runs folder": (_cli("fit", *common), {**kw, "cwd": readonly}),
        "checkpoint folder": (_cli("fit", *common, "--trainer.default_root_dir", str(writable / "run")), {**kw, "cwd": writable}),
        "validate run folder": (_cli("validate", *common, "--trainer.default_root_dir", str(readonly / "v")), {**kw, "cwd": writable}),
    }
    want = {
        "run folder": str(readonly / "run"),
        "runs folder": "runs",
        "checkpoint folder": str(writable / "run" / "checkpoints"),
        "validate run folder": str(readonly / "v"),
    }
    for name, res in _run_all(cases, top).items():
        line = _check_one_line(name, res, want[name])
        print(f"{name}: exit {res.returncode}: {line}")
        assert "Permission denied" in line and "Epoch" not in res.stdout + res.stderr
    # nothing reached MLflow (it is set up after the folders are checked), so no training step ran
    assert not (writable / "mlruns.db").exists()
    assert stat.S_IMODE((writable / "run" / "checkpoints").stat().st_mode) == 0o555
