"""Issue 21: the metric classes' public API that the evaluation harness uses (no subclasses built on the fly, no
patched module attributes): ``skipna``, ``record_regions`` / ``per_forecast``, ``weights_cache`` and
``update_from_means``. Expected values are computed here with numpy from the definitions."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from fcn3_lightning.grid import cell_area_weights
from fcn3_lightning.metrics import ACC, CRPS, DeterministicScores, EnergyScore, RankHistogram, SpreadSkill
from fcn3_lightning.metrics.regions import RegionWeights

LAT = np.linspace(90.0, -90.0, 9)
LON = np.arange(16) * 22.5
REGIONS = ["global", "tropics", "northern-hemisphere"]


def _weights(regions=REGIONS, area=True) -> np.ndarray:
    """(R, lat, lon) weights from the regions' latitude bounds, written out here (none of these regions cuts longitude)."""
    bounds = {"global": (-90, 90), "tropics": (-20, 20), "northern-hemisphere": (20, 90)}
    base = cell_area_weights(LAT) if area else np.ones(LAT.size)
    out = []
    for r in regions:
        lo, hi = bounds[r]
        w = np.where((LAT >= lo - 1e-6) & (LAT <= hi + 1e-6), base, 0.0)[:, None] * np.ones(LON.size)
        out.append(w / w.sum())
    return np.stack(out)


def _smean(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(..., lat, lon) -> (..., R), NaN points skipped (weights renormalised over the finite points)."""
    ok = np.isfinite(x)
    num = np.einsum("...hw,rhw->...r", np.where(ok, x, 0.0), w)
    return num / np.einsum("...hw,rhw->...r", ok.astype(float), w)


def _data(b=3, m=4, leads=2, chans=2, seed=0):
    g = np.random.default_rng(seed)
    o = g.normal(size=(b, leads, chans, LAT.size, LON.size))
    x = o[:, None] + g.normal(size=(b, m, leads, chans, LAT.size, LON.size))
    c = g.normal(size=o.shape) * 0.5
    return x, o, c


def _make(cls, **kw):
    return cls(LAT, LON, ["a", "b"], [6.0, 12.0], regions=REGIONS, **kw)


def test_update_from_means_gives_the_definitions():
    x, o, c = _data()
    f = x.mean(1)
    w = _weights()
    t = torch.as_tensor
    det, acc, crps, ss, es = (_make(k) for k in (DeterministicScores, ACC, CRPS, SpreadSkill, EnergyScore))
    det.check_pair(t(f), t(o))
    det.update_from_means(se=t(_smean((f - o) ** 2, w)), err=t(_smean(f - o, w)), ae=t(_smean(abs(f - o), w)))
    fa, oa = f - c, o - c
    acc.update_from_means(fo=t(_smean(fa * oa, w)), ff=t(_smean(fa * fa, w)), oo=t(_smean(oa * oa, w)))
    m = x.shape[1]
    skill = abs(x - o[:, None]).mean(1)
    spread = abs(x[:, :, None] - x[:, None]).sum((1, 2)) / (m * (m - 1))
    crps.check_pair(t(x), t(o))
    crps.update_from_means(skill=t(_smean(skill, w)), spread=t(_smean(spread, w)))
    ss.check_pair(t(x), t(o))
    se, var = _smean((f - o) ** 2, w), _smean(x.var(1, ddof=1), w)
    ss.update_from_means(se=t(se), var=t(var))
    es.check_pair(t(x), t(o))
    es.update_from_means(se=t(_smean((x - o[:, None]) ** 2, w)), sd=t(_smean((x[:, 1:] - x[:, :-1]) ** 2, w)))

    def mean_t(a):  # (B, L, C, R) -> (R, L, C)
        return np.moveaxis(a.mean(0), -1, 0)

    np.testing.assert_allclose(det.compute()["rmse"].numpy(), np.sqrt(mean_t(_smean((f - o) ** 2, w))), rtol=1e-12)
    np.testing.assert_allclose(det.compute()["mae"].numpy(), mean_t(_smean(abs(f - o), w)), rtol=1e-12)
    want_acc = _smean(fa * oa, w) / np.sqrt(_smean(fa * fa, w) * _smean(oa * oa, w))
    np.testing.assert_allclose(acc.compute()["acc"].numpy(), mean_t(want_acc), rtol=1e-12)
    np.testing.assert_allclose(crps.compute()["crps"].numpy(), mean_t(_smean(skill - 0.5 * spread, w)), rtol=1e-12)
    np.testing.assert_allclose(ss.compute()["debiased_ensemble_mean_mse"].numpy(), mean_t(se - var / m), rtol=1e-12)
    np.testing.assert_allclose(ss.compute()["spread_skill_ratio_fortin_corrected"].numpy(), np.sqrt(mean_t(var) / mean_t(se) * (m + 1) / m))
    es_skill = np.sqrt(_smean((x - o[:, None]) ** 2, w)).mean(1)
    np.testing.assert_allclose(es.compute()["energy_score_skill"].numpy(), mean_t(es_skill), rtol=1e-12)
    # the same states as update() on the inputs
    for cls, args in ((DeterministicScores, (f, o)), (ACC, (f, o, c)), (CRPS, (x, o)), (SpreadSkill, (x, o)), (EnergyScore, (x, o))):
        ref = _make(cls)
        ref.update(*(t(a) for a in args))
        mine = {DeterministicScores: det, ACC: acc, CRPS: crps, SpreadSkill: ss, EnergyScore: es}[cls]
        for k, v in ref.compute().items():
            torch.testing.assert_close(mine.compute()[k], v, rtol=1e-12, atol=1e-14, equal_nan=True, msg=f"{cls.__name__}.{k}")


def test_update_from_means_is_an_update():
    """torchmetrics' bookkeeping: the call is counted and a cached compute() result is dropped."""
    x, o, _ = _data()
    w = _weights()
    det = _make(DeterministicScores)
    f = x.mean(1)
    means = {k: torch.as_tensor(_smean(v, w)) for k, v in (("se", (f - o) ** 2), ("err", f - o), ("ae", abs(f - o)))}
    det.update_from_means(**means)
    first = det.compute()["mse"].clone()
    means = {k: 4.0 * v for k, v in means.items()}
    det.update_from_means(**means)
    assert det.update_count == 2
    torch.testing.assert_close(det.compute()["mse"], 2.5 * first)
    # a copy (deepcopy, pickle) updates itself, not the original
    for clone in (copy.deepcopy(det), pickle.loads(pickle.dumps(det))):
        clone.update_from_means(**means)
        assert clone.update_count == 3 and det.update_count == 2
        torch.testing.assert_close(clone.compute()["mse"], (1 + 4 + 4) / 3 * first)
        torch.testing.assert_close(det.compute()["mse"], 2.5 * first)
    with pytest.raises(RuntimeError, match="ensemble size is unknown"):
        _make(SpreadSkill).update_from_means(se=means["se"], var=means["se"])


def test_skipna_renormalises_the_weights_over_finite_points():
    x, o, _ = _data(seed=1)
    f = x[:, 0].copy()
    f[0, 0, 0, 4, 3] = np.nan  # an equator point of the first forecast
    f[1, 1, 1, :2] = np.inf  # the northernmost rows: the northern-hemisphere mean keeps its other rows
    det = _make(DeterministicScores, skipna=True)
    det.update(torch.as_tensor(f), torch.as_tensor(o))
    e = np.where(np.isfinite(f), f - o, np.nan)
    want = np.moveaxis(_smean(e * e, _weights()).mean(0), -1, 0)
    np.testing.assert_allclose(det.compute()["mse"].numpy(), want, rtol=1e-12)
    plain = _make(DeterministicScores)
    plain.update(torch.as_tensor(f), torch.as_tensor(o))
    assert not np.isfinite(plain.compute()["mse"].numpy()).all()


def test_rank_histogram_skipna_leaves_out_nan_points():
    x, o, _ = _data(b=2, m=3, seed=2)  # continuous values: no ties
    x[1, 2, 0, 1, 5, 5] = np.nan
    o[0, 1, 0, 0, 0] = np.nan
    rh = RankHistogram(LAT, LON, ["a", "b"], [6.0, 12.0], regions=["global"], n_members=3, skipna=True)
    rh.update(torch.as_tensor(x), torch.as_tensor(o))
    ranks = (x < o[:, None]).sum(1)
    bad = ~np.isfinite(o) | ~np.isfinite(x).all(1)
    onehot = np.where(bad[..., None], np.nan, np.eye(4)[ranks])  # (B, L, C, h, w, K)
    for name, area in (("latweighted", True), ("unweighted", False)):
        want = _smean(np.moveaxis(onehot, -1, -3), _weights(["global"], area)).mean(0)[..., 0]  # (L, C, K)
        got = rh.compute()[f"rank_histogram_{name}_spatial_mean"][0].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=name)


