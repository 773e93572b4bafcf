"""The Fourier-space DISCO layers (fcn3_lightning.model.disco_fourier) equal torch-harmonics' kernels.

Each layer is built through the factory twice, with ``disco_impl="fourier"`` and ``"torch-harmonics"``, from the same
seed: same state dict, and forward (<= 1e-5 relative), input and weight gradients (<= 1e-4 relative) equal, on several
grids (with and without poles), kernel shapes, channel counts and groups.
"""

from __future__ import annotations

import pytest
import torch

from fcn3_lightning.model import build_model
from fcn3_lightning.model.disco_fourier import FourierDisco, basis_parity
from fcn3_lightning.model.layers import SphericalLayers, fcn3_theta_cutoff

FOURIER, TH = SphericalLayers("fourier"), SphericalLayers("torch-harmonics")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _compare(make, x_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    ours = make(FOURIER)
    torch.manual_seed(0)
    theirs = make(TH)
    ours_conv, theirs_conv = ours[-1], theirs[-1]
    assert isinstance(ours_conv, FourierDisco) and not isinstance(theirs_conv, FourierDisco)
    assert ours_conv.state_dict().keys() == theirs_conv.state_dict().keys() == {"weight"}
    assert torch.equal(ours_conv.weight, theirs_conv.weight)
    x = torch.randn(*x_shape, dtype=torch.float64).float().requires_grad_(True)

    def run(mods):
        y = x
        for m in mods:
            y = m(y)
        return y

    y_ours, y_theirs = run(ours), run(theirs)
    assert y_ours.shape == y_theirs.shape
    assert _rel(y_ours, y_theirs) <= 1e-5
    gy = torch.randn_like(y_theirs)
    gx_o, gw_o = torch.autograd.grad(y_ours, [x, ours_conv.weight], gy)
    gx_t, gw_t = torch.autograd.grad(y_theirs, [x, theirs_conv.weight], gy)
    assert _rel(gx_o, gx_t) <= 1e-4
    assert _rel(gw_o, gw_t) <= 1e-4


@pytest.mark.parametrize(
    "shape, grid, channels, groups, kernel_shape",
    [
        ((30, 60), "legendre-gauss", (7, 5), 1, (3, 3)),
        ((31, 60), "equiangular", (6, 4), 2, (3, 3)),  # both poles on the grid
        ((45, 90), "legendre-gauss", (8, 8), 1, (2, 2)),
        ((19, 36), "equiangular", (3, 9), 3, (4, 4)),
        ((24, 50), "lobatto", (4, 4), 4, (3, 3)),
    ],
)
def test_block_disco_equals_torch_harmonics(shape, grid, channels, groups, kernel_shape) -> None:
    def make(layers: SphericalLayers):
        conv = layers.disco(
            *channels,
            shape,
            shape,
            kernel_shape=kernel_shape,
            basis_type="morlet",
            basis_norm_mode="mean",
            groups=groups,
            grid_in=grid,
            grid_out=grid,
            theta_cutoff=fcn3_theta_cutoff(shape[0], kernel_shape, factor=2.0),
        )
        return [conv]

    _compare(make, (2, channels[0], *shape))


@pytest.mark.parametrize(
    "latent, data, channels, groups, kernel_shape",
    [
        ((15, 30), (31, 60), (4, 2), 2, (3, 3)),
        ((16, 32), (33, 64), (6, 6), 1, (3, 3)),
        ((8, 16), (25, 48), (3, 1), 1, (2, 2)),  # upsampling by 3 in longitude
        ((20, 36), (41, 72), (5, 10), 5, (4, 4)),
    ],
)
def test_decoder_fused_equals_resample_then_disco(latent, data, channels, groups, kernel_shape) -> None:
    def make(layers: SphericalLayers):
        return list(
            layers.resampled_disco(
                *channels,
                latent,
                data,
                kernel_shape=kernel_shape,
                basis_type="morlet",
                basis_norm_mode="mean",
                groups=groups,
                grid_in="legendre-gauss",
                grid_out="equiangular",
                theta_cutoff=fcn3_theta_cutoff(data[0], kernel_shape),
            )
        )

    _compare(make, (3, channels[0], *latent))


def test_morlet_basis_is_even_or_odd_in_longitude() -> None:
    """FCN3's basis splits into even and odd functions (what makes the tables real); a general one would be in both."""
    conv = TH.disco(
        2, 2, (20, 40), (20, 40), kernel_shape=(3, 3), basis_type="morlet", basis_norm_mode="mean", groups=1,
        grid_in="legendre-gauss", grid_out="legendre-gauss", theta_cutoff=0.5,
    )  # fmt: skip
    even, odd = basis_parity(conv)
    assert sorted(even + odd) == list(range(9)) and not set(even) & set(odd)
    assert len(odd) == 3


def test_network_with_fourier_layers_equals_torch_harmonics_kernels() -> None:
    """Whole network, both switches, same seed: same state dict, output and gradients equal."""
    cfg = dict(
        inp_shape=(33, 64), channel_names=["z500", "t500", "z850", "t850", "t2m", "msl"], aux_channel_names=["xzen", "xnoise0"],
        atmo_embed_dim=4, surf_embed_dim=6, aux_embed_dim=3, num_layers=3, sfno_block_frequency=2,
    )  # fmt: skip
    torch.manual_seed(1)
    ours = build_model(cfg, layers=FOURIER)
    torch.manual_seed(1)
    theirs = build_model(cfg, layers=TH)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    x = torch.randn(2, ours.n_in_channels, 33, 64)
    y_o, y_t = ours(x), theirs(x)
    assert _rel(y_o, y_t) <= 1e-5
    y_o.square().mean().backward()
    y_t.square().mean().backward()
    for (name, p_o), p_t in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert _rel(p_o.grad, p_t.grad) <= 1e-4, name


def test_unknown_disco_impl_is_refused() -> None:
    with pytest.raises(ValueError, match="disco_impl"):
        SphericalLayers("sparse")


def test_block_disco_in_wavenumber_chunks_equals_torch_harmonics(monkeypatch) -> None:
    """The same-grid layer processes wavenumbers in chunks (disco_fourier.CHUNK_BYTES): chunks of one wavenumber, with
    groups and a batch, give torch-harmonics' result."""
    from fcn3_lightning.model import disco_fourier

    monkeypatch.setattr(disco_fourier, "CHUNK_BYTES", 1)
    test_block_disco_equals_torch_harmonics((31, 60), "equiangular", (6, 4), 2, (3, 3))
