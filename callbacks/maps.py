"""Forecast maps: truth, one ensemble member, the ensemble mean and the spread of a fixed validation sample."""

from __future__ import annotations

import importlib.util
from typing import Any

import lightning as L
import numpy as np
import torch
from fcn3_lightning.callbacks.forecast import (
    ForecastGrid,
    ValidationPlots,
    ensemble_spread,
    forecast_grid,
    forecast_outputs,
    gather_globe,
    physical,
    pick_channels,
    pick_leads,
)
from fcn3_lightning.callbacks.plotting import ArtifactSink, artifact_sink, cell_edges, lead_text, new_figure
from lightning.pytorch.utilities import rank_zero_info

from fcn3_lightning.channels import HEADLINE_CHANNELS

#: channels shown by default when the model has more than four: the classic pair, the first two headline channels
PREFERRED_CHANNELS = HEADLINE_CHANNELS[:2]
PANELS = ("truth", "member", "ensemble mean", "ensemble spread (std)")
COASTLINES = ("auto", "true", "false")


def _lat_label(v: int) -> str:
    return "0°" if v == 0 else f"{abs(v)}°{'N' if v > 0 else 'S'}"


def _is_wind(channel: str) -> bool:
    return channel.startswith(("u", "v")) and not channel.startswith("vo")


