"""fcn3_lightning.callbacks on tiny fits of the default world: the plots reach MLflow, the maps show the truth of the
whole globe in physical units, the NaN guard stops at the bad step with a checkpoint from before it."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from fcn3_lightning.callbacks import Calibration, ForecastMaps, GradNorm, NonFiniteError, NonFiniteGuard, SpectraPlots, Throughput
from fcn3_lightning.callbacks.plotting import cell_edges
from fcn3_lightning.callbacks.spectra import high_k_ratio, readable_log_ticks
from lightning.pytorch.loggers import MLFlowLogger
from tiny_net import FIT_NET as NET

from fcn3_lightning.channels import display_units
from fcn3_lightning.data.datamodule import WB2DataModule
from fcn3_lightning.training.module import FCN3Module

MODULE_KW = {"net": NET, "ensemble_size": 2, "lr": 2e-3}
DATA_KW = {"batch_size": 2, "num_workers": 0, "train_rollout": 1, "valid_rollout": 2}


def _trainer(root: Path, callbacks: list[L.Callback], logger: object = False, **kw: object) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=str(root),
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    args.update(kw)
    return L.Trainer(**args)


def test_high_k_ratio_averages_the_top_quarter_of_the_degrees() -> None:
    truth = torch.ones(2, 3, 32)
    pred = truth.clone()
    pred[..., 24:] = 0.5  # the top quarter: degrees 24 ... 31
    pred[..., :24] = 7.0  # ignored
    ratio, first = high_k_ratio(pred, truth, 0.25)
    assert first == 24
    assert ratio.shape == (2, 3)
    torch.testing.assert_close(ratio, torch.full((2, 3), 0.5, dtype=torch.float64))


def test_plot_helpers() -> None:
    np.testing.assert_allclose(cell_edges(np.array([90.0, 45.0, 0.0, -45.0, -90.0]), -90, 90), [90, 67.5, 22.5, -22.5, -67.5, -90])
    assert display_units("m**2 s**-2", mathtext=True) == "m$^{2}$ s$^{-2}$"


@pytest.mark.parametrize(
    "lo, hi, want",
    [
        (0.8, 1.2, [0.8, 0.9, 1.0, 1.1, 1.2]),  # a ratio near 1: evenly spaced
        (1.0, 32.0, [1.0, 2.0, 5.0, 10.0, 20.0]),  # the degrees of a T31 grid: 1-2-5
        (0.3, 3.0, [0.5, 1.0, 2.0]),
        (1e-4, 1.0, None),  # several decades: matplotlib's own powers of ten
    ],
)
def test_log_axes_get_readable_ticks(lo: float, hi: float, want: list[float] | None) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatterSciNotation

    ax = Figure().subplots()
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    readable_log_ticks(ax.yaxis, lo, hi)
    ticks = [t for t in ax.yaxis.get_major_locator().tick_values(lo, hi) if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
    if want is None:
        assert isinstance(ax.yaxis.get_major_formatter(), LogFormatterSciNotation) and len(ticks) >= 3
        return
    np.testing.assert_allclose(ticks, want)
    labels = [ax.yaxis.get_major_formatter()(t, i) for i, t in enumerate(ticks)]
    assert labels == [f"{v:g}" for v in want]


def test_fit_logs_maps_spectra_calibration_and_health_to_mlflow(tmp_path: Path) -> None:
    from matplotlib.image import imread
    from mlflow.tracking import MlflowClient

    L.seed_everything(0, verbose=False)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    logger = MLFlowLogger(experiment_name="cb", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"))
    maps, spectra, calib = ForecastMaps(), SpectraPlots(), Calibration()
    grad = GradNorm(log_every_n_steps=1)
    callbacks = [maps, spectra, calib, NonFiniteGuard(), Throughput(log_every_n_steps=1), grad]
    dm = WB2DataModule(**DATA_KW)
    _trainer(tmp_path / "run", callbacks, logger=logger).fit(FCN3Module(**MODULE_KW), datamodule=dm)

    client = MlflowClient(uri)
    found = {}
    for folder in ("maps", "spectra", "calibration"):
        found[folder] = sorted(a.path for a in client.list_artifacts(logger.run_id, folder))
    assert found == {
        "maps": ["maps/forecast_maps_step0000003.png"],
        "spectra": ["spectra/spectra_step0000003.png"],
        "calibration": ["calibration/rank_histogram_step0000003.png", "calibration/spread_skill_step0000003.png"],
    }
    for path in (tmp_path / "run" / "plots").rglob("*.png"):
        img = imread(path)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400, (path, img.shape)
    metrics = client.get_run(logger.run_id).data.metrics
    for name in ("val/spectral_ratio_high_k", "val/spectral_ratio_high_k/z500", "train/grad_norm", "perf/samples_per_s", "perf/s_per_step"):
        assert name in metrics and math.isfinite(metrics[name]), name
    assert metrics["perf/peak_memory_mb"] > 50
    assert metrics["train/grad_norm"] == pytest.approx(grad.last)

    # the maps show validation sample 0 in physical units on the whole globe: its truth is the store's
    f = maps.last_fields
    assert f["channels"] == dm.channels and f["lead_hours"] == [6.0, 12.0]
    sample = dm.dataset("valid")[0]
    truth = sample["target"].numpy()  # physical units (the data module normalises on the device): (lead, channel, lat, lon)
    np.testing.assert_allclose(f["truth"], truth, rtol=1e-5, atol=1e-3)
    assert f["truth"].shape == (2, 4, *dm.store.shape)
    assert (f["ensemble spread (std)"] >= 0).all() and (f["ensemble spread (std)"] > 0).any()
    # the spectra and calibration are over the 4 validation forecasts, 2 members
    assert spectra.last["prediction"].shape == (2, 4, 32) and np.all(spectra.last["truth"] > 0)
    hist = calib.last["rank_histogram"]
    assert hist.shape == (2, 4, 3)
    np.testing.assert_allclose(hist.sum(-1), 1.0, rtol=1e-6)
    assert np.all(calib.last["spread_skill_ratio"] > 0)
    # MLflow has both ratios: WB2's plain one and the Fortin-corrected one (x sqrt((M+1)/M), M = 2), which is 1 when calibrated
    for lead in ("6h", "12h"):
        plain, corrected = (metrics[f"val/{k}/z500/{lead}"] for k in ("spread_skill_ratio", "spread_skill_ratio_fortin_corrected"))
        assert corrected == pytest.approx(plain * math.sqrt(3 / 2), rel=1e-6)


class _PoisonAt(L.Callback):
    """Makes the loss (``what="loss"``) or one parameter's gradient (``what="grad"``) NaN at global step ``k``;
    records the weights at the start of that step."""

    def __init__(self, k: int, what: str):
        self.k, self.what = k, what
        self.weights: dict[str, torch.Tensor] | None = None
        self.param_name: str | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        if trainer.global_step != self.k:
            return
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        if self.what == "loss":
            batch["input"].fill_(float("nan"))  # after the data module's NaN check: the forward pass turns it into the loss
        else:
            name, param = [(n, p) for n, p in pl_module.named_parameters()][3]
            self.param_name = name
            param.register_hook(lambda g: torch.full_like(g, float("nan")))


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_nonfinite_guard_stops_at_the_bad_step_with_a_checkpoint_before_it(tmp_path: Path, what: str) -> None:
    k = 2
    L.seed_everything(0, verbose=False)
    poison = _PoisonAt(k, what)
    module = FCN3Module(**MODULE_KW)
    trainer = _trainer(tmp_path, [poison, NonFiniteGuard()], limit_train_batches=5, limit_val_batches=0)
    with pytest.raises(NonFiniteError) as err:
        trainer.fit(module, datamodule=WB2DataModule(**DATA_KW))
    msg = str(err.value)
    print(f"\n{msg}")
    assert f"at global step {k} " in msg
    expected = "non-finite loss" if what == "loss" else f"non-finite grad of {poison.param_name}"
    assert expected in msg, msg
    assert trainer.global_step == k  # no update at step k (nor after it)

    ckpt_path = tmp_path / "checkpoints" / f"before_nonfinite_step{k}.ckpt"
    assert ckpt_path.is_file() and str(ckpt_path) in msg
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == k  # the k good updates 0 ... k-1, before step k's
    for name, value in poison.weights.items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(ckpt["state_dict"][name], value, rtol=0, atol=0, msg=f"checkpoint {name}")
        torch.testing.assert_close(module.state_dict()[name], value, rtol=0, atol=0, msg=f"weights after the stop: {name}")
