"""The published package on the command line: ``convert``, ``--model.init_from``, ``predict`` then ``evaluate``, ``export``,
and the one-line errors (exit 2) for bad packages and data stores, all on the golden package written by the reference code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from wb2_synthetic import make_store

from fcn3_lightning import load_forecaster
from fcn3_lightning.channels import FCN3_CHANNELS, parse_channel
from fcn3_lightning.data import WB2Store, compute_stats
from fcn3_lightning.package import read_package

ENV = {**os.environ, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "COLUMNS": "200"}
TRAIN = ("2019-01-01", "2019-01-02T18")
VALID = ("2019-01-03", "2019-01-04T18")


@pytest.fixture(scope="module")
def package(golden_package_dir: Path) -> Path:
    return golden_package_dir / "package"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A WB2 store of the package's 72 prognostic channels on its 61x120 grid (no static fields: the package has them)."""
    root = tmp_path_factory.mktemp("package_cli")
    path, _ = make_store(root / "era72.zarr", FCN3_CHANNELS, start="2019-01-01", n_times=16, nlat=61, nlon=120, statics=False)
    return path


@pytest.fixture(scope="module")
def train_store(tmp_path_factory, package: Path) -> Path:
    """The same channels with static fields, in the package's units (what fine-tuning from it requires)."""
    root = tmp_path_factory.mktemp("package_train")
    raw, _ = make_store(root / "raw.zarr", FCN3_CHANNELS, start="2019-01-01", n_times=16, nlat=61, nlon=120)
    # in the package's units: each channel moved to the package's mean and spread (fine-tuning refuses data whose
    # spread is orders of magnitude off the package's statistics)
    pkg = read_package(package)
    have = compute_stats(WB2Store(raw, list(FCN3_CHANNELS)), *TRAIN, progress=False)
    ds = xr.open_zarr(raw).load()
    for c in FCN3_CHANNELS:
        ch = parse_channel(c)
        i, j = have.channels.index(c), pkg.stats.channels.index(c)
        sel = {} if ch.level is None else {"level": ch.level}
        v = ds[ch.long_name].loc[sel]
        ds[ch.long_name].loc[sel] = pkg.stats.mean[j] + pkg.stats.std[j] * (v - have.mean[i]) / have.std[i]
    path = root / "era72.zarr"
    ds.to_zarr(path, zarr_format=2, consolidated=True)
    compute_stats(WB2Store(path, list(FCN3_CHANNELS)), *TRAIN, progress=False).save(f"{path}.stats.json")
    return path