def test_per_forecast_records_each_forecast():
    x, o, _ = _data(b=3, seed=3)
    crps = _make(CRPS, record_regions=[2, 0])
    det = _make(DeterministicScores, record_regions=[1])
    crps.update(torch.as_tensor(x), torch.as_tensor(o))
    det.update(torch.as_tensor(x[:, 0]), torch.as_tensor(o))
    w = _weights()
    e = x[:, 0] - o
    want_rmse = np.moveaxis(np.sqrt(_smean(e * e, w)), -1, 1)[:, [1]]  # (B, 1, L, C)
    np.testing.assert_allclose(det.per_forecast()["rmse"].numpy(), want_rmse, rtol=1e-12)
    for i in range(3):  # one metric per forecast: the per-forecast value is that metric's score
        one = _make(CRPS)
        one.update(torch.as_tensor(x[i : i + 1]), torch.as_tensor(o[i : i + 1]))
        torch.testing.assert_close(crps.per_forecast()["crps"][i], one.compute()["crps"][[2, 0]], rtol=1e-12, atol=0)
    # the accumulated states are untouched by per_forecast
    whole = _make(CRPS)
    whole.update(torch.as_tensor(x), torch.as_tensor(o))
    torch.testing.assert_close(crps.compute()["crps"], whole.compute()["crps"], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="recorded nothing"):
        _make(CRPS).per_forecast()


def test_weights_cache_computes_each_grid_once():
    cache = RegionWeights()
    a = _make(DeterministicScores, weights_cache=cache)
    b = _make(CRPS, weights_cache=cache)
    rh = RankHistogram(LAT, LON, ["a", "b"], [6.0, 12.0], regions=REGIONS, n_members=3, weights_cache=cache)
    assert a.weights.data_ptr() == b.weights.data_ptr() == rh.weights.data_ptr()  # one array, shared
    assert len(cache.memo) == 2  # area weights and the rank histogram's uniform weights
    np.testing.assert_allclose(a.weights.numpy(), _weights(), rtol=1e-12)
    np.testing.assert_allclose(rh.uniform_weights.numpy(), _weights(area=False), rtol=1e-12)
    other = DeterministicScores(LAT, LON, ["a"], [6.0], regions=["tropics"], weights_cache=cache)
    assert len(cache.memo) == 3 and other.weights.data_ptr() != a.weights.data_ptr()
