"""Fine-tuning: freezing, parameter groups, warm-up and the weight average in real training runs (Lightning, real
Zarr stores, real MLflow), a kill -9 resume with the average, the end-to-end recipe on the real ERA5 sample starting
from the reference-written package, and the errors a user meets first."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import xarray as xr
import yaml
from tiny_net import FIT_NET as SMALL_NET
from wb2_synthetic import make_store

from fcn3_lightning.data import WB2Store, compute_stats
from fcn3_lightning.data.datamodule import WB2DataModule
from fcn3_lightning.data.era5_sample import convert_cfgrib_to_wb2, era5_sample_path
from fcn3_lightning.training.module import FCN3Module

REPO = Path(__file__).resolve().parents[1]
CHANNELS = ["tcwv", "u500", "v500", "z500"]
TRAIN = ["2000-01-01", "2000-01-20T18"]
VALID = ["2000-01-21", "2000-01-30T18"]
ENV = {**os.environ, "COLUMNS": "200"}
ERA5_CHANNELS = ["z500", "z850", "t500", "t850"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path, _ = make_store(tmp_path_factory.mktemp("ft") / "era.zarr", CHANNELS, n_times=120, cadence_hours=6, nlat=17, nlon=32)
    compute_stats(WB2Store(path, CHANNELS), *TRAIN, progress=False).save(f"{path}.stats.json")
    return path


class Recorder(L.Callback):
    """The trainable weights before training and after every optimizer step, and every step's learning rates."""

    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []
        self.lrs: list[list[float]] = []

    def _snap(self, module) -> dict[str, torch.Tensor]:
        return {n: p.detach().double().clone() for n, p in module.net.named_parameters()}

    def on_train_start(self, trainer, module):
        self.weights.append(self._snap(module))

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.weights.append(self._snap(module))


def _fit(store: Path, steps: int, **model_kw) -> tuple[FCN3Module, Recorder, L.Trainer]:
    torch.manual_seed(0)
    dm = WB2DataModule(
        data_path=str(store), channels=CHANNELS, train_range=TRAIN, valid_range=VALID, batch_size=2, train_rollout=1, valid_rollout=1
    )
    module = FCN3Module(net=SMALL_NET, ensemble_size=2, lr=1e-3, **model_kw)
    rec = Recorder()
    trainer = L.Trainer(
        max_steps=steps,
        limit_train_batches=steps // 2,  # two epochs: a validation (with the average swapped in) in the middle
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[rec],
    )
    trainer.fit(module, datamodule=dm)
    return module, rec, trainer


def test_frozen_tensors_stay_and_carry_no_optimizer_state(store):
    module, rec, trainer = _fit(store, 20, freeze=["blocks.0.*", "*_decoder.*"])
    frozen = [n for n, p in module.net.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("blocks.0.", "atmo_decoder.", "surf_decoder.")) for n in frozen), frozen
    final = dict(module.net.named_parameters())
    for n in frozen:
        assert torch.equal(final[n].detach().double(), rec.weights[0][n]), f"{n} changed"
        assert final[n].grad is None
    opt = trainer.optimizers[0]
    with_state = {id(p) for p in opt.state}
    names = {id(p): n for n, p in module.net.named_parameters()}
    assert not [names[i] for i in with_state if names[i] in frozen], "frozen parameters have optimizer state"
    trainable = [n for n, p in module.net.named_parameters() if p.requires_grad]
    assert {names[i] for i in with_state} == set(trainable)
    moved = [n for n in trainable if not torch.equal(final[n].detach().double(), rec.weights[0][n])]
    assert len(moved) == len(trainable), "every trainable tensor must have trained"


def test_parameter_groups_and_warm_up(store):
    module, rec, trainer = _fit(store, 8, param_groups=[{"params": ["*_encoder.*"], "lr": 1e-2}], warmup_steps=4)
    opt = trainer.optimizers[0]
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3]  # restored after every step
    assert opt.param_groups[0]["names"] == [n for n, _ in module.net.named_parameters() if n.endswith("_encoder.conv.weight")]
    expected = [[1e-2 * f, 1e-3 * f] for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0)]
    assert np.allclose(rec.lrs, expected, rtol=1e-12), rec.lrs


def test_the_weight_average_equals_an_independent_computation(store):
    decay = 0.8
    module, rec, _ = _fit(store, 20, ema_decay=decay, freeze=["blocks.1.*"])
    assert len(rec.weights) == 21
    avg = {n: w.clone() for n, w in rec.weights[0].items()}
    for w in rec.weights[1:]:
        for n in avg:
            avg[n] = decay * avg[n] + (1 - decay) * w[n]
    ours = module.ema.averaged()
    assert set(ours) == {n for n, p in module.net.named_parameters() if p.requires_grad}  # frozen ones are not averaged
    diff = max((ours[n].double() - avg[n]).abs().max().item() for n in ours)
    scale = max(avg[n].abs().max().item() for n in ours)
    print(f"weight average vs independent float64 recursion over 20 steps: max |diff| {diff:.2e} (max |w| {scale:.2f})")
    assert diff <= 1e-6
    # the validation in the middle swapped the average in and out: training ended on its raw weights
    final = dict(module.net.named_parameters())
    assert all(torch.equal(final[n].detach().double(), rec.weights[-1][n]) for n in final)
    assert any(not torch.equal(ours[n].double(), rec.weights[-1][n]) for n in ours)


