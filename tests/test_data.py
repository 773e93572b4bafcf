"""Reading WB2-style Zarr: channel order, latitude order, targets, tiles, statistics, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from wb2_synthetic import expected, make_store

from fcn3_lightning.channels import FCN3_CHANNELS
from fcn3_lightning.data import ChannelStats, ForecastDataset, WB2Store, compute_stats, cos_zenith
from fcn3_lightning.data.statics import static_fields
from fcn3_lightning.data.stats import Normalizer
from fcn3_lightning.grid import cell_area_weights

IDENTITY = Normalizer(list(FCN3_CHANNELS), np.zeros(72), np.ones(72), np.ones(72))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("wb2")
    desc, ids = make_store(d / "desc.zarr", FCN3_CHANNELS, n_times=12)
    asc, ids2 = make_store(d / "asc.zarr", FCN3_CHANNELS, n_times=12, ascending_lat=True)
    hourly, ids3 = make_store(d / "hourly.zarr", FCN3_CHANNELS, n_times=40, cadence_hours=1)
    assert ids == ids2 == ids3
    return {"desc": desc, "asc": asc, "hourly": hourly, "ids": ids}


def test_all_72_channels_in_reference_order_with_targets(stores):
    store = WB2Store(stores["desc"], FCN3_CHANNELS)
    ds = ForecastDataset(store, IDENTITY, "2000-01-01T00", "2000-01-03T18", n_targets=3)
    sample = ds[2]  # input at +12 h, targets at +18, +24, +30 h
    want = expected(FCN3_CHANNELS, stores["ids"], [12, 18, 24, 30], 9, 16)
    assert sample["input"].shape == (72, 9, 16) and sample["target"].shape == (3, 72, 9, 16)
    np.testing.assert_array_equal(sample["input"].numpy(), want[0])
    np.testing.assert_array_equal(sample["target"].numpy(), want[1:])
    assert sample["time"].item() == np.datetime64("2000-01-01T12", "ns").astype(np.int64)
    # 12 store times, 3 targets at stride 1 -> 9 samples
    assert len(ds) == 9


def test_ascending_latitude_store_gives_identical_tensors(stores):
    a = ForecastDataset(WB2Store(stores["desc"], FCN3_CHANNELS), IDENTITY, "2000-01-01", "2000-01-03T18", 2)
    b = ForecastDataset(WB2Store(stores["asc"], FCN3_CHANNELS), IDENTITY, "2000-01-01", "2000-01-03T18", 2)
    for i in (0, 5):
        sa, sb = a[i], b[i]
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def test_hourly_store_strides_to_six_hours(stores):
    store = WB2Store(stores["hourly"], FCN3_CHANNELS, step_hours=6)
    assert store.stride == 6
    ds = ForecastDataset(store, IDENTITY, "2000-01-01T00", "2000-01-02T15", n_targets=2)
    sample = ds[3]  # input at +3 h (every hour is an initial time), targets at +9, +15 h
    want = expected(FCN3_CHANNELS, stores["ids"], [3, 9, 15], 9, 16)
    np.testing.assert_array_equal(sample["input"].numpy(), want[0])
    np.testing.assert_array_equal(sample["target"].numpy(), want[1:])
    six_hourly = ForecastDataset(store, IDENTITY, "2000-01-01T00", "2000-01-02T15", n_targets=2, init_every_hours=6)
    assert [six_hourly.times(i)[0].astype("datetime64[h]").astype(int) % 6 for i in range(len(six_hourly))] == [0] * len(six_hourly)


def test_zenith_of_every_step_at_its_valid_time(stores):
    ds = ForecastDataset(WB2Store(stores["desc"], FCN3_CHANNELS), IDENTITY, "2000-01-01", "2000-01-03T18", 2)
    sample = ds[1]
    lat, lon = np.linspace(90, -90, 9), np.arange(16) * 22.5
    want = cos_zenith(ds.times(1), lat, lon).astype(np.float32)
    np.testing.assert_array_equal(sample["zenith"].numpy(), want)


def test_tile_read_equals_slice_of_full_read(stores):
    for name in ("desc", "asc"):
        store = WB2Store(stores[name], FCN3_CHANNELS)
        full = store.read([1, 4])
        tile = store.read([1, 4], lat=slice(2, 6), lon=slice(8, 16))
        np.testing.assert_array_equal(tile, full[..., 2:6, 8:16])
        ds = ForecastDataset(store, IDENTITY, "2000-01-01", "2000-01-03T18", 1, lat=slice(2, 6), lon=slice(8, 16))
        full_ds = ForecastDataset(store, IDENTITY, "2000-01-01", "2000-01-03T18", 1)
        assert torch.equal(ds[0]["zenith"], full_ds[0]["zenith"][..., 2:6, 8:16])


def test_other_channel_lists_and_subsets(stores):
    chans = ["z500", "t850", "t2m", "q700"]
    store = WB2Store(stores["desc"], chans)
    np.testing.assert_array_equal(store.read([0, 1]), expected(chans, stores["ids"], [0, 6], 9, 16))


def test_level_order_and_interleaved_channels(tmp_path, stores):
    """Stores with levels sorted 1000..50 hPa and channel lists that interleave variables read the same values."""
    rev, ids = make_store(tmp_path / "rev.zarr", FCN3_CHANNELS, n_times=4, descending_levels=True)
    np.testing.assert_array_equal(WB2Store(rev, FCN3_CHANNELS).read([0, 2]), expected(FCN3_CHANNELS, ids, [0, 12], 9, 16))
    mixed = ["z850", "t2m", "z500", "q50", "u1000", "q1000"]
    for path in (rev, stores["desc"], stores["asc"]):
        np.testing.assert_array_equal(WB2Store(path, mixed).read([1]), expected(mixed, ids, [6], 9, 16))


def test_datamodule_normalises_on_device_and_names_nan(stores):
    """The data module's loader returns physical values; its on-device hook normalises them and refuses NaN."""
    from fcn3_lightning.data.datamodule import normalize_batch

    chans = ["z500", "t2m"]
    store = WB2Store(stores["desc"], chans)
    norm = Normalizer(chans, np.array([1000.0, 2000.0]), np.array([2.0, 4.0]), np.ones(2))
    raw = ForecastDataset(store, norm, "2000-01-01", "2000-01-03", 2, on_device=True)
    cooked = ForecastDataset(store, norm, "2000-01-01", "2000-01-03", 2)
    batch = torch.utils.data.default_collate([raw[0], raw[3]])
    want = torch.utils.data.default_collate([cooked[0], cooked[3]])
    out = normalize_batch(batch, norm, chans, 6)
    for key in ("input", "target"):
        torch.testing.assert_close(out[key], want[key])
    batch = torch.utils.data.default_collate([raw[0], raw[3]])
    batch["target"][1, 1, 1, 4, 4] = float("nan")  # sample 3 (input at +18 h), second target (+30 h), t2m
    with pytest.raises(ValueError, match=r"NaN/Inf in the data: channel t2m at time 2000-01-02T06:00:00.000000000 \(sample 3\)"):
        normalize_batch(batch, norm, chans, 6)


