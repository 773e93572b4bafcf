"""Stores read over HTTP, in place: a real HTTP server on 127.0.0.1 serves a Zarr store written with xarray (consolidated
metadata), and ``fit``, ``predict`` and ``evaluate`` read it by URL and give the numbers they give on the local copy.
Bad locations (nothing listening, no Zarr there, a private bucket answering 401/403, a server that never answers) each
end in one line naming the option and the URL, exit 2, within the time-out.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import yaml
from tiny_net import FIT_NET
from torch.utils.data import DataLoader
from wb2_synthetic import make_store

from fcn3_lightning.data import ForecastDataset, WB2Store, compute_stats
from fcn3_lightning.data.datamodule import WB2DataModule, collate_batch, loader_worker_init
from fcn3_lightning.paths import StoreError
from fcn3_lightning.store_server import StoreServer

CHANNELS = ["tcwv", "u500", "v500", "z500"]
TRAIN = ["2000-01-01", "2000-01-05T18"]
VALID = ["2000-01-06", "2000-01-07T18"]
TINY = {
    "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "log_every_n_steps": 1},
    "model": {
        "net": FIT_NET,
        "ensemble_size": 2,
    },
    "data": {"channels": CHANNELS, "train_range": TRAIN, "valid_range": VALID, "batch_size": 2, "train_rollout": 1, "valid_rollout": 2},
}
ENV = {**os.environ, "COLUMNS": "200"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("cloud")
    store, _ = make_store(root / "served" / "era.zarr", CHANNELS, n_times=32, cadence_hours=6, nlat=17, nlon=32)
    (root / "served" / "not_a_store").mkdir()
    (root / "served" / "not_a_store" / "readme.txt").write_text("no zarr here\n")
    stats = root / "era.stats.json"
    compute_stats(WB2Store(store, CHANNELS), *TRAIN, progress=False).save(stats)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    server = StoreServer(root / "served")
    yield {"root": root, "store": store, "stats": stats, "config": config, "server": server, "url": server.url("era.zarr")}
    server.close()


def _cli(cwd: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "fcn3_lightning", *argv], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=timeout
    )


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def test_a_store_over_http_reads_as_its_local_copy(world):
    """Every variable of a sample (read concurrently for a URL), in the main process and in a forked loader worker."""
    local, remote = WB2Store(world["store"], CHANNELS), WB2Store(world["url"], CHANNELS)
    assert remote.location.remote and remote.path == world["url"]
    np.testing.assert_array_equal(remote.times, local.times)
    a, b = local.read([3, 4, 5]), remote.read([3, 4, 5])
    assert np.abs(a).max() > 0
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(local.read_static("land_sea_mask"), remote.read_static("land_sea_mask"))
    stats = compute_stats(local, *TRAIN, progress=False)
    batches = []
    for store in (local, remote):
        ds = ForecastDataset(store, stats.normalizer(CHANNELS), *TRAIN, 1, on_device=True)
        loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_batch, multiprocessing_context="fork")
        batches.append(torch.cat([b["target"] for b in loader]))
    assert batches[0].shape[0] == len(ds)
    torch.testing.assert_close(batches[0], batches[1], rtol=0, atol=0)


@pytest.fixture(scope="module")
def fits(world, tmp_path_factory) -> dict[str, Path]:
    """The tiny fit from the local store and from its URL (statistics from the same local file)."""
    out = {}
    for kind, data in (("local", str(world["store"])), ("url", world["url"])):
        cwd = tmp_path_factory.mktemp(f"fit_{kind}")
        _ok(_cli(cwd, "fit", "--config", str(world["config"]), "--data.data_path", data, "--data.stats_path", str(world["stats"])))
        out[kind] = cwd / "runs" / "latest" / "checkpoints" / "last.ckpt"
    return out


def test_fit_over_http_trains_as_from_the_local_copy(fits):
    a, b = (torch.load(fits[k], map_location="cpu", weights_only=False) for k in ("local", "url"))
    assert a["global_step"] == b["global_step"] == 2
    assert b["datamodule_hyper_parameters"]["data_path"].startswith("http://127.0.0.1:")
    for name, t in a["state_dict"].items():
        assert torch.equal(t, b["state_dict"][name]), name


@pytest.fixture(scope="module")
def forecasts(world, fits, tmp_path_factory) -> dict[str, Path]:
    cwd = tmp_path_factory.mktemp("predict")
    out = {}
    for kind, data in (("local", str(world["store"])), ("url", world["url"])):
        out[kind] = world["root"] / "served" / f"forecast_{kind}.zarr"
        args = ["--checkpoint", str(fits["local"]), "--data", data, "--stats", str(world["stats"]), "--output", str(out[kind])]
        _ok(_cli(cwd, "predict", *args, "--init-times", VALID[0], "2000-01-06T12", "--steps", "2", "--members", "2", "--no-progress"))
    return out


def test_predict_from_a_url_forecasts_as_from_the_local_copy(forecasts):
    a, b = xr.open_zarr(forecasts["local"]), xr.open_zarr(forecasts["url"])
    assert set(a.data_vars) and set(a.data_vars) == set(b.data_vars)
    for v in a.data_vars:
        assert np.isfinite(a[v].values).all()
        np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=v)


def test_evaluate_urls_scores_as_the_local_copies(world, forecasts, tmp_path):
    """--forecast and --obs as URLs (the forecast served by the same server) give the scores of the local stores."""
    fc_url = world["server"].url(forecasts["local"].name)
    common = ["--no-progress", "--baselines", "persistence", "--clim-years", "2000:2000"]
    _ok(_cli(tmp_path, "evaluate", "--forecast", str(forecasts["local"]), "--obs", str(world["store"]), "--out", "local", *common))
    _ok(_cli(tmp_path, "evaluate", "--forecast", fc_url, "--obs", world["url"], "--out", "url", "--name", "forecast_local", *common))
    a, b = pd.read_csv(tmp_path / "local" / "scores.csv"), pd.read_csv(tmp_path / "url" / "scores.csv")
    assert len(a) > 0 and a["value"].notna().any()
    pd.testing.assert_frame_equal(a, b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, f"exit {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-4000:]
    for n in needles:
        assert n in lines[-1], lines[-1]
    return lines[-1]


def _predict(cwd: Path, ckpt: Path, stats: Path, data: str, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    args = ["--checkpoint", str(ckpt), "--data", data, "--stats", str(stats), "--output", "f.zarr", "--init-times", VALID[0]]
    return _cli(cwd, "predict", *args, "--steps", "1", *extra, timeout=timeout)


def test_nothing_listening_is_one_line_cannot_reach(world, fits, tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/era.zarr"
    t0 = time.perf_counter()
    line = _one_line_error(_predict(tmp_path, fits["local"], world["stats"], url), url, "cannot reach it")
    print(f"{time.perf_counter() - t0:.1f} s: {line}")
    assert not (tmp_path / "f.zarr").exists()


def test_a_url_without_a_zarr_store_says_so(world, fits, tmp_path):
    url = world["server"].url("not_a_store")
    print(_one_line_error(_predict(tmp_path, fits["local"], world["stats"], url), url, "no Zarr store there"))
    res = _cli(tmp_path, "evaluate", "--forecast", world["server"].url("nothing.zarr"), "--obs", world["url"], "--out", "o")
    print(_one_line_error(res, "the forecast", "nothing.zarr", "no Zarr store there"))


@pytest.mark.parametrize("status", [401, 403])
def test_a_private_bucket_says_access_denied(world, tmp_path, status: int):
    server = StoreServer(world["root"] / "served", status=status)
    try:
        url = server.url("era.zarr")
        argv = ["fit", "--config", str(world["config"]), "--data.data_path", url, "--data.stats_path", str(world["stats"])]
        line = _one_line_error(_cli(tmp_path, *argv, timeout=120), url, f"access denied (HTTP {status})", "credentials")
        print(line)
    finally:
        server.close()
    assert not (tmp_path / "runs").exists()


def test_a_server_that_never_answers_times_out(world, fits, tmp_path):
    """Connections are accepted (the listen backlog) but nothing is ever sent: the storage option ``timeout`` ends the wait."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/era.zarr"
        t0 = time.perf_counter()
        res = _predict(tmp_path, fits["local"], world["stats"], url, "--storage-options", '{"timeout": 2}', timeout=90)
        took = time.perf_counter() - t0
    line = _one_line_error(res, url, "no answer within the time-out (2 s)")
    print(f"{took:.1f} s: {line}")


