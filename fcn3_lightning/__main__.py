"""Command line: ``python -m fcn3_lightning <command>`` (``<command> --help`` for its options)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcn3_lightning.paths import parse_storage_options

PROG = "python -m fcn3_lightning"


def _summary(args: argparse.Namespace) -> None:
    from fcn3_lightning.model.build import build_model
    from fcn3_lightning.model.summary import summarize

    model = build_model(args.config, meta=args.meta)
    print(summarize(model))


def _convert(args: argparse.Namespace) -> None:
    from fcn3_lightning.forecaster import convert

    kind = convert(
        args.reference, args.out, config=args.config, data_path=args.data_path, stats_path=args.stats, channels=_channels(args.channels)
    )
    print(f"wrote {args.out} ({kind})")


def _export(args: argparse.Namespace) -> None:
    from fcn3_lightning.forecaster import load_forecaster
    from fcn3_lightning.paths import local_path

    out = local_path(args.out, "--out")
    if out.exists() and not args.overwrite:  # before the (slow) load
        raise ValueError(f"export: {out} exists (choose another --out, or pass --overwrite)")
    forecaster = load_forecaster(
        args.checkpoint, device="cpu", config=args.config, data_path=args.data_path, stats_path=args.stats, noise_seed=args.seed
    )
    forecaster.export(out, overwrite=args.overwrite)
    print(f"wrote the model package {out} ({len(forecaster.channels)} channels on {forecaster.shape[0]}x{forecaster.shape[1]})")


def _channels(spec: str | None) -> list[str] | None:
    """``fcn3`` (the 72 FCN3 channels), a comma-separated list, or ``@file`` with one name per line."""
    from fcn3_lightning.channels import FCN3_CHANNELS

    if spec is None:
        return None
    if spec == "fcn3":
        return list(FCN3_CHANNELS)
    if spec.startswith("@"):
        return [line.strip() for line in Path(spec[1:]).read_text().splitlines() if line.strip()]
    return [c.strip() for c in spec.split(",") if c.strip()]


def _stats(args: argparse.Namespace) -> None:
    from fcn3_lightning.channels import FCN3_CHANNELS
    from fcn3_lightning.data.stats import compute_stats
    from fcn3_lightning.data.store import WB2Store
    from fcn3_lightning.paths import StoreError, local_path, store_location

    channels = _channels(args.channels)
    if args.data is None:
        from fcn3_lightning.data.default_world import DEFAULT_WORLD_CHANNELS, DEFAULT_WORLD_SPLITS, ensure_default_world

        path = ensure_default_world()
        channels = channels or list(DEFAULT_WORLD_CHANNELS)
        start, end = args.start or DEFAULT_WORLD_SPLITS["train"][0], args.end or DEFAULT_WORLD_SPLITS["train"][1]
    else:
        path = store_location(args.data, "--data", args.storage_options)
        if path.remote and not args.out:
            raise StoreError(f"--data {args.data} is a URL: nothing is written next to it; pass --out (a local statistics file)")
        channels = channels or list(FCN3_CHANNELS)
        if not (args.start and args.end):
            raise ValueError("stats: --start and --end (the training range) are required with --data")
        start, end = args.start, args.end
    store = WB2Store(path, channels, step_hours=args.step_hours)  # a StoreLocation carries its storage options
    stats = compute_stats(store, start, end)
    out = local_path(args.out, "--out") if args.out else store.location.stats_sibling()
    stats.save(out)
    print(f"wrote statistics of {len(channels)} channels over {stats.source['start']} .. {stats.source['end']} to {out}")


def _default_world(args: argparse.Namespace) -> None:
    from fcn3_lightning.data.default_world import default_world_path, generate_default_world

    path = Path(args.out) if args.out else default_world_path(seed=args.seed)
    if path.exists() and not args.force:
        print(f"{path} exists (use --force to regenerate)")
        return
    # generate_default_world swaps the finished store in by renames: the old one stays until then
    generate_default_world(path, seed=args.seed)
    print(f"wrote {path}")


def _era5_sample(args: argparse.Namespace) -> None:
    from fcn3_lightning.data.era5_sample import convert_cfgrib_to_wb2, era5_sample_path

    src = Path(args.src) if args.src else era5_sample_path()
    if src is None:
        raise ValueError("convert-era5: no source file given and the ERA5 sample was not found (set $FCN3_ERA5_SAMPLE)")
    out = convert_cfgrib_to_wb2(src, args.out, member=None if args.member < 0 else args.member, overwrite=args.force)
    print(f"wrote {out}")


def _add_summary(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("summary")
    p.add_argument("config", help="model YAML, e.g. configs/model/fcn3.yaml")
    p.add_argument("--meta", action="store_true", help="put parameters on the meta device (no memory; for the full-size model)")
    p.set_defaults(func=_summary)
    return p


def _add_convert(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("convert")
    p.add_argument("reference", help="a model package folder, a reference (Makani) checkpoint, or a checkpoint of this project")
    p.add_argument("out", help="output model file (.pt)")
    p.add_argument("--config", help="reference architecture (config.json or a golden manifest.json) for a reference checkpoint file")
    p.add_argument("--data-path", help="for a checkpoint of this project: the WB2 store of its static fields (default: its training store)")
    p.add_argument("--stats", help="for a checkpoint of this project: its normalisation statistics (default: the training store's)")
    p.add_argument(
        "--channels",
        help="map the network onto this channel list (comma-separated or @file): kept channels keep their weights, new ones "
        "start with no effect on them (their statistics: --stats, or --data-path's <store>.stats.json)",
    )
    p.set_defaults(func=_convert)
    return p


def _add_export(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("export")
    p.add_argument("--checkpoint", required=True, help="a checkpoint of this project, a model file, or a model package folder")
    p.add_argument("--out", required=True, help="the package folder to write")
    p.add_argument("--config", help="reference architecture (config.json) for a reference checkpoint file")
    p.add_argument("--data-path", help="the WB2 store of the static fields (default: the checkpoint's training store)")
    p.add_argument("--stats", help="normalisation statistics (default: the checkpoint's)")
    p.add_argument("--seed", type=int, help="noise seed recorded in the package (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package (kept until the new one is complete)")
    p.set_defaults(func=_export)
    return p


def _add_stats(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("stats")
    p.add_argument("--data", help="the Zarr store (default: the embedded default world)")
    p.add_argument("--channels", help="'fcn3' (default with --data), a comma-separated list, or @file")
    p.add_argument("--start", help="first time of the training range (inclusive)")
    p.add_argument("--end", help="last time of the training range (inclusive)")
    p.add_argument("--step-hours", type=int, default=6, help="model step for the tendency statistics (default 6)")
    p.add_argument("--out", help="stats file (default: <store>.stats.json next to the store; required for a URL --data)")
    p.add_argument("--storage-options", type=parse_storage_options, metavar="JSON", help="fsspec options for a URL --data")
    p.set_defaults(func=_stats)
    return p


def _add_default_world(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("default-world")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="store path (default: the cache location used by fit)")
    p.add_argument("--force", action="store_true", help="regenerate even if the store exists")
    p.set_defaults(func=_default_world)
    return p


def _add_era5_sample(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("convert-era5")
    p.add_argument("out", help="output Zarr store")
    p.add_argument("--src", help="netCDF file (default: the ERA5 sample, see $FCN3_ERA5_SAMPLE)")
    p.add_argument("--member", type=int, default=0, help="ensemble member to keep (-1 keeps all as a 'number' dimension)")
    p.add_argument("--force", action="store_true", help="overwrite an existing store")
    p.set_defaults(func=_era5_sample)
    return p


def _lazy(target: str) -> Callable[[Any], argparse.ArgumentParser]:
    """``"module:function"``, a command's ``add_cli``, imported only when that command runs (``--help`` stays quick)."""
    module, function = target.split(":")
    return lambda sub: getattr(importlib.import_module(module), function)(sub)