class ForecastMaps(ValidationPlots):
    """Maps of the first validation sample (rank 0's first validation batch, first sample) at chosen lead times.

    One row per (channel, lead time): truth, member ``member``, ensemble mean (one colour scale for the three) and
    the ensemble spread (standard deviation over the members, its own scale), in the channel's units, on a
    latitude/longitude grid of the whole globe (gathered from the tiles under the spatial-parallel strategy).
    Written to ``maps/forecast_maps_step<global step>.png`` in the MLflow run (and under ``<default_root_dir>/plots``).

    Args:
        channels: channels to map (default: all when the model has at most four, else z500 and t850 where present).
        lead_hours: lead times in hours, each one of the validation rollout's (default: the first and the last).
        member: which member to show next to the mean.
        every_n_validations: draw on every n-th validation run (0: never).
        coastlines: "auto" (when the data is Earth's and cartopy is installed), "true" (needs cartopy) or "false".
        background: draw and upload on a worker thread, off the training thread.
        enabled: False turns the callback off.
        dpi: resolution of the PNG.
    """

    def __init__(
        self,
        channels: list[str] | None = None,
        lead_hours: list[float] | None = None,
        member: int = 0,
        every_n_validations: int = 1,
        coastlines: str = "auto",
        background: bool = True,
        enabled: bool = True,
        dpi: int = 100,
    ):
        if str(coastlines).lower() not in COASTLINES:
            raise ValueError(f"ForecastMaps.coastlines must be one of {COASTLINES}, got {coastlines!r}")
        self.requested_channels, self.requested_leads = channels, lead_hours
        self.member = int(member)
        super().__init__("ForecastMaps", every_n_validations, enabled, background, dpi)
        self.coastlines_setting = str(coastlines).lower()
        self.channels: list[str] = []
        self.leads: list[int] = []
        self.coastlines = False
        #: the last fields drawn (rank 0): name -> (lead, channel, lat, lon) array in physical units, plus metadata
        self.last_fields: dict[str, Any] | None = None

    def _configure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        g = self.grid = forecast_grid(trainer, pl_module)
        default = g.channels if len(g.channels) <= 4 else [c for c in PREFERRED_CHANNELS if c in g.channels] or g.channels[:2]
        self.channels = pick_channels(self.requested_channels, g.channels, default, "ForecastMaps")
        self.leads = pick_leads(self.requested_leads, g.lead_hours, sorted({0, len(g.lead_hours) - 1}), "ForecastMaps")
        if not 0 <= self.member < g.n_members:
            raise ValueError(f"ForecastMaps.member={self.member} is not one of the {g.n_members} validation members")
        has_cartopy = importlib.util.find_spec("cartopy") is not None
        if self.coastlines_setting == "true" and not has_cartopy:
            raise ImportError("ForecastMaps(coastlines='true') needs cartopy: pip install cartopy (or use coastlines: auto)")
        self.coastlines = self.coastlines_setting == "true" or (self.coastlines_setting == "auto" and g.earth and has_cartopy)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.every.start(trainer)

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self.every.due or batch_idx != 0 or dataloader_idx != 0:
            return
        g = self.grid
        pred, target = forecast_outputs(outputs)
        ch = [g.channels.index(c) for c in self.channels]
        leads = torch.as_tensor(self.leads, device=pred.device)
        members = pred[0].index_select(1, leads)  # (M, S', C, h, w), normalised
        x = physical(pl_module, members, ch)  # (M, S', C', h, w)
        truth = physical(pl_module, target[0].index_select(0, leads), ch)
        mean = x.mean(0)
        std = ensemble_spread(pl_module, members, ch)
        # reduce over the members first, then gather 4 fields instead of M (collective: every rank takes part)
        fields = gather_globe(trainer, torch.stack([truth, x[self.member], mean, std]), g.shape)
        if not trainer.is_global_zero:
            return
        arrays = fields.float().cpu().numpy()
        init = np.datetime64(int(batch["time"][0]), "ns").astype("datetime64[m]")
        self.last_fields = {
            **dict(zip(PANELS, arrays, strict=True)),
            "channels": list(self.channels),
            "lead_hours": [g.lead_hours[i] for i in self.leads],
            "init_time": str(init),
            "global_step": trainer.global_step,
        }
        sink = artifact_sink(trainer)
        self.jobs.submit(self._draw, sink, self.last_fields, g, trainer.global_step)
        where = f"{sink.local_dir / 'maps'}" + (" and maps/ in the MLflow run" if sink.repository is not None else "")
        rank_zero_info(f"forecast maps of step {trainer.global_step} (drawn in the background): {where}")

    def _draw(self, sink: ArtifactSink, f: dict[str, Any], g: ForecastGrid, step: int) -> None:
        from matplotlib import colormaps

        n_lead, n_ch = len(f["lead_hours"]), len(f["channels"])
        rows = n_lead * n_ch
        height = rows * 1.95 + 0.8
        fig = new_figure(4 * 3.3 + 1.5, height, layout=None)  # fixed margins: a layout engine would re-measure every label
        fig.subplots_adjust(left=0.06, right=0.97, bottom=0.5 / height, top=1.0 - 0.7 / height, wspace=0.25, hspace=0.35)
        proj = None
        if self.coastlines:
            import cartopy.crs as ccrs

            proj = ccrs.PlateCarree(central_longitude=180.0)
        axes = fig.subplots(rows, 4, squeeze=False, subplot_kw={} if proj is None else {"projection": proj})
        lon_e = cell_edges(g.lon)
        lat_e = cell_edges(g.lat, -90.0, 90.0)
        for ci, channel in enumerate(f["channels"]):
            for li, hours in enumerate(f["lead_hours"]):
                r = ci * n_lead + li
                state = [f[p][li, ci] for p in PANELS[:3]]
                spread = f[PANELS[3]][li, ci]
                lo, hi = min(float(a.min()) for a in state), max(float(a.max()) for a in state)
                cmap = colormaps["viridis"]
                if _is_wind(channel):  # winds: a diverging scale centred on 0
                    hi = max(abs(lo), abs(hi))
                    lo, cmap = -hi, colormaps["RdBu_r"]
                unit = g.units[channel]
                for p, data in enumerate([*state, spread]):
                    ax = axes[r, p]
                    kw: dict[str, Any] = {"shading": "flat"}
                    if proj is not None:
                        import cartopy.crs as ccrs

                        kw["transform"] = ccrs.PlateCarree()
                    if p < 3:
                        mesh = ax.pcolormesh(lon_e, lat_e, data, cmap=cmap, vmin=lo, vmax=hi, **kw)
                    else:
                        mesh = ax.pcolormesh(lon_e, lat_e, data, cmap=colormaps["magma_r"], vmin=0.0, vmax=float(spread.max()), **kw)
                    name = f"member {self.member}" if p == 1 else PANELS[p]
                    ax.set_title(f"{channel} {lead_text(hours)}: {name}", fontsize=9)
                    self._axes_style(ax, proj is not None, last_row=r == rows - 1, first_col=p == 0)
                    if p == 2:
                        fig.colorbar(mesh, ax=list(axes[r, :3]), shrink=0.9, aspect=12, pad=0.01, label=f"{channel} [{unit}]")
                    elif p == 3:
                        fig.colorbar(mesh, ax=axes[r, 3], shrink=0.9, aspect=12, pad=0.02, label=f"spread [{unit}]")
        world = "" if g.earth else " (synthetic default world: not Earth, no coastlines)"
        fig.suptitle(
            f"Forecast maps at step {step}: validation sample initialised {f['init_time']} (first sample of rank 0's first "
            f"validation batch), {g.n_members} members{world}",
            fontsize=10,
        )
        sink.save(fig, "maps", f"forecast_maps_step{step:07d}.png", dpi=self.dpi)

    @staticmethod
    def _axes_style(ax: Any, geo: bool, last_row: bool, first_col: bool) -> None:
        if geo:
            ax.coastlines(linewidth=0.5)
            gl = ax.gridlines(draw_labels=True, linewidth=0.3, alpha=0.5)
            gl.top_labels = gl.right_labels = False
            return
        ax.set_xlim(0.0, 360.0)
        ax.set_ylim(-90.0, 90.0)
        ax.set_aspect("equal")
        # tick labels on the outer panels only: text layout is most of the drawing time
        ax.set_xticks(np.arange(0, 361, 60), [f"{v}°E" for v in range(0, 361, 60)] if last_row else [], fontsize=7)
        ax.set_yticks(np.arange(-90, 91, 45), [_lat_label(v) for v in range(-90, 91, 45)] if first_col else [], fontsize=7)
        if last_row:
            ax.set_xlabel("longitude", fontsize=8)
        if first_col:
            ax.set_ylabel("latitude", fontsize=8)
