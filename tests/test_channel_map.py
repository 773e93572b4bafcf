"""Channel mapping (fine-tuning onto another channel list) on the reference-written package.

The source is the network of ``tests/data/fcn3_package_small`` (72 channels, 13 levels, written by the reference
code). For each target channel list the tensors the source shares must be the source's exactly (checked slice by
slice against the source state dict, indexed here independently of the mapping code), and where no input is lost
(reordered channels, new variables, a new pressure level) the old channels' one-step forecast must be the source's
for the same input and noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fcn3_lightning.checkpoint import read_network
from fcn3_lightning.forecaster import load_forecaster, map_channels
from fcn3_lightning.model.channel_map import map_state_dict, mapped_settings
from fcn3_lightning.model.fcn3 import FCN3

LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)
E = 8  # atmo_embed_dim of the package


@pytest.fixture(scope="module")
def source(golden_package_dir):
    src = read_network(golden_package_dir / "package")
    net = FCN3(**src.net_kwargs)
    net.load_state_dict(src.state_dict)
    return src.net_kwargs, src.state_dict, net.eval()


def _mapped(source, channels):
    kwargs, state, _ = source
    settings = mapped_settings(kwargs, channels, kwargs["aux_channel_names"])
    torch.manual_seed(1)
    net = FCN3(**settings)
    mapped, report = map_state_dict(kwargs, state, net, settings)
    net.load_state_dict(mapped)  # strict: every tensor present and of the right shape
    return settings, net.eval(), report


def _forecast_diff(source, channels, net) -> float:
    """max |old channels' output of ``net`` - source output| / max |source output|, same input, noise and aux."""
    kwargs, _, src_net = source
    src_ch = list(kwargs["channel_names"])
    n_aux = len(kwargs["aux_channel_names"])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, len(src_ch) + n_aux, 61, 120, generator=g)
    xt = torch.randn(1, len(channels) + n_aux, 61, 120, generator=g)  # new channels: anything
    for j, c in enumerate(channels):
        if c in src_ch:
            xt[:, j] = x[:, src_ch.index(c)]
    xt[:, len(channels) :] = x[:, len(src_ch) :]
    with torch.no_grad():
        y, yt = src_net(x), net(xt)
    old = [c for c in channels if c in src_ch]
    a = torch.stack([yt[0, channels.index(c)] for c in old])
    b = torch.stack([y[0, src_ch.index(c)] for c in old])
    return float((a - b).abs().max() / b.abs().max())


def _latent(levels, channels_levels, surf=True):
    """Source latent indices of the target's latent channels (levels of ``channels_levels`` in order, then surface)."""
    idx = [LEVELS.index(p) * E + e for p in channels_levels for e in range(E)]
    return idx + ([len(LEVELS) * E + e for e in range(8)] if surf else [])


def test_reordered_channels_forecast_as_the_source(source):
    kwargs, state, _ = source
    channels = list(kwargs["channel_names"])[::-1]
    settings, net, report = _mapped(source, channels)
    diff = _forecast_diff(source, channels, net)
    print(f"reordered: max |diff| / max |y| = {diff:.2e}")
    assert diff <= 1e-6
    sd = net.state_dict()
    # levels now run 1000 .. 50 and variables q, t, z, v, u: the latent blocks and encoder columns follow
    lat = _latent(LEVELS, LEVELS[::-1]) + [len(LEVELS) * E + 8 + a for a in range(8)]  # + aux embedding
    assert torch.equal(sd["blocks.1.filter.weight"], state["blocks.1.filter.weight"][lat][:, lat])
    assert torch.equal(sd["blocks.0.filter.weight"], state["blocks.0.filter.weight"][:, lat][:, :, lat])
    assert torch.equal(sd["blocks.3.mlp.fc2.weight"], state["blocks.3.mlp.fc2.weight"][lat[: len(LEVELS) * E + 8]])
    assert torch.equal(sd["atmo_encoder.conv.weight"], state["atmo_encoder.conv.weight"][:, [4, 3, 2, 1, 0]])
    assert torch.equal(sd["atmo_decoder.conv.weight"], state["atmo_decoder.conv.weight"][[4, 3, 2, 1, 0]])
    assert not report.new and not report.extended and not report.dropped


def test_new_surface_and_atmospheric_variables_start_with_no_effect(source):
    kwargs, state, _ = source
    channels = list(kwargs["channel_names"]) + ["sp"] + [f"w{p}" for p in LEVELS]
    settings, net, report = _mapped(source, channels)
    diff = _forecast_diff(source, channels, net)
    print(f"+ sp, w: max |diff| / max |y| = {diff:.2e}; report {report.lines()}")
    assert diff <= 1e-6
    sd = net.state_dict()
    # the blocks are the source's as they are; encoders gain a zero column, decoders a new row
    for k, v in state.items():
        if k.startswith("blocks."):
            assert torch.equal(sd[k], v), k
    assert torch.equal(sd["atmo_encoder.conv.weight"][:, :5], state["atmo_encoder.conv.weight"])
    assert torch.equal(sd["atmo_encoder.conv.weight"][:, 5], torch.zeros(E, 9))
    assert torch.equal(sd["surf_encoder.conv.weight"][:, :7], state["surf_encoder.conv.weight"])
    assert torch.equal(sd["atmo_decoder.conv.weight"][:5], state["atmo_decoder.conv.weight"])
    assert sd["atmo_decoder.conv.weight"][5].abs().sum() > 0  # a fresh row: it learns from the first step
    assert set(report.extended) == {f"{m}.conv.weight" for m in ("atmo_encoder", "surf_encoder", "atmo_decoder", "surf_decoder")}
    assert report.channels["new"] == ["sp"] + [f"w{p}" for p in LEVELS]


