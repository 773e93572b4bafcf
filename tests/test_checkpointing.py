"""Activation checkpointing (``model.checkpointing``) changes memory, not the training step.

One training step of :class:`FCN3Module` (2-step rollout, ensemble of 2 with the spherical diffusion noise, the
module's own CRPS loss via ``training_step``) at every checkpointing level must give the loss and every parameter
gradient of the un-checkpointed step (within 1e-6 relative per tensor), serially and under a 2 x 1 spatial layout on
gloo (2 processes; distributed layers whose collectives are replayed by the recomputation). Hooks count the forward
calls of the blocks, encoders and decoders, so a level that silently recomputed nothing would fail too.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from gloo_workers import gloo_worker, run_workers
from tiny_net import CHANNELS, NET, SHAPE  # uneven latitude tiles under h = 2 (10 / 9 rows)

from fcn3_lightning.data.stats import Normalizer
from fcn3_lightning.model import FCN3
from fcn3_lightning.model.fcn3 import CHECKPOINTING_LEVELS
from fcn3_lightning.parallel import DistributedSphericalLayers, ProcessMesh, gather_state_dict, reduce_gradients, shard_state_dict
from fcn3_lightning.training.module import FCN3Module

AUX = ["xzen", "xnoise0", "xnoise1", "xoro"]
# blocks: spectral, DISCO, spectral
N_SAMPLES, N_MEMBERS, N_STEPS = 2, 2, 2
REL_TOL = 1e-6
WORLD = 2
TIME_LIMIT_S = 180.0
PRELOAD = ["torch", "torch.distributed", "lightning", "fcn3_lightning.parallel", "fcn3_lightning.training.module"]
#: forward calls of the checkpointed parts per network call: 1 without checkpointing, 2 with (forward + recomputation)
PARTS = {"blocks": "blocks", "encoder": "surf_encoder", "decoder": "surf_decoder"}


def _module(level: str, layers=None, mesh=None) -> FCN3Module:
    m = FCN3Module(net=NET, ensemble_size=N_MEMBERS, crps="fair", checkpointing=level)
    if mesh is not None:
        m.layout = mesh  # as configure_model sets it under the spatial-parallel strategy
    norm = Normalizer(CHANNELS, np.zeros(len(CHANNELS)), np.ones(len(CHANNELS)), np.linspace(0.5, 2.0, len(CHANNELS)))
    m.build(CHANNELS, AUX, SHAPE, norm, layers=layers)
    return m


def _blob() -> dict:
    torch.manual_seed(0)
    m = _module("none")
    g = torch.Generator().manual_seed(1)
    batch = {
        "input": torch.randn(N_SAMPLES, len(CHANNELS), *SHAPE, generator=g),
        "target": torch.randn(N_SAMPLES, N_STEPS, len(CHANNELS), *SHAPE, generator=g),
        "zenith": torch.rand(N_SAMPLES, N_STEPS, *SHAPE, generator=g),
        "time": torch.zeros(N_SAMPLES, dtype=torch.int64),
        "index": torch.tensor([3, 11]),
    }
    return {"state_dict": m.net.state_dict(), "batch": batch, "static": torch.randn(1, *SHAPE, generator=g)}


def _count_calls(net: FCN3) -> dict[str, int]:
    """Calls of the parts' forward (pre-hooks: the recomputation stops early, once it has what backward needs)."""
    counts = dict.fromkeys(PARTS, 0)

    def hook(part: str):
        def count(*_) -> None:
            counts[part] += 1

        return count

    for block in net.blocks:
        block.register_forward_pre_hook(hook("blocks"))
    net.surf_encoder.register_forward_pre_hook(hook("encoder"))
    net.surf_decoder.register_forward_pre_hook(hook("decoder"))
    return counts


def _step(m: FCN3Module, batch: dict, static: torch.Tensor) -> dict:
    """One training step (the module's own training_step: noise, rollout, loss) and backward."""
    m.register_buffer("static", static, persistent=False)
    m.train()
    counts = _count_calls(m.net)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer: logging is a no-op
        loss = m.training_step(batch, 0)
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad.detach().clone() for n, p in m.net.named_parameters()}, "counts": counts}


def _compare(got: dict, want: dict, what: str) -> float:
    assert got["grads"].keys() == want["grads"].keys()
    rel_loss = abs(float(got["loss"]) - float(want["loss"])) / abs(float(want["loss"]))
    assert rel_loss <= REL_TOL, f"{what}: loss {float(got['loss'])} vs {float(want['loss'])}"
    worst = 0.0
    for name, g in want["grads"].items():
        scale = float(g.abs().max())
        assert scale > 0, f"{what}: the un-checkpointed gradient of {name} is zero: the test would not check it"
        rel = float((got["grads"][name] - g).abs().max()) / scale
        worst = max(worst, rel)
        assert rel <= REL_TOL, f"{what}: {name} differs by {rel:.3g} x max |grad|"
    return worst


def _check_counts(counts: dict[str, int], level: str, what: str) -> None:
    parts = {"none": set(), "blocks": {"blocks"}, "encoder+decoder": {"encoder", "decoder"}}.get(level, {"blocks", "encoder", "decoder"})
    per_call = {"blocks": NET["num_layers"], "encoder": 1, "decoder": 1}
    for part, n in counts.items():
        want = N_STEPS * per_call[part] * (2 if part in parts else 1)
        assert n == want, f"{what}: {part} ran {n} times, expected {want} ({'recomputed' if part in parts else 'not checkpointed'})"


