"""The ensemble CRPS training loss on a tile: the serial :class:`~fcn3_lightning.losses.EnsembleCRPSLoss`, split.

Reference section 5.4. The serial loss is linear in its per-(sample, step, channel) terms, and each term is a sum
over grid points (spatial CRPS x quadrature weight) or over (l, m) coefficients (spectral CRPS x multiplicity
weight). Split over tiles, every rank computes those sums over its own points only, so

    serial loss = sum over the spatial group of the per-tile losses

and one differentiable all-reduce (:func:`~fcn3_lightning.parallel.comm.reduce_from_group`, backward identity)
of the scalar completes it. Per rank:

1. the ensemble ranks of a sample hold different members: :func:`~fcn3_lightning.parallel.comm.gather_members`
   collects all of them along the member dim first (the CRPS couples the members; its backward hands every rank
   the gradient of its own members);
2. the serial :class:`EnsembleCRPSLoss` runs on the tile with the tile's rows of the quadrature weights and a
   ``DistributedRealSHT`` for the spectral term (local (l, m) chunk; :class:`~fcn3_lightning.losses.SpectralCRPS`
   picks the m-multiplicity weights of its chunk);
3. the result is all-reduced (SUM) over the spatial group.

The returned loss is the full-domain, full-ensemble loss averaged over this rank's samples; averaging it (and the
gradients, :func:`~fcn3_lightning.parallel.grads.reduce_gradients`) over the batch ranks gives the serial value
when every batch rank holds the same number of samples.

Every ensemble rank evaluates the CRPS of all members on its tile (the reference instead all-to-alls members
against points, which saves the redundant CRPS work at the same communication volume); the SHT of every member is
computed on every ensemble rank, too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fcn3_lightning.grid import quadrature_weights
from fcn3_lightning.losses import EnsembleCRPSLoss
from fcn3_lightning.parallel.comm import all_reduce_coalesced_, gather_members, reduce_from_group
from fcn3_lightning.parallel.layers import DistributedSphericalLayers
from fcn3_lightning.parallel.mesh import Layout


class DistributedEnsembleCRPSLoss(nn.Module):
    """:class:`~fcn3_lightning.losses.EnsembleCRPSLoss` on this rank's tile and ensemble members.

    Args:
        mesh: the process mesh (its spatial and ensemble groups, and this rank's tile); torch-harmonics must be
            initialised on its h / w groups (``ProcessMesh(init_harmonics=True)``, the default).
        img_shape: the full (nlat, nlon) grid.
        channel_weights: per-channel weights (C,), as for the serial loss.
        quadrature: full-grid quadrature weights ((nlat, 1) or (nlat, nlon)); default
            :func:`~fcn3_lightning.grid.quadrature_weights` of ``img_shape`` and ``grid``. The tile's part is cut
            here.
        grid: the data grid.
        layers: factory of the distributed SHT (default :class:`DistributedSphericalLayers`).
        **kwargs: the serial loss's remaining options (``kind``, ``alpha``, ``spectral_weight``,
            ``spectral_normalization``, ``multistep_weighting``, ``spectral_lmax``).

    ``forward(pred, obs)``: pred (B, M_local, S, C, h, w) or one step (B, M_local, C, h, w), obs (B, S, C, h, w) or
    (B, C, h, w), on this rank's tile (h, w) and its members. Returns ``(loss, details)`` like the serial loss; the
    loss and the details are complete over the tiles and members (identical on every rank of a sample).
    """

    def __init__(
        self,
        mesh: Layout,
        img_shape: Sequence[int],
        channel_weights: Tensor | Sequence[float],
        *,
        quadrature: Tensor | None = None,
        grid: str = "equiangular",
        layers: DistributedSphericalLayers | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if "quadrature" in kwargs or "layers" in kwargs:
            raise TypeError("pass quadrature / layers as keywords of DistributedEnsembleCRPSLoss, once")
        self.mesh = mesh
        self.img_shape = tuple(int(s) for s in img_shape)
        if len(self.img_shape) != 2:
            raise ValueError(f"img_shape must be (nlat, nlon), got {tuple(img_shape)}")
        nlat, nlon = self.img_shape
        q = quadrature_weights(nlat, nlon, grid=grid, dtype=torch.float64) if quadrature is None else torch.as_tensor(quadrature)
        if q.ndim != 2 or q.shape[0] != nlat or q.shape[1] not in (1, nlon):
            raise ValueError(f"quadrature must be the full grid's weights, shape ({nlat}, 1) or ({nlat}, {nlon}); got {tuple(q.shape)}")
        lat, lon = mesh.tile(self.img_shape)
        # the weights of this tile's points: the same numbers the serial loss multiplies them with
        q_tile = q[lat] if q.shape[1] == 1 else q[lat, lon]
        self.local = EnsembleCRPSLoss(
            self.img_shape, channel_weights, quadrature=q_tile, grid=grid, layers=layers or DistributedSphericalLayers(), **kwargs
        )
        self.local_shape = (lat.stop - lat.start, lon.stop - lon.start)

    def forward(self, pred: Tensor, obs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if tuple(pred.shape[-2:]) != self.local_shape or tuple(obs.shape[-2:]) != self.local_shape:
            raise ValueError(
                f"this rank's tile of the {self.img_shape} grid is {self.local_shape}, got pred {tuple(pred.shape)} and obs "
                f"{tuple(obs.shape)}"
            )
        if pred.ndim < 2:
            raise ValueError(f"pred must be (B, M_local, ...), got shape {tuple(pred.shape)}")
        members = gather_members(pred, self.mesh.group("ensemble"), dim=1)
        loss, details = self.local(members, obs)
        spatial = self.mesh.group("spatial")
        loss = reduce_from_group(loss, spatial)
        # the logged per-(step, channel) terms are sums over the tile, too (detached: not differentiated)
        details = {k: v.clone() for k, v in details.items()}
        all_reduce_coalesced_(list(details.values()), spatial)
        return loss, details
