"""Copy the parts of the shared WeatherBench2 fixture that the tests need into tests/data/wb2_fixture_5p625.

Run from the repository root with ``../shared`` beside it. Forecasts, reference CSVs and README are copied
as they are; the observations keep only the 2020 initial and valid times and the same calendar times of
2017-2019 (for the probabilistic-climatology baseline); the climatology keeps the days of year 1-5.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

SRC = Path("../shared/golden/wb2_fixture_5p625")
DST = Path("tests/data/wb2_fixture_5p625")


def main() -> None:
    if not SRC.is_dir():
        sys.exit(f"{SRC} not found: run from the repository root with ../shared beside it")
    if DST.exists():
        shutil.rmtree(DST)
    DST.mkdir(parents=True)
    refs = ("det", "ens", "per_init_sample", "per_init_all_regions", "rank_histogram", "spectra")
    copied = ["README.md", "fixture_info.json"] + [f"{n}.csv.gz" for n in refs]
    for name in copied:
        shutil.copy2(SRC / name, DST / name)
    for name in ("forecast_det.zarr", "forecast_ens.zarr"):
        shutil.copytree(SRC / name, DST / name)
    obs = xr.open_zarr(SRC / "obs.zarr", decode_timedelta=True)
    t2020 = pd.date_range("2020-01-01T00", "2020-01-05T12", freq="12h")
    times = [t.replace(year=y) for y in (2017, 2018, 2019, 2020) for t in t2020]
    sub = obs.sel(time=np.array(times, dtype="datetime64[ns]")).load()
    for v in sub.data_vars.values():
        v.encoding = {}
    sub.to_zarr(DST / "obs.zarr", zarr_format=2, consolidated=True, mode="w")
    clim = xr.open_zarr(SRC / "climatology.zarr").sel(dayofyear=slice(1, 5)).load()
    for v in clim.data_vars.values():
        v.encoding = {}
    clim.to_zarr(DST / "climatology.zarr", zarr_format=2, consolidated=True, mode="w")
    sums = []
    for f in sorted(p for p in SRC.iterdir() if p.is_file()):
        sums.append(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}")
    (DST / "SOURCE_SHA256").write_text("\n".join(sums) + "\n")
    print(f"wrote {DST}: obs {dict(sub.sizes)}, climatology {dict(clim.sizes)}")


if __name__ == "__main__":
    main()
