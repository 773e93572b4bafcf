"""The results of a run as long-form frames, and its meta data: what the writers of :mod:`.results` write.

The metric objects' states become frames with one row per value (eval, variable, metric, region, level, lead
time, ...), string columns categorical (built from integer codes, vectorised) and rows sorted by the names.
"""

from __future__ import annotations

import platform
import resource
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from fcn3_lightning.eval import significance
from fcn3_lightning.eval.baselines import BASELINE_EVALS
from fcn3_lightning.eval.plan import Plan, iso, warn
from fcn3_lightning.eval.results import (
    PER_INIT_COLUMNS,
    RANK_COLUMNS,
    SCORE_COLUMNS,
    SPECTRA_COLUMNS,
    eval_dataset,
    write_csv,
    write_netcdf,
)
from torch import Tensor

from fcn3_lightning.metrics import ZonalEnergySpectrum


def collect(
    plan: Plan, sets: dict[tuple[int, int], dict[str, Any]], obs_spectra: dict[int, ZonalEnergySpectrum], records: list[tuple]
) -> dict[str, pd.DataFrame]:
    """Long-form frames of every result; string columns categorical, level NaN for 2-D variables.

    ``sets``: the metric sets of :class:`.score.Scorer`; ``records``: its per-initialisation values.
    """
    labels = [c.label for c in plan.channels] + [v.label for v in plan.vectors]
    cats = _Categories(labels, plan.regions)
    scores, ranks, spectra, per_init = [], [], [], []
    for ms in sets.values():
        leads = np.asarray(ms["leads"], dtype=np.float64)
        for p in ms["parts"]:
            values = p.metric.compute()
            for key in p.keys:
                scores.append(cats.grid(p.eval, key, values[key], leads, p.labels))
        if ms["ens"]:
            for key, v in ms["ens"]["rank"].compute().items():
                ranks.append(cats.rank(key, v[0], leads, ms["group"].labels))
        if ms["spec"] is not None:
            spectra.append(cats.spectrum(plan.name, ms["spec"]))
    for spec in obs_spectra.values():
        spectra.append(cats.spectrum("obs", spec, lead=np.nan))
    for ev, key, labs, leads, inits, regions, a in records:
        per_init.append(cats.per_init(ev, key, a, np.asarray(leads, dtype=np.float64), labs, inits, regions))
    frames = {
        "scores": cats.frame(scores, ["eval", "variable", "metric", "region", "level", "lead_time_hours"]),
        "per_init": cats.frame(per_init, ["eval", "variable", "metric", "region", "level", "lead_time_hours", "init_time"]),
        "rank_histogram": cats.frame(ranks, ["eval", "variable", "metric", "level", "lead_time_hours", "bin"]),
        "spectra": cats.frame(spectra, ["eval", "dataset", "variable", "level", "lead_time_hours", "latitude", "zonal_wavenumber"]),
    }
    if "persistence" in plan.baselines:  # persistence's CRPS: that of a one-member ensemble, its MAE (per init too)
        for frame, ev in (("scores", BASELINE_EVALS["persistence"]), ("per_init", f"{BASELINE_EVALS['persistence']}_temporal")):
            frames[frame] = _mae_as_crps(frames[frame], ev)
    # the scores' bootstrap intervals over the inits, from the per-init records (one home: .significance)
    frames["intervals"], notes = significance.run_intervals(frames["per_init"], seed=plan.opt.seed)
    for note in notes:
        warn(f"intervals: {note}", plan.notes)
    return frames


def _mae_as_crps(df: pd.DataFrame, eval_name: str) -> pd.DataFrame:
    """``df`` plus a copy of ``eval_name``'s mae rows named crps."""
    if df.empty:
        return df
    mae = df[(df["eval"] == eval_name) & (df["metric"] == "mae")].copy()
    if mae.empty:
        return df
    cats = df["metric"].cat.categories
    if "crps" not in cats:
        df["metric"] = df["metric"].cat.add_categories(["crps"])
        cats = df["metric"].cat.categories
    mae["metric"] = pd.Categorical(["crps"] * len(mae), categories=cats)
    return pd.concat([df, mae], ignore_index=True)