# --- serial -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blob() -> dict:
    return _blob()


def _serial_step(level: str, blob: dict) -> dict:
    m = _module(level)
    m.net.load_state_dict(blob["state_dict"])
    return _step(m, blob["batch"], blob["static"])


@pytest.fixture(scope="module")
def serial_reference(blob) -> dict:
    out = _serial_step("none", blob)
    _check_counts(out["counts"], "none", "serial none")
    return out


@pytest.mark.parametrize("level", [lv for lv in CHECKPOINTING_LEVELS if lv != "none"])
def test_serial_step_equals_unchecked(level, blob, serial_reference) -> None:
    out = _serial_step(level, blob)
    _check_counts(out["counts"], level, f"serial {level}")
    worst = _compare(out, serial_reference, f"serial {level}")
    print(f"[serial {level}] loss {float(out['loss']):.6f}; worst gradient max|diff| / max|grad| = {worst:.3e}")


def test_network_draws_no_random_numbers() -> None:
    """Nothing random inside the checkpointed regions (the noise is an input): recomputation replays the forward."""
    torch.manual_seed(0)
    net = FCN3(inp_shape=SHAPE, channel_names=CHANNELS, aux_channel_names=AUX, **NET).train()
    x = torch.randn(2, net.n_in_channels, *SHAPE)
    state = torch.get_rng_state()
    net(x).sum().backward()
    assert torch.equal(state, torch.get_rng_state()), "the network's forward/backward consumed random numbers"


def test_levels_are_checked() -> None:
    net = FCN3(inp_shape=SHAPE, channel_names=CHANNELS, aux_channel_names=AUX, **NET)
    assert net.checkpointing == "none"
    with pytest.raises(ValueError, match="checkpointing level 'all' is not supported"):
        net.set_checkpointing("all")
    with pytest.raises(ValueError, match="model.checkpointing must be one of"):
        FCN3Module(checkpointing="block")
    # a training setting, not architecture: not in the state dict
    net.set_checkpointing("blocks")
    assert not any("checkpoint" in k for k in net.state_dict())


def test_no_recomputation_without_autograd(blob) -> None:
    m = _module("blocks+encoder+decoder")
    counts = _count_calls(m.net)
    with torch.no_grad():
        m.net(torch.randn(1, m.net.n_in_channels, *SHAPE))
    assert counts == {"blocks": NET["num_layers"], "encoder": 1, "decoder": 1}


# --- 2 x 1 spatial layout on gloo ---------------------------------------------------------------------------


def _worker(rank: int, port: int, workdir: str) -> None:
    workdir = Path(workdir)
    with gloo_worker(rank, port, WORLD):
        blob = torch.load(workdir / "blob.pt")
        mesh = ProcessMesh(h_parallel_size=2)
        lat, lon = mesh.tile(SHAPE)
        batch = dict(blob["batch"])
        # the data module hands over this rank's tile (dm.set_tile); the static fields are cut by the forecaster
        batch["input"] = batch["input"][..., lat, lon].contiguous()
        batch["target"] = batch["target"][..., lat, lon].contiguous()
        results = {}
        for level in CHECKPOINTING_LEVELS:
            m = _module(level, layers=DistributedSphericalLayers(), mesh=mesh)
            m.net.load_state_dict(shard_state_dict(blob["state_dict"], m.net))
            out = _step(m, batch, blob["static"])
            reduce_gradients(m.net, mesh)  # as the strategy does before the optimizer step
            out["grads"] = {n: p.grad.detach().clone() for n, p in m.net.named_parameters()}
            out["serial_layout_grads"] = gather_state_dict(out["grads"], m.net)
            results[level] = out
            dist.barrier()
        torch.save(results, workdir / f"rank{rank}.pt")
        dist.barrier()
        mesh.destroy()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, blob) -> list[dict]:
    workdir = tmp_path_factory.mktemp("checkpointing")
    torch.save(blob, workdir / "blob.pt")
    elapsed = run_workers(_worker, workdir, WORLD, TIME_LIMIT_S, PRELOAD)
    print(f"\n[world={WORLD}, 2x1] spawn + {len(CHECKPOINTING_LEVELS)} levels: {elapsed:.1f} s")
    return [torch.load(workdir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("level", [lv for lv in CHECKPOINTING_LEVELS if lv != "none"])
def test_spatial_2x1_step_equals_unchecked(level, distributed) -> None:
    worst = 0.0
    for rank, results in enumerate(distributed):
        _check_counts(results["none"]["counts"], "none", f"2x1 rank {rank} none")
        _check_counts(results[level]["counts"], level, f"2x1 rank {rank} {level}")
        worst = max(worst, _compare(results[level], results["none"], f"2x1 rank {rank} {level}"))
    print(f"[2x1 {level}] loss {float(distributed[0][level]['loss']):.6f}; worst gradient max|diff| / max|grad| = {worst:.3e}")


def test_spatial_2x1_unchecked_equals_serial(distributed, serial_reference) -> None:
    """The distributed reference itself is the serial step (looser: float32 differences between the layouts)."""
    for results in distributed:
        got = results["none"]
        assert abs(float(got["loss"]) - float(serial_reference["loss"])) <= 1e-5 * abs(float(serial_reference["loss"]))
        for name, g in serial_reference["grads"].items():
            assert float((got["serial_layout_grads"][name] - g).abs().max()) <= 1e-5 * float(g.abs().max()), name
