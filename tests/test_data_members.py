"""Ensemble members as extra samples: a WB2 store with a ``number`` dimension (the ERA5 sample's EDA members).

Every expected value comes from xarray reading the cfgrib netCDF directly (not through the reader under test);
the statistics are recomputed here with numpy and the WB2 area weights written out in the test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from fcn3_lightning.eval.harness import evaluate

from fcn3_lightning.data import ForecastDataset, WB2DataModule, WB2Store, compute_stats
from fcn3_lightning.data.era5_sample import convert_cfgrib_to_wb2, era5_sample_path
from fcn3_lightning.data.stats import ChannelStats
from fcn3_lightning.inference import load_predictor
from fcn3_lightning.model.build import save_model
from fcn3_lightning.model.fcn3 import FCN3

REPO = Path(__file__).resolve().parents[1]
FULL = REPO.parent / "shared" / "data" / "era5-levels-members.nc"  # all 10 members, beside a developer checkout
CHANNELS = ["z500", "z850", "t500", "t850"]
SHORT = {"z": "geopotential", "t": "temperature"}
TIMES = np.array(["2017-01-01T00", "2017-01-01T12", "2017-01-02T00", "2017-01-02T12"], dtype="datetime64[ns]")


@pytest.fixture(scope="module", params=["repo_subset", "shared_full"])
def sample(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the cfgrib netCDF, its all-member WB2 store)."""
    if request.param == "repo_subset":
        src = era5_sample_path()
        if src is None or not src.is_file():
            pytest.fail("the committed ERA5 sample tests/data/era5_sample/era5-levels-members-2.nc is missing (git checkout)")
    else:
        src = FULL
        if not src.is_file():
            pytest.skip(f"ERA5 sample not found: {src}")
    root = tmp_path_factory.mktemp(request.param)
    return src, convert_cfgrib_to_wb2(src, root / "members.zarr", member=None)


def _raw(src: Path) -> np.ndarray:
    """The netCDF's values as (member, time, channel, lat, lon) float32 in CHANNELS order, read by xarray alone."""
    with xr.open_dataset(src) as ds:
        np.testing.assert_array_equal(ds["valid_time"].values, TIMES)
        assert ds["latitude"].values[0] == 90.0  # north first, as the reader serves it
        fields = [ds[c[0]].sel(isobaricInhPa=float(c[1:])).transpose("number", "time", "latitude", "longitude").values for c in CHANNELS]
    return np.stack(fields, axis=2).astype(np.float32)


def _area_weights(lat_deg: np.ndarray) -> np.ndarray:
    """WB2's cell-area weights written out: sin of the upper minus the lower cell edge, edges half-way, clipped at the poles."""
    la = np.sort(lat_deg)
    edges = np.concatenate([[-90.0], (la[1:] + la[:-1]) / 2, [90.0]])
    w = np.diff(np.sin(np.deg2rad(edges)))
    return w[np.searchsorted(la, lat_deg)]


def test_store_reads_each_member(sample):
    src, path = sample
    raw = _raw(src)
    store = WB2Store(path, CHANNELS, step_hours=12)
    assert store.members == raw.shape[0] >= 2
    np.testing.assert_array_equal(store.member_numbers, np.arange(raw.shape[0]))
    assert not np.array_equal(raw[0], raw[1])  # the members differ: reading the wrong one would show
    for m in range(store.members):
        np.testing.assert_array_equal(store.read([0, 1, 2, 3], member=m), raw[m])
        # a tile and a channel order that takes the gathering read path
        other = WB2Store(path, ["t850", "z500"], step_hours=12)
        np.testing.assert_array_equal(other.read([3, 1], slice(5, 20), slice(7, 50), member=m), raw[m][[3, 1]][:, [3, 0], 5:20, 7:50])


def test_store_member_argument_is_checked(sample, tmp_path):
    src, path = sample
    store = WB2Store(path, CHANNELS, step_hours=12)
    with pytest.raises(ValueError, match=r"ensemble-member dimension 'number' \(\d+ members\): say which member.*member=0"):
        store.read([0])
    with pytest.raises(ValueError, match=r"member 99 is not a position on its 'number' axis"):
        store.read([0], member=99)
    single = WB2Store(convert_cfgrib_to_wb2(src, tmp_path / "m0.zarr", member=0), CHANNELS, step_hours=12)
    assert single.members is None and single.member_numbers is None
    with pytest.raises(ValueError, match="has no ensemble-member dimension 'number'"):
        single.read([0], member=0)
    np.testing.assert_array_equal(single.read([0, 1, 2, 3]), store.read([0, 1, 2, 3], member=0))


