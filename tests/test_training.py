"""The training recipe: rollouts, noise through a rollout, weights hand-off, bad configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fcn3_lightning.data.stats import Normalizer
from fcn3_lightning.model import FCN3
from fcn3_lightning.model.noise import NoiseStreams
from fcn3_lightning.model.rollout import EnsembleForecaster
from fcn3_lightning.training.module import FCN3Module
from fcn3_lightning.training.weights import load_initial_weights

CHANNELS = ["tcwv", "u500", "v500", "z500"]
AUX = ["xzen", "xnoise0", "xnoise1", "xoro", "xlsml", "xlsms"]
SMALL_NET = dict(atmo_embed_dim=4, surf_embed_dim=4, aux_embed_dim=3, num_layers=2, sfno_block_frequency=2)


def _forecaster(seed: int = 0) -> EnsembleForecaster:
    torch.manual_seed(seed)
    return EnsembleForecaster(FCN3(inp_shape=(17, 32), channel_names=CHANNELS, aux_channel_names=AUX, **SMALL_NET))


def test_gradients_reach_the_first_input_through_a_4_step_rollout():
    f = _forecaster()
    x0 = torch.randn(2, 4, 17, 32, requires_grad=True)
    zen = torch.rand(2, 4, 17, 32)
    static = torch.randn(3, 17, 32)
    pred = f.rollout(x0, zen, static, NoiseStreams(0, [0, 1], 3), n_steps=4, n_members=3)
    assert pred.shape == (2, 3, 4, 4, 17, 32)
    pred[:, :, -1].square().mean().backward()  # a loss on the last step only
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    # and every step is in the graph: the loss at step 4 depends on the first block's weights through 4 passes
    assert all(p.grad is not None for p in f.net.parameters())


def test_noise_process_must_match_the_network_grid():
    from fcn3_lightning.model.noise import SphericalDiffusionNoise

    net = FCN3(inp_shape=(17, 32), channel_names=CHANNELS, aux_channel_names=AUX, **SMALL_NET)
    with pytest.raises(ValueError, match="same layers factory"):
        EnsembleForecaster(net, SphericalDiffusionNoise((33, 64), n_channels=2))
    # serial: the tile is the full grid, inputs pass through untouched; another grid is named
    f = EnsembleForecaster(net)
    x = torch.randn(2, 17, 32)
    assert f.to_tile(x) is x
    with pytest.raises(ValueError, match="expected the data grid"):
        f.to_tile(torch.randn(2, 16, 32), "zenith")


def test_noise_is_ar1_correlated_across_rollout_steps():
    f = _forecaster()
    seen: list[torch.Tensor] = []
    to_grid = f.noise.to_grid
    f.noise.to_grid = lambda s: seen.append(to_grid(s)) or seen[-1]  # record the field of every step
    with torch.no_grad():
        f.rollout(torch.zeros(16, 4, 17, 32), torch.zeros(16, 3, 17, 32), torch.zeros(3, 17, 32), NoiseStreams(1, range(16), 4), 3, 4)
    assert len(seen) == 3
    a, b, c = (s.double().flatten() for s in seen)
    r1 = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    r2 = torch.corrcoef(torch.stack([a, c]))[0, 1].item()
    assert abs(r1 - math.exp(-1)) < 0.05 and abs(r2 - math.exp(-2)) < 0.05, (r1, r2)


def test_members_have_their_own_noise_and_differ():
    f = _forecaster()
    with torch.no_grad():
        pred = f.rollout(torch.zeros(1, 4, 17, 32), torch.zeros(1, 1, 17, 32), torch.zeros(3, 17, 32), NoiseStreams(0, [5], 4), 1, 4)
    assert not torch.allclose(pred[0, 0], pred[0, 1])


def _module(**kw) -> FCN3Module:
    m = FCN3Module(net=kw.pop("net", SMALL_NET), **kw)
    norm = Normalizer(CHANNELS, np.zeros(4), np.ones(4), np.ones(4))
    m.build(CHANNELS, AUX, (17, 32), norm)
    m.register_buffer("static", torch.zeros(3, 17, 32), persistent=False)
    return m


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    m = _module(ensemble_size=2, lr=3e-3)
    batch = {
        "input": torch.randn(2, 4, 17, 32),
        "target": torch.randn(2, 2, 4, 17, 32) * 0.1,
        "zenith": torch.rand(2, 3, 17, 32),
        "time": torch.zeros(2, dtype=torch.int64),
        "index": torch.tensor([0, 1]),
    }
    opt = m.configure_optimizers()
    losses = []
    for _ in range(15):
        pred = m.forward_rollout(batch, 2, 2, key=1)  # same noise every step: a fixed problem
        loss, _ = m.loss_fn(pred, batch["target"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_init_from_reference_layout_reproduces_the_golden(golden_dir, manifest):
    """Weights-only start from a reference (Makani) state dict: the first forward equals the reference output."""
    cfg = manifest["config"]
    net = {k: cfg[k] for k in ("atmo_embed_dim", "surf_embed_dim", "aux_embed_dim", "num_layers", "sfno_block_frequency")}
    m = FCN3Module(net=net, init_from=str(golden_dir / "state_dict.pt"), ensemble_size=2)
    norm = Normalizer(cfg["channel_names"], np.zeros(72), np.ones(72), np.ones(72))
    m.build(cfg["channel_names"], cfg["aux_channel_names"], tuple(cfg["inp_shape"]), norm)
    tensors = torch.load(golden_dir / "tensors.pt", weights_only=True)
    with torch.no_grad():
        out = m.net(tensors["input"])
    assert (out - tensors["output"]).abs().max().item() <= 1e-5


def test_init_from_names_what_does_not_fit(golden_dir, tmp_path):
    net = FCN3(inp_shape=(33, 64), atmo_embed_dim=10, surf_embed_dim=14, aux_embed_dim=12, num_layers=3, sfno_block_frequency=2)
    with pytest.raises(ValueError, match="missing tensors|unknown to this network"):
        load_initial_weights(net, golden_dir / "state_dict.pt")
    with pytest.raises(FileNotFoundError, match="init_from: .*nope.pt does not exist"):
        load_initial_weights(net, tmp_path / "nope.pt")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ensemble_size=1, crps="fair"), "fair CRPS needs at least 2 members"),
        (dict(net={"channel_names": ["z500"]}), "comes from the data module"),
        (dict(net={"embed_dim": 3}), r"unknown model option\(s\) \['embed_dim'\]"),
        (dict(ensemble_size=3, antithetic=True), "ensemble_size must be even"),
        (dict(scheduler={"name": "cosine"}), "scheduler.name must be 'plateau' or 'step'"),
        (dict(crps="energy"), "unknown CRPS kind 'energy'"),
    ],
)
def test_bad_configs_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FCN3Module(**kwargs)


def test_init_from_a_lightning_checkpoint_and_a_model_file(tmp_path):
    """Stage hand-off: the network weights of a checkpoint of this project load exactly (and nothing else)."""
    from fcn3_lightning.model.build import save_model

    src = _module()
    ckpt = {"state_dict": {f"forecaster.net.{k}": v for k, v in src.net.state_dict().items()}, "optimizer_states": [{}], "global_step": 7}
    torch.save(ckpt, tmp_path / "stage1.ckpt")
    dst = FCN3(inp_shape=(17, 32), channel_names=CHANNELS, aux_channel_names=AUX, **SMALL_NET)
    assert load_initial_weights(dst, tmp_path / "stage1.ckpt") is None  # no channel mapping: loaded as it is
    for k, v in src.net.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    save_model(src.net, dict(inp_shape=(17, 32), channel_names=CHANNELS, aux_channel_names=AUX, **SMALL_NET), tmp_path / "m.pt")
    other = FCN3(inp_shape=(17, 32), channel_names=CHANNELS, aux_channel_names=AUX, **SMALL_NET)
    load_initial_weights(other, tmp_path / "m.pt")
    assert all(torch.equal(other.state_dict()[k], v) for k, v in src.net.state_dict().items())
    # a checkpoint for another channel list is refused, naming the tensors
    wrong = FCN3(inp_shape=(17, 32), channel_names=["u500", "v500", "z500"], aux_channel_names=AUX, **SMALL_NET)
    with pytest.raises(ValueError, match="does not fit the network"):
        load_initial_weights(wrong, tmp_path / "stage1.ckpt")


def test_predict_step_returns_physical_units():
    m = _module(ensemble_size=2)
    m.normalizer = Normalizer(CHANNELS, np.array([10.0, 0.0, 0.0, 5000.0]), np.array([5.0, 10.0, 10.0, 100.0]), np.ones(4))
    batch = {"input": torch.zeros(1, 4, 17, 32), "target": torch.zeros(1, 2, 4, 17, 32), "zenith": torch.zeros(1, 3, 17, 32),
             "time": torch.tensor([0]), "index": torch.tensor([0])}  # fmt: skip
    with torch.no_grad():
        out = m.predict_step(batch, 0)
        norm = m.forward_rollout(batch, 2, 2, key=0)
    assert out["prediction"].shape == (1, 2, 2, 4, 17, 32)
    torch.testing.assert_close(out["prediction"][:, :, :, 3], norm[:, :, :, 3] * 100.0 + 5000.0)
