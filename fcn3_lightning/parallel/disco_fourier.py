"""Distributed twin of the Fourier-space DISCO layers (:mod:`fcn3_lightning.model.disco_fourier`), for the
latitude x longitude domain decomposition.

:class:`DistributedFourierDisco` takes and returns this rank's (latitude, longitude) tile, like the other twins of
:mod:`fcn3_lightning.parallel.layers`, and holds the same ``weight`` (replicated; same state dict as the serial layer).
It serves both kinds of Fourier layer: the processor blocks' DISCO and the decoders' fused resampling + DISCO (input
on the latent grid).

How the work is split (every step is exact up to float32 round-off; nothing is computed twice):

1. **Longitude transpose** (all-to-all over the w / azimuth group, as torch-harmonics' ``DistributedRealSHT`` does,
   but trading longitudes for *latitude rows* instead of channels): the rank's ``(h rows, w longitudes)`` tile becomes
   ``(sub-rows, all longitudes)``, its h rows split once more over the w ranks (``compute_split_shapes``). Every rank
   then holds whole longitude circles of *all* channels for a disjoint set of input rows, so the serial layer's
   :meth:`~fcn3_lightning.model.disco_fourier.FourierDisco.contract` (rfft + channel/basis contraction) runs unchanged,
   and the weight gradient of each rank is the partial sum over its own rows: the spatial SUM of
   :func:`~fcn3_lightning.parallel.grads.reduce_gradients` completes it, as for ``DistributedDiscreteContinuousConvS2``.
   Trading rows rather than channels puts no channel-count limit on ``w_parallel_size``; it needs at least
   ``w_parallel_size`` rows per h rank (input and output grid), checked at build time.
2. **Band GEMMs as partial sums** (the latitude halo): the band of input rows a filter reaches from an output row
   crosses rank boundaries. Instead of fetching halo rows of the contracted spectrum (``Kv`` times the channels), each
   rank applies the band tables' columns of *its* input rows to every output row they reach, giving a partial output
   spectrum over all output rows; a **reduce-scatter over the h group, then over the w group** (along latitude) sums
   the partials of all spatial ranks and leaves each rank the sum for its own output sub-rows, in the same split as
   step 1. This is torch-harmonics' ``reduce-scatter`` polar mode in Fourier space: any filter reach, any number of h
   ranks; the price is a partial spectrum of every output row on each rank (output channels x full latitude x
   wavenumbers), the backward being the all-gather of its gradient.
3. ``irfft`` over the whole longitude circle of the output sub-rows, then the inverse **longitude transpose** back to
   the ``(h rows, w longitudes)`` tile.

Each rank keeps only the table columns of its input rows (the serial tables are built, sliced, and dropped).

The twin subclasses :class:`~fcn3_lightning.model.disco_fourier.FourierDisco` and relies on its layout: ``contract``
returns ``(M, rows, Kv, B * O * 2)``; ``tiles[i] = (t0, t1, a, b)`` with ``table_{i}`` of shape ``(M, t1 - t0,
(b - a) * Kv)``, columns ordered (input row, basis function); ``out_sign`` / ``conj`` the decoders' conjugation sign.
``tests/test_disco_fourier_parallel.py`` checks it against the serial layer.
"""

from __future__ import annotations

import torch
import torch_harmonics.distributed as thd
from torch import nn

from fcn3_lightning.model.disco_fourier import FourierDisco


