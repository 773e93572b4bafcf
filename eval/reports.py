"""Writing the reports of evaluations: the headline leaderboard (:mod:`.leaderboard`), the bootstrap intervals and
paired tests (:mod:`.significance`) and the scorecard (:mod:`.scorecard`); and the ``leaderboard`` command.

This module sits above the three (none of them imports it), so each keeps one job and there is no import cycle.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcn3_lightning.eval.leaderboard import collect_entries, harmonise, load_runs, load_scores, write_leaderboard
from fcn3_lightning.eval.scorecard import DEFAULT_PAIRS, plot_scorecard, reference_pairs, scorecard_panels

if TYPE_CHECKING:  # pandas is imported inside the functions: registering the CLI must stay cheap
    import pandas as pd


def write_all(
    runs: Mapping[str, pd.DataFrame],
    out_dir: str | Path,
    region: str = "global",
    reference: str | None = None,
    notes: Sequence[str] = (),
    warn: Callable[[str], None] | None = None,
) -> list[Path]:
    """Leaderboard (md, html) and, when some model has a baseline to compare with, ``scorecard.png``; with
    ``reference`` (a model's name) the scorecard compares every other model and baseline with that one, and
    ``intervals.csv``, ``significance.csv`` and ``significance.nc`` (see :mod:`.significance`) hold the bootstrap
    intervals and the paired tests that mark the scorecard's non-significant cells. ``notes``: lines for the
    leaderboard (what was left out of the merge); ``warn``: called with each note of the significance step."""
    from fcn3_lightning.eval import significance  # numpy and scipy: only when writing (the CLI registers cheaply)

    notes = list(notes)
    sig = None
    if reference:
        entries = collect_entries(runs, region)
        models = [e.name for e in entries if e.kind == "model"]
        if reference not in models:
            raise ValueError(f"--reference {reference!r} is none of the models {models} (the names in meta.json, or evaluate --name)")
        sig = significance.compute(entries, runs, region, reference)
        notes += sig.notes
        for line in sig.notes if warn else []:
            warn(line)
    paths = write_leaderboard(runs, out_dir, region, notes=notes)
    if sig is not None:
        paths += significance.write(sig, out_dir)
    pairs = reference_pairs(reference) if reference else DEFAULT_PAIRS
    if scorecard_panels(runs, region, pairs, reference):
        p_values = sig.p_values() if sig is not None else None
        paths.append(
            plot_scorecard(runs, Path(out_dir) / "scorecard.png", region=region, pairs=pairs, reference=reference, p_values=p_values)
        )
    elif reference:
        raise ValueError(f"--reference {reference!r}: no other model shares a score and lead time with it in region {region!r}")
    return paths


def write_reports(result_dir: str | Path, region: str = "global") -> list[Path]:
    """The reports of one evaluation output directory, written into it: leaderboard.md/.html and scorecard.png."""
    name, df = load_scores(result_dir)
    return write_all({name: df}, result_dir, region)


# ---------------------------------------------------------------------------------------------- CLI


def _leaderboard_cmd(args: argparse.Namespace) -> None:
    runs, left = harmonise(load_runs(args.result_dirs), args.region)
    warn = lambda line: print(f"leaderboard: WARNING: {line}", file=sys.stderr)  # noqa: E731
    for line in left:
        warn(line)
    for path in write_all(runs, args.out, args.region, args.reference, notes=left, warn=warn):
        print(f"wrote {path}")


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``leaderboard RESULT_DIR [RESULT_DIR ...] --out DIR [--region global]``."""
    p = subparsers.add_parser(
        "leaderboard",
        help="headline-score leaderboard (Markdown, HTML) and scorecard (PNG) of one or several evaluation output directories",
    )
    p.add_argument("result_dirs", nargs="+", metavar="RESULT_DIR", help="evaluation output directory (scores.csv + meta.json)")
    p.add_argument("--out", required=True, help="output directory for leaderboard.md, leaderboard.html, scorecard.png")
    p.add_argument("--region", default="global", help="WeatherBench2 region (default: global)")
    p.add_argument("--reference", default=None, metavar="NAME", help="a model (evaluate --name) the scorecard compares the others with")
    p.set_defaults(func=_leaderboard_cmd)
    return p