def test_dataset_serves_every_member_and_time(sample):
    src, path = sample
    raw = _raw(src)
    n_members = raw.shape[0]
    store = WB2Store(path, CHANNELS, step_hours=12)
    stats = compute_stats(store, str(TIMES[0]), str(TIMES[-1]), progress=False)
    norm = stats.normalizer(CHANNELS)
    ds = ForecastDataset(store, norm, str(TIMES[0]), str(TIMES[-1]), n_targets=2)
    n_times = 2  # inputs 00 and 12 of Jan 1 have both targets (+12 h, +24 h) in the range
    assert len(ds) == n_members * n_times
    seen = set()
    for k in range(len(ds)):
        m, j = divmod(k, n_times)  # member-major
        assert ds.member(k) == m and ds.start(k) == j
        np.testing.assert_array_equal(ds.times(k), TIMES[j : j + 3])
        sample_k = ds[k]
        assert int(sample_k["index"]) == k and int(sample_k["time"]) == TIMES[j].astype(np.int64)
        np.testing.assert_allclose(norm.denormalize(sample_k["input"].numpy()), raw[m, j], rtol=1e-6, atol=1e-6 * np.abs(raw).max())
        np.testing.assert_allclose(
            norm.denormalize(sample_k["target"].numpy()), raw[m, j + 1 : j + 3], rtol=1e-6, atol=1e-6 * np.abs(raw).max()
        )
        seen.add((m, j))
    assert len(seen) == len(ds)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_datamodule_batches_keep_input_and_targets_in_one_member(sample):
    src, path = sample
    raw = _raw(src)
    n_members = raw.shape[0]
    compute_stats(WB2Store(path, CHANNELS, step_hours=12), str(TIMES[0]), str(TIMES[2]), progress=False).save(f"{path}.stats.json")
    dm = WB2DataModule(
        data_path=str(path),
        channels=CHANNELS,
        aux_channels=[],
        step_hours=12,
        train_range=(str(TIMES[0]), str(TIMES[2])),
        valid_range=(str(TIMES[0]), str(TIMES[3])),
        train_rollout=1,
        valid_rollout=1,
        batch_size=2,
    )
    dm.setup("fit")
    assert len(dm.dataset("train")) == n_members * 2 and len(dm.dataset("valid")) == n_members * 3
    seen = []
    for batch in dm.train_dataloader():
        batch = dm.on_after_batch_transfer(batch, 0)
        x = dm.normalizer.denormalize(batch["input"].numpy())
        y = dm.normalizer.denormalize(batch["target"].numpy())[:, 0]
        for b, k in enumerate(batch["index"].tolist()):
            m, j = divmod(k, 2)
            assert int(batch["time"][b]) == TIMES[j].astype(np.int64)
            scale = np.abs(raw).max()
            np.testing.assert_allclose(x[b], raw[m, j], rtol=1e-6, atol=1e-6 * scale)
            np.testing.assert_allclose(y[b], raw[m, j + 1], rtol=1e-6, atol=1e-6 * scale)
            # and not any other member's state at either time
            for other in set(range(n_members)) - {m}:
                assert not np.allclose(x[b], raw[other, j], rtol=1e-6, atol=1e-6 * scale)
                assert not np.allclose(y[b], raw[other, j + 1], rtol=1e-6, atol=1e-6 * scale)
            seen.append(k)
    assert sorted(seen) == list(range(n_members * 2))  # one epoch: every (member, time) once


