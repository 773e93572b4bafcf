"""Encoders shared across members at the first rollout step change the cost, not the mathematics.

At the first step every member of a sample starts from the same state; only the noise channels differ. With
``EnsembleForecaster.share_encoders`` the state encoders run once per sample (``FCN3.encode_state``) and the rest of
the network once per member (``FCN3.forward_encoded``). A training rollout (4 members, 2 steps, the module's own
noise streams and CRPS loss) must give the outputs of the unshared rollout within 1e-6 and every parameter gradient
within 2e-6 (relative per tensor; float32 round-off of a reordered sum, see ``GRAD_REL_TOL``), serially (batched
members, and the CPU's one-sample lockstep) with and without activation checkpointing, and under a 2 x 1 spatial
layout on gloo. Hooks count the rows the encoders see, so sharing that silently did not happen fails too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from gloo_workers import gloo_worker, run_workers
from tiny_net import CHANNELS, NET, SHAPE  # uneven latitude tiles under h = 2 (10 / 9 rows)

from fcn3_lightning.data.stats import Normalizer
from fcn3_lightning.model import FCN3
from fcn3_lightning.model.rollout import EnsembleForecaster
from fcn3_lightning.parallel import DistributedSphericalLayers, ProcessMesh, gather_state_dict, reduce_gradients, shard_state_dict
from fcn3_lightning.training.module import FCN3Module

AUX = ["xzen", "xnoise0", "xnoise1", "xoro"]
N_MEMBERS, N_STEPS = 4, 2
REL_TOL = 1e-6
#: the state encoders' weight gradients sum the same terms in another order (members summed before the contraction):
#: float32 round-off, up to 1.24e-6 of max |grad| here (atmo_encoder); the unshared step itself moves that gradient
#: by 8.4e-7 when its two samples run as two batches of one instead of one batch of two
GRAD_REL_TOL = 2e-6
WORLD = 2
TIME_LIMIT_S = 240.0
PRELOAD = ["torch", "torch.distributed", "lightning", "fcn3_lightning.parallel", "fcn3_lightning.training.module"]
#: (samples, checkpointing level): batched members (2 samples), and the CPU lockstep of one sample
CASES = [(2, "none"), (2, "blocks+encoder+decoder"), (1, "none")]
ENCODERS = ("atmo_encoder", "surf_encoder", "aux_encoder")


def _module(level: str, share: bool, layers=None, mesh=None) -> FCN3Module:
    m = FCN3Module(net=NET, ensemble_size=N_MEMBERS, crps="fair", checkpointing=level)
    if mesh is not None:
        m.layout = mesh  # as configure_model sets it under the spatial-parallel strategy
    norm = Normalizer(CHANNELS, np.zeros(len(CHANNELS)), np.ones(len(CHANNELS)), np.linspace(0.5, 2.0, len(CHANNELS)))
    m.build(CHANNELS, AUX, SHAPE, norm, layers=layers)
    m.forecaster.share_encoders = share
    return m


def _blob() -> dict:
    torch.manual_seed(0)
    m = _module("none", True)
    g = torch.Generator().manual_seed(1)
    batch = {
        "input": torch.randn(2, len(CHANNELS), *SHAPE, generator=g),
        "target": torch.randn(2, N_STEPS, len(CHANNELS), *SHAPE, generator=g),
        "zenith": torch.rand(2, N_STEPS, *SHAPE, generator=g),
        "time": torch.zeros(2, dtype=torch.int64),
        "index": torch.tensor([3, 11]),
    }
    return {"state_dict": m.net.state_dict(), "batch": batch, "static": torch.randn(1, *SHAPE, generator=g)}


def _rows_seen(net: FCN3) -> dict[str, int]:
    """Rows (batch entries) each encoder's forward receives, summed over its calls."""
    rows = dict.fromkeys(ENCODERS, 0)
    for name in ENCODERS:

        def count(_module, args, name=name) -> None:
            rows[name] += args[0].shape[0]

        getattr(net, name).register_forward_pre_hook(count)
    return rows


