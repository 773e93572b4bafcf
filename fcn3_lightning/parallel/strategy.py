"""Lightning strategy for spatial model parallelism on top of DDP (issue 7, first cut).

``--trainer.strategy fcn3_lightning.parallel.strategy.SpatialParallelStrategy`` with
``--trainer.strategy.init_args.h_parallel_size 2`` etc. The world is laid out as a
:class:`~fcn3_lightning.parallel.mesh.ProcessMesh` of (batch, ensemble, h, w) ranks; the batch size is the rest.

**No DDP wrapper.** DDP averages every gradient over one group, but the serial gradient needs three different
reductions (:mod:`fcn3_lightning.parallel.grads`): SUM over the spatial axes a parameter is replicated over, SUM over
ensemble ranks and MEAN over batch ranks. DDP over the data group could do the last two only up to a factor
(and the spatial sums would still be separate, after DDP's bucketed all-reduce, outside its overlap), so the
strategy skips the wrapper (:meth:`configure_ddp` only sets up the optimizers' view of the plain module) and calls
:func:`~fcn3_lightning.parallel.grads.reduce_gradients` once per optimizer step, after the closure's backward and
before Lightning's gradient clipping. Norm clipping (``trainer.gradient_clip_val``) uses the shard-aware
:func:`~fcn3_lightning.parallel.grads.clip_grad_norm_`, i.e. the norm of the serial gradient. Without DDP the
initial weights are not broadcast by DDP either: the strategy broadcasts them itself at setup.

**Module interface.** The strategy exposes :attr:`mesh` (also as :attr:`layout`: what :func:`layout_of` hands the
module, the data module and the callbacks), :attr:`spatial_group` (None without a spatial split) and
:meth:`layers_factory` (the spherical-layers factory to build the network with; None = the serial default). A
LightningModule that builds its network on tiles and its ensemble on member shards declares so with a class
attribute ``supports_spatial_parallel = True``; without it, only batch parallelism (h = w = ensemble = 1) is
accepted, so a module never silently trains a serial network under a split.

**Checkpoints** are layout-independent: exactly the serial layout a single-process run writes. Lightning builds the
checkpoint dict on every rank; :meth:`lightning_module_state_dict` and :meth:`optimizer_state` gather the sharded
spectral weights and their per-parameter optimizer state (Adam moments) over the spatial groups (collectives), and
global rank 0 writes the file through the trainer's ``checkpoint_io`` (e.g. the atomic one). Loading
(:meth:`load_model_state_dict`, :meth:`load_optimizer_state_dict`) cuts every rank's shard out of the serial tensors,
so a checkpoint resumes under any layout, and a plain single-process Trainer reads it as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.optim import Optimizer

from fcn3_lightning.model.layers import DEFAULT_DISCO_IMPL
from fcn3_lightning.parallel.grads import GradTag, clip_grad_norm_, gradient_tags, reduce_gradients
from fcn3_lightning.parallel.layers import DistributedSphericalLayers
from fcn3_lightning.parallel.mesh import Layout, MeshSizes, ProcessMesh, mesh_sizes, rank_layout
from fcn3_lightning.parallel.state import (
    gather_optimizer_state,
    gather_state_dict,
    optimizer_param_names,
    shard_optimizer_state,
    shard_state_dict,
    sharded_entries,
)

#: attribute a LightningModule sets to True when it builds its network through :meth:`SpatialParallelStrategy.layers_factory`
SUPPORTS_ATTR = "supports_spatial_parallel"


class SpatialParallelStrategy(DDPStrategy):
    """DDP-style data parallelism plus latitude / longitude domain decomposition and ensemble parallelism.

    Args:
        h_parallel_size: ranks over which the latitudes are split (polar group).
        w_parallel_size: ranks over which the longitudes are split (azimuth group).
        ensemble_parallel_size: ranks over which the ensemble members of a sample are split.
        polar_mode: DISCO latitude split of :class:`~fcn3_lightning.parallel.layers.DistributedSphericalLayers`.
        accelerator, ..., start_method: as for :class:`~lightning.pytorch.strategies.DDPStrategy`. Its DDP-wrapper
            options (``find_unused_parameters``, comm hooks, ...) are not accepted: there is no wrapper.

    The batch-parallel size is ``world size / (h x w x ensemble)``; it must divide evenly.
    """

    strategy_name = "spatial_parallel"

    def __init__(
        self,
        h_parallel_size: int = 1,
        w_parallel_size: int = 1,
        ensemble_parallel_size: int = 1,
        polar_mode: str = "auto",
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        # validate the sizes alone now (world size 1 x product), against the real world size in setup_distributed
        self._sizes_args = {
            "h_parallel_size": h_parallel_size,
            "w_parallel_size": w_parallel_size,
            "ensemble_parallel_size": ensemble_parallel_size,
        }
        product = 1
        for value in self._sizes_args.values():
            product *= value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1
        mesh_sizes(product, **self._sizes_args)
        DistributedSphericalLayers(polar_mode)  # validates polar_mode early, with its own error message
        # no DDP-wrapper options (comm hooks, find_unused_parameters, ...): there is no wrapper to pass them to
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.polar_mode = polar_mode
        self.mesh: ProcessMesh | None = None
        self._tags: dict[str, GradTag] | None = None

    # --- mesh ---------------------------------------------------------------------------------------

    def mesh_sizes(self, world_size: int) -> MeshSizes:
        """The mesh for ``world_size`` processes (``ValueError`` naming the option if it does not divide)."""
        return mesh_sizes(world_size, **self._sizes_args)

    def setup_distributed(self) -> None:
        """Create the default process group (DDPStrategy), then the mesh's groups (collective, same order everywhere)."""
        super().setup_distributed()
        self.mesh = ProcessMesh(**self._sizes_args)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Samples are split over the batch ranks only: the ranks of one ensemble / spatial domain share samples."""
        sizes = self.mesh_sizes(self.world_size)
        return {"num_replicas": sizes.batch, "rank": rank_layout(self.global_rank, sizes).batch_rank}

    @property
    def model_parallel(self) -> bool:
        """True when the network or the ensemble is split (the LightningModule must support it)."""
        sizes = self.mesh_sizes(self.world_size)
        return sizes.model > 1 or sizes.ensemble > 1

    @property
    def layout(self) -> ProcessMesh:
        """The layout every reader takes (the mesh: tile, member share, groups); once the process group exists."""
        return self._require_mesh()

    @property
    def spatial_group(self) -> dist.ProcessGroup | None:
        """This rank's spatial (h x w) group, or None when the grid is not split."""
        return None if self.mesh is None else self.mesh.spatial_group

    def layers_factory(self, disco_impl: str = DEFAULT_DISCO_IMPL) -> DistributedSphericalLayers | None:
        """Spherical-layers factory for ``FCN3(layers=...)``: distributed under a spatial split, else None (serial);
        ``disco_impl``: the DISCO kernels (the module's ``model.disco_impl``)."""
        if self.mesh is None:
            raise RuntimeError("SpatialParallelStrategy.layers_factory is available once the process group exists (configure_model)")
        return DistributedSphericalLayers(self.polar_mode, disco_impl) if self.mesh.sizes.model > 1 else None

    @property
    def reduction_tags(self) -> dict[str, GradTag] | None:
        """How each parameter's gradient is reduced (:func:`~fcn3_lightning.parallel.grads.gradient_tags`; from setup on)."""
        return self._tags

    def _require_mesh(self) -> ProcessMesh:
        if self.mesh is None:
            raise RuntimeError("SpatialParallelStrategy: the process mesh does not exist yet (setup_distributed has not run)")
        return self.mesh

    # --- model setup --------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer) -> None:
        module = self.lightning_module
        if self.model_parallel and not getattr(module, SUPPORTS_ATTR, False):
            raise ValueError(
                f"{type(module).__name__} does not build its network on tiles / member shards (it does not set "
                f"`{SUPPORTS_ATTR} = True`): h_parallel_size, w_parallel_size and ensemble_parallel_size must be 1 "
                f"with it (got {self._sizes_args}); only batch parallelism is available"
            )
        super().setup(trainer)
        self._tags = gradient_tags(self.lightning_module)
        self._broadcast_parameters()
        # norm clipping must see the serial gradient's norm: every shard counted once (instance-level override, so
        # any precision plugin keeps its other behaviour)
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm  # type: ignore[method-assign]

    def configure_ddp(self) -> None:
        """No DDP wrapper: gradients are reduced by :meth:`optimizer_step` (see the module docstring for why)."""

    @torch.no_grad()
    def _broadcast_parameters(self) -> None:
        """Start every rank from the same weights (what DDP's constructor would do).

        Replicated parameters come from global rank 0; sharded ones from the first rank of this rank's data group,
        which holds the same shard (same model rank).
        """
        mesh = self._require_mesh()
        data_src = mesh.group_members["data"][0]
        for name, p in self.lightning_module.named_parameters():
            if self._tags[name].sharded:
                dist.broadcast(p.data, src=data_src, group=mesh.group("data"))
            else:
                dist.broadcast(p.data, src=0)

    # --- gradients ----------------------------------------------------------------------------------

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        """Reduce the gradients once, after the closure's (last) backward and before clipping and the step.

        Not in ``post_backward``: with gradient accumulation, ``.grad`` would then mix reduced and local terms.
        """

        def reduced_closure() -> Any:
            out = closure()
            reduce_gradients(self.lightning_module, self._require_mesh(), self._tags)
            return out

        return super().optimizer_step(optimizer, reduced_closure, model, **kwargs)

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: float) -> None:
        clip_grad_norm_(self.lightning_module, self._require_mesh(), float(clip_val), tags=self._tags)

    # --- checkpoints and teardown -------------------------------------------------------------------

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's state_dict in the serial layout (collective: every rank gathers, as Lightning calls it on all)."""
        module = self.lightning_module
        return gather_state_dict(module.state_dict(), module)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimizer's state_dict with the state of sharded parameters gathered to their serial shapes (collective)."""
        state = super().optimizer_state(optimizer)
        module = self.lightning_module
        if not sharded_entries(module):
            return state
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return gather_optimizer_state(state, optimizer_param_names(optimizer, module), module)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Global rank 0 writes the (already gathered, serial-layout) checkpoint through ``self.checkpoint_io``."""
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Load a serial-layout state_dict (from any layout, or a plain single-process run): each rank takes its shard."""
        local = shard_state_dict(checkpoint["state_dict"], self.lightning_module, strict=strict)
        super().load_model_state_dict({**checkpoint, "state_dict": local}, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Load serial-layout optimizer states: the state of sharded parameters is cut to this rank's shard."""
        module = self.lightning_module
        states = checkpoint["optimizer_states"]
        if sharded_entries(module):
            states = [
                shard_optimizer_state(state, optimizer_param_names(opt, module), module)
                for opt, state in zip(self.optimizers, states, strict=False)
            ]
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": states})

    def teardown(self) -> None:
        if self.mesh is not None:
            self.mesh.destroy()
            self.mesh = None
        super().teardown()


def layout_of(strategy: pl.strategies.Strategy) -> Layout:
    """The layout a strategy hands out: :class:`SpatialParallelStrategy`'s mesh, or for any other strategy the layout
    without a split (its ``world_size`` data-parallel replicas, each with the whole grid and every member)."""
    if isinstance(strategy, SpatialParallelStrategy):
        return strategy.layout
    return Layout(strategy.world_size, strategy.global_rank)
