"""Confidence intervals and paired significance of leaderboard scores, from the evaluations' per-init records.

An evaluation output directory's ``per_init.csv`` holds the per-initialisation values of the ``*_temporal`` evals
(see :mod:`.results`). For every leaderboard entry (a model or baseline of a run) and headline score (RMSE, CRPS)
this module finds the per-init values behind the score (the same eval and metric :func:`.leaderboard.score_series`
takes, ``{eval}_temporal``), and with :mod:`.statistics`

* ``intervals``: the score's 95 % bootstrap intervals over inits, IID and stationary (``lower_iid``,
  ``upper_iid``, ``lower``, ``upper``, ``block_length``);
* ``significance``: each entry against the reference model on the inits both have: the difference, its paired
  stationary-bootstrap interval, ``p_bootstrap`` and ``p_ttest`` (AR(1) effective sample size ``n_eff``).

Entries without per-init records (an evaluation made with ``--per-init-regions`` that leaves the region out, or
written before the baselines kept theirs) or with fewer than 2 shared inits get no test; :func:`compute` says so in
its notes. Below 8 inits the automatic block length is not defined: the block length is then 1 (the IID bootstrap),
with a note.

:func:`run_intervals` gives ``evaluate``'s own ``intervals.csv``: the same intervals for every per-init record of
one run (every eval, metric and region with an interval, see :func:`.statistics.aggregation`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from fcn3_lightning.eval import statistics as st
from fcn3_lightning.eval.leaderboard import MODEL_EVALS, NO_LEVEL, SCORES, Entry, baseline_name, is_baseline

if TYPE_CHECKING:
    import pandas as pd

TESTED_SCORES = ("RMSE", "CRPS")
ALPHA = 0.05
INTERVAL_COLUMNS = [
    "model",
    "score",
    "eval",
    "metric",
    "region",
    "variable",
    "level",
    "lead_time_hours",
    "n_inits",
    "value",
    "lower_iid",
    "upper_iid",
    "lower",
    "upper",
    "block_length",
]
SIGNIFICANCE_COLUMNS = [
    "model",
    "reference",
    "score",
    "region",
    "variable",
    "level",
    "lead_time_hours",
    "n_inits",
    "value",
    "reference_value",
    "difference",
    "lower",
    "upper",
    "p_bootstrap",
    "p_ttest",
    "n_eff",
    "block_length",
]


def load_per_init(run_df: pd.DataFrame) -> pd.DataFrame | None:
    """The run's ``per_init.csv`` (None if the directory has none or it is empty)."""
    import pandas as pd

    src = run_df.attrs.get("source")
    path = Path(src) / "per_init.csv" if src else None
    if path is None or not path.is_file():
        return None
    df = pd.read_csv(path, dtype={"eval": str, "variable": str, "metric": str, "region": str, "init_time": str})
    if df.empty:
        return None
    df["level"] = df["level"].astype(float).fillna(NO_LEVEL)
    df["lead_time_hours"] = df["lead_time_hours"].astype(int)
    return df


def entry_evals(entry: Entry, run_df: pd.DataFrame) -> list[str]:
    """The evals an entry's scores come from, in the priority :func:`.leaderboard.collect_entries` uses."""
    evals = list(dict.fromkeys(run_df["eval"]))
    if entry.kind == "baseline":
        base = entry.name.split(" [", 1)[0].removesuffix(" (baseline)")
        return [ev for ev in evals if is_baseline(ev) and baseline_name(ev) == base]
    return [e for e in MODEL_EVALS if e in evals] + [e for e in evals if e not in MODEL_EVALS and not is_baseline(e)]


