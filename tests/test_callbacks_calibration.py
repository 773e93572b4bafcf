"""Issue 15, acceptance 5: the Calibration callback's console line and spread-skill plot show the ratio that is 1
for a calibrated ensemble, whatever its size.

A perfectly calibrated synthetic ensemble: at every point, lead time and channel the truth and the M = 4 members are
drawn i.i.d. from one distribution (standard normal in the model's normalised units). The validation run is real
(the default world's validation loader, the callback in a Trainer); only the forecasts are these draws.

Sampling error of the ratio: per point the members' variance s^2 (ddof 1) has mean 1 and variance 2/(M-1), the
squared error of the ensemble mean (X̄ - o)^2 has mean (M+1)/M and variance 2((M+1)/M)^2, and the two are independent
(normal samples). Over N_eff effectively independent area-weighted points, var(log ratio) = (1/4)(2/(M-1) + 2)/N_eff
= (2/3)/N_eff for M = 4, so the ratio's standard deviation is sqrt(2/(3 N_eff)). The test allows 5 of them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning as L
import numpy as np
import torch
from fcn3_lightning.callbacks import Calibration
from fcn3_lightning.callbacks.calibration import console_line
from tiny_net import FIT_NET as NET

from fcn3_lightning.data.datamodule import WB2DataModule
from fcn3_lightning.training.module import FCN3Module

M = 4
BATCH, BATCHES = 8, 8  # 64 validation forecasts


class _CalibratedEnsemble(FCN3Module):
    """Validation forecasts that are perfectly calibrated by construction: truth and members i.i.d. N(0, 1)."""

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        b, s, c, h, w = batch["target"].shape
        gen = torch.Generator().manual_seed(1000 + batch_idx)
        draws = torch.randn((b, M + 1, s, c, h, w), generator=gen)
        return {"prediction": draws[:, 1:], "target": draws[:, 0]}


def test_a_calibrated_ensemble_shows_a_ratio_of_one(tmp_path: Path, capsys) -> None:
    L.seed_everything(0, verbose=False)
    calib = Calibration(background=False)
    dm = WB2DataModule(batch_size=BATCH, num_workers=0, train_rollout=1, valid_rollout=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        limit_val_batches=BATCHES,
        default_root_dir=str(tmp_path),
        callbacks=[calib],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(_CalibratedEnsemble(net=NET, ensemble_size=2, valid_ensemble_size=M), datamodule=dm)
    out = capsys.readouterr().out
    last = calib.last
    assert last is not None and last["n_members"] == M and calib.n_forecasts == BATCH * BATCHES

    # the tolerance: 5 standard deviations of the ratio over N_eff area-weighted points
    lat = np.deg2rad(np.asarray(dm.store.lat))
    w = np.repeat(np.cos(lat).clip(0.0)[:, None], np.asarray(dm.store.lon).size, axis=1)
    n_eff = calib.n_forecasts * w.sum() ** 2 / (w**2).sum()
    tol = 5.0 * math.sqrt(2.0 / (3.0 * n_eff))
    shown = last["spread_skill_ratio_fortin_corrected"]  # (lead, channel)
    plain = last["spread_skill_ratio"]
    print(f"\nN_eff {n_eff:.0f}, tolerance {tol:.4f}\nshown (Fortin-corrected):\n{shown}\nplain (WB2's, uncorrected):\n{plain}")
    assert shown.shape == (2, len(calib.channels))
    np.testing.assert_allclose(shown, 1.0, rtol=0, atol=tol)
    np.testing.assert_allclose(plain, math.sqrt(M / (M + 1)), rtol=0, atol=tol)  # 0.894: the plain ratio is not 1
    assert 1.0 - math.sqrt(M / (M + 1)) > 8 * tol  # so the test tells them apart
    # and the rank histogram is flat: each of the M + 1 bins holds 1/(M + 1) (Bernoulli(0.2) sampling error, 5 sd)
    np.testing.assert_allclose(last["rank_histogram"], 1.0 / (M + 1), rtol=0, atol=5.0 * math.sqrt(0.2 * 0.8 / n_eff))

    # the console shows the corrected ratio at the last lead time
    line = next(x for x in out.splitlines() if "spread-skill ratio" in x)
    assert line == console_line(last, calib.channels, 12.0)
    assert "Fortin-corrected" in line and "1 = calibrated" in line
    printed = [float(v) for v in re.findall(r"(?:tcwv|u500|v500|z500) ([0-9.]+)", line)]
    np.testing.assert_allclose(printed, shown[-1], atol=0.005)
    assert all(abs(v - 1.0) < 0.05 for v in printed)

    # the plot draws the corrected ratios, with the calibrated line at 1
    fig = calib.spread_skill_figure(last, calib.grid, "test")
    ax = fig.axes[0]
    curves = [line for line in ax.lines if line.get_label() in calib.channels]
    assert [c.get_label() for c in curves] == calib.channels
    for c, curve in enumerate(curves):
        np.testing.assert_array_equal(curve.get_ydata(), shown[:, c])
    (ref,) = [line for line in ax.lines if line.get_label() == "calibrated"]
    assert list(ref.get_ydata()) == [1.0, 1.0]
    assert "Fortin-corrected" in ax.get_title() and "1 = calibrated" in ax.get_title()
    # the calibrated spread drawn beside spread and RMSE is sqrt(M/(M+1)) x the RMSE
    for c in range(len(calib.channels)):
        (dotted,) = [line for line in fig.axes[c + 1].lines if str(line.get_label()).startswith("calibrated spread")]
        np.testing.assert_allclose(dotted.get_ydata(), math.sqrt(M / (M + 1)) * last["rmse"][:, c], rtol=1e-12)
    assert (tmp_path / "plots" / "calibration" / "spread_skill_step0000000.png").is_file()
