"""The stats command and the data module on a synthetic WB2 store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from wb2_synthetic import make_store

from fcn3_lightning.data import ChannelStats, WB2DataModule, WB2Store, compute_stats

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcn3_lightning", *args], capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path, _ = make_store(tmp_path_factory.mktemp("cli") / "era.zarr", ["z500", "t850", "t2m", "tcwv"], n_times=40, ascending_lat=True)
    return path


def test_stats_command_writes_what_compute_stats_computes(store, tmp_path):
    out = tmp_path / "stats.json"
    res = _cli(
        "stats", "--data", str(store), "--channels", "z500,t850,t2m,tcwv", "--start", "2000-01-01", "--end", "2000-01-07", "--out", str(out)
    )
    assert res.returncode == 0, res.stderr
    got = ChannelStats.load(out)
    want = compute_stats(WB2Store(store, ["z500", "t850", "t2m", "tcwv"]), "2000-01-01", "2000-01-07", progress=False)
    assert got.mean == want.mean and got.time_diff_std == want.time_diff_std and got.channels == want.channels


def test_stats_command_errors(store):
    res = _cli("stats", "--data", str(store), "--channels", "z500")
    assert res.returncode == 2 and "--start and --end" in res.stderr
    res = _cli("stats", "--data", str(store), "--channels", "z500,x9", "--start", "2000-01-01", "--end", "2000-01-02")
    assert res.returncode == 2 and "unknown channel 'x9'" in res.stderr
    res = _cli("stats", "--data", str(store), "--channels", "z500", "--start", "1999-01-01", "--end", "2000-01-02")
    assert res.returncode == 2 and "outside the store's time axis" in res.stderr


def test_datamodule_end_to_end(store, tmp_path):
    chans = ["z500", "t850", "t2m", "tcwv"]
    stats_path = tmp_path / "s.json"
    compute_stats(WB2Store(store, chans), "2000-01-01", "2000-01-06", progress=False).save(stats_path)
    dm = WB2DataModule(
        data_path=str(store),
        channels=chans,
        aux_channels=["xzen", "xnoise0", "xoro", "xlsml", "xlsms"],
        stats_path=str(stats_path),
        train_range=("2000-01-01", "2000-01-06"),
        valid_range=("2000-01-07", "2000-01-10T18"),
        train_rollout=2,
        valid_rollout=3,
        batch_size=3,
    )
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["input"].shape == (3, 4, 9, 16) and batch["target"].shape == (3, 2, 4, 9, 16) and batch["zenith"].shape == (3, 3, 9, 16)
    # normalised: tcwv is min-max scaled into [0, 1], the others z-scored
    stats = ChannelStats.load(stats_path)
    assert 0.0 <= batch["input"][:, 3].min() and batch["input"][:, 3].max() <= 1.0
    assert abs(float(batch["input"][:, 0].mean())) < 3 and stats.std[0] > 0
    val = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert val["target"].shape[1] == 3
    assert dm.static.shape == (3, 9, 16)
    dm.set_tile(slice(0, 4), slice(8, 16))
    tile = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    torch.testing.assert_close(tile["input"], val["input"][..., 0:4, 8:16])
    assert dm.static.shape == (3, 4, 8)


def test_datamodule_refuses_stats_of_another_grid(store, tmp_path):
    other, _ = make_store(tmp_path / "other.zarr", ["z500", "t2m"], nlat=5, nlon=8)
    stats_path = tmp_path / "o.json"
    compute_stats(WB2Store(other, ["z500", "t2m"]), "2000-01-01", "2000-01-02", progress=False).save(stats_path)
    dm = WB2DataModule(data_path=str(store), channels=["z500", "t2m"], stats_path=str(stats_path), train_range=("2000-01-01", "2000-01-03"))
    with pytest.raises(ValueError, match=r"o.json: computed on grid .*'nlat': 5.* but the data grid is .*'nlat': 9"):
        dm.setup("fit")
    missing = WB2DataModule(data_path=str(store), channels=["z500"], train_range=("2000-01-01", "2000-01-03"))
    with pytest.raises(FileNotFoundError, match=r"era.zarr.stats.json does not exist \(write one with: python -m fcn3_lightning stats"):
        missing.setup("fit")