def test_a_url_needs_local_statistics_and_local_outputs(world, tmp_path):
    res = _cli(tmp_path, "fit", "--config", str(world["config"]), "--data.data_path", world["url"])
    print(_one_line_error(res, "data.data_path", "is a URL", "data.stats_path", "stats --data"))
    res = _cli(tmp_path, "stats", "--data", world["url"], "--start", TRAIN[0], "--end", TRAIN[1])
    print(_one_line_error(res, "--data", "pass --out"))
    with pytest.raises(StoreError, match="storage options .* are for URLs"):
        WB2Store(world["store"], CHANNELS, storage_options={"anon": True})


def test_stats_of_a_url_equal_those_of_the_local_copy(world, tmp_path):
    _ok(
        _cli(
            tmp_path,
            "stats",
            "--data",
            world["url"],
            "--channels",
            ",".join(CHANNELS),
            "--start",
            TRAIN[0],
            "--end",
            TRAIN[1],
            "--out",
            "s.json",
        )
    )
    local = compute_stats(WB2Store(world["store"], CHANNELS), *TRAIN, progress=False)
    from fcn3_lightning.data.stats import ChannelStats

    remote = ChannelStats.load(tmp_path / "s.json")
    for name in ("mean", "std"):
        np.testing.assert_array_equal(getattr(local, name), getattr(remote, name))