def evals(plan: Plan) -> list[str]:
    """The evals scored (the names of WB2's results), baselines last."""
    names = ["ensemble_mean_deterministic", "probabilistic", "ensemble_experimental"] if plan.ensemble else ["deterministic"]
    return names + [BASELINE_EVALS[b] for b in plan.baselines]


def meta(plan: Plan, frames: dict[str, pd.DataFrame], timing: dict[str, float]) -> dict[str, Any]:
    """meta.json: what was scored, from what, how, with which warnings, and how long it took."""
    import torchmetrics

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "name": plan.name,
        "forecast": plan.paths["forecast"],
        "obs": plan.paths["obs"],
        "climatology": plan.clim_desc,
        "climatology_years": plan.clim_years,  # None: a climatology Zarr was given (--climatology)
        "forecast_kind": "ensemble" if plan.ensemble else "deterministic",
        "members": plan.members,
        "inits": [iso(t) for t in plan.inits],
        "lead_hours": plan.lead_hours,
        "variables": list(dict.fromkeys(c.variable for c in plan.channels)),
        "channels": [c.label for c in plan.channels],
        "wind_vectors": [v.label for v in plan.vectors],
        "regions": plan.regions,
        "evals": evals(plan),
        "per_init_evals": sorted(set(frames["per_init"]["eval"])),
        "baselines": plan.baselines,
        "baselines_skipped": plan.skipped,
        "probabilistic_climatology_years": plan.pclim.years if plan.pclim else [],
        "seeps": bool(plan.seeps_on),
        "spectra": sorted({g.labels[i] for g in plan.groups for i in g.spectra}),
        "options": {k: v for k, v in asdict(plan.opt).items() if k != "name"},
        "warnings": plan.notes,
        "rows": {k: len(v) for k, v in frames.items()},
        "blocks": len(plan.blocks),
        "groups": [g.labels for g in plan.groups],
        "timing": {**timing, "peak_rss_mb": rss_kb / 1024},
        "created": pd.Timestamp.now(tz="UTC").isoformat(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchmetrics": torchmetrics.__version__,
            "xarray": xr.__version__,
            "numpy": np.__version__,
        },
    }


