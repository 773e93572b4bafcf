"""The cfgrib -> WB2 Zarr converter, checked value by value against a direct xarray read of the real ERA5 sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from fcn3_lightning.data import era5_sample
from fcn3_lightning.data.era5_sample import convert_cfgrib_to_wb2, era5_sample_path

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO / "tests" / "data" / "era5_sample" / "era5-levels-members-2.nc"
FULL = REPO.parent / "shared" / "data" / "era5-levels-members.nc"
NAMES = {"z": "geopotential", "t": "temperature"}


@pytest.fixture(params=["repo_subset", "shared_full"])
def sample(request: pytest.FixtureRequest) -> Path:
    path = SUBSET if request.param == "repo_subset" else FULL
    if not path.is_file() and request.param == "repo_subset":  # committed: missing means a broken checkout
        pytest.fail(f"{path} is missing: it is part of the repository; restore it (git checkout)")
    if not path.is_file():  # ../shared exists only beside a developer checkout
        pytest.skip(f"ERA5 sample not found: {path}")
    return path


def _reference(path: Path) -> xr.Dataset:
    with xr.open_dataset(path) as ds:
        return ds.load()


def _leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def _check_store(store: xr.Dataset, ref: xr.Dataset) -> None:
    """Every value, coordinate and name of a single-member or all-member store against the cfgrib read ``ref``."""
    assert set(store.data_vars) == set(NAMES.values())
    assert store["level"].dtype == np.int64
    np.testing.assert_array_equal(store["level"].values, [500, 850])
    assert store["time"].dtype == np.dtype("datetime64[ns]")
    np.testing.assert_array_equal(store["time"].values, ref["valid_time"].values)
    np.testing.assert_array_equal(
        store["time"].values, np.array(["2017-01-01T00", "2017-01-01T12", "2017-01-02T00", "2017-01-02T12"], dtype="datetime64[ns]")
    )
    # the grid is passed through untouched, north-to-south as in the source
    for c in ("latitude", "longitude"):
        assert store[c].dtype == np.float64
        np.testing.assert_array_equal(store[c].values, ref[c].values)
    assert store["latitude"].values[0] == 90.0 and store["latitude"].values[-1] == -90.0
    for short, long in NAMES.items():
        da = store[long]
        assert da.dtype == np.float32
        assert da.attrs["units"] == ref[short].attrs["units"]
        assert da.attrs["long_name"] == ref[short].attrs["long_name"]
        for level in (500, 850):
            ours = da.sel(level=level).values
            theirs = ref[short].sel(isobaricInhPa=float(level)).transpose(*[d for d in da.dims if d != "level"]).values
            assert ours.shape == theirs.shape
            # exact: the converter only casts to float32
            np.testing.assert_array_equal(ours, theirs.astype(np.float32))


def test_convert_single_member_matches_source(sample: Path, tmp_path: Path) -> None:
    ref = _reference(sample)
    dst = convert_cfgrib_to_wb2(sample, tmp_path / "era5.zarr")
    assert dst == tmp_path / "era5.zarr"
    assert (dst / ".zmetadata").is_file() and (dst / ".zgroup").is_file()  # consolidated, Zarr format 2
    assert _leftovers(tmp_path, {"era5.zarr"}) == []
    with xr.open_zarr(dst, consolidated=True) as store:
        assert store.attrs["ensemble_member"] == 0
        assert "number" not in store.dims and "number" not in store.coords
        for name in NAMES.values():
            assert store[name].dims == ("time", "level", "latitude", "longitude")
            assert store[name].encoding["chunks"] == (1, 2, 61, 120)  # one time step, full fields per chunk
        _check_store(store.load(), ref.sel(number=0))
    meta = json.loads((dst / ".zmetadata").read_text())["metadata"]
    assert meta["geopotential/.zarray"]["dtype"] == "<f4"
    assert "scale_factor" not in meta["geopotential/.zattrs"]  # the netCDF packing must not leak into the store


def test_all_members(sample: Path, tmp_path: Path) -> None:
    ref = _reference(sample)
    dst = convert_cfgrib_to_wb2(sample, tmp_path / "all.zarr", member=None)
    with xr.open_zarr(dst) as store:
        assert "ensemble_member" not in store.attrs
        np.testing.assert_array_equal(store["number"].values, ref["number"].values)
        for name in NAMES.values():
            assert store[name].dims == ("time", "number", "level", "latitude", "longitude")
        _check_store(store.load(), ref)


def test_member_selection(tmp_path: Path) -> None:
    ref = _reference(SUBSET)
    dst = convert_cfgrib_to_wb2(SUBSET, tmp_path / "m1.zarr", member=1)
    with xr.open_zarr(dst) as store:
        assert store.attrs["ensemble_member"] == 1
        _check_store(store.load(), ref.sel(number=1))
        # members really differ, so the check above would catch a wrong selection
        assert not np.array_equal(store["temperature"].values, ref["t"].sel(number=0, isobaricInhPa=[500.0, 850.0]).values)


def test_member_not_in_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"member 5 .*available members: \[0, 1\]"):
        convert_cfgrib_to_wb2(SUBSET, tmp_path / "x.zarr", member=5)
    assert _leftovers(tmp_path, set()) == []


def test_unknown_variable_and_explicit_selection(tmp_path: Path) -> None:
    ref = _reference(SUBSET)
    src = tmp_path / "extra.nc"
    ref.assign(foo=ref["t"] * 0 + 1.0).to_netcdf(src)
    with pytest.raises(ValueError, match="foo"):
        convert_cfgrib_to_wb2(src, tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()
    with pytest.raises(ValueError, match="foo"):
        convert_cfgrib_to_wb2(src, tmp_path / "x.zarr", variables=["t", "foo"])

    written = _reference(src)  # (re-packing on write may move values by an ulp: compare with what the file holds)
    only_t = convert_cfgrib_to_wb2(src, tmp_path / "t.zarr", variables=["t"])
    with xr.open_zarr(only_t) as store:
        assert list(store.data_vars) == ["temperature"]
        np.testing.assert_array_equal(
            store["temperature"].sel(level=850).values, written["t"].sel(number=0, isobaricInhPa=850.0).values.astype(np.float32)
        )
    named = convert_cfgrib_to_wb2(src, tmp_path / "named.zarr", variables={"foo": "my_field", "z": "geopotential"})
    with xr.open_zarr(named) as store:
        assert sorted(store.data_vars) == ["geopotential", "my_field"]
        assert np.all(store["my_field"].values == 1.0)


def test_time_is_valid_time_when_step_nonzero(tmp_path: Path) -> None:
    # the same states, labelled as 6-hour forecasts from a reference time 6 hours earlier
    ref = _reference(SUBSET)
    shifted = ref.assign_coords(time=ref["time"] - np.timedelta64(6, "h"), step=np.timedelta64(6, "h"))
    for v in shifted.variables.values():
        v.encoding = {}
    src = tmp_path / "forecast.nc"
    shifted.to_netcdf(src)
    dst = convert_cfgrib_to_wb2(src, tmp_path / "f.zarr")
    with xr.open_zarr(dst) as store:
        np.testing.assert_array_equal(store["time"].values, ref["valid_time"].values)
        np.testing.assert_array_equal(
            store["geopotential"].values, ref["z"].sel(number=0, isobaricInhPa=[500.0, 850.0]).values.astype(np.float32)
        )


def test_existing_destination(tmp_path: Path) -> None:
    dst = tmp_path / "era5.zarr"
    dst.mkdir()
    (dst / "marker").write_text("keep me")
    with pytest.raises(FileExistsError):
        convert_cfgrib_to_wb2(SUBSET, dst)
    assert (dst / "marker").read_text() == "keep me"
    assert _leftovers(tmp_path, {"era5.zarr"}) == []

    convert_cfgrib_to_wb2(SUBSET, dst, overwrite=True)
    assert not (dst / "marker").exists()
    with xr.open_zarr(dst) as store:
        assert set(store.data_vars) == set(NAMES.values())
    assert _leftovers(tmp_path, {"era5.zarr"}) == []


@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool) -> None:
    dst = tmp_path / "era5.zarr"
    if existing:
        dst.mkdir()
        (dst / "marker").write_text("old store")
    real_to_zarr = xr.Dataset.to_zarr
    calls: list[str] = []

    def failing_to_zarr(self: xr.Dataset, store: object, *args: object, **kwargs: object) -> object:
        # write the first time step for real, then fail part-way through the second
        calls.append(str(store))
        out = real_to_zarr(self, store, *args, **kwargs)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return out

    monkeypatch.setattr(xr.Dataset, "to_zarr", failing_to_zarr)
    with pytest.raises(OSError, match="simulated"):
        convert_cfgrib_to_wb2(SUBSET, dst, overwrite=existing)
    assert len(calls) == 2 and Path(calls[0]).parent == tmp_path and Path(calls[0]) != dst  # it wrote beside dst, not at dst
    if existing:
        assert (dst / "marker").read_text() == "old store"  # the previous store is untouched
        assert _leftovers(tmp_path, {"era5.zarr"}) == []
    else:
        assert not dst.exists()
        assert _leftovers(tmp_path, set()) == []  # no temporary directory left behind


def test_era5_sample_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    custom = tmp_path / "mine.nc"
    monkeypatch.setenv("FCN3_ERA5_SAMPLE", str(custom))
    assert era5_sample_path() == custom
    monkeypatch.delenv("FCN3_ERA5_SAMPLE")
    assert era5_sample_path() == SUBSET  # the repo copy comes before ../shared
    monkeypatch.setattr(era5_sample, "_REPO_SAMPLE", tmp_path / "missing.nc")
    assert era5_sample_path() == (FULL if FULL.is_file() else None)
