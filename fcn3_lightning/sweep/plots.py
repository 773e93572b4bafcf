"""Optuna's plots of a study as PNG files (matplotlib, no display needed), written atomically."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from fcn3_lightning.io import atomic_path

PLOTS = ("optimization_history", "intermediate_values", "parallel_coordinate", "param_importances")
#: completed trials each plot needs to say anything
MIN_COMPLETE = {"optimization_history": 1, "intermediate_values": 0, "parallel_coordinate": 1, "param_importances": 2}


def save_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Write the plots the study's trials allow; a plot that needs more completed trials is skipped with a message."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    trials = study.get_trials(deepcopy=False)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    reported = sum(bool(t.intermediate_values) for t in trials)
    written = []
    for name in PLOTS:
        need = MIN_COMPLETE[name]
        if complete < need or (name == "intermediate_values" and not reported):
            what = f"{need} completed trials (the study has {complete})" if complete < need else "reported values"
            print(f"sweep: plot {name} skipped: it needs at least {what}", flush=True)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # matplotlib backend is "experimental"
            ax = getattr(vis, f"plot_{name}")(study)
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(9, 5.5)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        written.append(path)
    return written
