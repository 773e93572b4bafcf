"""Issue 15 (defect 9): the plotting callbacks' cadence survives a resume, and a run shorter than the cadence still
ends with plots. Real short fits of the default world with real checkpoints (Lightning's ModelCheckpoint)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from fcn3_lightning.callbacks import Calibration, ForecastMaps, SpectraPlots
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from tiny_net import FIT_NET as NET

from fcn3_lightning.data.datamodule import WB2DataModule
from fcn3_lightning.training.module import FCN3Module

MODULE_KW = {"net": NET, "ensemble_size": 2, "lr": 2e-3}
DATA_KW = {"batch_size": 2, "num_workers": 0, "train_rollout": 1, "valid_rollout": 2}
EVERY = 3


def _plots() -> list[L.Callback]:
    return [ForecastMaps(every_n_validations=EVERY), SpectraPlots(every_n_validations=EVERY), Calibration(every_n_validations=EVERY)]


def _fit(root: Path, max_epochs: int, extra: list[L.Callback] = (), ckpt_path: str | None = None) -> tuple[L.Trainer, list]:
    L.seed_everything(0, verbose=False)
    plots = _plots()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True), *plots, *extra],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(FCN3Module(**MODULE_KW), datamodule=WB2DataModule(**DATA_KW), ckpt_path=ckpt_path)
    return trainer, plots


def _steps(root: Path) -> dict[str, list[int]]:
    """Global steps of the PNGs under <root>/plots, per folder."""
    out: dict[str, list[int]] = {}
    for png in sorted((root / "plots").rglob("*.png")):
        out.setdefault(png.parent.name, []).append(int(png.stem.rsplit("step", 1)[1]))
    return {k: sorted(set(v)) for k, v in out.items()}


def test_a_short_run_ends_with_plots_and_a_resume_keeps_the_cadence(tmp_path: Path) -> None:
    # 2 validations (steps 2 and 4) with every_n_validations=3: the last one is drawn
    trainer, plots = _fit(tmp_path, max_epochs=2)
    assert trainer.global_step == 4
    assert _steps(tmp_path) == {"maps": [4], "spectra": [4], "calibration": [4]}
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    saved = {k: v for k, v in ckpt["callbacks"].items() if k.startswith(("ForecastMaps", "SpectraPlots", "Calibration"))}
    assert len(saved) == 3 and all(v == {"validations": 2} for v in saved.values()), saved

    # resumed for 3 more epochs: validations 3, 4, 5 of the run (steps 6, 8, 10); the 3rd is due by the cadence
    # (a count restarted at 0 would call it the 1st), the 5th as the last
    trainer, plots = _fit(tmp_path, max_epochs=5, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert trainer.global_step == 10 and all(p.every.count == 5 for p in plots)
    assert _steps(tmp_path) == {"maps": [4, 6, 10], "spectra": [4, 6, 10], "calibration": [4, 6, 10]}


def test_a_stop_the_trainer_cannot_foresee_is_reported(tmp_path: Path, caplog) -> None:
    # early stopping after the first validation (step 2) of a 5-epoch run: not due, and not known to be the last
    caplog.set_level(logging.INFO)
    stop = EarlyStopping(monitor="val/crps", stopping_threshold=1e9)
    trainer, _ = _fit(tmp_path, max_epochs=5, extra=[stop])
    assert trainer.global_step == 2 and not (tmp_path / "plots").exists()
    for name in ("ForecastMaps", "SpectraPlots", "Calibration"):
        assert f"{name}: the last validation of this fit (step 2) was not drawn" in caplog.text, caplog.text[-2000:]