class DistributedFourierDisco(FourierDisco):
    """:class:`~fcn3_lightning.model.disco_fourier.FourierDisco` on this rank's (latitude, longitude) tile.

    Same constructor arguments (the torch-harmonics layer ``conv`` on the whole grid, and the decoders' ``resample``);
    ``torch_harmonics.distributed`` must be initialised. Raises ``ValueError`` naming ``w_parallel_size`` where an h
    rank holds fewer latitude rows than there are w ranks.
    """

    def __init__(self, conv: nn.Module, resample: nn.Module | None = None, tile_rows: int | None = None):
        super().__init__(conv, resample, tile_rows)
        if not thd.is_initialized():
            raise RuntimeError("torch_harmonics.distributed is not initialised: build a ProcessMesh before the distributed Fourier DISCO")
        h, w = thd.polar_group_size(), thd.azimuth_group_size()
        h_rank, w_rank = thd.polar_group_rank(), thd.azimuth_group_rank()
        rows = {}
        for name, nlat in (("input", self.nlat_in), ("output", self.nlat_out)):
            lat = thd.compute_split_shapes(nlat, h)
            if lat[-1] < w:
                raise ValueError(
                    f"w_parallel_size={w}: the Fourier DISCO splits each h rank's latitude rows over the w ranks, but the "
                    f"{name} grid ({nlat} rows over h_parallel_size={h}) leaves {lat[-1]} row(s) on some h rank; use "
                    f"w_parallel_size <= {lat[-1]} or disco_impl='torch-harmonics'"
                )
            sub = thd.compute_split_shapes(lat[h_rank], w)
            start = sum(lat[:h_rank]) + sum(sub[:w_rank])
            rows[name] = (start, start + sub[w_rank], sub)
        s0, s1, _ = rows["input"]
        self.out_sub_rows = rows["output"][2]  # the output rows of every w rank of this h rank (inverse transpose)
        self.lon_in_shapes = thd.compute_split_shapes(self.nlon_in, w)
        # keep, per serial tile, the columns of this rank's input rows; drop the serial tables
        pieces = []
        for i, (t0, t1, a, b) in enumerate(self.tiles):
            table = getattr(self, f"table_{i}")
            delattr(self, f"table_{i}")
            lo, hi = max(a, s0), min(b, s1)
            if lo >= hi:
                continue
            kv = table.shape[-1] // (b - a)
            self.register_buffer(f"part_{len(pieces)}", table[:, :, (lo - a) * kv : (hi - a) * kv].contiguous(), persistent=False)
            pieces.append((t0, t1, lo - s0, hi - s0))
        self.pieces = pieces
        self.in_rows = (s0, s1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input_rows={self.in_rows}, pieces={len(self.pieces)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):  # as the serial layer: FFTs and tables in float32
            x = thd.distributed_transpose_azimuth(x.float(), (-2, -1), self.lon_in_shapes)  # (B, C, sub-rows, nlon_in)
            u = self.contract(x)
            tables = [getattr(self, f"part_{i}") for i in range(len(self.pieces))]
            y = _PartialBands.apply(u, tables, self.pieces, x.shape[0], self.out_channels, self.nlat_out)
            y = thd.reduce_from_scatter_to_polar_region(y, 2)  # sum over h ranks, keep this h rank's rows
            y = thd.reduce_from_scatter_to_azimuth_region(y, 2)  # sum over w ranks, keep this rank's sub-rows
            if self.conj:
                y = y * self.out_sign
            y = torch.fft.irfft(torch.view_as_complex(y.contiguous()), n=self.nlon, dim=-1)
            return thd.distributed_transpose_azimuth(y, (-1, -2), self.out_sub_rows).to(dtype)


class _PartialBands(torch.autograd.Function):
    """This rank's band GEMMs: the partial (B, O, nlat_out, M, 2) output spectrum of its input rows (zero elsewhere).

    One autograd node (as the serial layer's): the tables are constants, backward is the transposed GEMMs."""

    @staticmethod
    def forward(ctx, u, tables, pieces, batch, channels, nlat_out):  # noqa: ANN001, ANN205 (autograd.Function signature)
        m, n = u.shape[0], u.shape[-1]
        y = u.new_zeros(batch, channels, nlat_out, m, 2)
        for table, (t0, t1, r0, r1) in zip(tables, pieces, strict=True):
            p = torch.bmm(table, u[:, r0:r1].reshape(m, -1, n))  # (M, T, B * O * 2)
            y[:, :, t0:t1] = p.view(m, t1 - t0, batch, channels, 2).permute(2, 3, 1, 0, 4)
        ctx.tables, ctx.pieces, ctx.u_shape = tables, pieces, u.shape
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        m = gy.shape[3]
        gu = gy.new_zeros(ctx.u_shape)
        n = gu.shape[-1]
        for table, (t0, t1, r0, r1) in zip(ctx.tables, ctx.pieces, strict=True):
            g = gy[:, :, t0:t1].permute(3, 2, 0, 1, 4).reshape(m, t1 - t0, n)
            gu[:, r0:r1] += torch.bmm(table.transpose(1, 2), g).view(m, r1 - r0, -1, n)
        return gu, None, None, None, None, None
