"""The distributed twins of the Fourier-space DISCO layers equal the serial layers (gloo, CPU, 4 processes).

4 workers start once (forkserver, free TCP port, time-limited; tests/gloo_workers.py) and run every spatial layout of
tests/test_parallel_layers.py (the DISCO polar mode does not apply to these layers) on each layer case: the processor
block's DISCO and the decoders' fused resampling + DISCO (one with a longitude upsampling by 3, whose wavenumbers read
conjugated latent coefficients), built through ``DistributedSphericalLayers(disco_impl="fourier")`` with the serial
layer's state dict. Each rank runs its tile forward and backward (a fixed output gradient), reduces the weight gradient
with :func:`~fcn3_lightning.parallel.grads.reduce_gradients` as training does, and the gathered output, input gradient
and weight gradient are compared with the serial ``SphericalLayers(disco_impl="fourier")`` layer's in the test process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_workers import gloo_worker, run_workers

from fcn3_lightning.model.layers import SphericalLayers, fcn3_theta_cutoff
from fcn3_lightning.parallel import DistributedSphericalLayers, ProcessMesh, reduce_gradients
from fcn3_lightning.parallel.disco_fourier import DistributedFourierDisco

WORLD = 4
#: the (h, w) layouts of tests/test_parallel_layers.py; batch parallel size = 4 / (h * w)
LAYOUTS = [(2, 1), (1, 2), (2, 2), (4, 1)]
#: name -> (kind, channels, groups, kernel_shape, in_shape, out_shape, grid_in, grid_out, theta-cutoff factor)
CASES = {
    # the test network's latent grid (Legendre-Gauss 9 x 16: rows 5/4, 3/2/2/2 at h = 4), a wide filter
    "block-lg": ("block", (5, 3), 1, (3, 3), (9, 16), (9, 16), "legendre-gauss", "legendre-gauss", 2.0),
    "block-eq": ("block", (4, 6), 2, (3, 3), (19, 32), (19, 32), "equiangular", "equiangular", 1.0),
    "decoder": ("decoder", (4, 2), 2, (3, 3), (9, 16), (19, 32), "legendre-gauss", "equiangular", 1.0),
    "decoder-x3": ("decoder", (3, 2), 1, (2, 2), (8, 16), (25, 48), "legendre-gauss", "equiangular", 1.0),
}
BATCH = 2
FWD_TOL, GRAD_TOL = 1e-5, 1e-4
TIME_LIMIT_S = 180.0
PRELOAD = ["torch", "torch.distributed", "torch_harmonics.distributed", "fcn3_lightning.model", "fcn3_lightning.parallel"]


def _build(layers: SphericalLayers, name: str) -> torch.nn.ModuleList:
    kind, (cin, cout), groups, kernel, in_shape, out_shape, grid_in, grid_out, factor = CASES[name]
    disco = dict(kernel_shape=kernel, basis_type="morlet", basis_norm_mode="mean", groups=groups, grid_in=grid_in, grid_out=grid_out)
    cutoff = fcn3_theta_cutoff(out_shape[0], kernel, factor=factor)
    if kind == "block":
        return torch.nn.ModuleList([layers.disco(cin, cout, in_shape, out_shape, theta_cutoff=cutoff, **disco)])
    return torch.nn.ModuleList(layers.resampled_disco(cin, cout, in_shape, out_shape, theta_cutoff=cutoff, **disco))


def _run(mods: torch.nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for m in mods:
        x = m(x)
    return x


def _inputs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, (cin, cout), _, _, in_shape, out_shape, *_ = CASES[name]
    g = torch.Generator().manual_seed(7)
    return torch.randn(BATCH, cin, *in_shape, generator=g), torch.randn(BATCH, cout, *out_shape, generator=g)


def _worker(rank: int, port: int, workdir: str) -> None:
    workdir = Path(workdir)
    with gloo_worker(rank, port, WORLD):
        serial_sd = torch.load(workdir / "serial.pt")
        results = {}
        for h, w in LAYOUTS:
            mesh = ProcessMesh(h_parallel_size=h, w_parallel_size=w)
            layers = DistributedSphericalLayers(disco_impl="fourier")
            for name in CASES:
                _, _, _, _, in_shape, out_shape, *_ = CASES[name]
                torch.manual_seed(1000 + rank)  # a different init per rank on purpose: the loaded state must win
                mods = _build(layers, name)
                mods.load_state_dict(serial_sd[name])
                x, gy = _inputs(name)
                lat, lon = mesh.tile(in_shape)
                lat_o, lon_o = mesh.tile(out_shape)
                xt = x[..., lat, lon].clone().requires_grad_(True)
                y = _run(mods, xt)
                y.backward(gy[..., lat_o, lon_o])
                reduce_gradients(mods, mesh)
                results[(h, w, name)] = {
                    "types": [type(m).__name__ for m in mods],
                    "keys": sorted(mods.state_dict()),
                    "output": mesh.gather_tiles(y.detach(), out_shape),
                    "grad_input": mesh.gather_tiles(xt.grad, in_shape),
                    "grad_weight": mods[-1].weight.grad.clone(),
                }
            # too few latitude rows per h rank for the w split: a clear error at build time
            if (h, w) == (2, 2):
                try:
                    layers.disco(2, 2, (3, 8), (3, 8), kernel_shape=(3, 3), basis_type="morlet", basis_norm_mode="mean",
                                 groups=1, grid_in="equiangular", grid_out="equiangular", theta_cutoff=1.0)  # fmt: skip
                    results["error"] = ""
                except ValueError as e:
                    results["error"] = str(e)
            dist.barrier()
            mesh.destroy()
        torch.save(results, workdir / f"rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def serial() -> dict[str, dict]:
    out = {}
    for name in CASES:
        torch.manual_seed(0)
        mods = _build(SphericalLayers("fourier"), name)
        x, gy = _inputs(name)
        x.requires_grad_(True)
        y = _run(mods, x)
        y.backward(gy)
        out[name] = {"mods": mods, "output": y.detach(), "grad_input": x.grad, "grad_weight": mods[-1].weight.grad}
    return out


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, serial) -> list[dict]:
    workdir = tmp_path_factory.mktemp("disco_fourier_parallel")
    torch.save({name: s["mods"].state_dict() for name, s in serial.items()}, workdir / "serial.pt")
    elapsed = run_workers(_worker, workdir, WORLD, TIME_LIMIT_S, PRELOAD)
    print(f"\n[world={WORLD}] spawn + {len(LAYOUTS)} layouts x {len(CASES)} layers: {elapsed:.1f} s")
    return [torch.load(workdir / f"rank{r}.pt") for r in range(WORLD)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("h,w", LAYOUTS)
def test_distributed_fourier_layer_equals_serial(h: int, w: int, name: str, serial, distributed) -> None:
    want = serial[name]
    worst = {}
    for rank, per_rank in enumerate(distributed):
        r = per_rank[(h, w, name)]
        assert r["types"][-1] == DistributedFourierDisco.__name__, f"rank {rank}: {r['types']}"
        assert r["keys"] == sorted(want["mods"].state_dict()), f"rank {rank}: state dict keys {r['keys']}"
        for key, tol in (("output", FWD_TOL), ("grad_input", GRAD_TOL), ("grad_weight", GRAD_TOL)):
            assert r[key].shape == want[key].shape, f"rank {rank}: {key} {tuple(r[key].shape)} != {tuple(want[key].shape)}"
            rel = _rel(r[key], want[key])
            worst[key] = max(worst.get(key, 0.0), rel)
            assert rel <= tol, f"(h, w) = ({h}, {w}), {name}, rank {rank}: {key} differs by {rel:.3g} relative (> {tol})"
    print(f"[(h, w) = ({h}, {w}), {name}] relative differences " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


def test_too_few_rows_per_rank_for_the_longitude_transpose_is_refused(distributed) -> None:
    for per_rank in distributed:
        assert "w_parallel_size=2" in per_rank["error"] and "disco_impl='torch-harmonics'" in per_rank["error"], per_rank["error"]