# --- the command line ----------------------------------------------------------------------------------------------

TINY = {
    "trainer": {"max_epochs": 3, "limit_train_batches": 4, "limit_val_batches": 2, "log_every_n_steps": 1},
    "model": {"net": SMALL_NET, "ensemble_size": 2, "ema_decay": 0.7, "freeze": ["blocks.1.*"], "warmup_steps": 3},
    "data": {"channels": CHANNELS, "train_range": TRAIN, "valid_range": VALID, "batch_size": 2, "train_rollout": 1, "valid_rollout": 1},
}


def _argv(command: str, config: Path, store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fcn3_lightning", command, "--config", str(config), "--data.data_path", str(store), *extra]


def _run(argv: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=600)
    if ok:
        assert res.returncode == 0, f"{argv[3:]} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def _sd(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_kill_9_and_resume_give_the_uninterrupted_weight_average(store, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    _run(_argv("fit", config, store), tmp_path / "a")
    cwd = tmp_path / "b"
    cwd.mkdir()
    last = cwd / "runs/latest/checkpoints/last.ckpt"
    with open(cwd / "out", "w") as out, open(cwd / "err", "w") as err:
        proc = subprocess.Popen(_argv("fit", config, store), cwd=cwd, stdout=out, stderr=err, env=ENV)
        try:
            deadline = time.monotonic() + 300
            while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (cwd / "err").read_text()[-3000:]
    assert _sd(last)["global_step"] == 4, "the kill did not land after the first epoch"
    _run(_argv("fit", config, store, "--ckpt_path", "runs/latest/checkpoints/last.ckpt"), cwd)
    a, b = _sd(tmp_path / "a/runs/latest/checkpoints/last.ckpt"), _sd(last)
    assert a["global_step"] == b["global_step"] == 12 and a["ema_in_network_keys"] and b["ema_in_network_keys"]
    ema_keys = [k for k in a["state_dict"] if k.startswith("ema.")]
    assert ema_keys and a["state_dict"].keys() == b["state_dict"].keys()
    diff = max((a["state_dict"][k].double() - b["state_dict"][k].double()).abs().max().item() for k in a["state_dict"])
    print(f"resumed vs uninterrupted: max |diff| over the weights and their average {diff:.3g} ({len(ema_keys)} averaged tensors)")
    assert diff <= 1e-6
    # the checkpoint's network holds the average (what predict and export read), the raw weights sit aside
    net = "forecaster.net.blocks.0.mlp.fc1.weight"
    assert not torch.equal(a["state_dict"][net], a["state_dict"]["ema.blocks__0__mlp__fc1__weight"])
    # validating it without the setting validates the average; resuming elsewhere names the missing MLflow run
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({**TINY, "model": {k: v for k, v in TINY["model"].items() if k != "ema_decay"}}))
    _run(_argv("validate", plain, store, "--ckpt_path", str(last)), tmp_path / "c")
    res = _run(_argv("fit", plain, store, "--ckpt_path", str(last), "--trainer.max_epochs", "4"), tmp_path / "d", ok=False)
    assert res.returncode == 2 and "which the tracking store sqlite:///mlruns.db does not hold" in res.stderr, res.stderr[-2000:]
    # a resume takes the run's settings from its checkpoint (LightningCLI), the average included
    _run(_argv("fit", plain, store, "--ckpt_path", str(last), "--trainer.max_epochs", "4"), cwd)
    c = _sd(last)
    assert c["global_step"] == 16 and c["hyper_parameters"]["ema_decay"] == 0.7 and c["ema_in_network_keys"]


