"""Acceptance 4: under SpatialParallelStrategy (2 gloo processes, latitude split h=2) the plots are made once (rank 0)
and show the whole globe: the maps, spectra and calibration equal those of the same fit in one process.

Both runs start from the same serial weights and train with lr=0 (one step, so that the fit path is the one tested,
but the weights stay put whatever order the distributed sampler feeds the samples in); validation then sees the
same forecasts.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
from fcn3_lightning.callbacks import Calibration, ForecastMaps, GradNorm, NonFiniteGuard, SpectraPlots, Throughput
from gloo_workers import gloo_worker, run_workers
from tiny_net import FIT_NET as NET

from fcn3_lightning.data.datamodule import WB2DataModule
from fcn3_lightning.parallel import shard_state_dict
from fcn3_lightning.parallel.strategy import SpatialParallelStrategy
from fcn3_lightning.training.module import FCN3Module

WORLD = 2
MODULE_KW = {"net": NET, "ensemble_size": 2, "lr": 0.0}
DATA_KW = {"batch_size": 2, "num_workers": 0, "train_rollout": 1, "valid_rollout": 2}
TIME_LIMIT_S = 150.0
PRELOAD = ["torch", "torch.distributed", "lightning", "fcn3_lightning.parallel.strategy", "fcn3_lightning.training.module"]
PNGS = [
    "calibration/rank_histogram_step0000001.png",
    "calibration/spread_skill_step0000001.png",
    "maps/forecast_maps_step0000001.png",
    "spectra/spectra_step0000001.png",
]


class _StartFrom(L.Callback):
    def __init__(self, initial: dict[str, torch.Tensor]):
        self.initial = initial

    def on_fit_start(self, trainer: L.Trainer, pl_module: FCN3Module) -> None:
        net = pl_module.net  # after the strategy's broadcast; the distributed net takes its shards
        net.load_state_dict(shard_state_dict(self.initial, net) if pl_module.layout.model_parallel else self.initial)


def _initial_weights() -> dict[str, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    dm, module = WB2DataModule(**DATA_KW), FCN3Module(**MODULE_KW)
    module.build(dm.channels, dm.aux_channels, dm.store.shape, dm.normalizer)
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


def _fit(root: Path, strategy: SpatialParallelStrategy | None, initial: dict[str, torch.Tensor]) -> dict:
    L.seed_everything(0, verbose=False)
    maps, spectra, calib, grad = ForecastMaps(), SpectraPlots(), Calibration(), GradNorm(log_every_n_steps=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD if strategy is not None else 1,
        strategy=strategy if strategy is not None else "auto",
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        callbacks=[_StartFrom(initial), maps, spectra, calib, grad, NonFiniteGuard(), Throughput()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(FCN3Module(**MODULE_KW), datamodule=WB2DataModule(**DATA_KW))
    return {"maps": maps.last_fields, "spectra": spectra.last, "calibration": calib.last, "grad_norm": grad.last}


def _worker(rank: int, port: int, workdir: str) -> None:
    workdir = Path(workdir)
    with gloo_worker(rank, port, WORLD, lightning=True):
        strategy = SpatialParallelStrategy(h_parallel_size=2, process_group_backend="gloo")
        record = _fit(workdir / "parallel", strategy, torch.load(workdir / "initial.pt"))
        torch.save(record, workdir / f"rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    workdir = tmp_path_factory.mktemp("callbacks_parallel")
    initial = _initial_weights()
    torch.save(initial, workdir / "initial.pt")
    elapsed = run_workers(_worker, workdir, WORLD, TIME_LIMIT_S, PRELOAD)
    t0 = time.perf_counter()
    serial = _fit(workdir / "serial", None, initial)
    print(f"\n{WORLD} gloo processes (h=2): {elapsed:.1f} s; serial twin: {time.perf_counter() - t0:.1f} s")
    return workdir, serial, [torch.load(workdir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_plots_are_made_once_on_rank_0(runs) -> None:
    workdir, _, ranks = runs
    pngs = sorted(str(p.relative_to(workdir / "parallel" / "plots")) for p in (workdir / "parallel" / "plots").rglob("*.png"))
    assert pngs == PNGS
    assert ranks[0]["maps"] is not None and ranks[1]["maps"] is None  # rank 1 takes part in the gathers, draws nothing
    # the health callbacks ran alongside; the gradient norm is the full model's, the same on both ranks
    assert ranks[0]["grad_norm"] > 0 and ranks[0]["grad_norm"] == pytest.approx(ranks[1]["grad_norm"], rel=1e-6)


# Serial and parallel forecasts differ by the round-off of the distributed transforms' reduction order: a few 1e-7 of a
# channel's normalisation scale, plus one float32 ulp of the physical value (z500 ~ 58,000 m2 s-2: ulp 0.004 = 1.7e-6
# of its scale). The tolerance is stated in those units, where the network computes.
MEMBER_ATOL = 1e-5  # x the channel's normalisation scale


def test_plots_show_the_whole_globe_as_the_serial_run(runs) -> None:
    _, serial, ranks = runs
    par = ranks[0]
    dm = WB2DataModule(**DATA_KW)
    shape = dm.store.shape
    sigma = np.asarray(dm.normalizer.scale, dtype=np.float64).reshape(1, -1, 1, 1)
    # the spread is a function of the members: with M = 2, std = |x1 - x2| / sqrt(2), so it may move by up to
    # sqrt(2) x what a member moves. (Its own size is no yardstick: a spread of ~30 m2 s-2 is the difference of two
    # z500 values of ~58,000 and carries their round-off, not round-off relative to 30.)
    tolerance = {"member": MEMBER_ATOL, "ensemble mean": MEMBER_ATOL, "ensemble spread (std)": np.sqrt(2.0) * MEMBER_ATOL}
    for panel in ("truth", "member", "ensemble mean", "ensemble spread (std)"):
        got, want = par["maps"][panel], serial["maps"][panel]
        assert got.shape == want.shape == (2, 4, *shape), panel
        if panel == "truth":
            np.testing.assert_array_equal(got, want)  # read from the store, gathered: bit for bit
            continue
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64)) / sigma
        np.testing.assert_array_less(diff, tolerance[panel], err_msg=f"{panel}: |parallel - serial| / channel scale")
    for key in ("prediction", "truth"):
        np.testing.assert_allclose(par["spectra"][key], serial["spectra"][key], rtol=1e-3, atol=0, err_msg=key)
    for r in range(WORLD):  # the scalar is the same on every rank (logged by each)
        assert ranks[r]["spectra"]["ratio_high_k"] == pytest.approx(serial["spectra"]["ratio_high_k"], rel=1e-3)
    for key in ("spread_skill_ratio", "rmse", "spread", "rank_histogram"):
        np.testing.assert_allclose(par["calibration"][key], serial["calibration"][key], rtol=1e-3, atol=1e-6, err_msg=key)
