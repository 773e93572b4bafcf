"""Published FCN3 model packages: load one written by the reference code, step it as the reference does, export ours.

The golden package and one step of the reference's own package inference are in ``tests/data/fcn3_package_small``
(provenance there); the parity below compares against numbers the reference code produced.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fcn3_lightning import load_forecaster
from fcn3_lightning.channels import FCN3_AUX_CHANNELS
from fcn3_lightning.data.conventions import PROJECT, REFERENCE_PACKAGE
from fcn3_lightning.data.stats import ChannelStats
from fcn3_lightning.forecaster import Forecaster
from fcn3_lightning.model.fcn3 import FCN3
from fcn3_lightning.model.noise import NoiseSettings
from fcn3_lightning.package import PackageError, read_package


@pytest.fixture(scope="module")
def golden(golden_package_dir: Path) -> Path:
    return golden_package_dir


@pytest.fixture(scope="module")
def ref(golden):
    return torch.load(golden / "reference_step.pt", weights_only=True)


@pytest.fixture(scope="module")
def forecaster(golden) -> Forecaster:
    return load_forecaster(golden / "package", device="cpu")


def _time(ref) -> np.datetime64:
    return np.datetime64(int(ref["time"]), "ns")


def _per_channel_relative(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return (got - want).abs().amax((0, 2, 3)) / want.abs().amax((0, 2, 3))


def test_network_input_and_step_equal_the_reference_package_inference(forecaster, ref):
    noise = ref["net_input"][:, 73:81]  # the 8 noise channels the reference drew
    x = forecaster.network_input(ref["x_phys"], _time(ref), noise)
    diff = (x - ref["net_input"]).abs()
    zenith, statics = diff[:, 72].max(), diff[:, 81:].max()
    print(f"network input: max |diff| {diff.max():.3g} over all 84 channels (zenith {zenith:.3g}, statics {statics:.3g})")
    assert x.shape == ref["net_input"].shape
    assert diff.max() <= 1e-5
    out = forecaster.step(ref["x_phys"], _time(ref), noise)
    rel = _per_channel_relative(out, ref["out_phys"])
    zero = _per_channel_relative(forecaster.step(ref["x_phys"], _time(ref), torch.zeros_like(noise)), ref["out_phys_zero_noise"])
    print(f"step: max |diff| / max |out| per channel {rel.max():.3g} (zero noise {zero.max():.3g})")
    assert rel.max() <= 1e-5 and zero.max() <= 1e-5


def test_the_package_conventions_matter(golden, ref):
    """Computed our way (float64 zenith), the zenith channel differs by ~2e-3: the package must follow its own."""
    f = load_forecaster(golden / "package", device="cpu")
    assert f.conventions == REFERENCE_PACKAGE
    f.conventions = PROJECT
    x = f.network_input(ref["x_phys"], _time(ref), ref["net_input"][:, 73:81])
    assert (x[:, 72] - ref["net_input"][:, 72]).abs().max() > 1e-4


def test_what_the_loaded_package_knows(forecaster, golden):
    config = json.loads((golden / "package" / "config.json").read_text())
    assert forecaster.channels == config["channel_names"] and len(forecaster.channels) == 72
    assert forecaster.aux_channels == list(FCN3_AUX_CHANNELS)
    assert forecaster.shape == (61, 120) and forecaster.step_hours == 6
    np.testing.assert_array_equal(forecaster.lat, config["lat"])
    noise = forecaster.noise_settings
    np.testing.assert_allclose(noise.kT, config["input_noise"]["kT"], rtol=1e-12)
    assert noise.antithetic is True and noise.sigma == 1.0 and noise.lambd == 1.0
    # min-max for exactly the package's `normalization` channels (q* and tcwv), z-score for the rest
    stats = {
        k: np.load(golden / "package" / f).reshape(-1) for k, f in (("min", "mins.npy"), ("max", "maxs.npy"), ("mean", "global_means.npy"))
    }
    i = config["data_channel_names"].index("q500")
    j = forecaster.channels.index("q500")
    assert forecaster.normalizer.offset[j] == pytest.approx(stats["min"][i])
    k, m = config["data_channel_names"].index("z500"), forecaster.channels.index("z500")
    assert forecaster.normalizer.offset[m] == pytest.approx(stats["mean"][k])


def test_drawn_noise_is_reproducible_and_replaceable(forecaster, ref):
    t = _time(ref)
    a, b = forecaster.step(ref["x_phys"], t), forecaster.step(ref["x_phys"], t)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = forecaster.step(ref["x_phys"], t + np.timedelta64(6, "h"))
    assert not torch.equal(a, other)  # another time, another noise draw (same state)
    with pytest.raises(ValueError, match="noise has shape"):
        forecaster.network_input(ref["x_phys"], t, torch.zeros(1, 3, 61, 120))
    with pytest.raises(ValueError, match="state has shape"):
        forecaster.step(ref["x_phys"][:, :10], t)


def test_export_round_trip_reproduces_every_array(forecaster, golden, ref, tmp_path):
    out = forecaster.export(tmp_path / "exported")
    src = golden / "package"
    for name in ("global_means.npy", "global_stds.npy", "mins.npy", "maxs.npy"):
        a, b = np.load(src / name), np.load(out / name)
        assert a.dtype == b.dtype and a.shape == b.shape == (1, 73, 1, 1) and np.array_equal(a, b), name
    for name, var in (("orography.nc", "Z"), ("land_mask.nc", "LSM")):
        with h5py.File(src / name) as fa, h5py.File(out / name) as fb:
            assert np.array_equal(fa[var][()], fb[var][()]), name
    a = torch.load(src / "training_checkpoints" / "best_ckpt_mp0.tar", weights_only=True)["model_state"]
    b = torch.load(out / "training_checkpoints" / "best_ckpt_mp0.tar", weights_only=True)
    assert list(b) == ["model_state"] and set(b["model_state"]) == set(a)  # loaded strictly by name
    for k in a:
        assert a[k].dtype == b["model_state"][k].dtype and torch.equal(a[k], b["model_state"][k]), k
    config = json.loads((out / "config.json").read_text())
    assert not {"inp_shape", "out_shape", "inp_chans", "out_chans"} & set(config)  # they make the reference loader fail
    reloaded = load_forecaster(out, device="cpu")
    noise = ref["net_input"][:, 73:81]
    t = _time(ref)
    torch.testing.assert_close(reloaded.step(ref["x_phys"], t, noise), forecaster.step(ref["x_phys"], t, noise), rtol=0, atol=0)
    assert reloaded.conventions == REFERENCE_PACKAGE


def test_a_model_file_from_a_package_keeps_everything(forecaster, ref, tmp_path):
    forecaster.save(tmp_path / "m.pt")
    g = load_forecaster(tmp_path / "m.pt", device="cpu")
    noise = ref["net_input"][:, 73:81]
    t = _time(ref)
    torch.testing.assert_close(g.step(ref["x_phys"], t, noise), forecaster.step(ref["x_phys"], t, noise), rtol=0, atol=0)
    assert g.conventions == REFERENCE_PACKAGE and g.noise_settings == forecaster.noise_settings


def _small_forecaster(shape: tuple[int, int], seed: int = 0) -> Forecaster:
    """A forecaster of another size, channels and time step, with random weights and statistics."""
    rng = np.random.default_rng(seed)
    channels = ["t2m", "tcwv", "u500", "z500", "u850", "z850"]
    kwargs = dict(inp_shape=list(shape), channel_names=channels, aux_channel_names=list(FCN3_AUX_CHANNELS[:5]) + ["xoro", "xlsml", "xlsms"])
    kwargs.update(atmo_embed_dim=3, surf_embed_dim=4, aux_embed_dim=2, num_layers=2, sfno_block_frequency=2)
    torch.manual_seed(seed)
    net = FCN3(**kwargs)
    c = len(channels)
    mean = rng.normal(size=c) * 10
    stats = ChannelStats(
        channels=channels,
        grid={},
        mean=mean.tolist(),
        std=(rng.uniform(1, 2, c)).tolist(),
        min=(mean - 5).tolist(),
        max=(mean + 5).tolist(),
        time_diff_std=rng.uniform(0.1, 1, c).tolist(),
    )
    lat, lon = np.linspace(90, -90, shape[0]), np.arange(shape[1]) * 360 / shape[1]
    oro = np.abs(rng.normal(size=shape)).astype(np.float32) * 1000
    lsm = rng.uniform(size=shape).round().astype(np.float32)
    return Forecaster(
        net,
        net_kwargs=kwargs,
        stats=stats,
        normalization=None,
        lat=lat,
        lon=lon,
        step_hours=12,
        noise=NoiseSettings(n_channels=4, length_scales_km=(100.0, 300.0, 900.0, 2700.0), sigma=0.7, seed=5),
        orography=oro,
        land_sea_mask=lsm,
    ).eval()


@pytest.mark.parametrize("shape", [(17, 32), (25, 48)])
def test_packages_of_other_sizes_and_channels_load_the_same_way(shape, tmp_path):
    f = _small_forecaster(shape)
    out = f.export(tmp_path / "pkg")
    pkg = read_package(out)
    assert pkg.net_kwargs["inp_shape"] == list(shape) and pkg.step_hours == 12 and pkg.conventions == PROJECT
    g = load_forecaster(out, device="cpu")
    state = torch.randn(2, len(f.channels), *shape) * 3 + torch.as_tensor(f.normalizer.offset, dtype=torch.float32).view(-1, 1, 1)
    times = np.array(["2020-01-01T00", "2020-06-01T12"], dtype="datetime64[ns]")
    torch.testing.assert_close(g.step(state, times), f.step(state, times), rtol=0, atol=0)
    assert g.noise_settings == f.noise_settings


def _copy(golden: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "package"
    shutil.copytree(golden / "package", dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dst


def _edit_config(pkg: Path, **changes) -> None:
    config = json.loads((pkg / "config.json").read_text())
    config.update(changes)
    (pkg / "config.json").write_text(json.dumps(config))


def test_bad_packages_name_the_culprit(golden, tmp_path):
    cases = []
    pkg = _copy(golden, tmp_path / "a")
    (pkg / "mins.npy").unlink()
    cases.append((pkg, r"package .*: mins\.npy is missing"))
    pkg = _copy(golden, tmp_path / "b")
    np.save(pkg / "global_stds.npy", np.ones((1, 70, 1, 1), dtype=np.float32))
    cases.append((pkg, r"global_stds\.npy has shape \(1, 70, 1, 1\), expected \(1, 73, 1, 1\)"))
    pkg = _copy(golden, tmp_path / "c")
    _edit_config(pkg, atmo_embed_dim=9)
    cases.append((pkg, r"best_ckpt_mp0\.tar do not fit the network described by .*config\.json.*atmo_encoder\.conv\.weight"))
    pkg = _copy(golden, tmp_path / "d")
    _edit_config(pkg, nettype="SFNO")
    cases.append((pkg, r"config\.json: .*nettype.*'SFNO' is not FCN3"))
    pkg = _copy(golden, tmp_path / "e")
    (pkg / "orography.nc").unlink()
    cases.append((pkg, r"orography\.nc is missing"))
    for pkg, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            load_forecaster(pkg, device="cpu")
    with pytest.raises(PackageError):
        read_package(cases[0][0])


def test_export_leaves_nothing_behind_when_it_fails(tmp_path):
    f = _small_forecaster((9, 16))
    f.land_sea_mask = np.zeros((3, 3), dtype=np.float32)  # wrong shape: writing fails half-way
    with pytest.raises(Exception):  # noqa: B017 - any failure; what matters is what is left on disk
        f.export(tmp_path / "pkg")
    assert list(tmp_path.iterdir()) == []
