"""The LightningModule: FCN3's ensemble training recipe (reference sections 2.8, 3 and 4).

What is predicted (the network, its channels and grid) comes from the data module and the ``net``
settings; this module owns *how* it is trained: members folded into the batch with their own noise,
autoregressive rollouts with backpropagation through every step, the CRPS loss, the optimiser and
the schedule, and the validation scores.

Under :class:`~fcn3_lightning.parallel.strategy.SpatialParallelStrategy` the module builds the network with the
strategy's distributed layers, reads only its latitude/longitude tile of every sample, rolls out its own share of
the members (global member ids, so the noise is the serial run's) and uses the distributed loss, which gathers the
members and sums over the tiles. Validation scores are computed on the tiles and completed by all-reduces over the
spatial group (members gathered first), so no rank's shard stands in for another's.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger

from fcn3_lightning.channels import HEADLINE_CHANNELS
from fcn3_lightning.checkpoint import INPUTS_KEY, ModelInputs, model_inputs
from fcn3_lightning.grid import quadrature_weights
from fcn3_lightning.losses import CRPS_KINDS, EnsembleCRPSLoss, channel_weights, check_ensemble_size, crps_ensemble
from fcn3_lightning.metrics.suite import DEFAULT_SCORES, PROVIDERS, ValidationScores, lead_label
from fcn3_lightning.model.build import model_kwargs
from fcn3_lightning.model.channel_map import MappingReport
from fcn3_lightning.model.fcn3 import CHECKPOINTING_LEVELS, FCN3
from fcn3_lightning.model.layers import DEFAULT_DISCO_IMPL, DISCO_IMPLS, SphericalLayers
from fcn3_lightning.model.noise import NoiseStreams, SphericalDiffusionNoise
from fcn3_lightning.model.rollout import EnsembleForecaster, keyed_streams
from fcn3_lightning.parallel import DistributedEnsembleCRPSLoss, Layout, all_reduce_, gather_members
from fcn3_lightning.parallel.strategy import layout_of
from fcn3_lightning.precision import at_least_float32, float32_region
from fcn3_lightning.training.ema import WeightAverage
from fcn3_lightning.training.parameters import freeze, optimizer_groups, warmup_factor
from fcn3_lightning.training.weights import check_grid, initial_architecture, load_initial_weights

# Lightning recommends sync_dist=True for epoch-level values (warning at epoch end, once per value and rank); the
# WB2 scores are torchmetrics values, synced over the processes already and identical on every rank
warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")


class FCN3Module(L.LightningModule):
    """Trains FCN3 as an ensemble model (serially, or on tiles and member shards under SpatialParallelStrategy).

    Args:
        net: FCN3 architecture settings (sizes, depth, ...; see :class:`fcn3_lightning.model.FCN3`). The
            channel lists and the grid come from the data module.
        ensemble_size: members per sample during training (folded into the batch).
        valid_ensemble_size: members during validation and testing (default: ``ensemble_size``).
        crps: "cdf" (standard CRPS; stage 1) or "fair" (almost-fair CRPS with ``alpha``; later stages).
        alpha: almost-fair CRPS parameter (1 = fair).
        spectral_weight: relative weight of the spectral CRPS (0.1 in FCN3).
        spectral_normalization: "release" (what FCN3 was trained with) or "head" (the reference code today).
        multistep_weighting: "intended" (every step weighted alike, each term with its own weights) or
            "reference" (the reference's permuted weights, section 3.5; for bit-faithful reproduction).
        channel_weighting: "auto" (reference) or "constant".
        noise_seed: base seed of the latent noise streams.
        antithetic: centred noise pairs (members 2k, 2k+1 share a draw with opposite signs; fine-tuning).
        noise_length_scales_km, noise_sigma, noise_lambd: the noise process (defaults: FCN3's).
        lr, betas, eps, weight_decay: Adam (FCN3: 0.9/0.95, no weight decay).
        scheduler: None, ``{"name": "plateau", "factor": 0.8, "patience": 5}`` or
            ``{"name": "step", "step_size": 4, "gamma": 0.5}`` (stepped per epoch).
        init_from: weights to start from (weights only): a model package folder (the published FCN3), a checkpoint
            of this project, a model file from ``convert``, or a reference-layout (Makani) state dict / checkpoint.
            Where the source describes its network, that architecture is built (differences from ``net`` printed).
        freeze: name patterns of network parameters that do not train (``blocks.0.*``, ``*_encoder.*``; ``@new``: what
            channel mapping added); they get no gradients and no optimizer state. A pattern matching nothing is an error.
        param_groups: optimizer groups with their own settings, e.g. ``[{"params": ["@new"], "lr": 1e-3}]``; the
            parameters no group matches train at ``lr``.
        warmup_steps: linear learning-rate warm-up over the first optimizer steps (0: none), on top of the scheduler.
        ema_decay: keep an exponential moving average of the trainable weights with this decay (None: off); validation,
            checkpoints (and so ``predict`` and ``export``) use the average, training the raw weights.
        log_channels: headline channels whose WeatherBench2 scores are logged per lead time (default: all if
            <= 9, else the headline variables present).
        val_scores: which WB2 scores to log for them, in physical units (names of
            :data:`fcn3_lightning.metrics.suite.PROVIDERS`; default crps, ensemble_mean_rmse, ensemble_spread,
            spread_skill_ratio, bias). Logged as ``val/{score}/{channel}/{lead}``.
        checkpointing: activation checkpointing of the training forward (``none``, ``blocks``, ``encoder+decoder``,
            ``blocks+encoder+decoder``; :meth:`fcn3_lightning.model.FCN3.set_checkpointing`): less memory, same gradients.
        disco_impl: kernels of the processor blocks' and decoders' DISCO convolutions: ``fourier`` (Fourier space,
            :mod:`fcn3_lightning.model.disco_fourier`) or ``torch-harmonics`` (its kernels); same weights and, to
            float32 round-off, the same values (:mod:`fcn3_lightning.model.layers`).
    """

    #: builds its network through the strategy's layers factory (see SpatialParallelStrategy)
    supports_spatial_parallel = True

    def __init__(
        self,
        net: dict[str, Any] | None = None,
        ensemble_size: int = 4,
        valid_ensemble_size: int | None = None,
        crps: str = "fair",
        alpha: float = 1.0,
        spectral_weight: float = 0.1,
        spectral_normalization: str = "release",
        multistep_weighting: str = "intended",
        channel_weighting: str = "auto",
        noise_seed: int = 333,
        antithetic: bool = False,
        noise_length_scales_km: list[float] | None = None,
        noise_sigma: float = 1.0,
        noise_lambd: float = 1.0,
        lr: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        scheduler: dict[str, Any] | None = None,
        init_from: str | None = None,
        freeze: list[str] | None = None,
        param_groups: list[dict[str, Any]] | None = None,
        warmup_steps: int = 0,
        ema_decay: float | None = None,
        log_channels: list[str] | None = None,
        val_scores: list[str] | None = None,
        checkpointing: str = "none",
        disco_impl: str = DEFAULT_DISCO_IMPL,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net_kwargs = model_kwargs(dict(net or {}))
        for key in ("channel_names", "aux_channel_names", "inp_shape"):
            if key in self.net_kwargs:
                raise ValueError(f"model.net.{key} comes from the data module (data.channels / data.aux_channels / the store's grid)")
        if crps not in (*CRPS_KINDS, "skillspread"):
            raise ValueError(f"unknown CRPS kind {crps!r}; model.crps must be one of {CRPS_KINDS} ('skillspread' = 'fair')")
        check_ensemble_size(ensemble_size, crps)
        if (valid_ensemble_size or ensemble_size) < 2:
            raise ValueError(
                "validation scores use the fair CRPS and the ensemble spread: model.valid_ensemble_size "
                f"(default: model.ensemble_size) must be >= 2, got {valid_ensemble_size or ensemble_size}"
            )
        if antithetic and ensemble_size % 2:
            raise ValueError(f"antithetic noise pairs members: ensemble_size must be even, got {ensemble_size}")
        unknown = [v for v in val_scores or () if v not in PROVIDERS]
        if unknown:
            raise ValueError(f"model.val_scores: unknown scores {unknown}; choose from {sorted(PROVIDERS)}")
        if scheduler is not None and scheduler.get("name") not in ("plateau", "step"):
            raise ValueError(f"model.scheduler.name must be 'plateau' or 'step', got {scheduler.get('name')!r}")
        if warmup_steps < 0:
            raise ValueError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
        if checkpointing not in CHECKPOINTING_LEVELS:
            raise ValueError(f"model.checkpointing must be one of {list(CHECKPOINTING_LEVELS)}, got {checkpointing!r}")
        if disco_impl not in DISCO_IMPLS:
            raise ValueError(f"model.disco_impl must be one of {list(DISCO_IMPLS)}, got {disco_impl!r}")
        self.forecaster: EnsembleForecaster | None = None
        self.ema: WeightAverage | None = None
        self.mapping: MappingReport | None = None
        self._new_tensors: list[str] = []  # what channel mapping added (the "@new" of freeze / param_groups)
        self.loss_fn: EnsembleCRPSLoss | DistributedEnsembleCRPSLoss | None = None
        #: which tile and members this rank holds (the strategy's, from configure_model on; serial until then)
        self.layout: Layout = Layout()

    # --- building -----------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build the network for the data module's channels and grid (and load ``init_from``)."""
        if self.forecaster is not None:
            return
        dm = self.trainer.datamodule
        if dm is None:
            raise ValueError("FCN3Module needs a data module (it defines the channels and the grid)")
        strategy = self.trainer.strategy
        self.layout = layout_of(strategy)  # the data module reads the same layout: its samples are on this tile
        # a split network is built with the strategy's (distributed) layers factory
        layers = strategy.layers_factory(self.hparams.disco_impl) if self.layout.model_parallel else None
        if self.hparams.init_from:
            check_grid(self.hparams.init_from, dm.store.shape)  # before anything is read for a network that cannot be
            self._adopt_inputs(dm)
        self.build(dm.channels, dm.aux_channels, dm.store.shape, dm.normalizer, layers=layers)
        self.register_buffer("static", dm.static, persistent=False)
        lead_hours = [(s + 1) * dm.hparams.step_hours for s in range(dm.hparams.valid_rollout)]
        self.scores = ValidationScores(
            dm.store.lat,
            dm.store.lon,
            self.log_channels,
            lead_hours,
            self.hparams.val_scores or DEFAULT_SCORES,
            tile=self.layout.tile(dm.store.shape),
            spatial_group=self.layout.spatial_group,
        )

    def _adopt_inputs(self, dm: Any) -> None:
        """Normalise the data and make the static inputs as the source model was trained (its statistics for the
        channels it has, its orography and land-sea mask where it carries them)."""
        path = self.hparams.init_from
        inputs = model_inputs(path)
        if inputs is None:
            print(
                f"WARNING: init_from {path} carries no statistics: the data's own ({dm.stats_path}) normalise every channel, "
                "which is right only if they are what the source was trained with",
                flush=True,
            )
            return
        new = dm.use_model_statistics(inputs.stats, inputs.normalization, inputs.source)
        print(
            f"init_from {path}: channels normalised with the statistics of the {inputs.source}"
            + (f"; new channels {new} with the data's" if new else ""),
            flush=True,
        )
        needs = {"xoro": inputs.orography, "xlsml": inputs.land_sea_mask, "xlsms": inputs.land_sea_mask}
        if any(a in needs for a in dm.aux_channels) and all(needs[a] is not None for a in dm.aux_channels if a in needs):
            dm.use_static_fields(inputs.orography, inputs.land_sea_mask)
            print(f"init_from {path}: orography and land-sea mask from the {inputs.source}", flush=True)

    def build(
        self, channels: list[str], aux_channels: list[str], shape: tuple[int, int], normalizer: Any, layers: Any | None = None
    ) -> None:
        """The network, noise process and loss for these channels and grid, on this rank's part of :attr:`layout`;
        ``layers``: the distributed layers factory of a split grid, or None (serial)."""
        hp = self.hparams
        e = self.layout.sizes.ensemble
        for name, m in (("model.ensemble_size", hp.ensemble_size), ("model.valid_ensemble_size", hp.valid_ensemble_size)):
            if m is not None and m % e:
                raise ValueError(f"{name}={m} is not divisible by the strategy's ensemble_parallel_size={e}")
        if hp.antithetic and (hp.ensemble_size // e) % 2:
            raise ValueError(
                f"antithetic noise pairs members 2k, 2k+1 on one rank: model.ensemble_size ({hp.ensemble_size}) / "
                f"ensemble_parallel_size ({e}) must be even"
            )
        if hp.init_from:
            # the source's weights fix the architecture; the checkpoint's hyper-parameters must describe what is built
            self.net_kwargs = initial_architecture(self.net_kwargs, hp.init_from, channels, aux_channels, shape)
            self.hparams["net"] = dict(self.net_kwargs)
        layers = layers if layers is not None else SphericalLayers(hp.disco_impl)
        net = FCN3(inp_shape=shape, channel_names=channels, aux_channel_names=aux_channels, **self.net_kwargs, layers=layers)
        net.set_checkpointing(hp.checkpointing)
        noise = None
        if net.noise_channel_names:
            noise = SphericalDiffusionNoise(
                shape,
                n_channels=len(net.noise_channel_names),
                length_scales_km=hp.noise_length_scales_km,
                sigma=hp.noise_sigma,
                lambd=hp.noise_lambd,
                layers=layers,
            )
        self.forecaster = EnsembleForecaster(net, noise)
        if hp.init_from:
            settings = {
                "inp_shape": list(shape),
                "channel_names": list(channels),
                "aux_channel_names": list(aux_channels),
                **self.net_kwargs,
            }
            self.mapping = load_initial_weights(net, hp.init_from, settings)
            if self.mapping is not None:
                print(f"init_from {hp.init_from}: channel mapping\n  " + "\n  ".join(self.mapping.lines()), flush=True)
        new = (self.mapping.extended + self.mapping.new) if self.mapping is not None else []
        if hp.freeze:
            frozen = freeze(net, hp.freeze, new)
            n_frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
            print(
                f"model.freeze: {len(frozen)} tensors frozen ({n_frozen:,} parameters)",
                flush=True,
            )
        self._new_tensors = new
        self.ema = WeightAverage(net, hp.ema_decay) if hp.ema_decay is not None else None
        weights = channel_weights(channels, normalizer.scale, normalizer.time_diff_std, mode=hp.channel_weighting)
        loss_kw = dict(
            kind=hp.crps,
            alpha=hp.alpha,
            spectral_weight=hp.spectral_weight,
            spectral_normalization=hp.spectral_normalization,
            multistep_weighting=hp.multistep_weighting,
        )
        if self.layout.model_parallel:  # gathers the members, sums over the tiles
            self.loss_fn = DistributedEnsembleCRPSLoss(self.layout, shape, weights, **loss_kw)
        else:
            self.loss_fn = EnsembleCRPSLoss(shape, weights, **loss_kw)
        # this tile's rows (all of them serially): validation sums over the tile, then over the tiles
        q = quadrature_weights(*shape, dtype=torch.float32)[self.layout.tile(shape)[0]]
        self.register_buffer("quadrature", q, persistent=False)
        self.channels = list(channels)
        self.normalizer = normalizer
        logged = hp.log_channels or (channels if len(channels) <= 9 else [c for c in HEADLINE_CHANNELS if c in channels])
        missing = [c for c in logged if c not in channels]
        if missing:
            raise ValueError(f"model.log_channels {missing} are not in the data's channel list")
        self.log_channels = list(logged)
        self.log_index = [channels.index(c) for c in self.log_channels]
        self.scores: ValidationScores | None = None

    # --- stepping -----------------------------------------------------------------------------------

    def _streams(self, batch: dict[str, torch.Tensor], members: slice, key: int, antithetic: bool) -> NoiseStreams | None:
        if self.forecaster.noise is None:
            return None
        # one reproducible stream per (sample, global member id) and step: resuming, or another layout, replays the
        # same noise
        ids = batch["index"].tolist()
        return keyed_streams(self.hparams.noise_seed, key, ids, members.stop - members.start, antithetic, member_offset=members.start)

    def forward_rollout(
        self, batch: dict[str, torch.Tensor], n_members: int, n_steps: int, key: int, antithetic: bool = False
    ) -> torch.Tensor:
        """``(B, M, n_steps, C, H, W)``: this rank's members (all ``n_members`` serially) on its tile."""
        members = self.layout.members(n_members)
        streams = self._streams(batch, members, key, antithetic)
        m = members.stop - members.start
        return self.forecaster.rollout(batch["input"], batch["zenith"], self.static, streams, n_steps, m)

    def _all_members(self, pred: torch.Tensor) -> torch.Tensor:
        """Every member of the ensemble (gathered from the ensemble ranks; validation, not differentiated)."""
        return gather_members(pred.detach(), self.layout.group("ensemble"), dim=1)

    def _tile_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over (lat, lon), completed over the tiles of the spatial group."""
        return all_reduce_(x.sum((-2, -1)).contiguous(), self.layout.group("spatial"))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        n_steps = batch["target"].shape[1]
        key = 2 * self.global_step + 1  # odd keys: training; even keys are used by validation
        pred = self.forward_rollout(batch, self.hparams.ensemble_size, n_steps, key, self.hparams.antithetic)
        loss, details = self.loss_fn(pred, batch["target"])
        b = batch["input"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/crps", details["spatial_crps"].mean(), batch_size=b)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], split: str) -> dict[str, torch.Tensor]:
        """Log the validation/test scores of a batch; returns the forecast for callbacks (``fcn3_lightning.callbacks``):
        ``prediction`` (B, M, S, C, h, w) with every member and ``target`` (B, S, C, h, w), normalised, on this rank's tile.
        """
        n_steps = batch["target"].shape[1]
        members = self.hparams.valid_ensemble_size or self.hparams.ensemble_size
        pred = self.forward_rollout(batch, members, n_steps, key=0)
        target = batch["target"]
        b = target.shape[0]
        loss, _ = self.loss_fn(pred[:, :, :1], target[:, :1])  # as in the reference: the loss at the first lead time
        # the scores in fp32 at least, autocast off (the rule of fcn3_lightning.precision); WB2 scores: float64
        pred, target = at_least_float32(self._all_members(pred)), at_least_float32(target)
        q = self.quadrature
        with float32_region(pred):
            # area-weighted fair CRPS (normalised units) per lead and channel; persistence's CRPS is its MAE
            crps = self._tile_sum(crps_ensemble(pred, target, member_dim=1, kind="fair") * q).mean(0)  # (S, C)
            persistence = self._tile_sum((at_least_float32(batch["input"])[:, None] - target).abs() * q).mean(0)  # (S, C)
        self.log(f"{split}/loss", loss, batch_size=b, sync_dist=True)
        self.log(f"{split}/crps", crps[0].mean(), batch_size=b, sync_dist=True, prog_bar=split == "val")
        self.log(f"{split}/persistence_mae", persistence[0].mean(), batch_size=b, sync_dist=True)
        for s, hours in enumerate(self.scores.lead_hours):
            self.log(f"{split}/crps_lead{lead_label(hours)}", crps[s].mean(), batch_size=b, sync_dist=True)
        # WeatherBench2 scores of the headline channels in physical units, accumulated over the epoch
        idx = self.log_index
        self.scores.update(
            self.normalizer.denormalize(pred[:, :, :, idx], axis=-3, index=idx),
            self.normalizer.denormalize(target[:, :, idx], axis=-3, index=idx),
        )
        return {"prediction": pred, "target": target}

    def _log_scores(self, split: str) -> None:
        if self.scores is None or not self.scores.updated:
            return
        values = self.scores.compute()  # already synced over the processes
        self.log_dict({f"{split}/{k}": v for k, v in values.items()}, sync_dist=False, rank_zero_only=False)
        self.scores.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, "val")  # the outputs reach the callbacks' on_validation_batch_end (plots, calibration)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Ensemble forecasts in physical units: ``prediction`` (B, M, S, C, H, W) for the batch's initial ``time``."""
        n_steps = batch["target"].shape[1]
        members = self.hparams.valid_ensemble_size or self.hparams.ensemble_size
        pred = self.forward_rollout(batch, members, n_steps, key=0)
        return {"time": batch["time"], "prediction": self.normalizer.denormalize(pred, axis=-3)}

    def on_validation_epoch_start(self) -> None:
        self.scores.reset()

    def on_test_epoch_start(self) -> None:
        self.scores.reset()

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")
        m = self.trainer.callback_metrics
        if "val/crps" in m and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            when = f"epoch {self.current_epoch}" if self.trainer.state.fn == "fit" else "validation"
            self.print(
                f"{when}: validation ensemble CRPS at the first lead time {float(m['val/crps']):.4f} "
                f"vs persistence MAE {float(m['val/persistence_mae']):.4f} (normalised units, mean over channels)"
            )

    # --- optimisation -------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = optimizer_groups(self.net, hp.param_groups, hp.lr, self._new_tensors)
        opt = torch.optim.Adam(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay)
        if not hp.scheduler:
            return opt
        cfg = dict(hp.scheduler)
        name = cfg.pop("name")
        if name == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", **{"factor": 0.8, "patience": 5, **cfg})
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss", "interval": "epoch"}}
        sched = torch.optim.lr_scheduler.StepLR(opt, **{"step_size": 4, "gamma": 0.5, **cfg})
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        # warm-up scales the scheduled rates for this step only, so it composes with any scheduler (and a resume)
        factor = warmup_factor(self.trainer.global_step, self.hparams.warmup_steps)
        scheduled = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] *= factor
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            for g, lr in zip(optimizer.param_groups, scheduled, strict=True):
                g["lr"] = lr
        if self.ema is not None:
            self.ema.update(self.net)

    # --- the weight average: validation and checkpoints see it, training the raw weights --------------

    def on_validation_start(self) -> None:
        if self.ema is not None:
            self.ema.swap(self.net)

    def on_validation_end(self) -> None:
        if self.ema is not None:
            self.ema.swap(self.net)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        dm = self.trainer.datamodule
        stats, modes = dm.statistics
        oro, lsm = dm.raw_static_fields()
        source = f"checkpoint inputs of {dm.hparams.data_path or 'the default world'}"
        checkpoint[INPUTS_KEY] = ModelInputs(stats, modes, oro, lsm, source).to_checkpoint()
        if self.ema is not None:  # the network's keys hold the average (what predict/export read), the raw weights aside
            sd = checkpoint["state_dict"]
            for buf, net in self.ema.checkpoint_keys("ema.", "forecaster.net."):
                sd[buf], sd[net] = sd[net], sd[buf]
            checkpoint["ema_in_network_keys"] = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("ema_in_network_keys"):
            sd = checkpoint["state_dict"]
            if self.ema is None:
                if self.trainer.state.fn == "fit":
                    raise ValueError("this checkpoint was trained with model.ema_decay: resume it with the same model.ema_decay")
                for key in [k for k in sd if k.startswith("ema.")]:  # validate/test the average, which the network keys hold
                    del sd[key]
                return
            for buf, net in self.ema.checkpoint_keys("ema.", "forecaster.net."):
                sd[buf], sd[net] = sd[net], sd[buf]

    def on_fit_start(self) -> None:
        self._log_mapping()

    def _log_mapping(self) -> None:
        logger = self.logger
        if self.mapping is None or not isinstance(logger, MLFlowLogger) or not self.trainer.is_global_zero:
            return
        logger.experiment.log_dict(logger.run_id, self.mapping.to_dict(), "init_from/channel_mapping.json")
        logger.experiment.log_text(logger.run_id, "\n".join(self.mapping.lines()) + "\n", "init_from/channel_mapping.txt")

    @property
    def net(self) -> FCN3:
        return self.forecaster.net
