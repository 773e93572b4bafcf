"""Command line: ``python -m fcn3_lightning <command>``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _summary(args: argparse.Namespace) -> None:
    from fcn3_lightning.model.build import build_model
    from fcn3_lightning.model.summary import summarize

    model = build_model(args.config, meta=args.meta)
    print(summarize(model))


def _convert(args: argparse.Namespace) -> None:
    from fcn3_lightning.model.build import save_model
    from fcn3_lightning.model.convert import load_reference_state_dict, reference_config_to_kwargs

    src = Path(args.reference)
    config_path = Path(args.config) if args.config else None
    checkpoint = src
    if src.is_dir():  # a reference model package: config.json + training_checkpoints/best_ckpt_mp0.tar
        config_path = config_path or src / "config.json"
        checkpoint = src / "training_checkpoints" / "best_ckpt_mp0.tar"
    if config_path is None:
        raise SystemExit("convert: --config is required when the reference is a checkpoint file (config.json or manifest.json)")
    for p in (config_path, checkpoint):
        if not p.is_file():
            raise SystemExit(f"convert: {p} does not exist")
    kwargs = reference_config_to_kwargs(json.loads(config_path.read_text()))
    from fcn3_lightning.model.fcn3 import FCN3

    model = FCN3(**kwargs)
    print(f"loading {checkpoint}", file=sys.stderr)
    load_reference_state_dict(model, checkpoint, progress=True)
    save_model(model, kwargs, args.out)
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcn3_lightning", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="build a model config and print its parts and parameter counts")
    p.add_argument("config", help="model YAML, e.g. configs/model/fcn3.yaml")
    p.add_argument("--meta", action="store_true", help="put parameters on the meta device (no memory; for the full-size model)")
    p.set_defaults(func=_summary)

    p = sub.add_parser("convert", help="convert a reference (Makani) FCN3 checkpoint to this project's model file")
    p.add_argument("reference", help="reference checkpoint file, or a model package directory with config.json")
    p.add_argument("out", help="output model file (.pt)")
    p.add_argument("--config", help="reference architecture config (config.json or a golden manifest.json)")
    p.set_defaults(func=_convert)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