def _step(m: FCN3Module, batch: dict, static: torch.Tensor, n_samples: int) -> dict:
    """The training rollout (the module's own noise streams), its CRPS loss and backward."""
    m.register_buffer("static", static, persistent=False)
    m.train()
    batch = {k: v[:n_samples] for k, v in batch.items()}
    rows = _rows_seen(m.net)
    pred = m.forward_rollout(batch, N_MEMBERS, N_STEPS, key=1)
    loss, _ = m.loss_fn(pred, batch["target"])
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in m.net.named_parameters()}
    return {"pred": pred.detach(), "loss": loss.detach(), "grads": grads, "rows": rows}


def _compare(got: dict, want: dict, what: str) -> float:
    """Worst relative difference of outputs, loss and gradients (each relative to the tensor's max |value|)."""
    worst = float((got["pred"] - want["pred"]).abs().max()) / float(want["pred"].abs().max())
    assert worst <= REL_TOL, f"{what}: outputs differ by {worst:.3g} x max |output|"
    rel_loss = abs(float(got["loss"]) - float(want["loss"])) / abs(float(want["loss"]))
    assert rel_loss <= REL_TOL, f"{what}: loss {float(got['loss'])} vs {float(want['loss'])}"
    assert got["grads"].keys() == want["grads"].keys()
    for name, g in want["grads"].items():
        scale = float(g.abs().max())
        assert scale > 0, f"{what}: the unshared gradient of {name} is zero: the test would not check it"
        rel = float((got["grads"][name] - g).abs().max()) / scale
        worst = max(worst, rel)
        assert rel <= GRAD_REL_TOL, f"{what}: gradient of {name} differs by {rel:.3g} x max |grad|"
    return worst


def _check_rows(rows: dict[str, int], n_samples: int, share: bool, level: str, what: str) -> None:
    """State encoders: one row per sample at the first step when shared, one per member otherwise; aux: per member."""
    per_member = n_samples * N_MEMBERS
    first = n_samples if share else per_member
    levels = 2  # z and t at 500 and 850 hPa: the level encoder sees one row per level
    recomputed = 2 if level == "blocks+encoder+decoder" else 1
    want = {
        "atmo_encoder": levels * (first + (N_STEPS - 1) * per_member) * recomputed,
        "surf_encoder": (first + (N_STEPS - 1) * per_member) * recomputed,
        "aux_encoder": N_STEPS * per_member * recomputed,
    }
    assert rows == want, f"{what}: rows through the encoders {rows}, expected {want}"


# --- serial -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blob() -> dict:
    return _blob()


def _serial(level: str, share: bool, blob: dict, n_samples: int) -> dict:
    m = _module(level, share)
    m.net.load_state_dict(blob["state_dict"])
    return _step(m, blob["batch"], blob["static"], n_samples)


@pytest.mark.parametrize(("n_samples", "level"), CASES)
def test_serial_shared_equals_unshared(n_samples, level, blob) -> None:
    want = _serial(level, False, blob, n_samples)
    got = _serial(level, True, blob, n_samples)
    what = f"serial, {n_samples} sample(s), {level}"
    _check_rows(want["rows"], n_samples, False, level, what + " unshared")
    _check_rows(got["rows"], n_samples, True, level, what + " shared")
    worst = _compare(got, want, what)
    print(f"[{what}] worst max|diff| / max|value| over outputs, loss and gradients = {worst:.3e}")


def test_cpu_lockstep_forecast_is_bit_exact(blob) -> None:
    """One sample on the CPU (predict): members one network call each; the shared encoding is that same call's."""
    m = _module("none", True)
    m.net.load_state_dict(blob["state_dict"])
    m.register_buffer("static", blob["static"], persistent=False)
    batch = {k: v[:1] for k, v in blob["batch"].items()}
    with torch.inference_mode():
        shared = m.forward_rollout(batch, N_MEMBERS, N_STEPS, key=0)
        m.forecaster.share_encoders = False
        unshared = m.forward_rollout(batch, N_MEMBERS, N_STEPS, key=0)
    assert torch.equal(shared, unshared), f"max |diff| {float((shared - unshared).abs().max()):.3g}"


