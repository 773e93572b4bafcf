"""Command line: ``python -m fcn3_lightning <command>`` (``<command> --help`` for its options)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fcn3_lightning.paths import parse_storage_options


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


LIGHTNING_COMMANDS = ("fit", "validate", "test")
#: the commands that parse their own options (``<command> --help`` shows them), with their line in ``--help``
OWN_PARSERS = {
    "fit": "train a model (configs/base.yaml, then --config files); each run in its own folder runs/<run name>",
    "validate": "score a checkpoint (--ckpt_path) on the validation range, as an MLflow run of its own",
    "test": "score a checkpoint (--ckpt_path) on the test range, as an MLflow run of its own",
    "curriculum": "train the curriculum stages (stage1, stage2, finetune) one after the other",
    "sweep": "search the hyperparameters of a fit config with Optuna (one trial = one fit)",
}
CURRICULUM_HELP = """usage: python -m fcn3_lightning curriculum [--stages A.yaml B.yaml ...] [--run_name NAME] [fit options]

Runs `fit` for each stage config in turn (default: configs/stage1.yaml configs/stage2.yaml configs/finetune.yaml),
each stage starting from the previous stage's best weights (weights only). The stages live in one folder,
runs/curriculum-<UTC time>/<stage> (runs/NAME/<stage> with --run_name NAME). Every other option is a fit option
for every stage (see `python -m fcn3_lightning fit --help`), e.g. --trainer.max_epochs 1."""


def _curriculum(argv: list[str]) -> int:
    """``curriculum [--stages a.yaml b.yaml ...] [fit options for every stage]``."""
    from fcn3_lightning.cli import run_curriculum

    if argv[:1] in (["-h"], ["--help"]):
        print(CURRICULUM_HELP)
        return 0
    stages = None
    if argv[:1] == ["--stages"]:
        argv = argv[1:]
        stages = []
        while argv and not argv[0].startswith("--"):
            stages.append(argv.pop(0))
    for best in run_curriculum(stages, argv):
        print(f"curriculum: {best}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from fcn3_lightning.cli import run_cli

        try:
            run_cli(argv)
        except (ValueError, FileNotFoundError) as e:  # configuration errors: the message, not a traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if argv and argv[0] == "curriculum":
        try:
            return _curriculum(argv[1:])
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if argv and argv[0] == "sweep":
        from fcn3_lightning.sweep.cli import main as sweep

        return sweep(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m fcn3_lightning", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name, line in OWN_PARSERS.items():  # dispatched above; listed here so that --help shows every command
        sub.add_parser(name, help=line, add_help=False)

    p = sub.add_parser("summary", help="build a model config and print its parts and parameter counts")
    p.add_argument("config", help="model YAML, e.g. configs/model/fcn3.yaml")
    p.add_argument("--meta", action="store_true", help="put parameters on the meta device (no memory; for the full-size model)")
    p.set_defaults(func=_summary)

    p = sub.add_parser("convert", help="a model package, reference or project checkpoint as one model file of this project")
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

    p = sub.add_parser("export", help="write a model as a model package in the published FCN3 layout (reference code, Earth2Studio)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint of this project, a model file, or a model package folder")
    p.add_argument("--out", required=True, help="the package folder to write")
    p.add_argument("--config", help="reference architecture (config.json) for a reference checkpoint file")
    p.add_argument("--data-path", help="the WB2 store of the static fields (default: the checkpoint's training store)")
    p.add_argument("--stats", help="normalisation statistics (default: the checkpoint's)")
    p.add_argument("--seed", type=int, help="noise seed recorded in the package (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package (kept until the new one is complete)")
    p.set_defaults(func=_export)

    p = sub.add_parser("stats", help="normalisation statistics of a WB2-style Zarr store over a training range")
    p.add_argument("--data", help="the Zarr store (default: the embedded default world)")
    p.add_argument("--channels", help="'fcn3' (default with --data), a comma-separated list, or @file")
    p.add_argument("--start", help="first time of the training range (inclusive)")
    p.add_argument("--end", help="last time of the training range (inclusive)")
    p.add_argument("--step-hours", type=int, default=6, help="model step for the tendency statistics (default 6)")
    p.add_argument("--out", help="stats file (default: <store>.stats.json next to the store; required for a URL --data)")
    p.add_argument("--storage-options", type=parse_storage_options, metavar="JSON", help="fsspec options for a URL --data")
    p.set_defaults(func=_stats)

    p = sub.add_parser("default-world", help="generate the embedded default world (shallow-water dynamics) into the cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="store path (default: the cache location used by fit)")
    p.add_argument("--force", action="store_true", help="regenerate even if the store exists")
    p.set_defaults(func=_default_world)

    p = sub.add_parser("convert-era5", help="convert a cfgrib-named ERA5 netCDF (e.g. the ERA5 sample) to a WB2-style Zarr store")
    p.add_argument("out", help="output Zarr store")
    p.add_argument("--src", help="netCDF file (default: the ERA5 sample, see $FCN3_ERA5_SAMPLE)")
    p.add_argument("--member", type=int, default=0, help="ensemble member to keep (-1 keeps all as a 'number' dimension)")
    p.add_argument("--force", action="store_true", help="overwrite an existing store")
    p.set_defaults(func=_era5_sample)

    from fcn3_lightning.eval.cli import add_cli as add_evaluate_cli
    from fcn3_lightning.eval.reports import add_cli as add_leaderboard_cli
    from fcn3_lightning.inference import add_cli as add_predict_cli

    add_predict_cli(sub)

    add_evaluate_cli(sub)
    add_leaderboard_cli(sub)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