def test_member_zero_keeps_the_single_member_store_indices(sample, tmp_path):
    src, path = sample
    members = WB2Store(path, CHANNELS, step_hours=12)
    single = WB2Store(convert_cfgrib_to_wb2(src, tmp_path / "m0.zarr", member=0), CHANNELS, step_hours=12)
    norm = compute_stats(single, str(TIMES[0]), str(TIMES[-1]), progress=False).normalizer(CHANNELS)
    a = ForecastDataset(members, norm, str(TIMES[0]), str(TIMES[-1]), n_targets=1)
    b = ForecastDataset(single, norm, str(TIMES[0]), str(TIMES[-1]), n_targets=1)
    assert len(a) == members.members * len(b) and b.member(0) is None
    got, want = a.__getitems__(list(range(len(b)))), b.__getitems__(list(range(len(b))))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_stats_cover_every_member_and_time(sample):
    src, path = sample
    raw = _raw(src).astype(np.float64)[:, :3]  # the range 2017-01-01T00 .. 2017-01-02T00: 3 times of each member
    store = WB2Store(path, CHANNELS, step_hours=12)
    with xr.open_dataset(src) as nc:
        w = _area_weights(nc["latitude"].values)[:, None] * np.ones(nc.sizes["longitude"])

    def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # x (..., C, H, W): weighted over all but C
        flat = np.moveaxis(x, -3, 0).reshape(x.shape[-3], -1, *w.shape)
        mean = np.einsum("cnhw,hw->c", flat, w) / (w.sum() * flat.shape[1])
        var = np.einsum("cnhw,hw->c", (flat - mean[:, None, None, None]) ** 2, w) / (w.sum() * flat.shape[1])
        return mean, np.sqrt(var)

    got = compute_stats(store, str(TIMES[0]), str(TIMES[2]), chunk=2, progress=False)  # chunks split a member's times
    mean, std = moments(raw)
    tmean, tstd = moments(raw[:, 1:] - raw[:, :-1])  # tendencies within each member, never across two
    np.testing.assert_allclose(got.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(got.std, std, rtol=1e-9)
    np.testing.assert_allclose(got.time_diff_mean, tmean, rtol=1e-9, atol=1e-9 * float(tstd.max()))
    np.testing.assert_allclose(got.time_diff_std, tstd, rtol=1e-9)
    np.testing.assert_array_equal(got.min, raw.min(axis=(0, 1, 3, 4)))
    np.testing.assert_array_equal(got.max, raw.max(axis=(0, 1, 3, 4)))
    assert got.source["members"] == raw.shape[0]
    # member 0 alone differs: the statistics above did use the other members
    assert not np.allclose(got.std, moments(raw[:1])[1], rtol=1e-6)


def test_single_state_readers_refuse_a_members_store(sample, tmp_path):
    """predict's initial conditions and evaluate's truth need one state per time: they refuse, naming 'number' and the fix."""
    src, path = sample
    store = WB2Store(path, CHANNELS, step_hours=12)
    stats_path = tmp_path / "stats.json"
    compute_stats(store, str(TIMES[0]), str(TIMES[-1]), progress=False).save(stats_path)
    assert ChannelStats.load(stats_path).channels == CHANNELS
    kwargs = dict(
        inp_shape=store.shape,
        channel_names=CHANNELS,
        aux_channel_names=["xzen"],
        atmo_embed_dim=2,
        surf_embed_dim=2,
        aux_embed_dim=2,
        num_layers=2,
        sfno_block_frequency=2,
    )
    save_model(FCN3(**kwargs), kwargs, tmp_path / "model.pt")
    # a model file steps 6 h: the same fields relabelled 6-hourly, so that only the member dimension is at fault
    with xr.open_zarr(path) as ds:
        six = ds.load().assign_coords(time=TIMES[0] + np.arange(4) * np.timedelta64(6, "h"))
    for v in six.variables.values():
        v.encoding = {}
    six.to_zarr(tmp_path / "six_hourly.zarr", zarr_format=2, consolidated=True)
    with pytest.raises(ValueError, match=r"ensemble-member dimension 'number'.*predict.*convert_cfgrib_to_wb2\(src, dst, member=0\)"):
        load_predictor(tmp_path / "model.pt", data_path=tmp_path / "six_hourly.zarr", stats_path=stats_path, device="cpu")
    # the same store with one member converted refuses nothing of that
    single = tmp_path / "six_hourly_m0.zarr"
    six.isel(number=0).drop_vars("number").to_zarr(single, zarr_format=2, consolidated=True)
    assert load_predictor(tmp_path / "model.pt", data_path=single, stats_path=stats_path, device="cpu").store.members is None

    # a one-lead forecast made of member 0, scored against the all-member store as truth
    with xr.open_zarr(path) as obs:
        fc = obs.isel(number=0, time=[0, 1]).drop_vars("number").load()
    fc = fc.expand_dims(prediction_timedelta=[np.timedelta64(12, "h").astype("timedelta64[ns]")])
    fc = fc.transpose("time", "prediction_timedelta", "level", "latitude", "longitude")
    for v in fc.variables.values():
        v.encoding = {}
    with pytest.raises(ValueError, match=r"truth .* ensemble-member dimension 'number'.*member=0"):
        evaluate(fc, path, tmp_path / "scores", regions=["global"], baselines=[], clim_years=(2017, 2017))
    assert not (tmp_path / "scores").exists()
