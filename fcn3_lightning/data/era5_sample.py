"""Convert a cfgrib-style ERA5 netCDF (e.g. the cfgrib ERA5 test sample) into a WeatherBench2-style Zarr store.

The training reader expects the WeatherBench2 (WB2) ERA5 layout: long variable names (``geopotential``,
``2m_temperature``, ...), a ``level`` dimension in integer hPa sorted ascending, ``time`` holding valid
times, dimensions ordered ``(time, [level,] latitude, longitude)`` and float32 values, one time step per
chunk. cfgrib writes short GRIB names (``z``, ``t2m``), ``isobaricInhPa`` levels in storage order, a
``time``/``step``/``valid_time`` triple and an ensemble ``number`` dimension; :func:`convert_cfgrib_to_wb2`
maps one onto the other. Values are only cast to float32, never interpolated, flipped or rescaled; the
latitude order of the source (ERA5: north to south, like WB2) is kept.

Usage::

    from fcn3_lightning.data.era5_sample import convert_cfgrib_to_wb2, era5_sample_path
    convert_cfgrib_to_wb2(era5_sample_path(), "era5_sample.zarr")  # member 0 -> (time, level, latitude, longitude)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from fcn3_lightning.io import give_default_mode, publish_folder

# cfgrib short name -> WB2 long name (the names of the WB2 ERA5 Zarr archives)
CFGRIB_TO_WB2: dict[str, str] = {
    "z": "geopotential",
    "t": "temperature",
    "u": "u_component_of_wind",
    "v": "v_component_of_wind",
    "q": "specific_humidity",
    "t2m": "2m_temperature",
    "msl": "mean_sea_level_pressure",
    "u10": "10m_u_component_of_wind",
    "v10": "10m_v_component_of_wind",
    "u100": "100m_u_component_of_wind",
    "v100": "100m_v_component_of_wind",
    "tcwv": "total_column_water_vapour",
    "sp": "surface_pressure",
}

# attributes carried over to the output variables; the GRIB_* bookkeeping and netCDF packing attrs are dropped
_KEPT_ATTRS = ("units", "long_name", "standard_name")

_SAMPLE_NAME = "era5-levels-members.nc"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_REPO_SAMPLE = _REPO_ROOT / "tests" / "data" / "era5_sample" / "era5-levels-members-2.nc"
_SHARED_SAMPLE = _REPO_ROOT.parent / "shared" / "data" / _SAMPLE_NAME


def era5_sample_path() -> Path | None:
    """Locate the ERA5 sample: ``$FCN3_ERA5_SAMPLE``, else the 2-member repo copy, else ``../shared/data``, else None.

    The repo copy (members 0 and 1 of the cfgrib test file) exists so that a clone without ``shared/`` can
    still run the data pipeline end to end.
    """
    env = os.environ.get("FCN3_ERA5_SAMPLE")
    if env:
        return Path(env)
    for candidate in (_REPO_SAMPLE, _SHARED_SAMPLE):
        if candidate.is_file():
            return candidate
    return None


def _rename_map(ds: xr.Dataset, variables: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """Source data-variable name -> WB2 name, for the variables to convert."""
    if isinstance(variables, Mapping):
        # explicit mapping: lets callers convert variables we do not know, under names they choose
        mapping = dict(variables)
    elif variables is not None:
        if isinstance(variables, str):
            raise TypeError("variables must be a sequence of names or a mapping, not a single string")
        unknown = [v for v in variables if v not in CFGRIB_TO_WB2]
        if unknown:
            raise ValueError(f"no WB2 name known for variable(s) {unknown}; pass variables={{name: wb2_name}} to name them")
        mapping = {v: CFGRIB_TO_WB2[v] for v in variables}
    else:
        unknown = [v for v in ds.data_vars if v not in CFGRIB_TO_WB2]
        if unknown:
            raise ValueError(
                f"no WB2 name known for variable(s) {unknown} in the source; known cfgrib names: {sorted(CFGRIB_TO_WB2)}. "
                "Select variables with variables=[...] or name them with variables={name: wb2_name}"
            )
        mapping = {str(v): CFGRIB_TO_WB2[str(v)] for v in ds.data_vars}
    missing = [v for v in mapping if v not in ds.data_vars]
    if missing:
        raise ValueError(f"variable(s) {missing} not in the source; it has {sorted(map(str, ds.data_vars))}")
    if not mapping:
        raise ValueError("no variables to convert")
    targets = list(mapping.values())
    if len(set(targets)) != len(targets):
        raise ValueError(f"several source variables map to the same WB2 name: {mapping}")
    return mapping


def _select_member(ds: xr.Dataset, member: int | None) -> xr.Dataset:
    if "number" not in ds.coords and "number" not in ds.dims:
        if member not in (None, 0):
            # a deterministic file is member 0 by cfgrib convention; asking for another one is a mistake
            raise ValueError(f"ensemble member {member} not in the source: it has no 'number' coordinate (deterministic data)")
        return ds
    available = [int(n) for n in np.atleast_1d(ds["number"].values)]
    if member is None:
        if "number" not in ds.dims:
            ds = ds.expand_dims("number")
        return ds
    if member not in available:
        raise ValueError(f"ensemble member {member} not in the source; available members: {available}")
    if "number" in ds.dims:
        ds = ds.sel(number=member)
    return ds.drop_vars("number")


def _valid_times(ds: xr.Dataset) -> xr.Dataset:
    """Make ``time`` the valid time (analysis/initial time + step), as a 1-D dimension coordinate."""
    if "step" in ds.dims:
        if ds.sizes["step"] != 1:
            raise ValueError(f"source has {ds.sizes['step']} forecast steps; only analyses (one step per time) can be converted")
        ds = ds.isel(step=0)
    if "time" not in ds.dims:
        if "time" not in ds.coords:
            raise ValueError("source has no 'time' coordinate")
        ds = ds.expand_dims("time")
        if "valid_time" in ds.coords and "time" not in ds["valid_time"].dims:
            ds = ds.assign_coords(valid_time=ds["valid_time"].expand_dims("time"))
    if "valid_time" in ds.coords:
        # cfgrib's `time` is the forecast reference time; with a non-zero step only valid_time is the state's time
        valid = ds["valid_time"].values
    else:
        step = ds["step"].values if "step" in ds.coords else np.timedelta64(0, "ns")
        valid = ds["time"].values + step
    valid = np.asarray(valid, dtype="datetime64[ns]").reshape(ds.sizes["time"])
    if valid.size == 0:
        raise ValueError("source has no time steps")
    if np.unique(valid).size != valid.size:
        raise ValueError("valid times are not unique")
    return ds.assign_coords(time=("time", valid, {"long_name": "time", "standard_name": "time"}))


def _to_wb2(ds: xr.Dataset, mapping: Mapping[str, str], member: int | None) -> xr.Dataset:
    ds = ds[list(mapping)]
    ds = _select_member(ds, member)
    ds = _valid_times(ds)
    if "isobaricInhPa" in ds.dims:
        hpa = ds["isobaricInhPa"].values
        if not np.array_equal(hpa, np.round(hpa)):
            raise ValueError(f"non-integer pressure levels {hpa.tolist()}: WB2 levels are integer hPa")
        ds = ds.rename({"isobaricInhPa": "level"})
        ds = ds.assign_coords(level=("level", np.round(hpa).astype(np.int64), {"long_name": "pressure level", "units": "hPa"}))
        ds = ds.sortby("level")  # WB2 stores levels ascending (50 ... 1000)
    elif "isobaricInhPa" in ds.coords:
        ds = ds.drop_vars("isobaricInhPa")  # a single level as a scalar coord: the variable is then 2-D

    for dim in ("latitude", "longitude"):
        if dim not in ds.dims:
            raise ValueError(f"source has no '{dim}' dimension (dims: {dict(ds.sizes)})")
    order = [d for d in ("time", "number", "level", "latitude", "longitude") if d in ds.dims]
    extra = [d for d in ds.dims if d not in order]
    if extra:
        raise ValueError(f"unsupported dimension(s) {extra} in the source")

    # only dimension coordinates survive: step/valid_time/surface etc. are cfgrib bookkeeping
    ds = ds.drop_vars([c for c in ds.coords if c not in ds.dims])
    out = xr.Dataset(attrs={})
    for src_name, wb2_name in mapping.items():
        # stays lazy (backed by the open file): the float32 cast happens per written time step via the encoding
        var = ds[src_name].variable.transpose(*[d for d in order if d in ds[src_name].dims])
        attrs = {k: var.attrs[k] for k in _KEPT_ATTRS if k in var.attrs}
        attrs["cfgrib_name"] = src_name
        var = var.copy(deep=False)  # (Variable.data would load the whole array)
        var.attrs = attrs
        var.encoding = {}  # the source's netCDF packing (scale_factor etc.) must not leak into the Zarr encoding
        out[wb2_name] = var
    for c in ("latitude", "longitude"):
        out = out.assign_coords({c: (c, ds[c].values, {k: v for k, v in ds[c].attrs.items() if not k.startswith("_")})})
    out = out.assign_coords(time=("time", ds["time"].values, ds["time"].attrs))
    if "level" in ds.dims:
        out = out.assign_coords(level=("level", ds["level"].values, ds["level"].attrs))
    if "number" in ds.dims:
        out = out.assign_coords(number=("number", ds["number"].values.astype(np.int64), {"long_name": "ensemble member"}))
    return out


def _encoding(ds: xr.Dataset) -> dict[str, dict]:
    enc: dict[str, dict] = {}
    for name, da in ds.data_vars.items():
        # one time step per chunk, everything else whole: the reader fetches one full state per sample
        enc[str(name)] = {"chunks": tuple(1 if d == "time" else ds.sizes[d] for d in da.dims), "dtype": "float32"}
    times = ds["time"].values
    whole_hours = bool(np.all((times - times.astype("datetime64[h]")) == np.timedelta64(0, "ns")))
    # fixed int64 units so that appending later time steps cannot change the time encoding
    enc["time"] = {
        "units": "hours since 1970-01-01" if whole_hours else "seconds since 1970-01-01",
        "dtype": "int64",
        "chunks": (max(1, ds.sizes["time"]),),  # one chunk for the whole axis, as in WB2 (not one tiny file per step)
    }
    return enc


def convert_cfgrib_to_wb2(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    member: int | None = 0,
    variables: Sequence[str] | Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a cfgrib-named netCDF file into a WB2-style Zarr store at ``dst`` and return ``dst``.

    Args:
        src: the netCDF file (cfgrib names: ``z``, ``t``, ``t2m``, ...; dims ``number``, ``time``,
            ``isobaricInhPa``, ``latitude``, ``longitude``).
        dst: path of the Zarr store (a directory) to create.
        member: the ensemble member to keep; the store then has no ``number`` dimension and records the
            member in its ``ensemble_member`` attribute. ``None`` keeps all members as a ``number``
            dimension, ``(time, number, [level,] latitude, longitude)``: the training reader serves every
            (member, time) as a sample (members as extra samples, statistics over all members); predict's
            initial conditions and evaluate's truth need a single-member store and refuse this one.
        variables: ``None`` converts every data variable (each must have a known WB2 name, see
            :data:`CFGRIB_TO_WB2`); a sequence selects cfgrib names; a mapping ``{cfgrib_name: wb2_name}``
            selects and names variables explicitly (also ones not in :data:`CFGRIB_TO_WB2`).
        overwrite: replace an existing ``dst``; otherwise an existing ``dst`` raises ``FileExistsError``.

    The store is written to a temporary directory beside ``dst`` and renamed onto it only when complete,
    so ``dst`` never holds a half-written store.
    """
    src = Path(src)
    dst = Path(dst)
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True to replace it")

    dst.parent.mkdir(parents=True, exist_ok=True)
    # cache=False: each time step is read from the file when written, not kept in memory afterwards
    with xr.open_dataset(src, cache=False) as raw:
        mapping = _rename_map(raw, variables)
        ds = _to_wb2(raw, mapping, member)
        ds.attrs = {
            "source": src.name,
            "converted_by": "fcn3_lightning.data.era5_sample.convert_cfgrib_to_wb2",
            **{k: raw.attrs[k] for k in ("Conventions", "institution", "history") if k in raw.attrs},
        }
        if member is not None:
            ds.attrs["ensemble_member"] = int(member)
        encoding = _encoding(ds)

        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
        try:
            give_default_mode(tmp)  # mkdtemp makes it 0700, which the rename into place would keep
            # one time step per write keeps memory at one state (a full ERA5 year would not fit otherwise)
            for i in range(ds.sizes["time"]):
                step = ds.isel(time=slice(i, i + 1))
                if i == 0:
                    step.to_zarr(tmp, mode="w", encoding=encoding, consolidated=True, zarr_format=2)
                else:
                    step.to_zarr(tmp, append_dim="time", consolidated=True, zarr_format=2)
            publish_folder(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dst
