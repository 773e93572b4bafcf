"""The baselines of WB2's leaderboard, as forecasts built from the truth (and the climatology).

* ``persistence``: the truth at the initialisation time, for every lead time (eval ``persistence_baseline``,
  deterministic scores; its ``crps`` is its MAE, the CRPS of a one-member ensemble);
* ``climatology``: the climatology at each valid time's (dayofyear, hour) (eval
  ``climatology_baseline_deterministic``: mse, rmse, rmse_sqrt_before_time_avg, bias, mae);
* ``probabilistic_climatology``: an ensemble whose members are the truth of earlier years at the valid time's
  calendar date and hour (29 February taken from 28 February in non-leap years) (eval
  ``probabilistic_climatology_baseline``, the ``probabilistic`` scores). Default years: every year of the
  truth store before the first valid time's year in which all these times exist; at least two are needed.
"""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

BASELINES: tuple[str, ...] = ("persistence", "climatology", "probabilistic_climatology")
BASELINE_EVALS: dict[str, str] = {
    "persistence": "persistence_baseline",
    "climatology": "climatology_baseline_deterministic",
    "probabilistic_climatology": "probabilistic_climatology_baseline",
}


def shift_year(times: np.ndarray, year: int) -> np.ndarray:
    """The same calendar date and time of day in ``year`` (29 February -> 28 February in non-leap years)."""
    t = pd.DatetimeIndex(np.asarray(times).reshape(-1))
    day = np.where((t.month == 2) & (t.day == 29) & (not calendar.isleap(year)), 28, t.day)
    out = pd.to_datetime(pd.DataFrame({"year": year, "month": t.month, "day": day, "hour": t.hour, "minute": t.minute, "second": t.second}))
    return out.to_numpy(dtype="datetime64[ns]").reshape(np.shape(times))


@dataclass
class ProbClimPlan:
    """The years of the probabilistic climatology and the truth time index of every (year, valid time)."""

    years: list[int]
    indices: np.ndarray  # (year, *valid.shape) indices into the truth's time axis
    notes: list[str] = field(default_factory=list)


def prob_clim_plan(obs_times: np.ndarray, valid: np.ndarray, years: Sequence[int] | None = None) -> ProbClimPlan:
    """Pick the years (given, or all earlier years of the store) whose times at the valid calendar dates all exist."""
    index = pd.DatetimeIndex(obs_times)
    first = pd.DatetimeIndex(valid.reshape(-1)).year.min()
    explicit = years is not None
    candidates = sorted(set(years)) if explicit else sorted(y for y in set(index.year.tolist()) if y < first)
    notes: list[str] = []
    kept, rows = [], []
    for y in candidates:
        idx = index.get_indexer(pd.DatetimeIndex(shift_year(valid, y).reshape(-1))).reshape(valid.shape)
        if (idx < 0).any():
            notes.append(f"year {y} dropped: the truth lacks {int((idx < 0).sum())} of its {idx.size} times")
            continue
        kept.append(y)
        rows.append(idx)
    indices = np.stack(rows) if rows else np.zeros((0, *valid.shape), dtype=np.int64)
    return ProbClimPlan(kept, indices, notes)
