"""The harness's output files: long-form CSVs (the fixture's columns), one WB2-layout netCDF per eval, meta.json.

Every file is written to a temporary name in the output folder and renamed over its final name only after
all of them were written (``meta.json`` last), so a failure leaves the folder as it was.

* ``scores.csv``: eval, variable, metric, region, level, lead_time_hours, value;
* ``per_init.csv``: the same plus init_time (``{eval}_temporal`` evals, every scored region unless ``--per-init-regions``);
* ``rank_histogram.csv``: eval, variable, metric, level, lead_time_hours, bin, value;
* ``spectra.csv``: eval, dataset, variable, level, lead_time_hours, latitude, zonal_wavenumber, value;
* ``{eval}.nc``: data variables = variables, dims (metric, region, lead_time [timedelta64], [level]).

``level`` is empty for 2-D variables, ``lead_time_hours`` an integer where whole, values float64 at full
round-trip precision, ``nan`` for undefined values.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from fcn3_lightning.io import atomic_path

SCORE_COLUMNS = ["eval", "variable", "metric", "region", "level", "lead_time_hours", "value"]
PER_INIT_COLUMNS = ["eval", "variable", "metric", "region", "level", "lead_time_hours", "init_time", "value"]
RANK_COLUMNS = ["eval", "variable", "metric", "level", "lead_time_hours", "bin", "value"]
SPECTRA_COLUMNS = ["eval", "dataset", "variable", "level", "lead_time_hours", "latitude", "zonal_wavenumber", "value"]


_NUMBER_AS_TEXT = ("level", "lead_time_hours", "bin", "zonal_wavenumber")
#: rows converted to text at once by :func:`write_csv`
CSV_ROWS = 1 << 16


def _number_column(values: pd.Series, integral: bool | None = None) -> Any:
    """Integral numbers as integers (500, not 500.0), missing as empty: a nullable pyarrow array.

    ``integral``: whether to write integers (default: whether every present value of ``values`` is whole).
    """
    import pyarrow as pa

    a = _numbers(values)
    missing = np.isnan(a)
    if integral if integral is not None else np.all(np.mod(a[~missing], 1.0) == 0):
        return pa.array(np.where(missing, 0, a).astype(np.int64), mask=missing)
    return pa.array(a, mask=missing)


def _numbers(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def write_csv(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    """The frame's ``columns`` as CSV: shortest round-trip floats, ``nan`` for NaN values, empty for missing numbers."""
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
    except ImportError:  # pragma: no cover - pandas ships with pyarrow here; keep a (slower) path without it
        _write_csv_pandas(df, columns, path)
        return
    # in slices of rows: the text of a slice, not of the whole frame, is in memory at once (the frame may hold every
    # lead time's spectra)
    # integers or not: decided over the whole column, so that every slice writes a column alike
    integral = {}
    for col in _NUMBER_AS_TEXT:
        if col in columns and col in df:
            a = _numbers(df[col])
            integral[col] = bool(np.all(np.mod(a[~np.isnan(a)], 1.0) == 0))
    with open(path, "wb") as f:
        f.write((",".join(columns) + "\n").encode())
        for start in range(0, len(df), CSV_ROWS):
            part = df.iloc[start : start + CSV_ROWS]
            arrays = []
            for col in columns:
                s = part[col] if col in part else pd.Series([np.nan] * len(part))
                if col in _NUMBER_AS_TEXT:
                    arrays.append(_number_column(s, integral.get(col)))
                elif col in ("value", "latitude") or pd.api.types.is_float_dtype(s.dtype):
                    arrays.append(pa.array(s.to_numpy(dtype=np.float64)))
                else:
                    text = s if isinstance(s.dtype, pd.CategoricalDtype) else s.astype(str).to_numpy(dtype=object)
                    arrays.append(pa.array(text).cast(pa.string()))
            # our strings never hold a delimiter or quote: no quoting (header included), like the fixture's files
            pacsv.write_csv(pa.table(arrays, names=columns), f, pacsv.WriteOptions(quoting_style="none", include_header=False))


