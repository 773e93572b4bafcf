"""The FCN3 network: parity with the reference, other sizes, symmetry, bad input."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_net import NET

from fcn3_lightning.channels import channel_layout
from fcn3_lightning.model import (
    FCN3,
    build_model,
    load_model,
    load_reference_state_dict,
    model_from_reference_config,
    ours_to_reference_state_dict,
)
from fcn3_lightning.model.convert import convert_reference_state_dict
from fcn3_lightning.model.summary import count_parameters

REPO = Path(__file__).resolve().parents[1]

# --- parity with the reference network ------------------------------------------------------------


def _activation_modules(model: FCN3, names):
    """Map the golden activation names (hooks on reference modules) onto our modules."""
    mods = {}
    for name in names:
        if name.startswith("block"):
            mods[name] = model.blocks[int(name[len("block") :])]
        else:
            mods[name] = getattr(model, name)
    return mods


def test_reference_parity(golden_dir, manifest):
    """Reference weights through our converter reproduce the reference output and every activation."""
    model = model_from_reference_config(manifest["config"])  # nothing about the size is hard-coded here
    load_reference_state_dict(model, golden_dir / "state_dict.pt")
    assert count_parameters(model) == manifest["n_parameters"]
    tensors = torch.load(golden_dir / "tensors.pt", weights_only=True)

    acts = {}
    for name, mod in _activation_modules(model, manifest["activations"]).items():
        mod.register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o.detach()))
    with torch.no_grad():
        out = model(tensors["input"])

    assert out.shape == tensors["output"].shape
    diff = (out - tensors["output"]).abs().max().item()
    print(f"parity: max |output diff| = {diff:.3e}")
    assert diff <= 1e-5
    assert set(acts) == set(manifest["activations"])
    for name, shape in manifest["activations"].items():
        ref = tensors[f"act.{name}"]
        assert list(acts[name].shape) == shape == list(ref.shape), name
        d = (acts[name] - ref).abs().max().item()
        print(f"parity: {name:14s} max |diff| = {d:.3e}")
        assert d <= 1e-5, name


def test_export_to_reference_layout_matches_manifest(golden_dir, manifest):
    model = model_from_reference_config(manifest["config"])
    exported = ours_to_reference_state_dict(model)
    assert {k: list(v.shape) for k, v in exported.items()} == {k: v["shape"] for k, v in manifest["parameters"].items()}
    ref = torch.load(golden_dir / "state_dict.pt", weights_only=True)
    load_reference_state_dict(model, ref)
    for k, v in ours_to_reference_state_dict(model).items():
        assert torch.equal(v, ref[k]), k


# --- any size ---------------------------------------------------------------------------------------

SMALL = NET
CONFIGS = [
    dict(
        inp_shape=(17, 32),
        channel_names=["z500", "t500", "z850", "t850", "t2m", "tcwv"],
        aux_channel_names=["xzen", "xnoise0", "xoro"],
        **SMALL,
    ),
    dict(
        inp_shape=(33, 64),
        scale_factor=4,
        channel_names=["u10m", "v10m", "msl", "q700", "t700"],
        num_layers=2,
        sfno_block_frequency=1,
        atmo_embed_dim=6,
        surf_embed_dim=6,
        aux_embed_dim=4,
        kernel_shape=(2, 2),
    ),
    dict(
        inp_shape=(25, 48),
        scale_factor=3,
        channel_names=["z500", "t2m"],
        aux_channel_names=[],
        num_layers=1,
        atmo_embed_dim=3,
        surf_embed_dim=2,
        mlp_ratio=1.0,
    ),
    dict(
        inp_shape=(33, 64),
        channel_names=["t2m", "msl"],
        aux_channel_names=["xzen"],
        num_layers=5,
        sfno_block_frequency=3,
        surf_embed_dim=8,
        aux_embed_dim=2,
    ),
]


def expected_parameters(cfg: dict) -> int:
    """Independent count from the architecture's definition (reference doc section 2.9, generalised)."""
    lay = channel_layout(cfg["channel_names"])
    n_lev, n_lv, n_s = len(lay.levels), len(lay.level_variables), len(lay.surface_index)
    n_a = len(cfg.get("aux_channel_names", ["xzen", *[f"xnoise{i}" for i in range(8)], "xoro", "xlsml", "xlsms"]))
    ea = cfg.get("atmo_embed_dim", 45) if n_lev else 0
    es = cfg.get("surf_embed_dim", 56) if n_s else 0
    ex = cfg.get("aux_embed_dim", 36) if n_a else 0
    ks = cfg.get("kernel_shape", (3, 3))
    k = ks[0] * ks[1]

    def grouped(n_in, n_out):
        return n_out * (n_in // math.gcd(n_in, n_out)) * k if n_out and n_in else 0

    sf = cfg.get("scale_factor", 2)
    nlat_lat, nlon_lat = cfg["inp_shape"][0] // sf, cfg["inp_shape"][1] // sf
    lmax = min(nlat_lat, nlon_lat // 2 + 1)
    latent = n_lev * ea + es
    width = latent + ex
    hidden = int(cfg.get("mlp_ratio", 2.0) * width)
    total = grouped(n_lv, ea) + grouped(n_s, es) + grouped(n_a, ex) + grouped(ea, n_lv) + grouped(es, n_s)
    for i in range(cfg.get("num_layers", 10)):
        filt = 2 * width * width * lmax if i % cfg.get("sfno_block_frequency", 5) == 0 else width * width * k
        total += filt + width * hidden + hidden + hidden * latent + latent + latent
    return total


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['inp_shape'][0]}x{c['inp_shape'][1]}-{len(c['channel_names'])}ch")
def test_other_sizes_build_run_and_round_trip(cfg):
    torch.manual_seed(0)
    model = FCN3(**cfg)
    assert count_parameters(model) == expected_parameters(cfg)
    x = torch.randn(2, model.n_in_channels, *cfg["inp_shape"])
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, len(cfg["channel_names"]), *cfg["inp_shape"]) and torch.isfinite(y).all()
    water = model.water_index.tolist()
    if water:
        assert (y[:, water] >= 0).all()
    # reference layout and back: a fresh network with the exported weights gives the same output
    other = FCN3(**cfg)
    load_reference_state_dict(other, ours_to_reference_state_dict(model))
    with torch.no_grad():
        assert torch.equal(other(x), y)