def per_init_matrix(per_init: pd.DataFrame, evals: Sequence[str], score: str, region: str) -> tuple[pd.DataFrame, dict]:
    """Per-init values of one score of one entry: rows (variable, level, lead_time_hours), columns the inits in
    time order; and per row the (eval, metric) it came from (the first of ``SCORES[score].metrics`` x ``evals``)."""
    import pandas as pd

    reg = per_init["region"].fillna("global")
    sel = per_init[reg == region]
    out: pd.DataFrame | None = None
    source: dict = {}
    for metric in SCORES[score].metrics:
        for ev in evals:
            rows = sel[(sel["eval"] == f"{ev}_temporal") & (sel["metric"] == metric)]
            if rows.empty:
                continue
            m = rows.pivot_table(index=["variable", "level", "lead_time_hours"], columns="init_time", values="value", aggfunc="first")
            new = m.index if out is None else m.index.difference(out.index)
            source.update(dict.fromkeys(new, (ev, metric)))
            out = m if out is None else pd.concat([out, m.loc[new]])
    if out is None:
        return pd.DataFrame(), source
    return out.reindex(columns=sorted(out.columns)), source


@dataclass
class Result:
    intervals: pd.DataFrame
    significance: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def p_values(self) -> dict[tuple[str, str, str, float, int], float]:
        """(model, score, variable, level, lead) -> p_bootstrap against the reference; level ``NO_LEVEL`` for a 2-D
        variable (NaN would never match a lookup: NaN != NaN)."""
        s = self.significance
        return {
            (m, sc, v, NO_LEVEL if np.isnan(lev) else float(lev), int(h)): float(p)
            for m, sc, v, lev, h, p in zip(
                s["model"], s["score"], s["variable"], s["level"], s["lead_time_hours"], s["p_bootstrap"], strict=True
            )
        }


def _block(n: int) -> float | None:
    return None if n >= st.MIN_INITS_AUTO else 1.0


#: the interval columns after the keys, as :func:`interval_columns` gives them
STAT_COLUMNS = ("value", "lower_iid", "upper_iid", "lower", "upper", "block_length")


def interval_columns(values: np.ndarray, metrics: Sequence[str], seed: int = 0) -> dict[str, np.ndarray]:
    """The 95 % IID and stationary-bootstrap intervals of each row of ``values`` ``(R, n)`` (n >= 2 inits in time
    order; row i a score of metric ``metrics[i]``): ``n_inits`` and :data:`STAT_COLUMNS`, NaN for rows whose metric
    has no interval (a ratio, :func:`.statistics.aggregation`)."""
    r, n = values.shape
    out = {c: np.full(r, np.nan) for c in ("n_inits", *STAT_COLUMNS)}
    for how in ("mean", "rms"):
        rows = np.array([i for i, m in enumerate(metrics) if st.aggregation(m) == how], dtype=np.int64)
        if not rows.size:
            continue
        vals = values[rows]
        iid = st.bootstrap_intervals(vals, how, method="iid", seed=seed)
        blk = st.bootstrap_intervals(vals, how, method="stationary", block_length=_block(n), seed=seed)
        for col, a in zip(STAT_COLUMNS, (blk.value, iid.lower, iid.upper, blk.lower, blk.upper, blk.block_length), strict=True):
            out[col][rows] = a
        out["n_inits"][rows] = n
    return out


RUN_INTERVAL_COLUMNS = ["eval", "variable", "metric", "region", "level", "lead_time_hours", "n_inits", *STAT_COLUMNS]
_RUN_KEYS = ["eval", "metric", "region", "variable", "level", "lead_time_hours"]