def test_bad_fine_tuning_input_is_named(store, golden_package_dir, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    res = _run(_argv("fit", config, store, "--model.freeze", "[nothing.*]"), tmp_path / "freeze", ok=False)
    assert res.returncode == 2 and "model.freeze: the pattern 'nothing.*' matches no parameter" in res.stderr, res.stderr[-2000:]
    package = golden_package_dir / "package"
    res = _run(_argv("fit", config, store, "--model.init_from", str(package)), tmp_path / "grid", ok=False)
    assert res.returncode == 2 and "was trained on the 61x120 grid, but the data grid is 17x32" in res.stderr, res.stderr[-2000:]
    assert "Regrid the data to the source's 61x120" in res.stderr
    # a source whose channels the data has none of
    from fcn3_lightning.model.build import save_model
    from fcn3_lightning.model.fcn3 import FCN3

    kwargs = dict(inp_shape=[17, 32], channel_names=CHANNELS, aux_channel_names=["xzen", "xnoise0", "xnoise1"], **SMALL_NET)
    save_model(FCN3(**kwargs), kwargs, tmp_path / "source.pt")
    other, _ = make_store(tmp_path / "other.zarr", ["t2m", "msl"], n_times=120, cadence_hours=6, nlat=17, nlon=32)
    compute_stats(WB2Store(other, ["t2m", "msl"]), *TRAIN, progress=False).save(f"{other}.stats.json")
    argv = _argv("fit", config, other, "--model.init_from", str(tmp_path / "source.pt"), "--data.channels", "[t2m, msl]")
    res = _run(argv + ["--data.aux_channels", "[xzen, xnoise0, xnoise1]"], tmp_path / "none", ok=False)
    assert res.returncode == 2 and "keeps none of the source's channels" in res.stderr, res.stderr[-2000:]


@pytest.fixture(scope="module")
def era5(tmp_path_factory) -> dict[str, Path]:
    """The committed 2-member ERA5 sample as a members store (training) and member 0 (truth), with statistics."""
    src = era5_sample_path()
    assert src is not None and src.is_file(), "the committed ERA5 sample tests/data/era5_sample is missing"
    root = tmp_path_factory.mktemp("era5")
    members = convert_cfgrib_to_wb2(src, root / "members.zarr", member=None)
    compute_stats(WB2Store(members, ERA5_CHANNELS, step_hours=12), "2017-01-01T00", "2017-01-02T00", progress=False).save(
        f"{members}.stats.json"
    )
    # geopotential height in m instead of geopotential: what the units check is for
    ds = xr.open_zarr(members).load()
    ds["geopotential"] = ds["geopotential"] / 9.80665
    height = root / "height.zarr"
    ds.to_zarr(height, zarr_format=2, consolidated=True)
    compute_stats(WB2Store(height, ERA5_CHANNELS, step_hours=12), "2017-01-01T00", "2017-01-02T00", progress=False).save(
        f"{height}.stats.json"
    )
    return {"members": members, "height": height}


def _crps(stdout: str, when: str) -> list[float]:
    return [float(v) for v in re.findall(rf"{when}: validation ensemble CRPS at the first lead time ([0-9.]+)", stdout)]


def test_fine_tune_the_package_on_real_era5(golden_package_dir, era5, tmp_path):
    """configs/finetune_own_data.yaml from the reference-written package on the real ERA5 sample (2 members here)."""
    config = REPO / "configs" / "finetune_own_data.yaml"
    package = str(golden_package_dir / "package")
    common = ["--model.init_from", package, "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path / 'mlruns.db'}"]
    start = _run(_argv("validate", config, era5["members"], *common), tmp_path / "v")
    before = _crps(start.stdout, "validation")
    assert len(before) == 1, start.stdout[-3000:]
    assert "channels: 4 kept, 0 new [], 68 dropped" in start.stdout
    fit = _run(_argv("fit", config, era5["members"], *common, "--trainer.max_epochs", "4"), tmp_path / "f")
    after = _crps(fit.stdout, r"epoch \d+")
    print(f"validation CRPS (normalised): starting model {before[0]:.4f}, after each epoch {after}")
    assert len(after) == 4 and after[-1] < before[0]
    # the mapping report is in the MLflow run, and the package exports and loads again with the same weights
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fcn3").experiment_id], filter_string="attributes.run_name LIKE 'fit%'")
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id, "init_from")] == [
        "init_from/channel_mapping.json",
        "init_from/channel_mapping.txt",
    ]
    best = tmp_path / "f/runs/latest/checkpoints/best.ckpt"
    _run([sys.executable, "-m", "fcn3_lightning", "export", "--checkpoint", str(best), "--out", str(tmp_path / "pkg")], tmp_path)
    from fcn3_lightning.forecaster import load_forecaster

    a, b = load_forecaster(best, device="cpu"), load_forecaster(tmp_path / "pkg", device="cpu")
    assert a.channels == b.channels == ERA5_CHANNELS and a.step_hours == b.step_hours == 12
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert np.array_equal(a.normalizer.offset, b.normalizer.offset) and np.array_equal(a.normalizer.scale, b.normalizer.scale)
    assert a.orography is not None and np.array_equal(a.orography, b.orography)  # the package's, carried through


def test_data_in_other_units_than_the_package_is_refused(golden_package_dir, era5, tmp_path):
    config = REPO / "configs" / "finetune_own_data.yaml"
    res = _run(_argv("fit", config, era5["height"], "--model.init_from", str(golden_package_dir / "package")), tmp_path, ok=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "disagree in units" in res.stderr and "z500: std" in res.stderr
    assert "geopotential height (m) vs geopotential (m2 s-2)" in res.stderr, res.stderr[-2000:]
