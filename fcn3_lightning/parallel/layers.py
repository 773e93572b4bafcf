"""Distributed twins of the spherical layers, for latitude x longitude domain decomposition.

:class:`DistributedSphericalLayers` is a drop-in for :class:`~fcn3_lightning.model.layers.SphericalLayers`:
``FCN3(..., layers=DistributedSphericalLayers())`` builds the network whose spherical layers take and return this
rank's tile of the grid (latitudes split over the h / polar group, longitudes over the w / azimuth group,
``compute_split_shapes`` chunks). ``torch_harmonics.distributed`` must be initialised first (see
:class:`~fcn3_lightning.parallel.mesh.ProcessMesh`).

==================  ==========================================  ==================================================
serial layer        distributed layer                           parameters
==================  ==========================================  ==================================================
DISCO convolution   ``DistributedDiscreteContinuousConvS2``     weight replicated (same shape as serial)
Fourier DISCO       ``DistributedFourierDisco`` (ours)          weight replicated (same state dict as serial)
spectral (DHConv)   ``DistributedSpectralConvS2`` (eager)       weight ``(g, cin, cout, l)``: l sharded over h
bilinear resample   ``DistributedResampleS2``                   none
SHT / inverse SHT   ``DistributedRealSHT`` / ``...InverseRealSHT``  none; spectra are (l over h, m over w) chunks
==================  ==========================================  ==================================================

torch-harmonics 0.9.3's ``DistributedSpectralConvS2`` performs the same operations as the serial
``SpectralConvS2`` (SHT, l-wise channel contraction, inverse SHT, same truncation ``lmax = mmax = min(...)``),
on the local (l, m) chunk with the local l-rows of the weight; only its channel contraction is wrapped in
``torch.compile``, which we leave eager as the serial factory does (Inductor cannot generate complex kernels).
Its weight gradient covers the local m only: the strategy must sum it over the w group (reference section 5.5).

With ``disco_impl="fourier"`` the processor blocks' DISCO and the decoders' resampling + DISCO are the twins of the
Fourier-space layers (:mod:`fcn3_lightning.parallel.disco_fourier`: longitude transpose, band GEMMs as partial sums,
reduce-scatter over latitude); the encoders stay ``DistributedDiscreteContinuousConvS2`` (as the serial factory keeps
torch-harmonics' kernels there). No serial Fourier layer is ever built on a tile: :meth:`fourier_disco` returns the twin.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch_harmonics.distributed as thd
from torch import nn

from fcn3_lightning.kernels import disco_optimized_kernel
from fcn3_lightning.model.layers import DEFAULT_DISCO_IMPL, SphericalLayers
from fcn3_lightning.parallel.disco_fourier import DistributedFourierDisco
from fcn3_lightning.parallel.mesh import split_slice

#: DISCO polar modes: torch-harmonics' two, plus "auto" = halo exchange where the filter reach fits one neighbour.
POLAR_MODES = ("auto", "halo-exchange", "reduce-scatter")


class EagerDistributedSpectralConvS2(thd.DistributedSpectralConvS2):
    """``DistributedSpectralConvS2`` with its channel contraction left eager (as ``_EagerSpectralConvS2``)."""

    def _contract_lwise(self, ac: torch.Tensor, bc: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bgixy,giox->bgoxy", ac, bc)


class DistributedSphericalLayers(SphericalLayers):
    """Factory of the ``torch_harmonics.distributed`` layers; same methods and arguments as the serial one.

    Args:
        polar_mode: how DISCO convolutions split over latitude. ``"halo-exchange"`` borrows halo rows from the
            neighbouring h ranks (point-to-point, the output rows stay local); ``"reduce-scatter"`` computes partial
            sums of every output row and reduce-scatters them (any filter reach, more memory); ``"auto"`` uses the halo
            exchange where the filter reach fits inside one neighbour's rows, else reduce-scatter (small grids / many h
            ranks). Applies to the torch-harmonics DISCO layers (with ``disco_impl="fourier"``: the encoders only).
        disco_impl: as :class:`~fcn3_lightning.model.layers.SphericalLayers`; ``"fourier"`` builds the processor blocks'
            and decoders' DISCO as :class:`~fcn3_lightning.parallel.disco_fourier.DistributedFourierDisco` (needs at
            least ``w_parallel_size`` latitude rows per h rank on the latent and data grids). Default: the serial
            factory's (:data:`~fcn3_lightning.model.layers.DEFAULT_DISCO_IMPL`).
    """

    distributed = True

    def __init__(self, polar_mode: str = "auto", disco_impl: str = DEFAULT_DISCO_IMPL):
        super().__init__(disco_impl)
        if polar_mode not in POLAR_MODES:
            raise ValueError(f"polar_mode={polar_mode!r} is not supported; choose one of {list(POLAR_MODES)}")
        self.polar_mode = polar_mode

    @staticmethod
    def _check_initialized() -> None:
        if not thd.is_initialized():
            raise RuntimeError(
                "torch_harmonics.distributed is not initialised: build a ProcessMesh (fcn3_lightning.parallel) before "
                "building the network with DistributedSphericalLayers"
            )

    def local_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """This rank's tile of an (nlat, nlon) grid: what the layers take and return."""
        lat, lon = self.tile(shape)
        return lat.stop - lat.start, lon.stop - lon.start

    def tile(self, shape: Sequence[int]) -> tuple[slice, slice]:
        """(latitude, longitude) slices of this rank's tile of an (nlat, nlon) grid (the layers' split)."""
        self._check_initialized()
        nlat, nlon = (int(s) for s in shape)
        # the mesh's split (ProcessMesh registered these groups with torch-harmonics), by the one split function
        return (
            split_slice(nlat, thd.polar_group_size(), thd.polar_group_rank(), what="latitude dimension (h_parallel_size)"),
            split_slice(nlon, thd.azimuth_group_size(), thd.azimuth_group_rank(), what="longitude dimension (w_parallel_size)"),
        )

    def disco(
        self,
        in_channels: int,
        out_channels: int,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        *,
        kernel_shape: Sequence[int],
        basis_type: str,
        basis_norm_mode: str,
        groups: int,
        grid_in: str,
        grid_out: str,
        theta_cutoff: float,
    ) -> nn.Module:
        self._check_initialized()
        if self.fourier_applies(in_shape, out_shape, grid_in=grid_in, grid_out=grid_out):
            # the serial factory builds torch-harmonics' layer on the whole grid (its psi) and hands it to
            # fourier_disco, which here returns the twin
            return super().disco(
                in_channels,
                out_channels,
                in_shape,
                out_shape,
                kernel_shape=kernel_shape,
                basis_type=basis_type,
                basis_norm_mode=basis_norm_mode,
                groups=groups,
                grid_in=grid_in,
                grid_out=grid_out,
                theta_cutoff=theta_cutoff,
            )
        w = thd.azimuth_group_size()
        if w > min(in_channels, out_channels):
            # torch-harmonics' all-to-all trades longitudes for channels: every longitude rank needs a channel
            raise ValueError(
                f"w_parallel_size={w} splits the channels of every DISCO convolution over the longitude ranks, but one "
                f"has {in_channels} input and {out_channels} output channels (e.g. the encoder of a variable group with "
                f"fewer variables): use w_parallel_size <= {min(in_channels, out_channels)}, or h_parallel_size instead"
            )

        def build(polar_mode: str) -> nn.Module:
            return thd.DistributedDiscreteContinuousConvS2(
                in_channels,
                out_channels,
                in_shape=tuple(in_shape),
                out_shape=tuple(out_shape),
                kernel_shape=tuple(kernel_shape),
                basis_type=basis_type,
                basis_norm_mode=basis_norm_mode,
                groups=groups,
                grid_in=grid_in,
                grid_out=grid_out,
                bias=False,
                theta_cutoff=theta_cutoff,
                optimized_kernel=disco_optimized_kernel(),  # the compiled kernels, unless the slow path is allowed
                polar_mode=polar_mode,
            )

        with warnings.catch_warnings():
            # same deprecated-but-intended basis name as the serial factory
            warnings.filterwarnings("ignore", message=".*'morlet'.*", category=DeprecationWarning)
            if self.polar_mode != "auto":
                return build(self.polar_mode)
            try:
                return build("halo-exchange")
            except ValueError:
                # the filter reaches past the neighbouring rank's rows: the halo exchange cannot serve it; this
                # depends only on the sizes, so every h rank takes the same branch
                return build("reduce-scatter")

    def fourier_disco(self, conv: nn.Module, resample: nn.Module | None = None) -> nn.Module:
        """The distributed twin of the Fourier-space layer of ``conv`` (whole grid): takes and returns the rank's tile."""
        self._check_initialized()
        return DistributedFourierDisco(conv, resample)

    def spectral_conv(self, shape: Sequence[int], channels: int, *, grid: str) -> nn.Module:
        """Driscoll-Healy convolution on the local (l, m) chunk; weight holds this h rank's l-rows."""
        self._check_initialized()
        return EagerDistributedSpectralConvS2(
            tuple(shape), tuple(shape), channels, channels, num_groups=1, grid_in=grid, grid_out=grid, bias=False
        )

    def resample(self, in_shape: Sequence[int], out_shape: Sequence[int], *, grid_in: str, grid_out: str) -> nn.Module:
        self._check_initialized()
        return thd.DistributedResampleS2(*in_shape, *out_shape, grid_in=grid_in, grid_out=grid_out, mode="bilinear")

    def sht(self, shape: Sequence[int], *, lmax: int | None, mmax: int | None, grid: str) -> nn.Module:
        self._check_initialized()
        return thd.DistributedRealSHT(*shape, lmax=lmax, mmax=mmax, grid=grid, norm="ortho", csphase=True)

    def isht(self, shape: Sequence[int], *, lmax: int | None, mmax: int | None, grid: str) -> nn.Module:
        self._check_initialized()
        return thd.DistributedInverseRealSHT(*shape, lmax=lmax, mmax=mmax, grid=grid, norm="ortho", csphase=True)