def run_intervals(per_init: pd.DataFrame, seed: int = 0, chunk: int = 4096) -> tuple[pd.DataFrame, list[str]]:
    """``evaluate``'s intervals: for every score of one run with per-init records (``per_init``: the frame of
    ``per_init.csv``), its 95 % bootstrap intervals over the inits; ``eval`` without its ``_temporal``. Returns the
    frame (:data:`RUN_INTERVAL_COLUMNS`) and notes (too few inits, block length 1)."""
    import pandas as pd

    notes: list[str] = []
    empty = pd.DataFrame(columns=RUN_INTERVAL_COLUMNS)
    if per_init.empty:
        return empty, notes
    # counted before the string copies below (they cost ~10x the frame, for nothing when there is no interval to compute)
    n_inits = per_init["init_time"].nunique()
    if n_inits < st.MIN_INITS:
        notes.append(f"{n_inits} initialisation time(s): a bootstrap needs at least {st.MIN_INITS}; no intervals")
        return empty, notes
    df = per_init.loc[:, [*_RUN_KEYS, "init_time", "value"]].copy()
    for c in ("eval", "metric", "region", "variable", "init_time"):
        df[c] = df[c].astype(str)
    df["level"] = pd.to_numeric(df["level"], errors="coerce").fillna(NO_LEVEL)
    df = df[[st.aggregation(m) is not None for m in df["metric"]]]
    inits = sorted(set(df["init_time"]))
    if len(inits) < st.MIN_INITS:
        notes.append(f"{len(inits)} initialisation time(s): a bootstrap needs at least {st.MIN_INITS}; no intervals")
        return empty, notes
    if len(inits) < st.MIN_INITS_AUTO:
        notes.append(f"{len(inits)} inits (< {st.MIN_INITS_AUTO}): intervals with block length 1 (no allowance for correlated inits)")
    m = df.pivot_table(index=_RUN_KEYS, columns="init_time", values="value", aggfunc="first", dropna=False, observed=True)
    m = m.reindex(columns=inits)
    m = m[m.notna().any(axis=1)]
    frames = []
    for start in range(0, len(m), chunk):  # bounded memory: (chunk, n_boot) resampled scores at a time
        part = m.iloc[start : start + chunk]
        metrics = list(part.index.get_level_values("metric"))
        iv = interval_columns(part.to_numpy(dtype=float), metrics, seed)
        frames.append(part.index.to_frame(index=False).assign(**iv))
    out = pd.concat(frames, ignore_index=True)
    out["eval"] = out["eval"].str.removesuffix("_temporal")
    out["level"] = out["level"].where(out["level"] != NO_LEVEL, np.nan)
    out["n_inits"] = out["n_inits"].astype(int)
    return out.sort_values(_RUN_KEYS[:1] + ["variable", "metric", "region", "level", "lead_time_hours"], kind="stable")[
        RUN_INTERVAL_COLUMNS
    ].reset_index(drop=True), notes


