"""Angular power spectra of the forecasts against the truth, and the high-wavenumber spectral ratio.

FCN3's key claim is that its ensemble members keep the truth's spectrum at every lead time (no blurring): the
ratio of the members' power to the truth's at the smallest scales should stay near 1. The spectra are averaged
over every validation forecast of the run (each member's own spectrum, then the mean over members) with
:class:`~fcn3_lightning.metrics.spectra.AngularPowerSpectrum`, which also sums the tiles under the spatial-parallel
strategy before taking any power.
"""

from __future__ import annotations

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

from fcn3_lightning.metrics.spectra import AngularPowerSpectrum

METRIC = "val/spectral_ratio_high_k"


def high_k_ratio(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, fraction: float) -> tuple[torch.Tensor, int]:
    """Mean of pred/truth power over the top ``fraction`` of the degrees ``(..., l)``: ``(...)`` values and the first l."""
    p, t = torch.as_tensor(pred, dtype=torch.float64), torch.as_tensor(truth, dtype=torch.float64)
    lmax = p.shape[-1]
    first = max(1, min(lmax - 1, int(round((1.0 - fraction) * lmax))))
    return (p[..., first:] / t[..., first:]).mean(-1), first


class SpectraPlots(ValidationPlots):
    """Angular power spectra (log-log) of the members and of the truth per channel and lead time, their ratio, and
    the scalar ``val/spectral_ratio_high_k``: the mean ratio over the top ``high_k_fraction`` of the degrees, over
    the lead times and channels (1 = the truth's small-scale power; < 1 blurred, > 1 noisy), also per channel as
    ``val/spectral_ratio_high_k/<channel>``. The PNG goes to ``spectra/spectra_step<global step>.png``.

    Args:
        channels: channels to analyse (default: the module's ``log_channels``).
        lead_hours: lead times in hours (default: every lead of the validation rollout).
        high_k_fraction: the share of the highest degrees the scalar averages over.
        every_n_validations: on every n-th validation run (0: never); the spectra accumulate over the whole run.
        background, enabled, dpi: as for :class:`~fcn3_lightning.callbacks.maps.ForecastMaps`.
    """

    def __init__(
        self,
        channels: list[str] | None = None,
        lead_hours: list[float] | None = None,
        high_k_fraction: float = 0.25,
        every_n_validations: int = 1,
        background: bool = True,
        enabled: bool = True,
        dpi: int = 100,
    ):
        if not 0.0 < high_k_fraction <= 1.0:
            raise ValueError(f"SpectraPlots.high_k_fraction must be in (0, 1], got {high_k_fraction}")
        self.requested_channels, self.requested_leads = channels, lead_hours
        self.high_k_fraction = float(high_k_fraction)
        super().__init__("SpectraPlots", every_n_validations, enabled, background, dpi)
        self.pred_spectrum: AngularPowerSpectrum | None = None
        self.true_spectrum: AngularPowerSpectrum | None = None
        self.n_forecasts = 0
        #: the last spectra (rank 0 and the others): prediction/truth (lead, channel, degree), ratio scalars
        self.last: dict[str, Any] | None = None

    def _configure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        g = self.grid = forecast_grid(trainer, pl_module)
        self.channels = pick_channels(self.requested_channels, g.channels, pl_module.log_channels, "SpectraPlots")
        self.leads = pick_leads(self.requested_leads, g.lead_hours, range(len(g.lead_hours)), "SpectraPlots")
        hours = [g.lead_hours[i] for i in self.leads]
        kw = {"tile": g.tile, "spatial_group": g.spatial_group}
        self.pred_spectrum = AngularPowerSpectrum(g.lat, g.lon, self.channels, hours, ensemble=True, **kw).to(pl_module.device)
        self.true_spectrum = AngularPowerSpectrum(g.lat, g.lon, self.channels, hours, **kw).to(pl_module.device)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every.start(trainer):
            self.pred_spectrum.reset()
            self.true_spectrum.reset()
            self.n_forecasts = 0

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self.every.due:
            return
        pred, target = forecast_outputs(outputs)
        ch = [self.grid.channels.index(c) for c in self.channels]
        leads = torch.as_tensor(self.leads, device=pred.device)
        self.pred_spectrum.update(physical(pl_module, pred.index_select(2, leads), ch))
        self.true_spectrum.update(physical(pl_module, target.index_select(1, leads), ch))
        self.n_forecasts += target.shape[0]

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every.due or self.pred_spectrum.update_count == 0:
            return
        # collective (torchmetrics syncs the sums over the processes): every rank computes
        pred = self.pred_spectrum.compute()["angular_power_spectrum"].cpu()
        truth = self.true_spectrum.compute()["angular_power_spectrum"].cpu()
        self.pred_spectrum.reset()
        self.true_spectrum.reset()
        per_channel, first = high_k_ratio(pred, truth, self.high_k_fraction)  # (lead, channel)
        values = {METRIC: per_channel.mean()}
        values.update({f"{METRIC}/{c}": per_channel[:, i].mean() for i, c in enumerate(self.channels)})
        # identical on every rank after the sync
        pl_module.log_dict({k: v.float() for k, v in values.items()}, sync_dist=False, rank_zero_only=False)
        self.last = {
            "prediction": pred.numpy(),
            "truth": truth.numpy(),
            "first_degree": first,
            "ratio_high_k": {k: float(v) for k, v in values.items()},
            "global_step": trainer.global_step,
        }
        if trainer.is_global_zero:
            sink = artifact_sink(trainer)
            where = "" if trainer.world_size == 1 else " per data-parallel rank"
            self.jobs.submit(self._draw, sink, self.last, self.grid, f"{self.n_forecasts} validation forecasts{where}")
            ratio = float(values[METRIC])
            print(f"step {trainer.global_step}: {METRIC} = {ratio:.3f} (mean power ratio members/truth for degrees l >= {first})")

    def _draw(self, sink: ArtifactSink, last: dict[str, Any], g: ForecastGrid, what: str) -> None:
        fig = self.figure(last, g, what)
        sink.save(fig, "spectra", f"spectra_step{last['global_step']:07d}.png", dpi=self.dpi)

    def figure(self, last: dict[str, Any], g: ForecastGrid, what: str) -> Any:
        """The spectra figure of results ``last`` (a bare matplotlib Figure)."""
        from matplotlib import colormaps
        from matplotlib.ticker import NullFormatter

        pred, truth, first = last["prediction"], last["truth"], last["first_degree"]
        n_lead, n_ch, lmax = pred.shape
        hours = [g.lead_hours[i] for i in self.leads]
        fig = new_figure(max(3.6 * n_ch, 6.0), 6.4, layout=None)  # fixed margins: cheaper than a layout engine
        fig.subplots_adjust(left=0.07, right=0.985, bottom=0.08, top=0.9, wspace=0.33, hspace=0.12)
        axes = fig.subplots(2, n_ch, squeeze=False, sharex=True)
        degree = np.arange(1, lmax)  # l = 0 (the mean) has no place on a log axis
        colours = colormaps["viridis"](np.linspace(0.0, 0.85, n_lead))
        for c, channel in enumerate(self.channels):
            top, bottom = axes[0, c], axes[1, c]
            for s in range(n_lead):
                top.loglog(degree, pred[s, c, 1:], color=colours[s], lw=1.4, label=f"members {lead_text(hours[s])}")
                top.loglog(degree, truth[s, c, 1:], color=colours[s], lw=1.0, ls="--", label=f"truth {lead_text(hours[s])}")
                bottom.loglog(degree, pred[s, c, 1:] / truth[s, c, 1:], color=colours[s], lw=1.4, label=lead_text(hours[s]))
            top.set_title(f"{channel}: high-k ratio {last['ratio_high_k'][f'{METRIC}/{channel}']:.2f}", fontsize=10)
            top.set_ylabel(f"power per degree [({g.units[channel]})$^2$]", fontsize=8)
            bottom.axhline(1.0, color="k", lw=0.8)
            bottom.yaxis.set_minor_formatter(NullFormatter())  # minor labels of a narrow log range crowd the axis label
            bottom.axvspan(first, lmax - 1, color="#dddddd", zorder=0, label=f"l ≥ {first} (scalar)")
            bottom.set_ylabel("power ratio members / truth", fontsize=8)
            bottom.set_xlabel("total wavenumber (degree) l")
            for ax in (top, bottom):
                ax.grid(True, which="both", lw=0.3, alpha=0.5)
            readable_log_ticks(bottom.yaxis, *bottom.get_ylim())
        readable_log_ticks(axes[1, 0].xaxis, *axes[1, 0].get_xlim())  # shared by every panel
        axes[0, 0].legend(fontsize=6, ncol=2)
        axes[1, 0].legend(fontsize=6)
        fig.suptitle(
            f"Angular power spectra at step {last['global_step']}: mean over {what} (each member's spectrum, then the "
            f"member mean); {METRIC} = {last['ratio_high_k'][METRIC]:.3f}",
            fontsize=9,
        )
        return fig


def readable_log_ticks(axis: Any, lo: float, hi: float, at_least: int = 3) -> None:
    """Labelled ticks on a log ``axis`` spanning ``lo ... hi``: the powers of ten when there are ``at_least`` of them
    in range, else 1-2-5 steps, else evenly spaced values (a ratio axis from 0.8 to 1.2 would otherwise carry a
    single label, at 1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    lo, hi = sorted((float(lo), float(hi)))
    if not (lo > 0.0 and hi > lo):
        return
    candidates = [
        LogLocator(base=10.0, subs=(1.0,)),
        LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)),
        MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]),
    ]
    for k, locator in enumerate(candidates):
        ticks = [t for t in locator.tick_values(lo, hi) if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
        if len(ticks) >= at_least or k == len(candidates) - 1:
            break
    if k == 0:
        return  # matplotlib's own decade labels (10^k)
    axis.set_major_locator(locator)
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.10g}"))
    axis.set_minor_formatter(NullFormatter())  # matplotlib labels minor log ticks on short ranges: they would crowd these