def test_statics_follow_the_reference_recipe(stores):
    store = WB2Store(stores["asc"], FCN3_CHANNELS)
    st = static_fields(store, ["xzen", "xnoise0", "xoro", "xlsml", "xlsms"])
    assert st.shape == (3, 9, 16)
    lat = np.linspace(90, -90, 9)[:, None] * np.ones((1, 16))
    oro = np.abs(lat) * 100.0
    oro = (oro - oro.min()) / (oro.max() - oro.min())
    np.testing.assert_allclose(st[0], (oro - oro.mean()) / (oro.std() + 1e-6), rtol=1e-6)
    lsm = np.clip((lat + 30) / 60, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(st[2], (lsm == 1).astype(np.float32))
    np.testing.assert_array_equal(st[1] + st[2], np.ones_like(st[1]))


# --- statistics ---------------------------------------------------------------------------------


def test_stats_equal_independent_numpy(tmp_path):
    chans = ["u10m", "t2m", "tcwv", "z500", "q500", "z850", "q850"]
    rng = np.random.default_rng(0)
    path, _ = make_store(tmp_path / "s.zarr", chans, n_times=30, cadence_hours=3, nlat=13, nlon=24, ascending_lat=True)
    # replace the coded values by random ones with realistic spread (so cancellation errors would show)
    import xarray as xr
    import zarr

    g = zarr.open_group(str(path), mode="r+")
    for name in ("10m_u_component_of_wind", "2m_temperature", "total_column_water_vapour", "geopotential", "specific_humidity"):
        a = g[name]
        a[...] = (rng.standard_normal(a.shape) * 7 + 280).astype(np.float32)
    store = WB2Store(path, chans, step_hours=6)
    stats = compute_stats(store, "2000-01-01T03", "2000-01-04T12", chunk=4, progress=False)

    # independent computation straight from xarray, all in memory
    ds = xr.open_zarr(path).sel(time=slice("2000-01-01T03", "2000-01-04T12"))
    lat = ds.latitude.values
    edges = np.clip(
        np.concatenate([[lat[0] - (lat[1] - lat[0]) / 2], (lat[1:] + lat[:-1]) / 2, [lat[-1] + (lat[-1] - lat[-2]) / 2]]), -90, 90
    )
    w = np.abs(np.diff(np.sin(np.deg2rad(edges))))[:, None] * np.ones((1, 24))
    for k, c in enumerate(chans):
        from fcn3_lightning.channels import parse_channel

        ch = parse_channel(c)
        x = ds[ch.long_name]
        x = (x.sel(level=ch.level) if ch.level else x).values.astype(np.float64)
        ww = np.broadcast_to(w, x.shape)
        mean = np.average(x, weights=ww)
        std = np.sqrt(np.average((x - mean) ** 2, weights=ww))
        d = x[2:] - x[:-2]  # 6 h tendency on a 3-hourly store
        dmean = np.average(d, weights=np.broadcast_to(w, d.shape))
        dstd = np.sqrt(np.average((d - dmean) ** 2, weights=np.broadcast_to(w, d.shape)))
        for got, want in [(stats.mean[k], mean), (stats.std[k], std), (stats.time_diff_mean[k], dmean), (stats.time_diff_std[k], dstd)]:
            assert abs(got - want) <= 1e-10 * abs(want), (c, got, want)
        assert stats.max[k] == x.max()
        assert stats.min[k] == (0.0 if ch.is_water else x.min())

    stats.save(tmp_path / "s.json")
    again = ChannelStats.load(tmp_path / "s.json")
    assert again == stats


def three_channel_stats() -> ChannelStats:
    # offset (t2m, tcwv, q500) = (280 mean, 0 min, 0 min), scale = (10 std, 70 range, 0.02 range)
    return ChannelStats(
        ["t2m", "tcwv", "q500"],
        {"nlat": 3},
        mean=[280.0, 20.0, 0.001],
        std=[10.0, 5.0, 0.001],
        min=[200.0, 0.0, 0.0],
        max=[320.0, 70.0, 0.02],
    )


def test_normalizer_modes_and_round_trip():
    stats = three_channel_stats()
    stats.time_diff_std = [1.0, 1.0, 1.0]
    n = stats.normalizer(["t2m", "tcwv", "q500"])
    x = np.array([290.0, 35.0, 0.01]).reshape(3, 1, 1)
    np.testing.assert_allclose(n.normalize(x)[:, 0, 0], [1.0, 0.5, 0.5])
    np.testing.assert_allclose(n.denormalize(n.normalize(x)), x)


def test_normalizer_denormalizes_a_subset_of_channels_and_spreads():
    stats = three_channel_stats()
    n = stats.normalizer(["t2m", "tcwv", "q500"])
    x = torch.tensor([[1.0, 0.5], [-2.0, 0.25]]).reshape(2, 2, 1, 1)  # channels (q500, t2m) on axis -3
    np.testing.assert_allclose(n.denormalize(x, axis=-3, index=[2, 0])[..., 0, 0], [[0.02, 285.0], [-0.04, 282.5]], rtol=1e-6)
    np.testing.assert_allclose(n.denormalize(x, axis=-3, index=[2, 0], shift=False)[..., 0, 0], [[0.02, 5.0], [-0.04, 2.5]], rtol=1e-6)
    np.testing.assert_allclose(n.denormalize(x.numpy(), axis=-3, index=[2, 0])[..., 0, 0], [[0.02, 285.0], [-0.04, 282.5]], rtol=1e-6)


def test_cell_area_weights_sum_like_the_sphere():
    lat = np.linspace(90, -90, 721)
    w = cell_area_weights(lat)
    assert abs(w.mean() - 1) < 1e-12 and w[0] == w[-1]
    # the pole row owns a cap of half a cell (0.125 degrees); the next row a full ring
    s = np.sin(np.deg2rad([90.0, 89.875, 89.625]))
    np.testing.assert_allclose(w[0] / w[1], (s[0] - s[1]) / (s[1] - s[2]), rtol=1e-9)
    np.testing.assert_allclose(cell_area_weights(lat[::-1]), w[::-1])


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input_is_named(stores, tmp_path):
    with pytest.raises(ValueError, match=r"variable 'relative_humidity' \(channel r500\) not in the store"):
        WB2Store(stores["desc"], ["z500", "r500"])
    with pytest.raises(ValueError, match=r"level 10 hPa of 'geopotential' \(channel z10\) not in the store"):
        WB2Store(stores["desc"], ["z10"])
    store = WB2Store(stores["desc"], ["z500"])
    with pytest.raises(ValueError, match="outside the store's time axis"):
        store.index_range("1999-12-01", "2000-01-02")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WB2Store(tmp_path / "nope.zarr", ["z500"])
    # non-uniform time axis
    times = np.datetime64("2000-01-01", "ns") + np.array([0, 6, 12, 24, 30]) * np.timedelta64(1, "h")
    bad, _ = make_store(tmp_path / "gap.zarr", ["t2m"], times=times)
    with pytest.raises(ValueError, match="non-uniform time axis: step 12 h between 2000-01-01T12"):
        WB2Store(bad, ["t2m"])
    # cadence that does not divide the model step
    odd, _ = make_store(tmp_path / "odd.zarr", ["t2m"], cadence_hours=4)
    with pytest.raises(ValueError, match="cadence 4 h does not divide the model step of 6 h"):
        WB2Store(odd, ["t2m"])


def test_nan_in_a_sample_is_named(tmp_path):
    import zarr

    path, _ = make_store(tmp_path / "nan.zarr", ["t2m", "z500"])
    zarr.open_group(str(path), mode="r+")["geopotential"][3, 0, 2, 2] = np.nan
    store = WB2Store(path, ["t2m", "z500"])
    ds = ForecastDataset(store, Normalizer(["t2m", "z500"], np.zeros(2), np.ones(2), np.ones(2)), "2000-01-01", "2000-01-05", 1)
    ds[0]
    with pytest.raises(ValueError, match=r"NaN/Inf in channel z500 at time 2000-01-01T18"):
        ds[2]


def test_stats_for_other_channels_or_grid_are_refused(stores, tmp_path):
    store = WB2Store(stores["desc"], ["z500", "t2m"])
    stats = compute_stats(store, "2000-01-01", "2000-01-02", progress=False)
    with pytest.raises(ValueError, match=r"lack \['q700'\]"):
        stats.check_compatible(["z500", "q700"], store.lat, store.lon)
    other, _ = make_store(tmp_path / "big.zarr", ["z500", "t2m"], nlat=17, nlon=32)
    big = WB2Store(other, ["z500", "t2m"])
    with pytest.raises(ValueError, match="computed on grid .*'nlat': 9.* but the data grid is .*'nlat': 17"):
        stats.check_compatible(["z500"], big.lat, big.lon)


def test_loader_batches_equal_samples_in_workers(stores):
    """Batches read straight into (shared) buffers equal the stacked per-sample reads, with and without workers."""
    from torch.utils.data import DataLoader

    from fcn3_lightning.data.datamodule import collate_batch

    chans = ["z500", "t850", "t2m"]
    norm = Normalizer(chans, np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 8.0]), np.ones(3))
    ds = ForecastDataset(WB2Store(stores["asc"], chans), norm, "2000-01-01", "2000-01-03T18", 2)
    want = torch.utils.data.default_collate([ds[i] for i in range(4)])
    for workers in (0, 2):
        batch = next(iter(DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_batch)))
        for key in want:
            assert torch.equal(batch[key], want[key]), (workers, key)