def compute(entries: Sequence[Entry], runs: Mapping[str, pd.DataFrame], region: str, reference: str | None, seed: int = 0) -> Result:
    """Intervals of every entry with per-init records, and tests of every entry against ``reference``."""
    import pandas as pd

    notes: list[str] = []
    per_init = {run: load_per_init(df) for run, df in runs.items()}
    mats: dict[tuple[str, str], tuple[pd.DataFrame, dict]] = {}
    for e in entries:
        pi = per_init.get(e.run)
        if pi is None:
            notes.append(f"{e.name}: no per_init.csv in {runs[e.run].attrs.get('source')}: no intervals or significance")
            continue
        for score in TESTED_SCORES:
            m, src = per_init_matrix(pi, entry_evals(e, runs[e.run]), score, region)
            if not m.empty:
                mats[(e.name, score)] = (m, src)
        if not any((e.name, s) in mats for s in TESTED_SCORES):
            notes.append(f"{e.name}: no per-init {'/'.join(TESTED_SCORES)} records in region {region!r}: no intervals or significance")
    rows = []
    for (name, score), (m, src) in mats.items():
        n = m.shape[1]
        if n < st.MIN_INITS:
            notes.append(f"{name}: {n} initialisation time(s): a bootstrap needs at least {st.MIN_INITS}; no {score} intervals")
            continue
        if n < st.MIN_INITS_AUTO:
            notes.append(f"{name}: {n} inits (< {st.MIN_INITS_AUTO}): block length 1 (no allowance for correlated inits)")
        keys = list(m.index)
        iv = interval_columns(m.to_numpy(dtype=float), [src[k][1] for k in keys], seed)
        for i, (var, lev, lead) in enumerate(keys):
            if np.isnan(iv["n_inits"][i]):
                continue
            ev, metric = src[(var, lev, lead)]
            rows.append([name, score, ev, metric, region, var, lev, lead, n, *(iv[c][i] for c in STAT_COLUMNS)])
    intervals = pd.DataFrame(rows, columns=INTERVAL_COLUMNS)
    sig_rows = []
    if reference is not None:
        for e in entries:
            if e.name == reference:
                continue
            for score in TESTED_SCORES:
                if (e.name, score) not in mats or (reference, score) not in mats:
                    continue
                (ma, sa), (mb, _) = mats[(e.name, score)], mats[(reference, score)]
                keys = ma.index.intersection(mb.index)
                inits = ma.columns.intersection(mb.columns)
                if len(inits) < st.MIN_INITS:
                    notes.append(
                        f"{e.name} vs {reference}: {len(inits)} shared initialisation time(s) for {score}: "
                        f"a paired test needs at least {st.MIN_INITS}; no significance"
                    )
                    continue
                if len(inits) < ma.shape[1] or len(inits) < mb.shape[1]:
                    notes.append(f"{e.name} vs {reference}: tested on the {len(inits)} inits both have ({ma.shape[1]} and {mb.shape[1]})")
                for how in ("mean", "rms"):
                    ks = [k for k in keys if st.aggregation(sa[k][1]) == how]
                    if not ks:
                        continue
                    a = ma.loc[ks, inits].to_numpy(dtype=float)
                    b = mb.loc[ks, inits].to_numpy(dtype=float)
                    res = st.paired_test(a, b, how, block_length=_block(len(inits)), seed=seed)
                    va, vb = st.point_estimate(a, how), st.point_estimate(b, how)
                    for i, (var, lev, lead) in enumerate(ks):
                        sig_rows.append(
                            [e.name, reference, score, region, var, lev, lead, len(inits), va[i], vb[i], res.difference[i],
                             res.lower[i], res.upper[i], res.p_bootstrap[i], res.p_ttest[i], res.n_eff[i], res.block_length[i]]
                        )  # fmt: skip
    significance = pd.DataFrame(sig_rows, columns=SIGNIFICANCE_COLUMNS)
    for frame in (intervals, significance):
        frame["level"] = frame["level"].where(frame["level"] != NO_LEVEL, np.nan)
    return Result(intervals, significance, notes)


def write(result: Result, out_dir: str | Path) -> list[Path]:
    """``intervals.csv``, ``significance.csv`` and ``significance.nc`` (atomically) into ``out_dir``."""
    import xarray as xr
    from fcn3_lightning.eval.results import write_csv

    from fcn3_lightning.io import atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, frame, cols in (
        ("intervals.csv", result.intervals, INTERVAL_COLUMNS),
        ("significance.csv", result.significance, SIGNIFICANCE_COLUMNS),
    ):
        with atomic_path(out_dir / name) as tmp:
            write_csv(frame, cols, tmp)
        paths.append(out_dir / name)
    sig = result.significance.copy()
    sig["level"] = sig["level"].fillna(-1.0)
    ds = xr.Dataset.from_dataframe(
        sig.set_index(["model", "score", "variable", "level", "lead_time_hours"]).drop(columns=["reference", "region"])
    )
    ds.attrs.update(
        reference=str(result.significance["reference"].iloc[0]) if len(sig) else "",
        region=str(result.significance["region"].iloc[0]) if len(sig) else "",
        level_note="level -1: a 2-D variable",
        method="paired stationary bootstrap (95 % interval, p_bootstrap) and AR(1) n_eff t-test (p_ttest); fcn3_lightning.eval.statistics",
    )
    with atomic_path(out_dir / "significance.nc") as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")
    paths.append(out_dir / "significance.nc")
    return paths