def test_a_new_pressure_level_widens_the_latent_state_with_no_effect(source):
    kwargs, state, _ = source
    channels = list(kwargs["channel_names"]) + [f"{v}775" for v in "uvztq"]
    settings, net, report = _mapped(source, channels)
    diff = _forecast_diff(source, channels, net)
    print(f"+ level 775: max |diff| / max |y| = {diff:.2e}")
    assert diff <= 1e-6
    assert net.latent_channels == (len(LEVELS) + 1) * E + 8 and settings["mlp_hidden_channels"] == 240
    sd = net.state_dict()
    n = len(LEVELS) * E + 8  # the source's latent width: old channels first, then the new level, then surface
    lat = list(range(len(LEVELS) * E)) + [len(LEVELS) * E + E + e for e in range(8)]
    width_old = lat + [n + E + a for a in range(8)]
    src_width = list(range(len(LEVELS) * E)) + [len(LEVELS) * E + e for e in range(8)] + [n + a for a in range(8)]
    new = list(range(len(LEVELS) * E, len(LEVELS) * E + E))
    w = sd["blocks.0.mlp.fc1.weight"]
    assert torch.equal(w[:, width_old], state["blocks.0.mlp.fc1.weight"][:, src_width])
    assert torch.equal(w[:, new], torch.zeros_like(w[:, new]))  # the blocks read nothing from the new level
    f = sd["blocks.1.filter.weight"]  # (out, in, K)
    assert torch.equal(f[width_old][:, width_old], state["blocks.1.filter.weight"][src_width][:, src_width])
    assert torch.equal(f[width_old][:, new], torch.zeros(len(width_old), len(new), 9))
    assert report.channels["levels_new"] == [775]


def test_a_subset_keeps_the_source_slices(source):
    kwargs, state, _ = source
    channels = ["z500", "z850", "t500", "t850"]
    settings, net, report = _mapped(source, channels)
    sd = net.state_dict()
    lat = _latent(LEVELS, (500, 850), surf=False)
    width = lat + [len(LEVELS) * E + 8 + a for a in range(8)]
    assert torch.equal(sd["blocks.2.filter.weight"], state["blocks.2.filter.weight"][:, width][:, :, width])
    assert torch.equal(sd["blocks.3.mlp.fc1.weight"], state["blocks.3.mlp.fc1.weight"][:, width])
    assert torch.equal(sd["blocks.3.layer_scale"], state["blocks.3.layer_scale"][lat])
    # z, t are variables 2, 3 of (u, v, z, t, q); the 2-variable encoder is dense to hold the source's connections
    assert settings["encoder_groups"] == {"atmo_encoder": 1, "atmo_decoder": 1}
    assert torch.equal(sd["atmo_encoder.conv.weight"], state["atmo_encoder.conv.weight"][:, [2, 3]])
    assert torch.equal(sd["atmo_decoder.conv.weight"], state["atmo_decoder.conv.weight"][[2, 3]])
    assert set(report.dropped) == {"surf_encoder.conv.weight", "surf_decoder.conv.weight"}
    # the dropped channels were inputs: the forecast cannot be the source's, and is not claimed to be
    print(f"subset: max |diff| / max |y| = {_forecast_diff(source, channels, net):.2e} (inputs dropped)")


def test_a_list_that_keeps_no_channel_is_refused(source):
    kwargs = source[0]
    with pytest.raises(ValueError, match=r"keeps none of the source's channels.*drop init_from"):
        mapped_settings(kwargs, ["r500", "r850"], kwargs["aux_channel_names"])


def test_a_mapped_forecaster_exports_and_loads_again(golden_package_dir, tmp_path):
    f = load_forecaster(golden_package_dir / "package", device="cpu")
    mapped, report = map_channels(f, ["t850", "z850"])
    out = mapped.export(tmp_path / "pkg")
    again = load_forecaster(out, device="cpu")
    assert again.channels == ["t850", "z850"] and again.net_kwargs.get("encoder_groups") == mapped.net_kwargs.get("encoder_groups")
    a, b = mapped.net.state_dict(), again.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 2, 61, 120)).astype(np.float32)) * 100 + 250
    t = np.datetime64("2019-01-01T00")
    assert torch.equal(mapped.step(state, t), again.step(state, t))
    with pytest.raises(ValueError, match=r"new channels \['d2m'\] need statistics"):
        map_channels(f, ["t850", "z850", "d2m"])
