"""One distributed training step == the serial one (gloo, CPU, 4 processes), for spatial, ensemble and batch layouts.

The serial reference runs in the test process: a tiny FCN3 (as in tests/test_parallel_layers.py), 2 samples x 4
members with fixed input fields per member (nothing stochastic), the ensemble CRPS loss (fair kernel, spectral
term included), then 3 Adam steps with gradient clipping (max_norm below the gradient norm, so the clip acts).
The CRPS sorts the members, so its gradient jumps where two members swap order: the inputs are checked to keep
the members well apart (``_check_no_near_ties``), else float32 rounding could flip an order in one run only.

4 workers start once (forkserver, free TCP port, time-limited) and run every (h, w, ensemble, batch) layout in
turn: each rank loads its shard of the serial weights, takes its batch shard, its member shard and its tile of the
inputs and the target, and runs the same 3 steps with :class:`DistributedEnsembleCRPSLoss`,
:func:`reduce_gradients` and :func:`clip_grad_norm_`. The test process compares the loss (averaged over batch
ranks), every parameter's gradient after the first step (gathered to the serial layout), the clipped norms and the
weights after 3 steps with the serial run. Every layout runs with each DISCO kernel choice (``disco_impl``:
torch-harmonics' kernels, and the Fourier-space layers with their distributed twins), the serial reference built with
the same choice.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_workers import gloo_worker, run_workers
from tiny_net import tiny_config

from fcn3_lightning.losses import EnsembleCRPSLoss
from fcn3_lightning.model import FCN3
from fcn3_lightning.model.layers import DISCO_IMPLS, SphericalLayers
from fcn3_lightning.parallel import (
    DistributedEnsembleCRPSLoss,
    DistributedSphericalLayers,
    ProcessMesh,
    all_reduce_,
    clip_grad_norm_,
    gather_state_dict,
    gradient_tags,
    reduce_gradients,
    shard_state_dict,
    split_slice,
)

WORLD = 4
#: (h, w, ensemble, batch) parallel sizes
LAYOUTS = [(2, 1, 1, 2), (1, 2, 1, 2), (2, 2, 1, 1), (1, 1, 2, 2), (2, 1, 2, 1)]
# 19 latitudes: uneven tiles (10/9 rows), latent rows 5/4, spectral l 5/4; blocks: spectral, DISCO, spectral
# the water soft-clamp (pointwise, nothing distributed about it) makes members tie at 0 or differ by ~1e-9 near it
CONFIG = tiny_config(["xzen", "xnoise0", "xoro"], clamp_water=False)
N_SAMPLES, N_MEMBERS, N_STEPS = 2, 4, 3
# "head": the spectral CRPS up to the band limit; "release" (degrees up to nlat) adds near-empty coefficients whose
# members nearly tie (see _check_no_near_ties); its loss value is checked, too (RELEASE_KW)
LOSS_KW = dict(kind="fair", spectral_weight=0.5, spectral_normalization="head")
RELEASE_KW = dict(kind="cdf", spectral_weight=0.5, spectral_normalization="release")
LR = 1e-3
INPUT_SEED = 1
CLIP_FRACTION = 0.5  # max_norm = this x the first step's gradient norm
REL_TOL = 1e-5
TIME_LIMIT_S = 240.0
PRELOAD = ["torch", "torch.distributed", "torch_harmonics.distributed", "fcn3_lightning.model", "fcn3_lightning.parallel"]


def _inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = FCN3(**CONFIG)
    g = torch.Generator().manual_seed(INPUT_SEED)
    # every member gets its own fixed input fields (state and "noise" channels alike, nothing drawn in the step):
    # members far apart keep the CRPS away from ties (see _check_no_near_ties)
    x = torch.randn(N_SAMPLES, N_MEMBERS, net.n_in_channels, *CONFIG["inp_shape"], generator=g)
    target = torch.randn(N_SAMPLES, len(CONFIG["channel_names"]), *CONFIG["inp_shape"], generator=g)
    weights = torch.rand(len(CONFIG["channel_names"]), generator=g, dtype=torch.float64) + 0.5
    return {"state_dict": net.state_dict(), "input": x, "target": target, "channel_weights": weights}


def _min_gap(values: torch.Tensor) -> float:
    """Smallest gap between sorted members (dim 1), ignoring exact ties at 0 (spectral entries with m > l)."""
    srt = values.sort(1).values
    gap = srt[:, 1:] - srt[:, :-1]
    return float(gap[(gap > 0) | (srt[:, 1:] != 0)].min())


def _check_no_near_ties(pred: torch.Tensor, loss_fn: EnsembleCRPSLoss) -> dict[str, float]:
    """The CRPS sorts the members: its gradient jumps where two members swap order. float32 rounding differs
    between the serial and the distributed run (~1e-7 relative), so inputs with near-ties (gaps at that level)
    could flip an order and change a gradient by a finite amount. Make sure the test inputs have none."""
    with torch.no_grad():
        q = loss_fn.quadrature.squeeze(-1) > 0
        spatial = _min_gap(pred[..., q, :])
        coeffs = loss_fn.spectral._magnitudes(pred.flatten(0, 1)).unflatten(0, pred.shape[:2])
        spectral = _min_gap(coeffs)  # entries with m > l are 0 for every member: skipped
        gaps = {"spatial": spatial / float(pred.abs().max()), "spectral": spectral / float(coeffs.abs().max())}
    # 1e-6: ten times the forward-pass differences between the runs (~1e-7 relative, tests/test_parallel_layers.py)
    assert min(gaps.values()) > 1e-6, f"near-ties between members in the test inputs (relative gaps {gaps})"
    return gaps


def _train(net: torch.nn.Module, loss_fn, x: torch.Tensor, target: torch.Tensor, reduce, clip, release_loss_fn=None) -> dict:
    """N_STEPS Adam steps with clipping; the loss and the (reduced, unclipped) gradients of the first step.

    ``release_loss_fn``: a second loss whose value (only) is taken at the first step.
    """
    opt = torch.optim.Adam(net.parameters(), lr=LR, betas=(0.9, 0.95))
    out: dict = {"norms": []}
    b, m = x.shape[:2]
    for step in range(N_STEPS):
        opt.zero_grad(set_to_none=True)
        pred = net(x.flatten(0, 1)).unflatten(0, (b, m))
        loss, details = loss_fn(pred, target)
        loss.backward()
        reduce()
        if step == 0:
            out["loss"], out["details"], out["pred"] = loss.detach(), details, pred.detach()
            if release_loss_fn is not None:
                with torch.no_grad():
                    out["release_loss"] = release_loss_fn(pred, target)[0]
            out["grads"] = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
        out["norms"].append(float(clip()))
        opt.step()
    return out


def _serial(blob: dict, disco_impl: str) -> dict:
    net = FCN3(**CONFIG, layers=SphericalLayers(disco_impl))
    net.load_state_dict(blob["state_dict"])
    loss_fn = EnsembleCRPSLoss(CONFIG["inp_shape"], blob["channel_weights"], **LOSS_KW)
    release_loss_fn = EnsembleCRPSLoss(CONFIG["inp_shape"], blob["channel_weights"], **RELEASE_KW)
    params = list(net.parameters())
    # the clip threshold: a fraction of the first gradient norm, so that clipping acts
    pred = net(blob["input"].flatten(0, 1)).unflatten(0, blob["input"].shape[:2])
    loss_fn(pred, blob["target"])[0].backward()
    max_norm = CLIP_FRACTION * float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
    net.zero_grad(set_to_none=True)
    out = _train(
        net,
        loss_fn,
        blob["input"],
        blob["target"],
        lambda: None,
        lambda: torch.nn.utils.clip_grad_norm_(params, max_norm),
        release_loss_fn,
    )
    out["gaps"] = _check_no_near_ties(out["pred"], loss_fn)
    out["max_norm"] = max_norm
    out["weights"] = {k: v.clone() for k, v in net.state_dict().items()}
    return out


def _worker(rank: int, port: int, workdir: str) -> None:
    workdir = Path(workdir)
    with gloo_worker(rank, port, WORLD):
        blob = torch.load(workdir / "inputs.pt")
        max_norms = torch.load(workdir / "max_norm.pt")
        results = {}
        for (h, w, ens, batch), disco_impl in itertools.product(LAYOUTS, DISCO_IMPLS):
            max_norm = float(max_norms[disco_impl])
            mesh = ProcessMesh(h_parallel_size=h, w_parallel_size=w, ensemble_parallel_size=ens, batch_parallel_size=batch)
            torch.manual_seed(1000 + rank)  # a different init per rank: the loaded shard must win
            net = FCN3(**CONFIG, layers=DistributedSphericalLayers(disco_impl=disco_impl))
            net.load_state_dict(shard_state_dict(blob["state_dict"], net))
            loss_fn = DistributedEnsembleCRPSLoss(mesh, CONFIG["inp_shape"], blob["channel_weights"], **LOSS_KW)
            release_loss_fn = DistributedEnsembleCRPSLoss(mesh, CONFIG["inp_shape"], blob["channel_weights"], **RELEASE_KW)
            c = mesh.layout
            b = split_slice(N_SAMPLES, batch, c.batch_rank)
            m = split_slice(N_MEMBERS, ens, c.ensemble_rank)
            lat, lon = mesh.tile(CONFIG["inp_shape"])
            x = blob["input"][b, m][..., lat, lon].contiguous()
            target = blob["target"][b][..., lat, lon].contiguous()
            tags = gradient_tags(net)
            out = _train(
                net,
                loss_fn,
                x,
                target,
                lambda net=net, mesh=mesh, tags=tags: reduce_gradients(net, mesh, tags),
                lambda net=net, mesh=mesh, tags=tags, max_norm=max_norm: clip_grad_norm_(net, mesh, max_norm, tags=tags),
                release_loss_fn,
            )
            # the loss is a mean over this rank's samples: the serial batch mean is the mean over batch ranks
            loss = all_reduce_(out["loss"].clone(), mesh.group("batch")) / batch
            release_loss = all_reduce_(out["release_loss"].clone(), mesh.group("batch")) / batch
            results[(h, w, ens, batch, disco_impl)] = {
                "loss": loss,
                "release_loss": release_loss,
                "local_loss": out["loss"],
                "samples": (b.start, b.stop),
                "details": out["details"],
                "grads": gather_state_dict(out["grads"], net),
                "norms": out["norms"],
                "weights": gather_state_dict(net.state_dict(), net),
                "tags": {k: t.sharded for k, t in tags.items()},
            }
            dist.barrier()
            mesh.destroy()
        torch.save(results, workdir / f"rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def blob() -> dict:
    return _inputs()


@pytest.fixture(scope="module")
def serials(blob) -> dict[str, dict]:
    return {impl: _serial(blob, impl) for impl in DISCO_IMPLS}


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, blob, serials) -> list[dict]:
    workdir = tmp_path_factory.mktemp("parallel_step")
    torch.save(blob, workdir / "inputs.pt")
    torch.save({impl: torch.tensor(s["max_norm"]) for impl, s in serials.items()}, workdir / "max_norm.pt")
    elapsed = run_workers(_worker, workdir, WORLD, TIME_LIMIT_S, PRELOAD)
    print(f"\n[world={WORLD}] spawn + {len(LAYOUTS)} layouts x {len(DISCO_IMPLS)} DISCO kernels x {N_STEPS} steps: {elapsed:.1f} s")
    return [torch.load(workdir / f"rank{r}.pt") for r in range(WORLD)]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype, f"{tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    return float((a - b).abs().max())


@pytest.mark.parametrize("disco_impl", DISCO_IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_equals_serial(layout, disco_impl, serials, distributed) -> None:
    serial, layout = serials[disco_impl], (*layout, disco_impl)
    want, want_release = float(serial["loss"]), float(serial["release_loss"])
    worst = worst_release = 0.0
    for rank, per_rank in enumerate(distributed):
        r = per_rank[layout]
        worst = max(worst, abs(float(r["loss"]) - want))
        worst_release = max(worst_release, abs(float(r["release_loss"]) - want_release))
        # the per-(channel) terms, batch-meaned over this rank's samples, complete over tiles and members
        for k, v in r["details"].items():
            assert torch.isfinite(v).all(), (layout, rank, k)
    assert worst <= REL_TOL * abs(want), f"{layout}: loss differs by {worst:.3g} from the serial {want:.6g}"
    assert worst_release <= REL_TOL * abs(want_release), f"{layout}: 'release'/'cdf' loss differs by {worst_release:.3g}"
    spectral = [float(r[layout]["details"]["spectral_crps"].abs().max()) for r in distributed]
    assert min(spectral) > 0, "the spectral term should contribute"
    print(
        f"[{layout}] loss {want:.6f}: max |diff| {worst:.3e}, relative {worst / abs(want):.3e}; 'release'/'cdf' loss "
        f"{want_release:.6f}: relative {worst_release / abs(want_release):.3e}; min relative member gaps {serial['gaps']}"
    )


@pytest.mark.parametrize("disco_impl", DISCO_IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_equal_serial(layout, disco_impl, serials, distributed) -> None:
    serial, layout = serials[disco_impl], (*layout, disco_impl)
    want = serial["grads"]
    worst_ratio, worst_name = 0.0, ""
    for rank, per_rank in enumerate(distributed):
        got = per_rank[layout]["grads"]
        assert got.keys() == want.keys()
        for name, g in want.items():
            scale = float(g.abs().max())
            assert scale > 0, f"serial gradient of {name} is zero: the test would not check it"
            diff = _max_diff(got[name], g)
            ratio = diff / scale
            if ratio > worst_ratio:
                worst_ratio, worst_name = ratio, name
            assert ratio <= REL_TOL, f"{layout}, rank {rank}, {name}: max |diff| {diff:.3g} > {REL_TOL} x max |grad| {scale:.3g}"
    norms = [r[layout]["norms"] for r in distributed]
    for n in norms:
        for got_n, want_n in zip(n, serial["norms"], strict=True):
            assert abs(got_n - want_n) <= REL_TOL * want_n, f"{layout}: clipped norms {n} vs serial {serial['norms']}"
    print(f"[{layout}] grads: worst max|diff| / max|grad| = {worst_ratio:.3e} ({worst_name}); norms {norms[0]}")


@pytest.mark.parametrize("disco_impl", DISCO_IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_weights_after_adam_steps_equal_serial(layout, disco_impl, serials, distributed) -> None:
    serial, layout = serials[disco_impl], (*layout, disco_impl)
    want = serial["weights"]
    assert all(n > serial["max_norm"] for n in serial["norms"]), "clipping should act on every step"
    worst, worst_rel, worst_name = 0.0, 0.0, ""
    for rank, per_rank in enumerate(distributed):
        got = per_rank[layout]["weights"]
        assert got.keys() == want.keys()
        for name, v in want.items():
            diff = _max_diff(got[name], v)
            if diff > worst:
                worst, worst_rel, worst_name = diff, diff / max(float(v.abs().max()), 1e-12), name
            assert diff <= REL_TOL, f"{layout}, rank {rank}, {name}: weights differ by {diff:.3g} after {N_STEPS} steps"
    print(f"[{layout}] weights after {N_STEPS} Adam steps: max |diff| {worst:.3e} ({worst_name}; relative {worst_rel:.3e})")


def test_gradient_tags(distributed) -> None:
    tags = distributed[0][(2, 2, 1, 1, "fourier")]["tags"]
    assert tags == distributed[0][(2, 2, 1, 1, "torch-harmonics")]["tags"]
    sharded = {k for k, v in tags.items() if v}
    assert sharded == {k for k in tags if k.startswith("blocks.") and k.endswith("filter.weight")} - {"blocks.1.filter.weight"}
    assert all(tags[k] == ("h",) for k in sharded)  # spectral weights: l over h; summed over w
