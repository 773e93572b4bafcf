"""Issue 5: the scores logged while validating/testing equal the metrics computed afterwards on the forecasts.

``trainer.test`` logs WB2 scores of the headline channels; ``trainer.predict`` on the same split gives the
same ensembles (validation and prediction share the noise key), and fresh metric objects fed with those
forecasts and the raw store targets must reproduce every logged number.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from tiny_net import FIT_NET as NET
from wb2_synthetic import make_store

from fcn3_lightning.data import WB2DataModule, WB2Store, compute_stats
from fcn3_lightning.metrics import CRPS, DeterministicScores, SpreadSkill
from fcn3_lightning.training.module import FCN3Module

CHANNELS = ["tcwv", "u500", "v500", "z500"]
TRAIN = ("2000-01-01", "2000-01-05T18")
TEST = ("2000-01-06", "2000-01-07T12")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path, _ = make_store(tmp_path_factory.mktemp("val") / "era.zarr", CHANNELS, n_times=40, nlat=17, nlon=32)
    compute_stats(WB2Store(path, CHANNELS), *TRAIN, progress=False).save(f"{path}.stats.json")
    return path


def test_logged_scores_equal_metrics_of_the_predictions(store):
    torch.manual_seed(0)
    dm = WB2DataModule(str(store), channels=CHANNELS, train_range=TRAIN, valid_range=TEST, test_range=TEST, valid_rollout=2, batch_size=2)
    scores = ["crps", "ensemble_mean_rmse", "spread_skill_ratio", "spread_skill_ratio_fortin_corrected", "bias", "mae"]
    module = FCN3Module(net=NET, ensemble_size=2, valid_ensemble_size=3, log_channels=["z500", "tcwv"], val_scores=scores)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.test(module, datamodule=dm, verbose=False)[0]
    outputs = trainer.predict(module, datamodule=dm)

    pred = torch.cat([o["prediction"] for o in outputs])  # (N, M, lead, C, H, W), physical units
    target = torch.cat([b["target"] for b in dm.test_dataloader()])  # raw store values
    n = pred.shape[0]
    assert n == target.shape[0] == 5 and pred.shape[1] == 3  # 7 test times, 2 targets each
    idx = [CHANNELS.index(c) for c in ("z500", "tcwv")]
    pred, target = pred[:, :, :, idx], target[:, :, idx]
    args = (dm.store.lat, dm.store.lon, ["z500", "tcwv"], [6, 12])
    crps, ss, det = CRPS(*args), SpreadSkill(*args), DeterministicScores(*args)
    for i in range(0, n, 3):  # other batches than the loader's: sums over forecasts do not care
        crps.update(pred[i : i + 3], target[i : i + 3])
        ss.update(pred[i : i + 3], target[i : i + 3])
        det.update(pred[i : i + 3].mean(1), target[i : i + 3])
    values = {**crps.compute(), **ss.compute(), **det.compute()}
    checked = 0
    for name in scores:
        for li, lead in enumerate(("6h", "12h")):
            for ci, ch in enumerate(("z500", "tcwv")):
                got = logged[f"test/{name}/{ch}/{lead}"]
                want = float(values[name][0, li, ci])
                assert got == pytest.approx(want, rel=1e-5, abs=1e-6 * abs(float(values["mae"][0, li, ci]))), (name, ch, lead)
                checked += 1
    assert checked == 24
    assert "test/crps/u500/6h" not in logged  # only the headline channels