def writers(plan: Plan, frames: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """The output files (name -> function writing it to a path), for :func:`.results.commit`."""
    out: dict[str, Any] = {
        "scores.csv": lambda p: write_csv(frames["scores"], SCORE_COLUMNS, p),
        "per_init.csv": lambda p: write_csv(frames["per_init"], PER_INIT_COLUMNS, p),
        "spectra.csv": lambda p: write_csv(frames["spectra"], SPECTRA_COLUMNS, p),
    }
    if plan.ensemble:
        out["rank_histogram.csv"] = lambda p: write_csv(frames["rank_histogram"], RANK_COLUMNS, p)
    intervals = frames.get("intervals")
    if intervals is not None and len(intervals):
        out["intervals.csv"] = lambda p: write_csv(intervals, significance.RUN_INTERVAL_COLUMNS, p)
    attrs = {"model": plan.name, "forecast": plan.paths["forecast"], "obs": plan.paths["obs"], "climatology": plan.clim_desc}
    scores = frames["scores"]
    for ev in evals(plan):
        df = scores[scores["eval"] == ev]
        if len(df):
            out[f"{ev}.nc"] = lambda p, df=df, ev=ev: write_netcdf(_with_intervals(eval_dataset(df, ev, attrs), df, intervals, ev), p)
    return out


def _with_intervals(ds: xr.Dataset, df: pd.DataFrame, intervals: pd.DataFrame | None, ev: str) -> xr.Dataset:
    """``ds`` (an eval's netCDF) plus ``{variable}_lower`` / ``{variable}_upper``: the stationary-bootstrap 95 %
    interval of each score, NaN where it has none (no per-init records, a ratio, fewer than 2 inits)."""
    if intervals is None or not (intervals["eval"] == ev).any():
        return ds
    keys = ["variable", "metric", "region", "level", "lead_time_hours"]
    iv = intervals.loc[intervals["eval"] == ev, [*keys, "lower", "upper"]]
    left = df.assign(**{k: df[k].astype(str) for k in ("variable", "metric", "region")})
    iv = iv.assign(**{k: iv[k].astype(str) for k in ("variable", "metric", "region")})
    for frame in (left, iv):
        frame["level"] = pd.to_numeric(frame["level"], errors="coerce").fillna(-1.0)
        frame["lead_time_hours"] = frame["lead_time_hours"].astype(np.float64)
    both = left.merge(iv, on=keys, how="left", validate="many_to_one")
    for bound in ("lower", "upper"):
        # the same rows as ds's: the same coordinates
        b = eval_dataset(df.assign(value=both[bound].to_numpy()), ev, {})
        ds = ds.assign({f"{v}_{bound}": b[v] for v in b.data_vars})
    ds.attrs["intervals"] = "{variable}_lower/_upper: 95 % stationary-bootstrap interval over inits (intervals.csv: also IID, block length)"
    return ds


class _Categories:
    """Builds the output frames from result arrays: categorical codes for the strings, vectorised."""

    def __init__(self, labels: list[str], regions: list[str]) -> None:
        self.labels = labels
        self.label_index = {lab: i for i, lab in enumerate(labels)}
        self.regions = regions
        self.pieces_meta: dict[str, list[str]] = {"eval": [], "metric": [], "dataset": [], "init_time": []}
        self._codes: dict[str, dict[str, int]] = {k: {} for k in self.pieces_meta}

    def _code(self, col: str, value: str) -> int:
        codes = self._codes[col]
        if value not in codes:
            codes[value] = len(codes)
            self.pieces_meta[col].append(value)
        return codes[value]

    def _labels(self, labs: Sequence[str]) -> np.ndarray:
        return np.array([self.label_index[x] for x in labs], dtype=np.int64)

    def grid(self, eval_name: str, metric: str, value: Tensor, leads: np.ndarray, labs: Sequence[str]) -> dict[str, Any]:
        a = value.detach().cpu().double().numpy()  # (R, L, C)
        r, lead, c = (x.ravel() for x in np.meshgrid(np.arange(a.shape[0]), np.arange(a.shape[1]), np.arange(a.shape[2]), indexing="ij"))
        return {
            "eval": self._code("eval", eval_name),
            "metric": self._code("metric", metric),
            "region": r,
            "lead_time_hours": leads[lead],
            "label": self._labels(labs)[c],
            "value": a.ravel(),
        }

    def rank(self, metric: str, value: Tensor, leads: np.ndarray, labs: Sequence[str]) -> dict[str, Any]:
        a = value.detach().cpu().double().numpy()  # (L, C, K)
        lead, c, k = (x.ravel() for x in np.meshgrid(np.arange(a.shape[0]), np.arange(a.shape[1]), np.arange(a.shape[2]), indexing="ij"))
        return {
            "eval": self._code("eval", "rank_histogram"),
            "metric": self._code("metric", metric),
            "lead_time_hours": leads[lead],
            "label": self._labels(labs)[c],
            "bin": k,
            "value": a.ravel(),
        }

    def spectrum(self, dataset: str, metric: ZonalEnergySpectrum, lead: float | None = None) -> dict[str, Any]:
        a = metric.compute()["zonal_energy_spectrum"].detach().cpu().double().numpy()  # (L, C, lat, K)
        lead_i, c, y, k = (x.ravel() for x in np.meshgrid(*(np.arange(n) for n in a.shape), indexing="ij"))
        leads = np.asarray(metric.lead_hours, dtype=np.float64)[lead_i] if lead is None else np.full(lead_i.size, lead)
        return {
            "eval": self._code("eval", "zonal_energy_spectrum"),
            "dataset": self._code("dataset", dataset),
            "lead_time_hours": leads,
            "label": self._labels(metric.channels)[c],
            "latitude": metric.lat[y],
            "zonal_wavenumber": k,
            "value": a.ravel(),
        }

    def per_init(
        self,
        eval_name: str,
        metric: str,
        a: np.ndarray,
        leads: np.ndarray,
        labs: Sequence[str],
        inits: Sequence[str],
        regions: Sequence[int],
    ) -> dict[str, Any]:
        """Rows of ``a`` ``(init, region, lead, channel)``; ``regions``: indices into the run's regions."""
        b, r, lead, c = (x.ravel() for x in np.meshgrid(*(np.arange(n) for n in a.shape), indexing="ij"))
        init_codes = np.array([self._code("init_time", t) for t in inits], dtype=np.int64)
        return {
            "eval": self._code("eval", eval_name),
            "metric": self._code("metric", metric),
            "region": np.asarray(regions, dtype=np.int64)[r],
            "lead_time_hours": leads[lead],
            "label": self._labels(labs)[c],
            "init_time": init_codes[b],
            "value": a.ravel(),
        }

    def frame(self, pieces: list[dict[str, Any]], order: list[str]) -> pd.DataFrame:
        """Concatenate pieces (the list is emptied as it is read); map labels to variable and level; sort by ``order``.

        Lean in memory (scoring while forecasting holds every lead time's results only here): each column is filled
        in place (scalars broadcast, integer codes int32), the pieces are dropped once copied, and the rows are sorted
        by one mixed-radix int64 key of the columns' ranks (the order ``np.lexsort`` of the columns gives, stable), not
        by a full-size key array per column.
        """
        if not pieces:
            return pd.DataFrame(columns=[*order, "value"])
        n = sum(p["value"].size for p in pieces)
        data: dict[str, np.ndarray] = {}
        for k in pieces[0]:
            dtype = np.result_type(*[np.asarray(p[k]).dtype for p in pieces])
            col = np.empty(n, dtype=np.int32 if np.issubdtype(dtype, np.integer) else dtype)
            pos = 0
            for p in pieces:
                m = p["value"].size
                col[pos : pos + m] = p[k]
                pos += m
            data[k] = col
        pieces.clear()
        var_names = sorted({lab.split("/")[0] for lab in self.labels})
        var_of = np.array([var_names.index(lab.split("/")[0]) for lab in self.labels], dtype=np.int32)
        lev_of = np.array([float(lab.split("/")[1]) if "/" in lab else np.nan for lab in self.labels])
        label = data.pop("label")
        out: dict[str, Any] = {}
        key = np.zeros(n, dtype=np.int64)
        radix = 1
        ranks: list[np.ndarray] = []  # kept only when the combined key would overflow
        for col in order:
            if col == "variable":
                codes, cats = var_of[label], var_names
            elif col == "region":
                codes, cats = data.pop("region"), self.regions
            elif col in self.pieces_meta:
                codes, cats = data.pop(col), self.pieces_meta[col]
            elif col == "level":
                codes, cats = lev_of[label], None
            else:
                codes, cats = data.pop(col), None
            if cats is not None:
                # sort by the names, not by first appearance
                rank = np.argsort(np.argsort(np.asarray(cats, dtype=object)))[codes]
                size = len(cats)
                out[col] = pd.Categorical.from_codes(codes, categories=list(cats))
            else:
                _, rank = np.unique(np.nan_to_num(np.asarray(codes, dtype=np.float64), nan=-1.0), return_inverse=True)
                size = int(rank.max()) + 1
                out[col] = codes
            if ranks or radix * size >= 2**62:
                ranks.append(rank)
            else:
                key *= size
                key += rank
                radix *= size
            del rank
        out["value"] = data.pop("value")
        idx = np.lexsort([*ranks[::-1], key]) if ranks else np.argsort(key, kind="stable")
        del key, ranks
        cols = {}
        for k in list(out):
            v = out.pop(k)
            cols[k] = v.take(idx) if isinstance(v, pd.Categorical) else np.asarray(v)[idx]
        return pd.DataFrame(cols)