ERA5_SOURCES = {
    "repo-2-members": Path(__file__).parent / "data" / "era5_sample" / "era5-levels-members-2.nc",
    "shared-full": Path(__file__).resolve().parents[2] / "shared" / "data" / "era5-levels-members.nc",
}


@pytest.mark.parametrize("source", sorted(ERA5_SOURCES))
def test_era5_sample_reads_through_the_same_path(tmp_path, source):
    """The real ERA5 sample, converted to WB2 Zarr, reads through WB2Store/ForecastDataset as a direct xarray read."""
    import xarray as xr

    from fcn3_lightning.data.era5_sample import convert_cfgrib_to_wb2

    src = ERA5_SOURCES[source]
    if not src.is_file():
        pytest.skip(f"{src} not present (the shared folder exists only beside a developer checkout)")
    store_path = convert_cfgrib_to_wb2(src, tmp_path / "era5.zarr", member=0)
    chans = ["z500", "z850", "t500", "t850"]
    store = WB2Store(store_path, chans, step_hours=12)  # the sample is 12-hourly
    ds = ForecastDataset(store, Normalizer(chans, np.zeros(4), np.ones(4), np.ones(4)), str(store.times[0]), str(store.times[-1]), 2)
    direct = xr.open_dataset(src).isel(number=0)
    for i in range(len(ds)):
        sample = ds[i]
        for k, when in enumerate(ds.times(i)):
            got = sample["input"] if k == 0 else sample["target"][k - 1]
            for c, name in enumerate(chans):
                var, level = {"z": "z", "t": "t"}[name[0]], float(name[1:])
                want = direct[var].sel(time=when, isobaricInhPa=level).transpose("latitude", "longitude").values.astype(np.float32)
                np.testing.assert_array_equal(got[c].numpy(), want, err_msg=f"{name} at {when}")
    assert direct.latitude.values[0] == 90.0  # the model's orientation, and the sample's
