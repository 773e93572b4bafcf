"""Benchmark: does a forecast's global mean stay within the truth's range, channel by channel and lead by lead?

    python bench/forecast_bounds.py --forecast forecast.zarr --obs ~/.cache/fcn3_lightning/default_world_v1_seed0.zarr
    python bench/forecast_bounds.py --forecast forecast.zarr --obs era5.zarr --years 2018 2019 --max-lead-days 5

For every channel (variable and level) of the forecast Zarr (``predict``'s output, WeatherBench2's by-init layout)
it prints, per lead time, the range of the global (area-weighted, WeatherBench2's cell-area weights) means over the
forecast's initial times and members next to the range of the truth's global means over ``--years`` (default: the
calendar years of the forecast's valid times; the default world's 2002 is the year held out of training). A lead
time is marked ``*`` where the forecast's range leaves the truth's. Then per channel the first lead out of range
and the worst excursion (in units of the truth's standard deviation at a grid point, so that channels compare), and
the worst channel and lead overall. Exits with status 1 when any channel leaves the truth's range within
``--max-lead-days`` (default: all leads), so that a script can use it as a check.

This is the strict test of the README's default model (acceptance "every channel's global mean stays within the
truth's range over the validation years at every lead"); ``predict`` and ``evaluate`` warn by the looser bounds of
:mod:`fcn3_lightning.bounds`, which flag a diverged model rather than a drifting one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import xarray as xr
from fcn3_lightning.eval.leaderboard import variable_key

from fcn3_lightning.grid import cell_area_weights


def _channels(ds: xr.Dataset) -> list[tuple[str, str, int | None]]:
    """(label, variable, level) of every forecast array with (latitude, longitude)."""
    out = []
    for name, da in ds.data_vars.items():
        if not {"latitude", "longitude", "prediction_timedelta"} <= set(da.dims):
            continue
        if "level" in da.dims:
            out += [(f"{name}/{int(lev)}", str(name), int(lev)) for lev in ds["level"].values]
        else:
            out.append((str(name), str(name), None))
    return out


def _global_means(da: xr.DataArray, weights: np.ndarray, chunk_dim: str, chunk: int) -> np.ndarray:
    """Area-weighted means over (latitude, longitude), float64, read ``chunk`` entries of ``chunk_dim`` at a time."""
    da = da.transpose(..., "latitude", "longitude")
    parts = []
    for a in range(0, da.sizes[chunk_dim], chunk):
        x = da.isel({chunk_dim: slice(a, a + chunk)}).values
        parts.append(np.einsum("...hw,h->...", x, weights, dtype=np.float64) / (x.shape[-2] * x.shape[-1]))
    return np.concatenate(parts, axis=da.dims.index(chunk_dim))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--forecast", required=True, help="forecast Zarr (predict's output)")
    p.add_argument("--obs", required=True, help="the truth (a WB2 store with the forecast's variables)")
    p.add_argument("--years", type=int, nargs="+", help="years of the truth whose global means give the range (default: the valid times')")
    p.add_argument("--max-lead-days", type=float, help="only leads up to this many days count for the exit status (all are printed)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="excursions up to this many truth standard deviations (at a grid point) count as within, for the exit status "
        "(default 0: the strict test; a conserved global mean, like the default world's z500, has a range of almost no width)",
    )
    args = p.parse_args(argv)

    fc = xr.open_zarr(args.forecast)
    obs = xr.open_zarr(Path(args.obs).expanduser())
    if not np.allclose(np.sort(fc["latitude"].values), np.sort(obs["latitude"].values)):
        raise SystemExit("the forecast and the truth are on different grids")
    obs = obs.reindex(latitude=fc["latitude"].values)  # the same row order as the forecast
    w_fc = cell_area_weights(fc["latitude"].values)
    inits = fc["time"].values
    leads = fc["prediction_timedelta"].values
    lead_h = (leads / np.timedelta64(1, "h")).astype(float)
    valid = inits[:, None] + leads[None, :]
    years = args.years or sorted({int(str(t)[:4]) for t in valid.ravel()})
    t = obs["time"].values
    in_years = np.isin(t.astype("datetime64[Y]").astype(int) + 1970, years)
    if not in_years.any():
        raise SystemExit(f"the truth has no times in the years {years}")
    print(f"forecast {args.forecast}: {inits.size} initial times x {fc.sizes.get('number', 1)} members x {leads.size} leads")
    print(f"truth {args.obs}: global means over the years {years} ({int(in_years.sum())} times)\n")

    rows = []  # (label, truth lo, hi, std, forecast lo per lead, hi per lead)
    for label, var, level in _channels(fc):
        da = fc[var] if level is None else fc[var].sel(level=level)
        gm = _global_means(da, w_fc, "time", 1)  # (time, [number], lead)
        if gm.ndim == 3:
            gm = gm.reshape(-1, gm.shape[-1])
        truth = obs[var] if level is None else obs[var].sel(level=level)
        truth = truth.isel(time=np.flatnonzero(in_years))
        tg = _global_means(truth, w_fc, "time", 256)
        std = float(truth.std().values)
        rows.append((label, tg.min(), tg.max(), std, gm.min(0), gm.max(0)))

    labels = [variable_key(var, level) for _, var, level in _channels(fc)]
    print("global-mean range of the truth: " + "; ".join(f"{lab} {r[1]:.6g} .. {r[2]:.6g}" for lab, r in zip(labels, rows, strict=True)))
    print("\nforecast global means (min .. max over initial times and members); * = outside the truth's range")
    print(f"{'lead':>10} " + " ".join(f"{lab:>26}" for lab in labels))
    for j, h in enumerate(lead_h):
        cells = []
        for _, lo, hi, _, flo, fhi in rows:
            out = flo[j] < lo or fhi[j] > hi
            cells.append(f"{flo[j]:.6g} .. {fhi[j]:.6g}{'*' if out else ' '}")
        print(f"{h:>8g} h " + " ".join(f"{c:>26}" for c in cells))

    limit = np.inf if args.max_lead_days is None else args.max_lead_days * 24
    worst: dict[str, tuple | None] = {"all": None, "limit": None}
    failed = False
    print("\nper channel (excursion in truth standard deviations at a grid point):")
    for lab, (_, lo, hi, std, flo, fhi) in zip(labels, rows, strict=True):
        excess = np.maximum(np.maximum(lo - flo, fhi - hi), 0.0) / std
        for key, leads in (("all", lead_h < np.inf), ("limit", lead_h <= limit)):
            k = int(np.argmax(np.where(leads, excess, -1.0)))
            if worst[key] is None or excess[k] > worst[key][0]:
                worst[key] = (float(excess[k]), lab, float(lead_h[k]), flo[k], fhi[k], lo, hi)
        bad = np.flatnonzero(excess > 0)
        if bad.size == 0:
            closest = float(np.min(np.minimum(flo - lo, hi - fhi)))
            print(f"  {lab}: within {lo:.6g} .. {hi:.6g} at every lead (closest: {closest:.4g} inside)")
            continue
        first, k = bad[0], int(np.argmax(excess))
        failed |= bool(np.any((excess > args.tolerance) & (lead_h <= limit)))
        print(
            f"  {lab}: leaves {lo:.6g} .. {hi:.6g} from lead {lead_h[first]:g} h ({flo[first]:.6g} .. {fhi[first]:.6g}); "
            f"worst at {lead_h[k]:g} h: {flo[k]:.6g} .. {fhi[k]:.6g} ({excess[k]:.3g} std beyond)"
        )
    print()
    for key, what in (("limit", f"up to {args.max_lead_days or 0:g} days"), ("all", "at any lead")):
        if key == "limit" and args.max_lead_days is None:
            continue
        size, lab, h, flo_k, fhi_k, lo, hi = worst[key]
        print(
            f"worst channel and lead {what}: {lab} at {h:g} h ({h / 24:g} d): {flo_k:.6g} .. {fhi_k:.6g} against the truth's "
            f"{lo:.6g} .. {hi:.6g}, {size:.3g} std beyond"
        )
    within = "strictly" if args.tolerance == 0 else f"within {args.tolerance:g} std"
    scope = "every lead" if args.max_lead_days is None else f"leads up to {args.max_lead_days:g} days"
    print(f"{'FAIL' if failed else 'PASS'}: every channel's global mean stays in the truth's range ({within}) at {scope}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
