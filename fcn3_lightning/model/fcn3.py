"""The FourCastNet 3 network (reference: ``shared/docs/fcn3-reference.md`` sections 1-2).

Data flow: variable-separated DISCO encoders take the data grid to the Legendre-Gauss latent grid
(one encoder shared across pressure levels, one for surface channels, one for auxiliary inputs);
a processor of spectral (global) and DISCO (local) blocks evolves the latent state, with the
auxiliary embedding re-joined before every block; decoders resample back to the data grid and
apply grouped DISCO convolutions; water channels are soft-clamped at zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fcn3_lightning.channels import FCN3_AUX_CHANNELS, FCN3_CHANNELS, ChannelLayout, channel_layout, check_aux_channels
from fcn3_lightning.model.layers import GRIDS, GRIDS_WITH_POLES, SERIAL, SphericalLayers, fcn3_theta_cutoff
from fcn3_lightning.precision import float32_region


def soft_clamp_water(x: torch.Tensor) -> torch.Tensor:
    """C1 spline ReLU: 0 for x <= 0, x^2 on (0, 0.5), x - 0.25 from 0.5 on."""
    return torch.where(x >= 0.5, x - 0.25, torch.where(x > 0.0, x * x, torch.zeros_like(x)))


#: activation checkpointing levels (:meth:`FCN3.set_checkpointing`) -> the parts whose activations are recomputed
CHECKPOINTING_LEVELS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "encoder+decoder": frozenset({"encoder", "decoder"}),
    "blocks": frozenset({"blocks"}),
    "blocks+encoder+decoder": frozenset({"blocks", "encoder", "decoder"}),
}


class Encoder(nn.Module):
    """Grouped DISCO convolution from the data grid to the latent grid (groups = gcd(in, out))."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with float32_region(x):  # the float32 rule: fcn3_lightning.precision
            return self.conv(x.float())


class Decoder(nn.Module):
    """Bilinear resampling latent -> data grid (poles expanded), then a grouped DISCO convolution (the factory may fuse
    the two into ``conv``, ``resample`` then being an identity: :meth:`SphericalLayers.resampled_disco`)."""

    def __init__(self, resample: nn.Module, conv: nn.Module):
        super().__init__()
        self.resample = resample
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with float32_region(x):  # the float32 rule: fcn3_lightning.precision
            return self.conv(self.resample(x.float()))


class MLP(nn.Module):
    """Pointwise two-layer MLP (1x1 convolutions with bias) with exact GELU in between."""

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(in_channels, hidden_channels, 1, bias=True)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_channels, out_channels, 1, bias=True)
        # reference init: He-normal for fc1, variance 1/hidden for fc2, zero biases
        nn.init.normal_(self.fc1.weight, std=math.sqrt(2.0 / in_channels))
        nn.init.normal_(self.fc2.weight, std=math.sqrt(1.0 / hidden_channels))
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ProcessorBlock(nn.Module):
    """ConvNeXt-like block without normalisation: filter -> MLP -> LayerScale -> identity skip.

    The input is the latent state with the auxiliary embedding appended; the skip and the output
    cover the latent channels only.
    """

    def __init__(self, filter_: nn.Module, in_channels: int, out_channels: int, hidden_channels: int, layer_scale: bool):
        super().__init__()
        self.filter = filter_
        self.mlp = MLP(in_channels, hidden_channels, out_channels)
        self.out_channels = out_channels
        # LayerScale initialised at 0.1; without it the residual branch enters at full strength
        self.layer_scale = nn.Parameter(torch.full((out_channels,), 0.1)) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.mlp(self.filter(x))
        if self.layer_scale is not None:
            d = d * self.layer_scale.view(1, -1, 1, 1).to(d.dtype)
        return x[:, : self.out_channels] + d