@dataclass(frozen=True)
class Command:
    help: str  # its line in `python -m fcn3_lightning --help` (and its description, where the command gives none)
    #: registers the command's argparse parser on the subparsers and returns it; the parser's defaults hold ``func``
    #: (runs it: returns an exit status or None for 0) and, with ``fit_options=True``, options it does not know are
    #: fit options, handed on as ``args.fit_args``. None: a LightningCLI command, which parses its own options
    add_cli: Callable[[Any], argparse.ArgumentParser] | None


#: every command of ``python -m fcn3_lightning``, in the order --help lists them
COMMANDS: dict[str, Command] = {
    "fit": Command("train a model (configs/base.yaml, then --config files); each run in its own folder runs/<run name>", None),
    "validate": Command("score a checkpoint (--ckpt_path) on the validation range, as an MLflow run of its own", None),
    "test": Command("score a checkpoint (--ckpt_path) on the test range, as an MLflow run of its own", None),
    "curriculum": Command(
        "train the curriculum stages (stage1, stage2, finetune) one after the other", _lazy("fcn3_lightning.cli:add_curriculum_cli")
    ),
    "sweep": Command(
        "search the hyperparameters of a fit config with Optuna (one trial = one fit)", _lazy("fcn3_lightning.sweep.cli:add_cli")
    ),
    "summary": Command("build a model config and print its parts and parameter counts", _add_summary),
    "convert": Command("a model package, reference or project checkpoint as one model file of this project", _add_convert),
    "export": Command("write a model as a model package in the published FCN3 layout (reference code, Earth2Studio)", _add_export),
    "stats": Command("normalisation statistics of a WB2-style Zarr store over a training range", _add_stats),
    "default-world": Command("generate the embedded default world (shallow-water dynamics) into the cache", _add_default_world),
    "convert-era5": Command("convert a cfgrib-named ERA5 netCDF (e.g. the ERA5 sample) to a WB2-style Zarr store", _add_era5_sample),
    "predict": Command(
        "ensemble forecasts from a checkpoint into a WeatherBench2 forecast Zarr", _lazy("fcn3_lightning.inference:add_cli")
    ),
    "evaluate": Command(
        "score a forecast Zarr against the ground truth the WeatherBench2 way (scores.csv, {eval}.nc, ...)",
        _lazy("fcn3_lightning.eval.cli:add_cli"),
    ),
    "leaderboard": Command(
        "headline-score leaderboard (Markdown, HTML) and scorecard (PNG) of one or several evaluation output directories",
        _lazy("fcn3_lightning.eval.reports:add_cli"),
    ),
}


def build_parser(command: str | None = None) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The top-level parser, listing every command; ``command``'s own parser (also returned) with all its options."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    own = None
    for name, cmd in COMMANDS.items():
        if name == command and cmd.add_cli is not None:
            own = cmd.add_cli(sub)
            own.description = own.description or cmd.help
        else:  # listed only: --help shows it, its own parser is built when it runs
            sub.add_parser(name, help=cmd.help, add_help=False)
    return parser, own


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        if command is not None and command.add_cli is None:  # fit, validate, test: LightningCLI parses the options
            from fcn3_lightning.cli import run_cli

            run_cli(argv)
            return 0
        parser, own = build_parser(argv[0] if argv else None)
        args, rest = parser.parse_known_args(argv)
        if rest and not getattr(args, "fit_options", False):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.fit_args = rest
        try:
            status = args.func(args)
        except argparse.ArgumentError as e:  # bad option values the command found: its usage and the message, exit 2
            (own or parser).error(str(e))
        return status if isinstance(status, int) else 0
    except (ValueError, FileNotFoundError) as e:  # configuration errors: the message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
