"""``python -m fcn3_lightning sweep [--config configs/sweep/default.yaml] [options] [fit options]``.

Options that are not the sweep's own (``--trainer.max_steps 20``, ``--data.data_path ...``) are fit options: they
apply to every trial, as in ``curriculum``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fcn3_lightning.cli import CONFIGS

DEFAULT_SWEEP = CONFIGS / "sweep" / "default.yaml"


DESCRIPTION = "Optuna hyperparameter search over a fit config, with pruning, parallel workers and MLflow."
EPILOG = "Other --key value options are fit options for every trial (e.g. --trainer.max_steps 20)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fcn3_lightning.sweep.storage import DEFAULT_STORAGE

    p.add_argument("--config", type=Path, default=DEFAULT_SWEEP, help=f"search-space YAML (default: {DEFAULT_SWEEP})")
    p.add_argument("--n-trials", type=int, help="trials the study should hold, all workers together (default: n_trials of the YAML)")
    p.add_argument("--timeout", type=float, help="seconds after which this worker starts no new trial")
    p.add_argument("--study-name", help="study name (default: study_name of the YAML, else its file name)")
    p.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help=f"sqlite:///PATH, journal:PATH (a journal file) or an RDB URL (default: {DEFAULT_STORAGE})",
    )
    p.add_argument("--out", type=Path, default=Path("sweeps"), help="trial directories, best.yaml and plots go to OUT/STUDY")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the fit config's, sqlite:///mlruns.db)")
    p.add_argument("--heartbeat-interval", type=float, default=10.0, help="seconds between a running trial's heartbeats")
    p.add_argument("--grace-period", type=float, default=60.0, help="seconds without heartbeat after which a trial counts as dead (FAIL)")


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``sweep`` on the ``python -m fcn3_lightning`` subparsers; options it does not know are fit options."""
    p = subparsers.add_parser(
        "sweep",
        description=DESCRIPTION,
        epilog=EPILOG,
        allow_abbrev=False,  # unknown options are fit options: no prefix matching against the sweep's own
    )
    add_arguments(p)
    p.set_defaults(func=run, fit_options=True)
    return p


def run(args: argparse.Namespace) -> int:
    """The ``sweep`` command; ``args.fit_args``: the fit options for every trial. Exit 2 on bad input, 1 when no trial
    completed."""
    fit_args = args.fit_args
    stray = [a for a in fit_args if a.startswith("-") and not a.startswith("--")]
    if stray:
        raise argparse.ArgumentError(None, f"unrecognized arguments: {stray} (fit options are --key value)")
    for name in ("n_trials", "timeout", "heartbeat_interval", "grace_period"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise argparse.ArgumentError(None, f"--{name.replace('_', '-')} must be positive, got {v:g}")
    if args.grace_period <= 2 * args.heartbeat_interval:
        raise argparse.ArgumentError(
            None, f"--grace-period ({args.grace_period:g}) must exceed twice --heartbeat-interval ({args.heartbeat_interval:g})"
        )

    from optuna.trial import TrialState

    from fcn3_lightning.sweep.space import SweepError, load_sweep
    from fcn3_lightning.sweep.study import SweepOptions, run_sweep

    try:
        spec = load_sweep(args.config)
        n_trials = args.n_trials or spec.n_trials
        if n_trials is None and args.timeout is None:
            raise SweepError(f"give --n-trials or --timeout (or n_trials in {args.config}): the sweep would never end")
        opts = SweepOptions(
            spec=spec,
            storage=args.storage,
            out=args.out,
            study_name=args.study_name or spec.study_name,
            n_trials=n_trials,
            timeout=args.timeout,
            tracking_uri=args.tracking_uri,
            heartbeat_interval=args.heartbeat_interval,
            grace_period=args.grace_period,
            fit_args=fit_args,
        )
        result = run_sweep(opts)
    except (ValueError, FileNotFoundError) as e:  # configuration errors (SweepError included): the message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    trials = result.study.get_trials(deepcopy=False)
    for t in trials:
        value = f"{t.value:.6g}" if t.value is not None else "-"
        steps = max(t.intermediate_values, default="-")
        print(f"sweep: trial {t.number:3d} {t.state.name:8s} value {value:>10s} last step {steps} {t.params}")
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    counts = {k: v for k, v in counts.items() if v}
    print(f"sweep: study {opts.study_name!r}: {len(trials)} trials {counts}; this worker ran {result.ran}")
    if result.best_yaml is None:
        print("error: no trial completed, so there is no best config", file=sys.stderr)
        return 1
    best = result.study.best_trial
    print(f"sweep: best trial {best.number}: {best.value:.6g} {best.params}")
    print(f"sweep: best config {result.best_yaml} (python -m fcn3_lightning fit --config {result.best_yaml})")
    return 0
