"""``python -m fcn3_lightning evaluate``: score a forecast Zarr against the truth as WB2's leaderboard does.

Wiring (``fcn3_lightning/__main__.py``)::

    from fcn3_lightning.eval.cli import add_cli
    add_cli(sub)

This module imports nothing heavy: the harness is imported when the command runs.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from fcn3_lightning.eval.baselines import BASELINES

from fcn3_lightning.paths import is_url as _is_url
from fcn3_lightning.paths import parse_storage_options

_EPILOG = """\
outputs (in --out): scores.csv, per_init.csv, rank_histogram.csv (ensembles), spectra.csv, one {eval}.nc per
eval in WB2's results layout, meta.json. Evals: deterministic | ensemble_mean_deterministic, probabilistic,
ensemble_experimental; persistence_baseline, climatology_baseline_deterministic,
probabilistic_climatology_baseline. Errors exit with status 2 and a message naming the culprit.
"""


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in _list(text)]


def _years(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d{1,4})\s*(?:[:-]\s*(\d{1,4})\s*)?", text)
    if m is None or int(m[2] or m[1]) < int(m[1]):
        raise argparse.ArgumentTypeError(f"years must be YEAR or FIRST:LAST (or FIRST-LAST), got {text!r}")
    return int(m[1]), int(m[2] or m[1])


#: ``--preset``: WeatherBench-X's official settings (public_benchmark/run_benchmark_evaluation.py): its levels, its inits
#: every 12 h (00 and 12 UTC) and its region list (metrics.regions.WBX_REGIONS); options given explicitly win
PRESETS: dict[str, dict[str, Any]] = {
    "wbx": {"levels": [500.0, 700.0, 850.0], "init_every_hours": 12.0, "regions": "WBX_REGIONS"},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--forecast", required=True, help="forecast Zarr, WB2 by-init layout (time=init, [number], prediction_timedelta, [level], lat, lon)"
    )
    p.add_argument(
        "--obs", required=True, help="ground-truth Zarr (time, [level], latitude, longitude), with land_sea_mask for the land regions"
    )
    p.add_argument("--climatology", help="WB2 climatology Zarr (hour, dayofyear, ...); default: computed from --obs (WB2's definition)")
    p.add_argument(
        "--storage-options",
        type=parse_storage_options,
        metavar="JSON",
        help="fsspec options for the stores given as URLs (gs://, s3://, https://; default: anonymous for gs:// and s3://)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", help="model name (default: the forecast store's name)")
    p.add_argument("--regions", type=_list, help="comma-separated regions (default: all 13 WB2 regions + the 3 land regions)")
    p.add_argument(
        "--per-init-regions",
        type=_list,
        help="comma-separated regions with per-initialisation records in per_init.csv, or 'none' (default: every scored region, as WB2)",
    )
    p.add_argument(
        "--variables", type=_list, help="comma-separated WB2 variable names (default: all of the forecast, plus derived wind speeds)"
    )
    p.add_argument("--levels", type=_floats, help="comma-separated pressure levels (default: all of the forecast)")
    p.add_argument("--lead-times", type=_floats, dest="lead_hours", help="comma-separated lead times in hours (default: all)")
    p.add_argument("--max-lead", type=float, dest="max_lead_hours", help="score lead times up to this many hours")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="official settings: wbx = WeatherBench-X's (levels 500,700,850, inits every 12 h, its 17 regions); explicit options win",
    )
    p.add_argument("--init-every-hours", type=float, help="score only the inits at multiples of this many hours after 00 UTC")
    p.add_argument("--start", help="first initialisation time to score (inclusive, e.g. 2020-01-01)")
    p.add_argument("--end", help="last initialisation time to score (inclusive)")
    p.add_argument("--skipna", action="store_true", help="leave NaN points out of the spatial means instead of failing")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--baselines", type=_list, help=f"comma-separated baselines to score ({', '.join(BASELINES)}); named ones are required to work"
    )
    g.add_argument("--no-baselines", action="store_true", help="score no baseline")
    p.add_argument(
        "--prob-clim-years",
        type=_years,
        help="years of the probabilistic climatology, FIRST:LAST (default: the years of --obs before the first scored init)",
    )
    p.add_argument(
        "--clim-years",
        type=_years,
        help="years the computed climatology averages, FIRST:LAST (default: the years of --obs before the first scored init, "
        "as WB2 scores 2020 against 1990-2019; years holding scored times are allowed, with a warning)",
    )
    p.add_argument(
        "--spectra",
        type=_list,
        default=None,
        help="channels for zonal energy spectra: VAR or VAR/LEVEL, comma-separated, or 'none' "
        "(default: those of geopotential/500, 2m_temperature that are scored; a channel named here that is not scored is a warning)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="dtype of the pointwise work (default float32, as WB2; its spatial means and the sums over inits are float64)",
    )
    p.add_argument("--device", default="cpu", help="torch device for the metrics (cpu, cuda)")
    p.add_argument(
        "--block-mb", type=float, default=128.0, help="input size of one block (default 128 MB); peak memory is a small multiple"
    )
    p.add_argument(
        "--compile", choices=("auto", "on", "off"), default="auto", help="torch.compile the fused metric kernels (auto: for large data)"
    )
    p.add_argument(
        "--threads", type=int, dest="torch_threads", help="torch threads for scoring (default: the usable cores minus one for the readers)"
    )
    p.add_argument("--read-threads", type=int, default=4, help="threads reading the stores (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rank histogram's tie-breaking")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> Any:
    from fcn3_lightning.eval.harness import Options

    from fcn3_lightning.metrics.regions import WBX_REGIONS

    spectra = None if args.spectra is None else ([] if args.spectra == ["none"] else args.spectra)
    preset = PRESETS.get(getattr(args, "preset", None) or "", {})
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, list(WBX_REGIONS) if value == "WBX_REGIONS" else value)
    return Options(
        name=args.name,
        regions=args.regions,
        per_init_regions=None if args.per_init_regions is None else ([] if args.per_init_regions == ["none"] else args.per_init_regions),
        variables=args.variables,
        levels=args.levels,
        lead_hours=args.lead_hours,
        max_lead_hours=args.max_lead_hours,
        start=args.start,
        end=args.end,
        init_every_hours=args.init_every_hours,
        skipna=args.skipna,
        baselines=[] if args.no_baselines else args.baselines,
        prob_clim_years=args.prob_clim_years,
        clim_years=args.clim_years,
        spectra=spectra,
        dtype=args.dtype,
        device=args.device,
        block_mb=args.block_mb,
        seed=args.seed,
        progress=not args.no_progress,
        compile=args.compile,
        torch_threads=args.torch_threads,
        read_threads=args.read_threads,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The ``evaluate`` command: errors are ``ValueError``/``FileNotFoundError`` with a message naming the culprit."""
    import os
    from pathlib import Path

    # inductor caches the compiled metric kernels in /tmp by default, which reboots wipe: keep them with our other
    # caches so that only the first evaluation on a machine pays the ~15 s compilation (an explicit setting wins)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "fcn3_lightning" / "inductor"))
    from fcn3_lightning.eval.harness import evaluate

    from fcn3_lightning.paths import local_path, store_location

    # the stores may be URLs (read in place with --storage-options); the output is a local folder: checked before anything is opened
    sources = {
        option: None if value is None else store_location(value, option, args.storage_options if _is_url(value) else None)
        for option, value in (("--forecast", args.forecast), ("--obs", args.obs), ("--climatology", args.climatology))
    }
    local_path(args.out, "--out")
    meta = evaluate(sources["--forecast"], sources["--obs"], args.out, sources["--climatology"], options_from_args(args))
    rows = meta["rows"]
    print(
        f"evaluate: {meta['name']} ({meta['forecast_kind']}, {len(meta['inits'])} inits, {len(meta['lead_hours'])} lead times): "
        f"{rows['scores']} scores of {', '.join(meta['evals'])} -> {args.out} ({meta['timing']['total_s']:.1f} s)"
    )
    if meta["warnings"]:
        print(f"evaluate: {len(meta['warnings'])} warning(s), see meta.json", file=sys.stderr)
    from fcn3_lightning.eval.reports import write_reports

    for path in write_reports(args.out):  # leaderboard.md/.html and the scorecard of this run
        print(f"wrote {path}")
    return meta


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``python -m fcn3_lightning`` subparsers."""
    p = subparsers.add_parser(
        "evaluate",
        description=__doc__.split("\n\n")[0],
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m fcn3_lightning.eval.cli ...``), with the same error handling as the main CLI."""
    parser = argparse.ArgumentParser(
        prog="python -m fcn3_lightning evaluate",
        description=__doc__.split("\n\n")[0],
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
