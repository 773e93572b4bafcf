"""What the command line leaves for others to read: file modes under the user's umask, progress in a batch log, and
a plain error for a cloud URL where a store path is expected.

Every command runs in a subprocess that sets its own umask (``preexec_fn``), so the test does not depend on the
umask of whoever runs the suite; the expected modes are literals (0644 = rw-r--r--, 0640 = rw-r-----).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from wb2_synthetic import make_store

CHANNELS = ["tcwv", "u500", "v500", "z500"]
TRAIN = ["2000-01-01", "2000-01-15T18"]
VALID = ["2000-01-16", "2000-01-20T18"]
TINY = {
    "trainer": {
        "max_steps": 4,
        "limit_train_batches": 4,
        "limit_val_batches": 1,
        "val_check_interval": 2,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
    },
    "model": {
        "net": {"atmo_embed_dim": 4, "surf_embed_dim": 4, "aux_embed_dim": 2, "num_layers": 1, "sfno_block_frequency": 1},
        "ensemble_size": 2,
    },
    "data": {"channels": CHANNELS, "train_range": TRAIN, "valid_range": VALID, "batch_size": 2, "valid_rollout": 1},
}
ENV = {**os.environ, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "COLUMNS": "200"}


def _mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


def _cli(cwd: Path, umask: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m fcn3_lightning ARGS`` under ``umask``, stdout and stderr to pipes (as in a batch job: no terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "fcn3_lightning", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=lambda: os.umask(umask),
    )


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path, _ = make_store(tmp_path_factory.mktemp("modes") / "era.zarr", CHANNELS, n_times=84, cadence_hours=6, nlat=17, nlon=32)
    return path


@pytest.fixture(scope="module")
def fit(store: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One tiny fit under umask 022, through the CLI, its stats written by the ``stats`` command under umask 022."""
    cwd = tmp_path_factory.mktemp("fit")
    stats = store.with_name(store.name + ".stats.json")
    _ok(_cli(cwd, 0o022, "stats", "--data", str(store), "--channels", ",".join(CHANNELS), "--start", TRAIN[0], "--end", TRAIN[1]))
    assert stats.is_file()
    (cwd / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    res = _ok(_cli(cwd, 0o022, "fit", "--config", "tiny.yaml", "--data.data_path", str(store)))
    return cwd, res


def test_fit_and_stats_outputs_are_0644_under_umask_022(store: Path, fit):
    cwd, _ = fit
    ckpts = cwd / "runs" / "latest" / "checkpoints"  # the fit's own run folder (fcn3_lightning.runs)
    modes = {p.name: _mode(p) for p in sorted(ckpts.iterdir())}
    modes[f"{store.name}.stats.json"] = _mode(store.with_name(store.name + ".stats.json"))
    modes["checkpoints/"] = _mode(ckpts)
    print(f"fit and stats under umask 022: {modes}")
    assert {"best.ckpt", "last.ckpt"} <= set(modes)
    assert modes.pop("checkpoints/") == "0o755"
    assert set(modes.values()) == {"0o644"}, modes


def test_the_umask_decides_not_a_fixed_mode(store: Path, tmp_path: Path):
    out = tmp_path / "stats.json"
    args = ("stats", "--data", str(store), "--channels", "z500", "--start", TRAIN[0], "--end", TRAIN[1], "--out", str(out))
    _ok(_cli(tmp_path, 0o027, *args))
    print(f"stats under umask 027: {_mode(out)}")
    assert _mode(out) == "0o640"
    _ok(_cli(tmp_path, 0o002, *args))  # a shared group folder: group may write too
    print(f"stats under umask 002: {_mode(out)}")
    assert _mode(out) == "0o664"


def test_predict_store_is_0755_with_0644_files(store: Path, fit, tmp_path: Path):
    cwd, _ = fit
    out = tmp_path / "forecast.zarr"
    ckpt = cwd / "runs" / "latest" / "checkpoints" / "last.ckpt"
    args = ["predict", "--checkpoint", str(ckpt), "--data-path", str(store), "--init-times", VALID[0], "--steps", "1"]
    _ok(_cli(tmp_path, 0o022, *args, "--members", "1", "--device", "cpu", "--output", str(out)))
    dirs = {_mode(p) for p in [out, *out.rglob("*")] if p.is_dir()}
    files = {_mode(p) for p in out.rglob("*") if p.is_file()}
    print(f"predict store under umask 022: directories {dirs}, files {files}")
    assert dirs == {"0o755"} and files == {"0o644"}


def test_converted_model_file_is_0644(golden_dir: Path, tmp_path: Path):
    out = tmp_path / "fcn3_small.pt"
    _ok(_cli(tmp_path, 0o022, "convert", str(golden_dir / "state_dict.pt"), str(out), "--config", str(golden_dir / "manifest.json")))
    print(f"convert under umask 022: {_mode(out)}")
    assert _mode(out) == "0o644"


def test_exported_package_is_0755_with_0644_files(fit, tmp_path: Path):
    cwd, _ = fit
    out = tmp_path / "package"
    _ok(_cli(tmp_path, 0o022, "export", "--checkpoint", str(cwd / "runs" / "latest" / "checkpoints" / "best.ckpt"), "--out", str(out)))
    dirs = {_mode(p) for p in [out, *out.rglob("*")] if p.is_dir()}
    files = {_mode(p) for p in out.rglob("*") if p.is_file()}
    print(f"export under umask 022: directories {dirs}, files {files}")
    assert (out / "training_checkpoints" / "best_ckpt_mp0.tar").is_file()
    assert dirs == {"0o755"} and files == {"0o644"}


def test_fit_prints_progress_lines_into_a_pipe(fit):
    """A batch job's log (stdout is a pipe): a live bar would show nothing until the end; lines show every step here
    (4 batches per epoch: a line every 10 % rounds to every batch) and every validation."""
    _, res = fit
    lines = [ln for ln in res.stdout.splitlines() if re.match(r"(epoch \d+ batch|validation at)", ln)]
    print("\n".join(lines))
    batches = [int(m.group(1)) for ln in lines if (m := re.match(r"epoch 0 batch (\d+)/4 \(\d+%\) step \d+: train/loss [0-9.]+", ln))]
    assert batches == [1, 2, 3, 4], res.stdout[-3000:]
    vals = [ln for ln in lines if re.match(r"validation at epoch 0 step [24]: .*val/crps [0-9.]+ \| 1 batches in", ln)]
    assert len(vals) == 2, res.stdout[-3000:]
    assert all("steps/s" in ln for ln in lines if ln.startswith("epoch"))
    assert not re.search(r"Epoch \d+/\d+ ", res.stdout)  # no frame of the rich bar


URL_CASES = {  # stores may be URLs (tests/test_cloud.py); outputs, and the statistics a URL store cannot hold, may not
    "fit": (["fit", "--data.data_path", "gs://bucket/era5.zarr"], "data.data_path gs://bucket/era5.zarr is a URL"),
    "predict --output": (
        ["predict", "--checkpoint", "x.ckpt", "--output", "s3://bucket/f.zarr", "--init-times", "2000-01-01"],
        "--output s3://bucket/f.zarr",
    ),
    "stats": (["stats", "--data", "https://example.org/era5.zarr", "--start", "2000", "--end", "2001"], "--data https://example.org/"),
    "evaluate --out": (["evaluate", "--forecast", "f.zarr", "--obs", "o.zarr", "--out", "gs://wb2/out"], "--out gs://wb2/out"),
    "export --out": (["export", "--checkpoint", "x.ckpt", "--out", "gs://b/pkg"], "--out gs://b/pkg"),
}


@pytest.mark.parametrize("case", list(URL_CASES))
def test_a_url_where_a_local_path_is_needed_says_so(case: str, tmp_path: Path):
    argv, where = URL_CASES[case]
    res = _cli(tmp_path, 0o022, *argv, timeout=300)
    err = res.stderr.strip().splitlines()
    print(f"{case}: exit {res.returncode}: {err[-1] if err else ''}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert where in err[-1] and "URL" in err[-1], res.stderr[-3000:]
    assert "does not exist" not in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "gs:").exists() and not (tmp_path / "runs").exists()  # nothing was created on the way