def test_forward_encoded_equals_forward_and_checks_shapes() -> None:
    torch.manual_seed(0)
    net = FCN3(inp_shape=SHAPE, channel_names=CHANNELS, aux_channel_names=AUX, **NET).eval()
    x = torch.randn(3, net.n_in_channels, *SHAPE)
    with torch.no_grad():
        z = net.encode_state(x[:, : net.n_channels])
        assert torch.equal(net.forward_encoded(z, x[:, net.n_channels :]), net(x))
    with pytest.raises(ValueError, match=r"encode_state: state has shape \(3, 10, 19, 32\)"):
        net.encode_state(x)
    with pytest.raises(ValueError, match=r"forward_encoded: aux has shape \(2, 4, 19, 32\), expected \(3, 4, 19, 32\)"):
        net.forward_encoded(z, x[:2, net.n_channels :])
    with pytest.raises(ValueError, match=r"forward_encoded: z has shape"):
        net.forward_encoded(z[:, 1:], x[:, net.n_channels :])
    assert EnsembleForecaster(net).share_encoders


# --- 2 x 1 spatial layout on gloo ---------------------------------------------------------------------------


def _worker(rank: int, port: int, workdir: str) -> None:
    workdir = Path(workdir)
    with gloo_worker(rank, port, WORLD):
        blob = torch.load(workdir / "blob.pt")
        mesh = ProcessMesh(h_parallel_size=2)
        lat, lon = mesh.tile(SHAPE)
        batch = dict(blob["batch"])
        # the data module hands over this rank's tile; the static fields are cut by the forecaster
        batch["input"] = batch["input"][..., lat, lon].contiguous()
        batch["target"] = batch["target"][..., lat, lon].contiguous()
        results = {}
        for share in (False, True):
            m = _module("none", share, layers=DistributedSphericalLayers(), mesh=mesh)
            m.net.load_state_dict(shard_state_dict(blob["state_dict"], m.net))
            out = _step(m, batch, blob["static"], 2)
            reduce_gradients(m.net, mesh)  # as the strategy does before the optimizer step
            out["grads"] = {n: p.grad.detach().clone() for n, p in m.net.named_parameters()}
            out["serial_layout_grads"] = gather_state_dict(out["grads"], m.net)
            results[share] = out
            dist.barrier()
        torch.save(results, workdir / f"rank{rank}.pt")
        dist.barrier()
        mesh.destroy()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, blob) -> list[dict]:
    workdir = tmp_path_factory.mktemp("shared_encoders")
    torch.save(blob, workdir / "blob.pt")
    elapsed = run_workers(_worker, workdir, WORLD, TIME_LIMIT_S, PRELOAD)
    print(f"\n[world={WORLD}, 2x1] spawn + shared and unshared steps: {elapsed:.1f} s")
    return [torch.load(workdir / f"rank{r}.pt") for r in range(WORLD)]


def test_spatial_2x1_shared_equals_unshared(distributed, blob) -> None:
    worst = 0.0
    for rank, results in enumerate(distributed):
        _check_rows(results[False]["rows"], 2, False, "none", f"2x1 rank {rank} unshared")
        _check_rows(results[True]["rows"], 2, True, "none", f"2x1 rank {rank} shared")
        worst = max(worst, _compare(results[True], results[False], f"2x1 rank {rank}"))
    print(f"[2x1] worst max|diff| / max|value| shared vs unshared = {worst:.3e}")
    # and the shared distributed step is the serial one (looser: float32 differences between the layouts)
    serial = _serial("none", True, blob, 2)
    for results in distributed:
        got = results[True]
        assert abs(float(got["loss"]) - float(serial["loss"])) <= 1e-5 * abs(float(serial["loss"]))
        for name, g in serial["grads"].items():
            assert float((got["serial_layout_grads"][name] - g).abs().max()) <= 1e-5 * float(g.abs().max()), name
