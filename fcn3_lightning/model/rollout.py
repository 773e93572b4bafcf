"""Ensemble rollouts: members folded into the batch, auxiliary inputs assembled, AR(1) noise between steps.

Plain torch, next to the network it steps (the user-facing :class:`fcn3_lightning.forecaster.Forecaster` wraps it with
normalisation, static fields and time); used by training, validation and inference alike, so that all three step the model
the same way (reference section 4.3): fresh stationary noise per (sample, member) at the initial
time, an AR(1) step of the noise before every later step, the cos zenith of each step's own valid
time, and the prediction fed back as the next input (no teacher forcing, no detach).

Under spatial parallelism (a network built with the distributed layers factory) the rollout runs on this rank's
tile: the initial state, the cos zenith and the static fields may be given on the full grid (they are cut to the
tile) or as the tile already, and the noise process maps its spectral chunk to the tile (see
:mod:`fcn3_lightning.model.noise`). Under ensemble parallelism each rank passes the streams of its own members
(``member_offset`` of :func:`keyed_streams`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from fcn3_lightning.channels import STATIC_AUX
from fcn3_lightning.model.fcn3 import FCN3
from fcn3_lightning.model.noise import NoiseStreams, SphericalDiffusionNoise


def keyed_streams(
    noise_seed: int, key: int, sample_ids: Sequence[int], n_members: int, antithetic: bool = False, member_offset: int = 0
) -> NoiseStreams:
    """The noise streams of one use of the model: ``key`` says which (0: validation and inference, odd: training steps).

    One reproducible stream per (sample, member) and step, so a resumed run replays exactly the same noise.
    ``member_offset``: global id of the first member (ensemble parallelism: ``ensemble_rank * members_per_rank``).
    """
    seed = int(np.random.SeedSequence([noise_seed, key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return NoiseStreams(seed, list(sample_ids), n_members, antithetic=antithetic, member_offset=member_offset)


class EnsembleForecaster(nn.Module):
    """Wraps the network with the noise process and the assembly of its auxiliary inputs.

    Args:
        net: the FCN3 network; its ``aux_channel_names`` say which inputs to assemble and in which order.
        noise: noise process on the data grid, one channel per ``xnoise*`` auxiliary channel; for a tiled network it
            must be built with the same (distributed) layers factory, so that it produces this rank's tile.
        share_encoders: at the first step every member of a sample starts from the same state (only the noise
            channels differ), so the state encoders run once per sample and their output is repeated over the
            members (:meth:`FCN3.encode_state`, :meth:`FCN3.forward_encoded`); the auxiliary encoder still runs per
            member. The same mathematics (in training the shared encoding gets the sum of the members' gradients);
            False runs every member through the whole network (``tests/test_shared_encoders.py`` compares the two,
            ``bench/shared_encoders.py`` times them).
    """

    def __init__(self, net: FCN3, noise: SphericalDiffusionNoise | None = None, share_encoders: bool = True):
        super().__init__()
        self.net = net
        self.share_encoders = share_encoders
        names = net.aux_channel_names
        n_noise = len(net.noise_channel_names)
        if n_noise and noise is None:
            noise = SphericalDiffusionNoise(net.inp_shape, n_channels=n_noise, layers=net.layers)
        if noise is not None and noise.n_channels != n_noise:
            raise ValueError(
                f"the noise process has {noise.n_channels} channels but the network expects {n_noise} ({net.noise_channel_names})"
            )
        if noise is not None and (tuple(noise.img_shape) != tuple(net.inp_shape) or noise.local_img_shape != net.local_inp_shape):
            # e.g. a serial noise process next to a tiled network: its full fields would not fit the tile
            raise ValueError(
                f"the noise process makes {noise.local_img_shape} fields of the {noise.img_shape} grid, but the network "
                f"takes {net.local_inp_shape} tiles of {net.inp_shape}: build both with the same layers factory"
            )
        self.noise = noise
        unknown = [a for a in names if a != "xzen" and not a.startswith("xnoise") and a not in STATIC_AUX]
        if unknown:
            raise ValueError(f"no source for auxiliary channels {unknown}")
        self.static_names = [a for a in names if a in STATIC_AUX]

    def to_tile(self, x: torch.Tensor, what: str = "input") -> torch.Tensor:
        """``x[..., lat, lon]`` cut to this rank's tile if given on the full data grid; a tile passes unchanged.

        Serial (or a 1 x 1 split) the tile is the full grid and ``x`` is returned as is. Under a split the two
        shapes differ, so which one ``x`` is can be told from its trailing shape.
        """
        shape = tuple(x.shape[-2:])
        local = tuple(self.net.local_inp_shape)
        if shape == local:
            return x
        if shape != tuple(self.net.inp_shape):
            raise ValueError(f"{what} has grid {shape}; expected the data grid {tuple(self.net.inp_shape)} or this rank's tile {local}")
        lat, lon = self.net.layers.tile(self.net.inp_shape)
        return x[..., lat, lon]

    def aux_inputs(self, zenith: torch.Tensor, noise: torch.Tensor | None, static: torch.Tensor | None, n_members: int) -> torch.Tensor:
        """Auxiliary channels ``(B * M, A, H, W)`` in the network's order.

        ``zenith`` (B, H, W) for this step, ``noise`` (B * M, N, H, W), ``static`` (S, H, W).
        """
        bm = zenith.shape[0] * n_members
        parts: list[torch.Tensor] = []
        i_noise = i_static = 0
        for name in self.net.aux_channel_names:
            if name == "xzen":
                parts.append(zenith.repeat_interleave(n_members, dim=0)[:, None])
            elif name.startswith("xnoise"):
                parts.append(noise[:, i_noise : i_noise + 1])
                i_noise += 1
            else:
                parts.append(static[i_static][None, None].expand(bm, 1, *static.shape[-2:]))
                i_static += 1
        if not parts:
            return zenith.new_zeros((bm, 0, *zenith.shape[-2:]))
        return torch.cat([p.to(zenith.dtype) for p in parts], dim=1)

    def rollout(
        self,
        x0: torch.Tensor,
        zenith: torch.Tensor,
        static: torch.Tensor | None,
        streams: NoiseStreams | None,
        n_steps: int,
        n_members: int,
    ) -> torch.Tensor:
        """Predict ``n_steps`` 6 h steps for ``n_members`` members: ``(B, M, n_steps, C, H, W)``.

        ``x0`` (B, C, H, W) normalised initial state, ``zenith`` (B, >= n_steps, H, W) the cos zenith
        of the input time of each step (the IC, then each target time but the last). For a tiled network,
        (H, W) is the tile (inputs given on the full grid are cut to it, see :meth:`to_tile`).
        """
        return torch.stack(list(self.steps(x0, zenith, static, streams, n_steps, n_members)), dim=2)

    def steps(
        self,
        x0: torch.Tensor,
        zenith: torch.Tensor | Callable[[int], torch.Tensor],
        static: torch.Tensor | None,
        streams: NoiseStreams | None,
        n_steps: int,
        n_members: int,
    ) -> Iterator[torch.Tensor]:
        """The rollout one step at a time: yields ``(B, M, C, H, W)`` for step 1, 2, ... ``n_steps``.

        What :meth:`rollout` stacks; inference writes each step away as it comes, so memory does not
        grow with the lead time. ``zenith`` is either ``(B, >= n_steps, H, W)`` or a function of the
        step index ``s`` (0 = the initial time) returning ``(B, H, W)``, so that a long forecast never
        holds the cos zenith of all its steps.
        """
        b = x0.shape[0]
        if isinstance(zenith, torch.Tensor):
            if zenith.shape[1] < n_steps:
                raise ValueError(f"zenith holds {zenith.shape[1]} steps, the rollout needs {n_steps}")
            table = zenith

            def zenith(s: int) -> torch.Tensor:
                return table[:, s]

        if self.noise is not None:
            if streams is None or streams.n_streams != b * n_members:
                raise ValueError(f"need one noise stream per (sample, member): {b} x {n_members}")
        if self.net.tiled:
            # full-grid inputs are cut to this rank's tile (values identical to the serial run's on the tile)
            x0 = self.to_tile(x0, "x0")
            static = None if static is None else self.to_tile(static, "static")
            full_zenith = zenith

            def zenith(s: int) -> torch.Tensor:
                return self.to_tile(full_zenith(s), "zenith")

        lockstep = x0.device.type == "cpu" and b == 1 and n_members > 1
        # made at the first step (inside the generator: under the caller's grad mode), dropped once all have it
        encoding = _SharedEncoding(self.net, x0, n_members if lockstep else 1) if self.share_encoders else None
        if lockstep:
            # The CPU kernels (torch-harmonics' DISCO contraction, the Legendre transforms) round differently with the
            # batch size, and batching members is not faster there: one network call per member, so a member's
            # forecast does not depend on which members share its batch (predict --member-batch). The shared state
            # encoding is that of the same one-sample batch, so sharing keeps this exact.
            parts = [
                self._steps(x0, zenith, static, None if streams is None else streams.subset(m, m + 1), n_steps, 1, encoding)
                for m in range(n_members)
            ]
            return (torch.cat(ys, dim=1) for ys in zip(*parts, strict=True))
        # checked here, not inside the generator: a bad call fails when it is made, not at the first step
        return self._steps(x0, zenith, static, streams, n_steps, n_members, encoding)

    def _steps(
        self,
        x0: torch.Tensor,
        zenith: Callable[[int], torch.Tensor],
        static: torch.Tensor | None,
        streams: NoiseStreams | None,
        n_steps: int,
        n_members: int,
        encoding: _SharedEncoding | None,
    ) -> Iterator[torch.Tensor]:
        b = x0.shape[0]
        x = x0.repeat_interleave(n_members, dim=0) if encoding is None else x0
        state = None
        if self.noise is not None:
            with torch.no_grad():
                state = self.noise.stationary(streams)
        for s in range(n_steps):
            noise = None
            if state is not None:
                with torch.no_grad():
                    if s > 0:
                        state = self.noise.ar1_step(state, streams)
                    noise = self.noise.to_grid(state)
            aux = self.aux_inputs(zenith(s), noise, static, n_members).to(x.dtype)
            if s == 0 and encoding is not None:
                z = encoding.get()
                encoding = None
                x = self.net.forward_encoded(z if n_members == 1 else z.repeat_interleave(n_members, dim=0), aux)
            else:
                x = self.net(torch.cat([x, aux], dim=1))
            yield x.unflatten(0, (b, n_members))


class _SharedEncoding:
    """The state encoding of a rollout's initial condition (:meth:`FCN3.encode_state`), shared by ``users`` member
    rollouts: made at the first request, dropped after the last (so a long forecast does not hold it)."""

    def __init__(self, net: FCN3, x0: torch.Tensor, users: int):
        self.net, self.x0, self.left = net, x0, users
        self.z: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self.left < 1:
            raise RuntimeError("the shared state encoding was requested more times than it has users")
        if self.z is None:
            self.z = self.net.encode_state(self.x0)
        z = self.z
        self.left -= 1
        if self.left == 0:
            self.z = self.x0 = None
        return z
