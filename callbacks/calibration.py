"""Ensemble calibration: the spread-skill ratio against lead time, and rank histograms.

Both are accumulated over every forecast of the validation run with the WeatherBench2 metrics of
:mod:`fcn3_lightning.metrics.ensemble` (area-weighted, summed over the tiles under the spatial-parallel strategy),
in physical units. A calibrated ensemble has a flat rank histogram and a Fortin-corrected spread-skill ratio near 1.

Which ratio is shown: for an ensemble of M members drawn from the same distribution as the truth, the ensemble-mean
error has variance (1 + 1/M) sigma^2 and the members' variance is sigma^2, so WeatherBench2's plain ratio
``spread_skill_ratio`` = spread / RMSE of the mean is sqrt(M / (M + 1)) when calibrated (0.89 for 4 members, 0.82
for 2). The plots and the console show ``spread_skill_ratio_fortin_corrected`` = that x sqrt((M + 1) / M) (Fortin
et al. 2014), which is 1 when calibrated whatever M; ``last`` keeps both.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
from fcn3_lightning.callbacks.forecast import (
    ForecastGrid,
    ValidationPlots,
    forecast_grid,
    forecast_outputs,
    physical,
    pick_channels,
    pick_leads,
)
from fcn3_lightning.callbacks.plotting import ArtifactSink, artifact_sink, lead_text, new_figure

from fcn3_lightning.metrics.ensemble import RankHistogram, SpreadSkill


class Calibration(ValidationPlots):
    """Spread-skill ratio vs lead time (``calibration/spread_skill_step<step>.png``: the Fortin-corrected ratio per
    channel, 1 = calibrated; and the ensemble-mean RMSE with the spread in the channel's units) and rank histograms
    (``calibration/rank_histogram_step<step>.png``: channels x lead times; frequency x (M + 1), so flat = 1).

    Args:
        channels: channels to analyse (default: the module's ``log_channels``).
        histogram_lead_hours: lead times of the rank histograms (default: the first and the last).
        every_n_validations: on every n-th validation run (0: never); accumulated over the whole run.
        background, enabled, dpi: as for :class:`~fcn3_lightning.callbacks.maps.ForecastMaps`.
    """

    def __init__(
        self,
        channels: list[str] | None = None,
        histogram_lead_hours: list[float] | None = None,
        every_n_validations: int = 1,
        background: bool = True,
        enabled: bool = True,
        dpi: int = 100,
    ):
        self.requested_channels, self.requested_leads = channels, histogram_lead_hours
        super().__init__("Calibration", every_n_validations, enabled, background, dpi)
        self.spread_skill: SpreadSkill | None = None
        self.rank_histogram: RankHistogram | None = None
        self.n_forecasts = 0
        #: the last results: spread_skill_ratio (WB2's, uncorrected), spread_skill_ratio_fortin_corrected (shown), rmse,
        #: spread (lead, channel); rank_histogram (lead, channel, M + 1); n_members
        self.last: dict[str, Any] | None = None

    def _configure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        g = self.grid = forecast_grid(trainer, pl_module)
        self.channels = pick_channels(self.requested_channels, g.channels, pl_module.log_channels, "Calibration")
        self.histogram_leads = pick_leads(self.requested_leads, g.lead_hours, sorted({0, len(g.lead_hours) - 1}), "Calibration")
        kw = {"tile": g.tile, "spatial_group": g.spatial_group}
        self.spread_skill = SpreadSkill(g.lat, g.lon, self.channels, g.lead_hours, **kw).to(pl_module.device)
        self.rank_histogram = RankHistogram(g.lat, g.lon, self.channels, g.lead_hours, n_members=g.n_members, **kw).to(pl_module.device)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every.start(trainer):
            self.spread_skill.reset()
            self.rank_histogram.reset()
            self.n_forecasts = 0

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self.every.due:
            return
        pred, target = forecast_outputs(outputs)
        ch = [self.grid.channels.index(c) for c in self.channels]
        x, o = physical(pl_module, pred, ch), physical(pl_module, target, ch)
        self.spread_skill.update(x, o)
        self.rank_histogram.update(x, o)
        self.n_forecasts += target.shape[0]

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every.due or self.spread_skill.update_count == 0:
            return
        ss = self.spread_skill.compute()  # collective: every rank computes
        rh = self.rank_histogram.compute()["rank_histogram_latweighted_spatial_mean"]
        self.spread_skill.reset()
        self.rank_histogram.reset()
        self.last = {
            "spread_skill_ratio": ss["spread_skill_ratio"][0].cpu().numpy(),  # global region: (lead, channel)
            "spread_skill_ratio_fortin_corrected": ss["spread_skill_ratio_fortin_corrected"][0].cpu().numpy(),
            "rmse": ss["ensemble_mean_rmse"][0].cpu().numpy(),
            "spread": ss["ensemble_spread"][0].cpu().numpy(),
            "rank_histogram": rh[0].cpu().numpy(),
            "global_step": trainer.global_step,
            "n_members": self.grid.n_members,
        }
        if trainer.is_global_zero:
            sink = artifact_sink(trainer)
            where = "" if trainer.world_size == 1 else " per data-parallel rank"
            what = f"{self.n_forecasts} validation forecasts{where}, {self.grid.n_members} members"
            self.jobs.submit(self._draw, sink, self.last, self.grid, what)
            print(console_line(self.last, self.channels, self.grid.lead_hours[-1]))

    def _draw(self, sink: ArtifactSink, last: dict[str, Any], g: ForecastGrid, what: str) -> None:
        self._draw_spread_skill(sink, last, g, what)
        self._draw_rank_histograms(sink, last, g, what)

    def _draw_spread_skill(self, sink: ArtifactSink, last: dict[str, Any], g: ForecastGrid, what: str) -> None:
        fig = self.spread_skill_figure(last, g, what)
        sink.save(fig, "calibration", f"spread_skill_step{last['global_step']:07d}.png", dpi=self.dpi)

    def spread_skill_figure(self, last: dict[str, Any], g: ForecastGrid, what: str) -> Any:
        """The spread-skill figure of results ``last`` (a bare matplotlib Figure)."""
        hours = np.asarray(g.lead_hours)
        m = last["n_members"]
        calibrated_plain = math.sqrt(m / (m + 1))
        n_ch = len(self.channels)
        fig = new_figure(3.4 * (n_ch + 1), 3.6, layout=None)  # fixed margins: cheaper than a layout engine
        fig.subplots_adjust(left=0.05, right=0.99, bottom=0.14, top=0.85, wspace=0.3)
        axes = fig.subplots(1, n_ch + 1, squeeze=False)[0]
        ax = axes[0]
        for c, channel in enumerate(self.channels):
            ax.plot(hours, last["spread_skill_ratio_fortin_corrected"][:, c], marker="o", label=channel)
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label="calibrated")
        ax.set_xlabel("lead time [h]")
        ax.set_ylabel(f"spread / RMSE of the mean x sqrt({m + 1}/{m})")
        ax.set_title(f"spread-skill ratio, Fortin-corrected\n(1 = calibrated; the plain ratio would be {calibrated_plain:.3f})", fontsize=9)
        ax.set_xticks(hours)
        ax.legend(fontsize=7)
        for c, channel in enumerate(self.channels):
            ax = axes[c + 1]
            ax.plot(hours, last["rmse"][:, c], marker="o", label="ensemble-mean RMSE")
            ax.plot(hours, last["spread"][:, c], marker="s", label="ensemble spread")
            calibrated = f"calibrated spread (RMSE x {calibrated_plain:.3f})"
            ax.plot(hours, calibrated_plain * last["rmse"][:, c], color="k", lw=0.8, ls=":", label=calibrated)
            ax.set_xlabel("lead time [h]")
            ax.set_ylabel(f"{channel} [{g.units[channel]}]")
            ax.set_title(f"{channel}: skill and spread", fontsize=10)
            ax.set_xticks(hours)
            ax.set_ylim(bottom=0.0)
            ax.legend(fontsize=7)
        for ax in axes:
            ax.grid(True, lw=0.3, alpha=0.5)
        fig.suptitle(f"Spread-skill at step {last['global_step']}: over {what} (area-weighted, WeatherBench2 definitions)", fontsize=9)
        return fig

    def _draw_rank_histograms(self, sink: ArtifactSink, last: dict[str, Any], g: ForecastGrid, what: str) -> None:
        hist = last["rank_histogram"]  # (lead, channel, M + 1), sums to 1 over the bins
        bins = hist.shape[-1]
        leads = self.histogram_leads
        height = 2.4 * len(leads) + 0.8
        fig = new_figure(2.8 * len(self.channels) + 0.6, height, layout=None)
        fig.subplots_adjust(left=0.08, right=0.99, bottom=0.55 / height, top=1.0 - 0.6 / height, wspace=0.1, hspace=0.35)
        axes = fig.subplots(len(leads), len(self.channels), squeeze=False, sharey=True)
        top = max(1.5, float(hist[leads].max()) * bins * 1.1)
        for r, s in enumerate(leads):
            for c, channel in enumerate(self.channels):
                ax = axes[r, c]
                ax.bar(np.arange(bins), hist[s, c] * bins, width=0.85, color="#4c72b0")
                ax.axhline(1.0, color="k", lw=0.8, ls="--")
                ax.set_ylim(0.0, top)
                ax.set_xticks(np.arange(bins))
                ax.set_title(f"{channel} {lead_text(g.lead_hours[s])}", fontsize=9)
                if r == len(leads) - 1:
                    ax.set_xlabel("rank of the truth among the members")
                if c == 0:
                    ax.set_ylabel("frequency x (M + 1)")
        fig.suptitle(
            f"Rank histograms at step {last['global_step']}: over {what} (area-weighted; flat at 1 = calibrated, U = under-dispersed)",
            fontsize=9,
        )
        sink.save(fig, "calibration", f"rank_histogram_step{last['global_step']:07d}.png", dpi=self.dpi)


def console_line(last: dict[str, Any], channels: list[str], lead_hours: float) -> str:
    """The console summary of a validation run's calibration: the Fortin-corrected ratio at the last lead time."""
    ratios = ", ".join(f"{c} {r:.2f}" for c, r in zip(channels, last["spread_skill_ratio_fortin_corrected"][-1], strict=True))
    m = last["n_members"]
    return (
        f"step {last['global_step']}: spread-skill ratio, Fortin-corrected (x sqrt({m + 1}/{m})), at {lead_text(lead_hours)}: "
        f"{ratios} (1 = calibrated, < 1 under-dispersed)"
    )