def _write_csv_pandas(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    df = df.loc[:, columns].copy()
    for col in _NUMBER_AS_TEXT:
        if col in df:
            df[col] = [
                ("" if np.isnan(float(x)) else (str(int(x)) if float(x).is_integer() else repr(float(x)))) for x in df[col].astype(float)
            ]
    df.to_csv(path, index=False, na_rep="nan")


def _codes(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    c = values.astype("category").cat.remove_unused_categories()
    return c.cat.codes.to_numpy(dtype=np.int64), [str(x) for x in c.cat.categories]


def eval_dataset(df: pd.DataFrame, eval_name: str, attrs: dict[str, Any]) -> xr.Dataset:
    """WB2's results layout of one eval's rows: a variable per data variable, dims (metric, region, lead_time, [level])."""
    im, metrics = _codes(df["metric"])
    ir, regions = _codes(df["region"])
    iv, variables = _codes(df["variable"])
    leads, il = np.unique(df["lead_time_hours"].to_numpy(dtype=np.float64), return_inverse=True)
    level = pd.to_numeric(df["level"], errors="coerce").to_numpy(dtype=np.float64)
    has_level = ~np.isnan(level)
    levels, ilev = np.unique(np.where(has_level, level, np.inf), return_inverse=True)
    levels = levels[np.isfinite(levels)]
    lead_td = (leads * 3600e9).round().astype("int64").astype("timedelta64[ns]")
    coords: dict[str, Any] = {"metric": metrics, "region": regions, "lead_time": lead_td}
    if levels.size:
        coords["level"] = [int(x) if float(x).is_integer() else float(x) for x in levels]
    value = df["value"].to_numpy(dtype=np.float64)
    order = np.argsort(iv, kind="stable")
    bounds = np.searchsorted(iv[order], np.arange(len(variables) + 1))
    data_vars = {}
    for v, var in enumerate(variables):
        rows = order[bounds[v] : bounds[v + 1]]
        if has_level[rows].all():
            arr = np.full((len(metrics), len(regions), leads.size, levels.size), np.nan)
            arr[im[rows], ir[rows], il[rows], ilev[rows]] = value[rows]
            data_vars[var] = (("metric", "region", "lead_time", "level"), arr)
        else:
            arr = np.full((len(metrics), len(regions), leads.size), np.nan)
            arr[im[rows], ir[rows], il[rows]] = value[rows]
            data_vars[var] = (("metric", "region", "lead_time"), arr)
    return xr.Dataset(data_vars, coords=coords, attrs={"eval": eval_name, **{k: str(v) for k, v in attrs.items()}})


def write_netcdf(ds: xr.Dataset, path: Path) -> None:
    ds.to_netcdf(path, engine="h5netcdf")


def commit(out: Path, writers: dict[str, Callable[[Path], None]], meta: dict[str, Any]) -> list[str]:
    """Write every file to a temporary name, then rename them all into ``out`` (``meta.json`` last).

    Files a previous run listed in its meta.json but this one does not write are removed afterwards, so the
    folder describes one run.
    """
    out.mkdir(parents=True, exist_ok=True)
    old: list[str] = []
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        old = list(json.loads((out / "meta.json").read_text())["files"])
    names = sorted(writers)
    meta = {**meta, "files": [*names, "meta.json"]}
    with contextlib.ExitStack() as stack:
        # entered first, left last: meta.json is renamed only after every other file is in place
        meta_tmp = stack.enter_context(atomic_path(out / "meta.json"))
        temps = {name: stack.enter_context(atomic_path(out / name)) for name in names}
        for name in names:
            writers[name](temps[name])
        meta_tmp.write_text(json.dumps(meta, indent=1, default=str) + "\n")
    for name in old:
        if name not in meta["files"] and "/" not in name and not name.startswith("."):
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
    return meta["files"]
