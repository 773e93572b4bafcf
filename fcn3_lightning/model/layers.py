"""The one place where torch-harmonics layers are constructed.

Every spherical layer of the network (DISCO convolutions, spectral convolutions, SHTs and
resampling) is built through a :class:`SphericalLayers` factory. The serial factory returns the
plain torch-harmonics modules; the spatial-parallel strategy substitutes a factory that returns
their ``torch_harmonics.distributed`` twins, without the network code changing.

``disco_impl`` picks the kernels of the DISCO convolutions on one grid (the processor blocks) and of the decoders
(resampling + DISCO): ``"fourier"`` (default) computes them in Fourier space
(:mod:`fcn3_lightning.model.disco_fourier`, tables derived from torch-harmonics' own psi, same weights);
``"torch-harmonics"`` uses torch-harmonics' kernels throughout. The encoders always use torch-harmonics' kernels.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch_harmonics as th
from torch import nn

from fcn3_lightning.kernels import disco_optimized_kernel
from fcn3_lightning.model.disco_fourier import FourierDisco

#: Grid names torch-harmonics understands; "equiangular" includes both poles.
GRIDS_WITH_POLES = ("equiangular", "equiangular-trapezoidal", "lobatto")
GRIDS = (*GRIDS_WITH_POLES, "legendre-gauss")
#: kernels of the blocks' and decoders' DISCO convolutions (see the module docstring)
DISCO_IMPLS = ("fourier", "torch-harmonics")
#: the default of every factory and of ``model.disco_impl``
DEFAULT_DISCO_IMPL = "fourier"


def fcn3_theta_cutoff(nlat: int, kernel_shape: Sequence[int], factor: float = 1.0) -> float:
    """FCN3's DISCO cut-off radius: ``factor * (kernel_shape[0] + 1) * pi / 2 / (nlat - 1)``.

    At 721 latitudes this is 0.5 degrees (encoders, decoders); the processor uses ``factor=2``
    at the latent resolution (2.006 degrees at 360 latitudes).
    """
    if nlat < 2:
        raise ValueError(f"the DISCO cut-off needs at least 2 latitudes, got nlat={nlat}")
    return factor * (kernel_shape[0] + 1) * 0.5 * math.pi / (nlat - 1)


class _EagerSpectralConvS2(th.SpectralConvS2):
    """torch-harmonics' spectral convolution with its channel contraction left eager.

    torch-harmonics wraps the contraction in ``torch.compile``, but Inductor cannot generate code for
    complex tensors: compiling only adds seconds of latency per new shape, for the same kernel.
    """

    def _contract_lwise(self, ac: torch.Tensor, bc: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bgixy,giox->bgoxy", ac, bc)


class SphericalLayers:
    """Factory for the serial torch-harmonics layers (the distributed factory subclasses it)."""

    #: Whether layers built by this factory see a tile of the grid rather than the whole grid.
    distributed: bool = False

    def __init__(self, disco_impl: str = DEFAULT_DISCO_IMPL):
        if disco_impl not in DISCO_IMPLS:
            raise ValueError(f"disco_impl={disco_impl!r} is not supported; choose one of {list(DISCO_IMPLS)}")
        self.disco_impl = disco_impl

    def local_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """The part of a (nlat, nlon) grid this process holds: all of it (the distributed factory: its tile)."""
        return (int(shape[0]), int(shape[1]))

    def tile(self, shape: Sequence[int]) -> tuple[slice, slice]:
        """(latitude, longitude) slices of this process's part of a (nlat, nlon) grid: all of it."""
        return slice(0, int(shape[0])), slice(0, int(shape[1]))

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
        """A DISCO convolution; on one grid (the processor blocks) in Fourier space unless ``disco_impl`` says otherwise
        (between grids, the encoders, always torch-harmonics' kernels: the Fourier form is slower there)."""
        fourier = self.fourier_applies(in_shape, out_shape, grid_in=grid_in, grid_out=grid_out)
        conv = self._th_disco(
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
            optimized_kernel=not fourier and disco_optimized_kernel(),  # the compiled kernels, unless the slow path is allowed
        )
        return self.fourier_disco(conv) if fourier else conv

    def fourier_applies(self, in_shape: Sequence[int], out_shape: Sequence[int], *, grid_in: str, grid_out: str) -> bool:
        """Whether :meth:`disco` builds this convolution in Fourier space (``disco_impl="fourier"``, one grid)."""
        return self.disco_impl == "fourier" and tuple(in_shape) == tuple(out_shape) and grid_in == grid_out

    def fourier_disco(self, conv: nn.Module, resample: nn.Module | None = None) -> nn.Module:
        """The Fourier-space layer of the torch-harmonics convolution ``conv`` on the whole grid (``resample``: the
        decoders' fused resampling); the distributed factory returns its twin on the rank's tile."""
        return FourierDisco(conv, resample)

    @staticmethod
    def _th_disco(in_channels: int, out_channels: int, in_shape: Sequence[int], out_shape: Sequence[int], **kwargs: object) -> nn.Module:
        with warnings.catch_warnings():
            # torch-harmonics 0.9 deprecates the name "morlet" (an alias of the unnormalised
            # harmonic basis FCN3 was trained with); we keep the reference's name on purpose.
            warnings.filterwarnings("ignore", message=".*'morlet'.*", category=DeprecationWarning)
            return th.DiscreteContinuousConvS2(
                in_channels, out_channels, in_shape=tuple(in_shape), out_shape=tuple(out_shape), bias=False, **kwargs
            )

    def resampled_disco(
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
    ) -> tuple[nn.Module, nn.Module]:
        """(resampling, DISCO convolution) of a decoder: bilinear resampling from ``in_shape`` (``grid_in``) to
        ``out_shape`` (``grid_out``), then a DISCO convolution on ``out_shape``. With ``disco_impl="fourier"`` the two
        are fused in Fourier space: the resampling is then an identity and the convolution reads the ``in_shape``
        field (the convolution's state dict is the same either way)."""
        disco = dict(kernel_shape=kernel_shape, basis_type=basis_type, basis_norm_mode=basis_norm_mode, groups=groups)
        if self.disco_impl != "fourier":
            resample = self.resample(in_shape, out_shape, grid_in=grid_in, grid_out=grid_out)
            conv = self.disco(
                in_channels, out_channels, out_shape, out_shape, grid_in=grid_out, grid_out=grid_out, theta_cutoff=theta_cutoff, **disco
            )
            return resample, conv
        resample = th.ResampleS2(*in_shape, *out_shape, grid_in=grid_in, grid_out=grid_out, mode="bilinear")
        conv = self._th_disco(
            in_channels,
            out_channels,
            out_shape,
            out_shape,
            grid_in=grid_out,
            grid_out=grid_out,
            theta_cutoff=theta_cutoff,
            optimized_kernel=False,
            **disco,
        )
        return nn.Identity(), self.fourier_disco(conv, resample)

    def spectral_conv(self, shape: Sequence[int], channels: int, *, grid: str) -> nn.Module:
        """Driscoll-Healy convolution: one complex channel-mixing matrix per degree l."""
        return _EagerSpectralConvS2(tuple(shape), tuple(shape), channels, channels, num_groups=1, grid_in=grid, grid_out=grid, bias=False)

    def resample(self, in_shape: Sequence[int], out_shape: Sequence[int], *, grid_in: str, grid_out: str) -> nn.Module:
        return th.ResampleS2(*in_shape, *out_shape, grid_in=grid_in, grid_out=grid_out, mode="bilinear")

    def sht(self, shape: Sequence[int], *, lmax: int | None, mmax: int | None, grid: str) -> nn.Module:
        return th.RealSHT(*shape, lmax=lmax, mmax=mmax, grid=grid, norm="ortho", csphase=True)

    def isht(self, shape: Sequence[int], *, lmax: int | None, mmax: int | None, grid: str) -> nn.Module:
        return th.InverseRealSHT(*shape, lmax=lmax, mmax=mmax, grid=grid, norm="ortho", csphase=True)


SERIAL = SphericalLayers()


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every parameter on the ``meta`` device (no memory, no init cost).

    The layers' fixed geometry (DISCO sparse tensors, Legendre tables, resampling weights) is
    still computed on the CPU: torch-harmonics needs real values to build it. This is how the
    full-size network (711 M parameters) is built to inspect it on a small machine.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
