"""Scoring the blocks: the metric objects of each (channel group, lead range) and their updates.

Each block becomes one ``(batch, [member], lead, channel, lat, lon)`` tensor per data source, fed to the metric
classes of :mod:`fcn3_lightning.metrics` (one set per channel group and lead range; their states are additive over
inits). Evals (names as WB2's results): a deterministic forecast gets ``deterministic``; an ensemble gets
``ensemble_mean_deterministic`` (the member mean, taken in the data's dtype as WB2 does), ``probabilistic``,
``ensemble_experimental`` and the rank histogram; both get the baselines (:mod:`.baselines`) and zonal energy
spectra of the forecast and of the truth (each distinct valid time once). Deterministic scores: mse, rmse,
rmse_sqrt_before_time_avg, bias, mae, acc and WeatherBench-X's prediction_activity (climatology at the valid time),
seeps_24hr (total_precipitation_24hr, :mod:`.seeps`), and mse/rmse/rmse_sqrt_before_time_avg of the wind vectors
(:mod:`.derived`).

Speed: the pointwise work of the metric classes' updates is fused into one kernel per block (:mod:`.fast`,
compiled with ``torch.compile`` for large data), in float32 by default (WB2 computes in the data's float32; the
fixture's tolerances hold), while the metric states, i.e. the sums over initialisations, stay float64.

NaN: by default a non-finite score makes :func:`.load.raise_nonfinite` search the block and raise. With ``skipna``,
a grid point where the truth or the forecast (any member) is not finite is dropped from that field's spatial means
(per eval: the pair scored), the region's area weights renormalised over the remaining points (WB2's NaN-skipping
spatial average); a field without any valid point in a region gives NaN there for that init, and a NaN per-init
value makes the time mean NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr
from fcn3_lightning.eval.baselines import BASELINE_EVALS
from fcn3_lightning.eval.blocks import Block, Group
from fcn3_lightning.eval.climatology import ZarrClimatology
from fcn3_lightning.eval.derived import WindVectorScores
from fcn3_lightning.eval.fast import (
    MAX_NETWORK_MEMBERS,
    FusedUpdates,
    crps_spread_weights,
    deterministic_kernel,
    ensemble_kernel,
    sorting_network,
)
from fcn3_lightning.eval.load import Loaded, raise_nonfinite
from fcn3_lightning.eval.plan import Plan, iso
from fcn3_lightning.eval.seeps import SEEPS
from torch import Tensor

from fcn3_lightning.metrics import (
    ACC,
    CRPS,
    DeterministicScores,
    EnergyScore,
    PredictionActivity,
    RankHistogram,
    SpreadSkill,
    ZonalEnergySpectrum,
)
from fcn3_lightning.metrics.base import GriddedMetric
from fcn3_lightning.metrics.regions import RegionWeights
from fcn3_lightning.metrics.suite import CRPS_SCORES, ENERGY_SCORES, SPREAD_SKILL_SCORES

DET_KEYS = ("mse", "rmse", "rmse_sqrt_before_time_avg", "bias", "mae")
WIND_KEYS = ("mse", "rmse", "rmse_sqrt_before_time_avg")
CRPS_KEYS = CRPS_SCORES
PROB_SS_KEYS = SPREAD_SKILL_SCORES
ENERGY_KEYS = ENERGY_SCORES
EXP_SS_KEYS = ("ensemble_mean_rmse_sqrt_before_time_avg", "ensemble_stddev_sqrt_before_time_avg", "spread_skill_ratio_sqrt_before_time_avg")
#: evals whose per-initialisation values go to per_init.csv (as ``{eval}_temporal``): the model's, and the baselines'
#: (WB2 keeps none for them; the leaderboard's paired tests and intervals need them for every entry)
TEMPORAL_EVALS = ("deterministic", "ensemble_mean_deterministic", "probabilistic", *BASELINE_EVALS.values())


@dataclass
class Part:
    """A metric object and the output rows it gives one eval."""

    eval: str
    metric: GriddedMetric
    keys: tuple[str, ...]
    labels: list[str]
    temporal: bool = False


def take(x: Tensor, positions: Sequence[int], dim: int = -3) -> Tensor:
    """``x`` at channel ``positions``: a view when they are consecutive (index_select copies slowly on 5-D tensors)."""
    pos = list(positions)
    if pos == list(range(pos[0], pos[0] + len(pos))):
        return x.narrow(dim, pos[0], len(pos))
    return x.index_select(dim, torch.as_tensor(pos, device=x.device))


def compile_jobs(plan: Plan) -> list[tuple[str, Any, tuple[Any, ...]]]:
    """The kernel variants this run calls, on small example inputs (for the background compilation)."""
    if plan.opt.skipna:
        return []

    def dtype_of(ds: xr.Dataset) -> torch.dtype:
        names = [v for v in dict.fromkeys(c.variable for c in plan.channels) if v in ds.data_vars]
        return torch.from_numpy(np.zeros(0, dtype=np.result_type(*[ds[v].dtype for v in names] or [np.float32]))).dtype

    fc, obs = dtype_of(plan.fc), dtype_of(plan.obs)
    clim = dtype_of(plan.clim.ds) if isinstance(plan.clim, ZarrClimatology) else obs
    n, w = 64, plan.work_dtype

    def ens(m: int, x: torch.dtype, rank: bool) -> tuple[str, Any, tuple[Any, ...]]:
        pairs = sorting_network(m) if m <= MAX_NETWORK_MEMBERS else []
        return (
            "ensemble",
            ensemble_kernel,
            (torch.ones(m, n, dtype=x), torch.ones(n, dtype=obs), w, pairs, crps_spread_weights(m), rank),
        )

    def det(f: torch.dtype, c: torch.dtype | None) -> tuple[str, Any, tuple[Any, ...]]:
        return (
            "deterministic",
            deterministic_kernel,
            (torch.ones(n, dtype=f), torch.ones(n, dtype=obs), None if c is None else torch.ones(n, dtype=c), w),
        )

    jobs = [ens(plan.members, fc, True)] if plan.ensemble else []
    jobs.append(det(fc, clim))
    if "persistence" in plan.baselines:
        jobs.append(det(obs, clim))
    if "climatology" in plan.baselines:
        jobs.append(det(clim, None))
    if plan.pclim is not None:
        jobs.append(ens(len(plan.pclim.years), obs, False))
    return jobs


def compile_mode(plan: Plan) -> str:
    """auto: compile only when the data are large enough for the one-off compilation (~15 s cold) to pay off."""
    if plan.opt.compile != "auto":
        return plan.opt.compile
    points = len(plan.inits) * len(plan.leads) * len(plan.channels) * plan.lat.size * plan.lon.size
    return "auto" if points * plan.members >= 3e8 else "off"


class Scorer:
    """The metric objects of a run and their updates; also collects the per-initialisation values."""

    def __init__(self, plan: Plan, fused: FusedUpdates) -> None:
        self.plan = plan
        self.opt = plan.opt
        self.fused = fused
        self.per_init: list[tuple] = []  # (eval, metric, labels, leads, inits, regions, (B, R, L, C) values)
        self.region_weights = RegionWeights()  # computed once, shared by all metric objects
        # the truth's spectra: over the distinct valid times, whatever their lead
        self.obs_spectra = {
            g.index: self._make(ZonalEnergySpectrum, [g.labels[i] for i in g.spectra], [0.0], regions=["global"], dtype=torch.float64)
            for g in plan.groups
            if g.spectra
        }

    def _make(
        self,
        cls: type[GriddedMetric],
        labels: Sequence[str],
        lead_hours: Sequence[float],
        *,
        record: bool = False,
        regions: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        **kw: Any,
    ) -> GriddedMetric:
        regions = list(regions) if regions is not None else self.plan.regions
        m = cls(
            self.plan.lat,
            self.plan.lon,
            list(labels),
            list(lead_hours),
            regions=regions,
            land_sea_mask=self.plan.lsm,
            dtype=dtype or self.plan.compute_dtype,
            skipna=self.opt.skipna,
            record_regions=self.plan.record_regions if record else None,
            weights_cache=self.region_weights,
            **kw,
        )
        return m.to(self.plan.device)

    def metric_set(self, b: Block) -> dict[str, Any]:
        """A new set of metric objects for the channel group and lead range of ``b``."""
        g = self.plan.groups[b.group]
        leads = [self.plan.lead_hours[i] for i in b.leads]
        labels = g.labels
        vec_labels = [v.label for v, _, _ in g.vectors]
        seeps_labels = [labels[i] for i in g.seeps]
        parts: list[Part] = []
        det: dict[str, dict[str, Part | None]] = {}

        def det_eval(name: str, acc: bool, seeps: bool, temporal: bool) -> None:
            d: dict[str, Part | None] = {
                "scores": Part(name, self._make(DeterministicScores, labels, leads, record=temporal), DET_KEYS, labels, temporal)
            }
            d["acc"] = Part(name, self._make(ACC, labels, leads, record=temporal), ("acc",), labels, temporal) if acc else None
            d["activity"] = (
                Part(name, self._make(PredictionActivity, labels, leads, record=temporal), ("prediction_activity",), labels, temporal)
                if acc
                else None
            )
            d["seeps"] = (
                Part(
                    name, self._make(SEEPS, seeps_labels, leads, record=temporal, p1=self.plan.p1), ("seeps_24hr",), seeps_labels, temporal
                )
                if seeps and g.seeps
                else None
            )
            d["wind"] = (
                Part(name, self._make(WindVectorScores, vec_labels, leads, record=temporal), WIND_KEYS, vec_labels, temporal)
                if g.vectors
                else None
            )
            det[name] = d
            parts.extend(p for p in d.values() if p is not None)

        ens: dict[str, Any] = {}
        if self.plan.ensemble:
            det_eval("ensemble_mean_deterministic", True, True, "ensemble_mean_deterministic" in TEMPORAL_EVALS)
            t = "probabilistic" in TEMPORAL_EVALS
            crps = self._make(CRPS, labels, leads, record=t)
            ss = self._make(SpreadSkill, labels, leads, record=t)
            es = self._make(EnergyScore, labels, leads)
            ens = {"crps": crps, "ss": ss, "es": es}
            parts += [
                Part("probabilistic", crps, CRPS_KEYS, labels, t),
                Part("probabilistic", ss, PROB_SS_KEYS, labels, t),
                Part("ensemble_experimental", es, ENERGY_KEYS, labels),
                Part("ensemble_experimental", ss, EXP_SS_KEYS, labels),
            ]
            ens["rank"] = self._make(RankHistogram, labels, leads, regions=["global"], n_members=self.plan.members, seed=self.opt.seed)
        else:
            det_eval("deterministic", True, True, "deterministic" in TEMPORAL_EVALS)
        if "persistence" in self.plan.baselines:
            name = BASELINE_EVALS["persistence"]
            det_eval(name, True, True, name in TEMPORAL_EVALS)
        if "climatology" in self.plan.baselines:
            name = BASELINE_EVALS["climatology"]
            det_eval(name, False, False, name in TEMPORAL_EVALS)
        pclim: dict[str, GriddedMetric] = {}
        if self.plan.pclim is not None:
            name = BASELINE_EVALS["probabilistic_climatology"]
            t = name in TEMPORAL_EVALS
            pclim = {"crps": self._make(CRPS, labels, leads, record=t), "ss": self._make(SpreadSkill, labels, leads, record=t)}
            parts += [Part(name, pclim["crps"], CRPS_KEYS, labels, t), Part(name, pclim["ss"], PROB_SS_KEYS, labels, t)]
        spec = None
        if g.spectra:
            sp_labels = [labels[i] for i in g.spectra]
            spec = self._make(ZonalEnergySpectrum, sp_labels, leads, regions=["global"], dtype=torch.float64, ensemble=self.plan.ensemble)
        return {"parts": parts, "det": det, "ens": ens, "pclim": pclim, "spec": spec, "group": g, "leads": leads}

    def _mask(self, pred: Tensor, target: Tensor, ensemble: bool = False) -> tuple[Tensor, Tensor]:
        """skipna: NaN in both where either is not finite (so every spatial mean of the pair drops the same points)."""
        cd = self.plan.compute_dtype
        pred, target = pred.to(cd), target.to(cd)
        bad = ~torch.isfinite(target)
        bad |= ~torch.isfinite(pred).all(1) if ensemble else ~torch.isfinite(pred)
        if not bool(bad.any()):
            return pred, target
        nan = float("nan")
        return pred.masked_fill(bad.unsqueeze(1) if ensemble else bad, nan), target.masked_fill(bad, nan)

    def _det_update(
        self, ms: dict[str, Any], name: str, pred: Tensor, obs: Tensor, clim: Tensor | None, thr: Tensor | None, blk: Loaded
    ) -> None:
        """The deterministic scores of one eval; inputs in the data's dtype, (B, L, C, H, W)."""
        d = ms["det"][name]
        g: Group = ms["group"]
        acc = d["acc"].metric if d["acc"] is not None else None
        activity = d["activity"].metric if d["activity"] is not None else None
        if self.opt.skipna:
            f, o = self._mask(pred, obs)
            d["scores"].metric.update(f, o)
            if acc is not None:
                acc.update(f, o, clim)
            if activity is not None:
                activity.update(f, clim)
        else:
            f, o = pred, obs
            if not self.fused.deterministic(pred, obs, d["scores"].metric, acc, clim, activity):
                raise_nonfinite(self.plan, blk)
        if d["seeps"] is not None:
            # categories in the data's dtype, as WB2 compares them; SEEPS skips NaN points itself
            d["seeps"].metric.update(take(pred, g.seeps), take(obs, g.seeps), thr)
        if d["wind"] is not None:
            u, v = [x for _, x, _ in g.vectors], [x for _, _, x in g.vectors]
            if self.opt.skipna:
                d["wind"].metric.update(take(f, u), take(f, v), take(o, u), take(o, v))
            else:
                self.fused.wind_vector(d["wind"].metric, take(f, u), take(f, v), take(o, u), take(o, v))

    def _ens_update(self, metrics: dict[str, GriddedMetric], x: Tensor, o: Tensor, blk: Loaded) -> Tensor:
        """The ensemble scores; returns the member mean in the data's dtype (WB2's ensemble mean)."""
        if self.opt.skipna:
            xm, om = self._mask(x, o, ensemble=True)
            for m in metrics.values():
                m.update(xm, om)
            return x.mean(1)
        ok, mean = self.fused.ensemble(x, o, metrics.get("crps"), metrics.get("ss"), metrics.get("es"), metrics.get("rank"))  # type: ignore[arg-type]
        if not ok:
            raise_nonfinite(self.plan, blk)
        return mean

    def score(self, ms: dict[str, Any], blk: Loaded) -> None:
        """Update the metric set ``ms`` with block ``blk`` and record its per-initialisation values."""
        dev = self.plan.device
        fc = torch.from_numpy(blk.fc).to(dev)
        obs = torch.from_numpy(blk.obs).to(dev)
        clim = torch.from_numpy(blk.clim).to(dev) if blk.clim is not None else None
        thr = torch.from_numpy(blk.thr).to(dev) if blk.thr is not None else None
        if self.plan.ensemble:
            mean = self._ens_update(ms["ens"], fc, obs, blk)
            self._det_update(ms, "ensemble_mean_deterministic", mean, obs, clim, thr, blk)
            del mean
        else:
            self._det_update(ms, "deterministic", fc, obs, clim, thr, blk)
        if blk.pers is not None:
            pers = torch.from_numpy(blk.pers).to(dev).unsqueeze(1).expand(*obs.shape).contiguous()
            self._det_update(ms, BASELINE_EVALS["persistence"], pers, obs, clim, thr, blk)
        if "climatology" in self.plan.baselines and clim is not None:
            self._det_update(ms, BASELINE_EVALS["climatology"], clim, obs, None, None, blk)
        if blk.pclim is not None:
            self._ens_update(ms["pclim"], torch.from_numpy(blk.pclim).to(dev), obs, blk)
        g: Group = ms["group"]
        if ms["spec"] is not None:
            ms["spec"].update(take(fc, g.spectra))
        if blk.obs_spec is not None:
            self.obs_spectra[g.index].update(torch.from_numpy(np.ascontiguousarray(blk.obs_spec)).to(dev))
        self._record(ms, blk.block)

    def _record(self, ms: dict[str, Any], b: Block) -> None:
        if not self.plan.record_regions:
            return
        inits = [iso(self.plan.inits[i]) for i in b.inits]
        for p in ms["parts"]:
            if not p.temporal:
                continue
            values = p.metric.per_forecast()
            for key in p.keys:
                a = values[key].detach().cpu().double().numpy()  # (B, R, L, C)
                self.per_init.append((f"{p.eval}_temporal", key, p.labels, ms["leads"], inits, self.plan.record_regions, a))