def _cli(cwd: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fcn3_lightning", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def _error(res: subprocess.CompletedProcess, pattern: str) -> str:
    """Exit 2 and one line on stderr matching ``pattern`` (no traceback)."""
    import re

    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, f"exit {res.returncode}:\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert re.search(pattern, lines[-1]), lines[-1]
    return lines[-1]


def test_convert_then_the_model_file_is_the_package(package, tmp_path):
    _ok(_cli(tmp_path, "convert", str(package), "m.pt"))
    a, b = load_forecaster(package, device="cpu"), load_forecaster(tmp_path / "m.pt", device="cpu")
    x = torch.randn(1, 72, 61, 120) + torch.as_tensor(a.normalizer.offset, dtype=torch.float32).view(-1, 1, 1)
    t = np.datetime64("2020-03-01T06")
    torch.testing.assert_close(b.step(x, t), a.step(x, t), rtol=0, atol=0)


def test_predict_from_the_package_then_evaluate(package, store, tmp_path):
    res = _ok(
        _cli(
            tmp_path,
            "predict",
            "--checkpoint",
            str(package),
            "--data",
            str(store),
            "--init-times",
            "2019-01-02T00",
            "--members",
            "2",
            "--steps",
            "2",
            "--output",
            "fc.zarr",
            "--no-progress",
        )
    )
    assert "wrote fc.zarr" in res.stdout
    with xr.open_zarr(tmp_path / "fc.zarr") as ds:
        assert ds["geopotential"].sizes["level"] == 13 and ds.sizes["number"] == 2 and ds.sizes["prediction_timedelta"] == 2
        assert ds.sizes["latitude"] == 61 and ds.sizes["longitude"] == 120
        first = ds["geopotential"].isel(time=0, number=0, prediction_timedelta=0).sel(level=500).values
    # the stored step is the forecaster's own rollout of the same initial state (physical units, 90N first)
    f = load_forecaster(package, device="cpu")
    x0 = torch.from_numpy(WB2Store(store, f.channels).read([4]))
    y = next(f.rollout(x0, np.datetime64("2019-01-02T00"), members=2, steps=1))[0, 0, f.channels.index("z500")]
    np.testing.assert_array_equal(first, y.numpy())
    _ok(
        _cli(
            tmp_path,
            "evaluate",
            "--forecast",
            "fc.zarr",
            "--obs",
            str(store),
            "--out",
            "ev",
            "--name",
            "golden",
            "--no-baselines",
            "--clim-years",
            "2019:2019",  # the store holds one year (the ACC needs a climatology)
            "--regions",
            "global",
        )
    )
    assert (tmp_path / "ev" / "scores.csv").is_file()


def test_init_from_the_package_builds_its_network_and_loads_its_weights(package, train_store, tmp_path):
    import lightning as L

    from fcn3_lightning.data import WB2DataModule
    from fcn3_lightning.training.module import FCN3Module

    dm = WB2DataModule(str(train_store), train_range=TRAIN, valid_range=VALID, valid_rollout=1, batch_size=1)
    module = FCN3Module(net={"atmo_embed_dim": 16}, ensemble_size=2, init_from=str(package))
    trainer = L.Trainer(
        limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, datamodule=dm)
    want = load_forecaster(package, device="cpu").net.state_dict()
    got = module.net.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert module.hparams["net"]["atmo_embed_dim"] == 8  # the package's architecture, recorded for the checkpoint
    # and through the command line: a short fit from the package
    res = _ok(
        _cli(
            tmp_path,
            "fit",
            "--model.init_from",
            str(package),
            "--data.data_path",
            str(train_store),
            "--data.train_range",
            json.dumps(list(TRAIN)),
            "--data.valid_range",
            json.dumps(list(VALID)),
            "--data.batch_size",
            "1",
            "--data.valid_rollout",
            "1",
            "--data.train_rollout",
            "1",
            "--model.ensemble_size",
            "2",
            "--trainer.max_steps",
            "1",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.num_sanity_val_steps",
            "0",
        )
    )
    assert "the network is built as the source describes it" in res.stdout


def _copy(package: Path, dst: Path) -> Path:
    shutil.copytree(package, dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dst


def test_bad_packages_and_stores_give_one_line_and_exit_2(package, store, tmp_path):
    predict = ["--init-times", "2019-01-02T00", "--steps", "1", "--members", "2", "--no-progress"]
    missing = _copy(package, tmp_path / "missing")
    (missing / "maxs.npy").unlink()
    print(_error(_cli(tmp_path, "predict", "--checkpoint", str(missing), "--data", str(store), *predict), r"missing.*maxs\.npy is missing"))
    stats = _copy(package, tmp_path / "stats")
    np.save(stats / "mins.npy", np.zeros((1, 72, 1, 1), dtype=np.float32))
    print(_error(_cli(tmp_path, "convert", str(stats), "x.pt"), r"mins\.npy has shape \(1, 72, 1, 1\), expected \(1, 73, 1, 1\)"))
    shape = _copy(package, tmp_path / "shape")
    config = json.loads((shape / "config.json").read_text())
    config["num_layers"] = 5
    (shape / "config.json").write_text(json.dumps(config))
    print(_error(_cli(tmp_path, "convert", str(shape), "x.pt"), r"best_ckpt_mp0\.tar do not fit the network described by .*config\.json"))
    net = _copy(package, tmp_path / "net")
    config = json.loads((net / "config.json").read_text())
    config["nettype"] = "SFNO"
    (net / "config.json").write_text(json.dumps(config))
    print(_error(_cli(tmp_path, "export", "--checkpoint", str(net), "--out", "o"), r"nettype.*'SFNO' is not FCN3"))
    partial = tmp_path / "partial.zarr"
    make_store(partial, [c for c in FCN3_CHANNELS if c != "tcwv"], start="2019-01-01", n_times=8, nlat=61, nlon=120, statics=False)
    line = _error(
        _cli(tmp_path, "predict", "--checkpoint", str(package), "--data", str(partial), *predict),
        r"does not hold what .* needs: .*total_column_water_vapour",
    )
    print(line)
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "o").exists()