def test_full_size_parameter_count_on_meta():
    """configs/model/fcn3.yaml: the full FCN3 builds on the meta device with 710,867,670 real parameters."""
    model = build_model(REPO / "configs" / "model" / "fcn3.yaml", meta=True)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.latent_shape == (360, 720) and model.latent_channels == 641
    assert count_parameters(model) == 710_867_670  # the figure stated by the issue and the reference doc


def test_longitude_shift_equivariance():
    """Every layer is a convolution on the sphere: rotating the input about the axis rotates the output."""
    torch.manual_seed(1)
    cfg = CONFIGS[0]
    model = FCN3(**cfg)
    x = torch.randn(1, model.n_in_channels, *cfg["inp_shape"])
    shift = 2  # one latent grid cell (scale factor 2)
    with torch.no_grad():
        y = model(x)
        y_rot = model(torch.roll(x, shift, dims=-1))
    err = (torch.roll(y, shift, dims=-1) - y_rot).abs().max().item()
    assert err < 1e-5 * y.abs().max().item() + 1e-6
    with torch.no_grad():  # and a shift the latent grid cannot represent is not trivially equivariant
        assert (torch.roll(y, 1, dims=-1) - model(torch.roll(x, 1, dims=-1))).abs().max() > 1e-4


def test_water_clamp_is_c1_spline():
    from fcn3_lightning.model.fcn3 import soft_clamp_water

    x = torch.tensor([-1.0, 0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(soft_clamp_water(x), torch.tensor([0.0, 0.0, 0.0625, 0.25, 0.75]))


# --- bad input --------------------------------------------------------------------------------------


def test_wrong_channel_count_and_grid():
    model = FCN3(**CONFIGS[0])
    with pytest.raises(ValueError, match=r"expects 9 input channels \(6 prognostic \+ 3 auxiliary\), got 8"):
        model(torch.randn(1, 8, 17, 32))
    with pytest.raises(ValueError, match=r"input grid \(16, 32\) does not match"):
        model(torch.randn(1, 9, 16, 32))


def test_unknown_channel_name():
    with pytest.raises(ValueError, match="unknown channel 'zz500'"):
        FCN3(inp_shape=(17, 32), channel_names=["zz500", "t2m"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(inp_shape=(33, 64), scale_factor=3), r"needs nlon \(64\) to be a multiple of the latent nlon \(21\)"),
        (dict(inp_shape=(7, 16), scale_factor=2), r"latent grid \(3, 8\); it needs at least 4x8"),
        (dict(inp_shape=(32, 64), model_grid_type="legendre-gauss"), r"model_grid_type='legendre-gauss' is not supported"),
    ],
)
def test_grid_the_resampling_cannot_serve(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FCN3(channel_names=["t2m"], **kwargs)


def test_state_dict_problems_are_named(golden_dir, manifest):
    model = model_from_reference_config(manifest["config"])
    ref = torch.load(golden_dir / "state_dict.pt", weights_only=True)
    broken = dict(ref)
    del broken["blocks.1.local_conv.weight"]
    broken["blocks.0.mlp.fwd.3.bias"] = torch.zeros(7)
    broken["blocks.9.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        convert_reference_state_dict(broken, model)
    msg = str(err.value)
    assert "blocks.1.filter.weight" in msg and "missing" in msg
    assert "blocks.0.mlp.fwd.3.bias: (7,)" in msg and "expected (144,)" in msg
    assert "blocks.9.extra.weight" in msg


def test_unsupported_reference_setting_is_refused(manifest):
    cfg = dict(manifest["config"], big_skip=True)
    with pytest.raises(ValueError, match="big_skip=True is not supported"):
        model_from_reference_config(cfg)


# --- command line -----------------------------------------------------------------------------------


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fcn3_lightning", *args], capture_output=True, text=True, cwd=REPO)


def test_cli_convert_then_load(golden_dir, tmp_path):
    out = tmp_path / "fcn3_small.pt"
    res = _run("convert", str(golden_dir / "state_dict.pt"), str(out), "--config", str(golden_dir / "manifest.json"))
    assert res.returncode == 0, res.stderr
    model = load_model(out)
    tensors = torch.load(golden_dir / "tensors.pt", weights_only=True)
    with torch.no_grad():
        assert (model(tensors["input"]) - tensors["output"]).abs().max() <= 1e-5


def test_cli_errors_exit_nonzero(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("class_path: fcn3_lightning.model.FCN3\ninit_args:\n  inp_shape: [33, 64]\n  embed_dim: 3\n")
    res = _run("summary", str(bad))
    assert res.returncode == 2 and "unknown model option(s) ['embed_dim']" in res.stderr
    res = _run("summary", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "missing.yaml does not exist" in res.stderr


def test_cli_summary_small():
    res = _run("summary", str(REPO / "configs" / "model" / "fcn3_small.yaml"))
    assert res.returncode == 0, res.stderr
    assert "2,372,892" in res.stdout