class FCN3(nn.Module):
    """FourCastNet 3 (spherical neural operator), as specified by the paper and its reference code.

    Input ``(B, C + A, nlat, nlon)``: the C prognostic channels (normalised) followed by the A
    auxiliary channels, on an equiangular grid with poles, row 0 at 90N. Output ``(B, C, nlat, nlon)``:
    the normalised state 6 h later. All sizes are constructor arguments; the defaults are FCN3's.

    Args:
        inp_shape: data grid (nlat, nlon), equiangular with both poles.
        channel_names: prognostic channels (see :mod:`fcn3_lightning.channels`).
        aux_channel_names: auxiliary input channels, in input order.
        scale_factor: latent grid is (nlat // scale_factor, nlon // scale_factor).
        model_grid_type: grid of the data (must include the poles).
        sht_grid_type: grid of the latent state.
        atmo_embed_dim: latent channels per pressure level (shared level encoder).
        surf_embed_dim: latent channels of the surface group.
        aux_embed_dim: channels of the auxiliary embedding joined to every block's input.
        num_layers: number of processor blocks.
        sfno_block_frequency: block i is global (spectral) when i % frequency == 0.
        kernel_shape: DISCO filter basis shape.
        filter_basis_type: DISCO filter basis ("morlet" = torch-harmonics' unnormalised harmonic basis).
        filter_basis_norm_mode: DISCO basis normalisation ("mean" in FCN3).
        mlp_ratio: MLP hidden width relative to the block input width.
        mlp_hidden_channels: hidden width of the blocks' MLPs; None: ``int(mlp_ratio * width)`` (the reference). Set
            when weights are mapped onto another channel list (:mod:`fcn3_lightning.model.channel_map`), which keeps
            the source's hidden units while the block width changes.
        layer_scale: multiply the residual branch by a learned per-channel scale (init 0.1).
        clamp_water: soft-clamp water channels at zero.
        water_channels: names of the water channels; None uses the reference rule (q*, r*, tcwv).
        encoder_groups: groups of the grouped DISCO convolutions by module name (``atmo_encoder``, ``surf_encoder``,
            ``aux_encoder``, ``atmo_decoder``, ``surf_decoder``); a module not named uses the reference rule,
            gcd(in, out). Channel mapping sets 1 (dense) where a new channel list breaks the source's grouping.
        layers: factory of the spherical layers (serial, or distributed for spatial parallelism).
    """

    def __init__(
        self,
        inp_shape: Sequence[int] = (721, 1440),
        channel_names: Sequence[str] = FCN3_CHANNELS,
        aux_channel_names: Sequence[str] = FCN3_AUX_CHANNELS,
        scale_factor: int = 2,
        model_grid_type: str = "equiangular",
        sht_grid_type: str = "legendre-gauss",
        atmo_embed_dim: int = 45,
        surf_embed_dim: int = 56,
        aux_embed_dim: int = 36,
        num_layers: int = 10,
        sfno_block_frequency: int = 5,
        kernel_shape: Sequence[int] = (3, 3),
        filter_basis_type: str = "morlet",
        filter_basis_norm_mode: str = "mean",
        mlp_ratio: float = 2.0,
        layer_scale: bool = True,
        clamp_water: bool = True,
        water_channels: Sequence[str] | None = None,
        mlp_hidden_channels: int | None = None,
        encoder_groups: Mapping[str, int] | None = None,
        layers: SphericalLayers | None = None,
    ):
        super().__init__()
        layers = layers or SERIAL
        self.layout: ChannelLayout = channel_layout(channel_names)
        self.aux_channel_names = tuple(aux_channel_names)
        self.noise_channel_names = tuple(check_aux_channels(self.aux_channel_names))
        self.inp_shape = _check_shape("inp_shape", inp_shape)
        self.latent_shape = _latent_shape(self.inp_shape, scale_factor)
        # what this process holds: the whole grids, or its tile of them under spatial parallelism
        self.local_inp_shape = layers.local_shape(self.inp_shape)
        self.local_latent_shape = layers.local_shape(self.latent_shape)
        self.tiled = layers.distributed
        # the factory, so that companions (noise process, auxiliary inputs) can be built for / cut to the same tile
        self.layers = layers
        _check_grid("model_grid_type", model_grid_type, GRIDS_WITH_POLES)
        _check_grid("sht_grid_type", sht_grid_type, GRIDS)
        for name, v in [
            ("atmo_embed_dim", atmo_embed_dim),
            ("surf_embed_dim", surf_embed_dim),
            ("aux_embed_dim", aux_embed_dim),
            ("num_layers", num_layers),
            ("sfno_block_frequency", sfno_block_frequency),
        ]:
            if int(v) < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        self.kernel_shape = tuple(int(k) for k in kernel_shape)
        self.clamp_water = clamp_water
        self.register_buffer("water_index", torch.tensor(self.layout.water_index(water_channels), dtype=torch.long), persistent=False)

        n_levels, n_level_vars = len(self.layout.levels), len(self.layout.level_variables)
        n_surf, n_aux = len(self.layout.surface_index), len(self.aux_channel_names)
        if n_levels == 0:
            atmo_embed_dim = 0
        if n_surf == 0:
            surf_embed_dim = 0
        if n_aux == 0:
            aux_embed_dim = 0
        self.atmo_embed_dim, self.surf_embed_dim, self.aux_embed_dim = atmo_embed_dim, surf_embed_dim, aux_embed_dim
        self.latent_channels = n_levels * atmo_embed_dim + surf_embed_dim
        self.n_in_channels = self.layout.n_channels + n_aux
        self.register_buffer("level_index", torch.tensor(self.layout.level_index, dtype=torch.long), persistent=False)
        self.register_buffer("surface_index", torch.tensor(self.layout.surface_index, dtype=torch.long), persistent=False)

        data, latent = self.inp_shape, self.latent_shape
        enc_cutoff = fcn3_theta_cutoff(data[0], self.kernel_shape)
        block_cutoff = fcn3_theta_cutoff(latent[0], self.kernel_shape, factor=2.0)
        disco = dict(kernel_shape=self.kernel_shape, basis_type=filter_basis_type, basis_norm_mode=filter_basis_norm_mode)

        groups = _check_groups(encoder_groups)

        def encoder(name: str, n_in: int, n_out: int) -> Encoder | None:
            if n_out == 0:
                return None
            conv = layers.disco(
                n_in,
                n_out,
                data,
                latent,
                groups=_groups(groups, name, n_in, n_out),
                grid_in=model_grid_type,
                grid_out=sht_grid_type,
                theta_cutoff=enc_cutoff,
                **disco,
            )
            return Encoder(conv)

        def decoder(name: str, n_in: int, n_out: int) -> Decoder | None:
            if n_in == 0:
                return None
            resample, conv = layers.resampled_disco(
                n_in,
                n_out,
                latent,
                data,
                groups=_groups(groups, name, n_in, n_out),
                grid_in=sht_grid_type,
                grid_out=model_grid_type,
                theta_cutoff=enc_cutoff,
                **disco,
            )
            return Decoder(resample, conv)

        self.atmo_encoder = encoder("atmo_encoder", n_level_vars, atmo_embed_dim)
        self.surf_encoder = encoder("surf_encoder", n_surf, surf_embed_dim)
        self.aux_encoder = encoder("aux_encoder", n_aux, aux_embed_dim)

        width = self.latent_channels + aux_embed_dim
        hidden = int(mlp_ratio * width) if mlp_hidden_channels is None else int(mlp_hidden_channels)
        if hidden < 1:
            raise ValueError(f"the blocks' MLP hidden width must be positive, got {hidden} (mlp_ratio / mlp_hidden_channels)")
        blocks = []
        for i in range(num_layers):
            if i % sfno_block_frequency == 0:
                filter_: nn.Module = layers.spectral_conv(latent, width, grid=sht_grid_type)
            else:
                filter_ = layers.disco(
                    width,
                    width,
                    latent,
                    latent,
                    groups=1,
                    grid_in=sht_grid_type,
                    grid_out=sht_grid_type,
                    theta_cutoff=block_cutoff,
                    **disco,
                )
            blocks.append(ProcessorBlock(filter_, width, self.latent_channels, hidden, layer_scale))
        self.blocks = nn.ModuleList(blocks)

        self.atmo_decoder = decoder("atmo_decoder", atmo_embed_dim, n_level_vars)
        self.surf_decoder = decoder("surf_decoder", surf_embed_dim, n_surf)
        # a training-time setting, not architecture: kept out of the constructor (and so of model packages)
        self.checkpointing = "none"

    def set_checkpointing(self, level: str) -> None:
        """Activation checkpointing of the training forward: one of :data:`CHECKPOINTING_LEVELS`.

        ``"blocks"`` keeps only each processor block's input for backward and recomputes the block there (the
        reference's ``checkpointing_level`` 3 minus its encoder / decoder part); ``"encoder+decoder"`` does the same
        for the encoders and decoders (the reference's level 1), ``"blocks+encoder+decoder"`` for all of them. Non-
        reentrant ``torch.utils.checkpoint``: the recomputation replays the same operations, collectives of the
        distributed layers included, in the same order on every rank; nothing inside the network draws random
        numbers (the noise is an input), and the RNG state is restored for the replay all the same. Gradients are
        those of ``"none"``; only memory and time change. Without autograd (inference, validation) it does nothing.
        """
        if level not in CHECKPOINTING_LEVELS:
            raise ValueError(f"checkpointing level {level!r} is not supported; choose one of {list(CHECKPOINTING_LEVELS)}")
        self.checkpointing = level

    def _run(self, part: str, fn: Callable[..., object], *args: object) -> object:
        """``fn(*args)``, checkpointed when the current level covers ``part`` and autograd records."""
        if part in CHECKPOINTING_LEVELS[self.checkpointing] and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    @property
    def n_channels(self) -> int:
        return self.layout.n_channels

    def encode_state(self, state: torch.Tensor) -> torch.Tensor:
        """Prognostic channels ``(B, C, H, W)`` -> latent state ``(B, L, h, w)``: the state encoders (levels, surface).

        Members of an ensemble whose states are equal (the first step of a rollout) need it once per sample:
        :meth:`forward_encoded` takes it, repeated over the members (see
        :class:`fcn3_lightning.model.rollout.EnsembleForecaster`). Under activation checkpointing it is
        recomputed in backward with the ``encoder`` part, as in :meth:`forward`.
        """
        if state.dim() != 4 or state.shape[1] != self.n_channels or tuple(state.shape[-2:]) != self.local_inp_shape:
            raise ValueError(
                f"FCN3.encode_state: state has shape {tuple(state.shape)}, expected (batch, {self.n_channels}, "
                f"{', '.join(map(str, self.local_inp_shape))}) (the prognostic channels on this process's grid)"
            )
        return self._run("encoder", self._encode_state, state)

    def _encode_state(self, state: torch.Tensor) -> torch.Tensor:
        b = state.shape[0]
        parts = []
        if self.atmo_encoder is not None:
            lev = state.index_select(1, self.level_index)
            lev = lev.reshape(b * len(self.layout.levels), len(self.layout.level_variables), *state.shape[-2:])
            parts.append(self.atmo_encoder(lev).reshape(b, -1, *self.local_latent_shape))
        if self.surf_encoder is not None:
            parts.append(self.surf_encoder(state.index_select(1, self.surface_index)))
        return torch.cat(parts, dim=1)

    def _encode_aux(self, aux: torch.Tensor) -> torch.Tensor | None:
        return self.aux_encoder(aux) if self.aux_encoder is not None else None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Data-grid input -> (latent state, auxiliary embedding)."""
        return self._encode_state(x[:, : self.n_channels]), self._encode_aux(x[:, self.n_channels :])

    def process(self, z: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        for block in self.blocks:
            z = self._run("blocks", _block_step, block, z, aux)
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent state -> prognostic channels on the data grid, in channel-list order."""
        b = z.shape[0]
        out = z.new_empty((b, self.n_channels, *self.local_inp_shape), dtype=torch.float32)
        n_atmo = len(self.layout.levels) * self.atmo_embed_dim
        if self.atmo_decoder is not None:
            lev = z[:, :n_atmo].reshape(b * len(self.layout.levels), self.atmo_embed_dim, *self.local_latent_shape)
            lev = self.atmo_decoder(lev).reshape(b, -1, *self.local_inp_shape)
            out = out.index_copy(1, self.level_index, lev)
        if self.surf_decoder is not None:
            out = out.index_copy(1, self.surface_index, self.surf_decoder(z[:, n_atmo:]))
        if self.clamp_water and self.water_index.numel():
            out = out.index_copy(1, self.water_index, soft_clamp_water(out.index_select(1, self.water_index)))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        z, aux = self._run("encoder", self.encode, x)
        return self._run("decoder", self.decode, self.process(z, aux))

    def forward_encoded(self, z: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` from a state encoding made beforehand: ``z`` ``(B, L, h, w)`` from :meth:`encode_state`
        (run once for members whose states are equal, then repeated), ``aux`` ``(B, A, H, W)`` the auxiliary input
        channels of each row (the noise differs per member, so the auxiliary encoder runs here). Equals
        ``forward(cat([state, aux]))`` where ``z = encode_state(state)``; under autograd the gradient reaching a
        repeated ``z`` is the sum over its rows. Activation checkpointing covers the auxiliary encoder with the
        ``encoder`` part, the processor and the decoders as in :meth:`forward`.
        """
        want_z = (self.latent_channels, *self.local_latent_shape)
        if z.dim() != 4 or tuple(z.shape[1:]) != want_z:
            raise ValueError(f"FCN3.forward_encoded: z has shape {tuple(z.shape)}, expected (batch, {', '.join(map(str, want_z))})")
        want_aux = (len(self.aux_channel_names), *self.local_inp_shape)
        if aux.dim() != 4 or tuple(aux.shape[1:]) != want_aux or aux.shape[0] != z.shape[0]:
            raise ValueError(
                f"FCN3.forward_encoded: aux has shape {tuple(aux.shape)}, expected ({z.shape[0]}, {', '.join(map(str, want_aux))}) "
                f"(the auxiliary channels {list(self.aux_channel_names)} of each row of z)"
            )
        a = self._run("encoder", self._encode_aux, aux)
        return self._run("decoder", self.decode, self.process(z, a))

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for an input of the wrong rank, channel count or grid."""
        if x.dim() != 4:
            raise ValueError(f"FCN3 expects input of shape (batch, channels, nlat, nlon), got {tuple(x.shape)}")
        if x.shape[1] != self.n_in_channels:
            raise ValueError(
                f"FCN3 expects {self.n_in_channels} input channels ({self.n_channels} prognostic + "
                f"{len(self.aux_channel_names)} auxiliary), got {x.shape[1]}"
            )
        if tuple(x.shape[-2:]) != self.local_inp_shape:
            if self.tiled:
                raise ValueError(
                    f"input tile {tuple(x.shape[-2:])} does not match this rank's tile {self.local_inp_shape} of inp_shape={self.inp_shape}"
                )
            raise ValueError(f"input grid {tuple(x.shape[-2:])} does not match the model's data grid inp_shape={self.inp_shape}")


def _block_step(block: ProcessorBlock, z: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
    """One processor block on the latent state with the auxiliary embedding re-joined (the join is recomputed with
    the block under checkpointing, so only ``z`` and the shared ``aux`` are kept)."""
    return block(z if aux is None else torch.cat([z, aux.to(z.dtype)], dim=1))


def _check_shape(name: str, shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{name} must be (nlat, nlon) with positive sizes, got {shape}")
    return shape  # type: ignore[return-value]


#: the grouped DISCO convolutions whose groups ``encoder_groups`` may set
GROUPED_MODULES = ("atmo_encoder", "surf_encoder", "aux_encoder", "atmo_decoder", "surf_decoder")


def _check_groups(groups: Mapping[str, int] | None) -> dict[str, int]:
    groups = dict(groups or {})
    unknown = sorted(set(groups) - set(GROUPED_MODULES))
    if unknown:
        raise ValueError(f"encoder_groups: unknown module(s) {unknown}; known: {list(GROUPED_MODULES)}")
    return {k: int(v) for k, v in groups.items()}


def _groups(groups: Mapping[str, int], name: str, n_in: int, n_out: int) -> int:
    """The reference's rule gcd(in, out), or the explicit number, which must divide both."""
    g = groups.get(name, math.gcd(n_in, n_out))
    if g < 1 or n_in % g or n_out % g:
        raise ValueError(f"encoder_groups[{name!r}]={g} must divide both its input ({n_in}) and output ({n_out}) channels")
    return g


def _check_grid(name: str, grid: str, allowed: Sequence[str]) -> None:
    if grid not in allowed:
        raise ValueError(f"{name}={grid!r} is not supported; choose one of {list(allowed)}")


def _latent_shape(inp_shape: tuple[int, int], scale_factor: int) -> tuple[int, int]:
    """Latent grid of FCN3: the data grid divided by the scale factor, checked against DISCO's needs."""
    if int(scale_factor) != scale_factor or scale_factor < 1:
        raise ValueError(f"scale_factor must be a positive integer, got {scale_factor}")
    nlat, nlon = inp_shape
    latent = (nlat // scale_factor, nlon // scale_factor)
    if latent[0] < 4 or latent[1] < 8:
        raise ValueError(
            f"inp_shape={inp_shape} with scale_factor={scale_factor} gives a latent grid {latent}; it needs at least 4x8 points"
        )
    if nlon % latent[1] != 0:
        raise ValueError(
            f"inp_shape={inp_shape} with scale_factor={scale_factor}: the encoder's DISCO convolution needs nlon ({nlon}) "
            f"to be a multiple of the latent nlon ({latent[1]}); choose nlon divisible by the scale factor"
        )
    if nlat < 3:
        raise ValueError(f"inp_shape={inp_shape}: an equiangular grid with poles needs at least 3 latitudes")
    return latent