def test_the_store_server_serves_files_byte_ranges_and_nothing_else(world):
    """What the tests and ``bench/loader.py --url`` read through: whole files, byte ranges (206) as a bucket serves them,
    a 404 for folders, missing files and paths outside its root; the delay holds every answer back."""
    server, store = world["server"], world["store"]
    body = (store / ".zmetadata").read_bytes()
    assert urllib.request.urlopen(server.url("era.zarr/.zmetadata"), timeout=30).read() == body
    ranged = urllib.request.Request(server.url("era.zarr/.zmetadata"), headers={"Range": "bytes=2-9"})
    with urllib.request.urlopen(ranged, timeout=30) as r:
        assert r.status == 206 and r.read() == body[2:10]
    assert (world["root"] / "era.stats.json").is_file()  # one level above the served folder: never served
    for name in ("era.zarr", "nothing.zarr/.zgroup", "../era.stats.json", "%2e%2e/era.stats.json"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.url(name), timeout=30)
        assert e.value.code == 404, name
    with StoreServer(world["root"] / "served", delay_s=0.5) as slow:
        t0 = time.perf_counter()
        assert urllib.request.urlopen(slow.url("era.zarr/.zmetadata"), timeout=30).read() == body
        assert time.perf_counter() - t0 >= 0.5


_FAULTS = """
import resource, sys
from fcn3_lightning.data.datamodule import loader_worker_init
if sys.argv[1] == "worker":
    loader_worker_init(0)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
bytearray(64 << 20)
f0 = faults()
for _ in range(10):
    bytearray(64 << 20)  # a chunk-sized buffer, zero-filled (every page touched), freed at once
print(faults() - f0)
"""


def test_loader_workers_keep_freed_memory(world, tmp_path):
    """A loader worker reuses the buffers it freed: ten 64 MB chunk-sized buffers fault in (almost) no fresh pages, where
    glibc's defaults unmap each one on free and fault all 16384 pages of the next back in. The data module's workers
    start with it (``worker_init_fn``)."""
    if not Path("/proc/self/statm").exists() or sys.platform != "linux":
        pytest.skip("glibc malloc tuning (Linux)")
    run = functools.partial(subprocess.run, capture_output=True, text=True, check=True)
    faults = {kind: int(run([sys.executable, "-c", _FAULTS, kind]).stdout) for kind in ("worker", "default")}
    print(faults)
    assert faults["default"] > 10 * 16384 // 2
    assert faults["worker"] < 16384
    dm = WB2DataModule(str(world["store"]), CHANNELS, stats_path=str(world["stats"]), train_range=TRAIN, valid_range=VALID, num_workers=1)
    dm.setup("fit")
    assert dm.train_dataloader().worker_init_fn is loader_worker_init and dm.val_dataloader().worker_init_fn is loader_worker_init
