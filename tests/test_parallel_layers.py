"""Spatial model parallelism foundations: the rank layout, and distributed FCN3 == serial FCN3 (gloo, CPU).

The layout test checks :func:`rank_layout` / :func:`group_ranks` against the reference formulas
(``shared/docs/fcn3-reference.md`` section 5.1) without ``torch.distributed``.

The multi-process test starts 4 workers once (forkserver, like tests/test_metrics_distributed.py; rendezvous on a
free TCP port; the whole run is time-limited) and runs every (h, w, DISCO polar mode) layout in turn, with each DISCO
kernel choice (``disco_impl``: torch-harmonics' kernels, and the Fourier-space layers with their distributed twins, the
serial reference built with the same choice): each builds a ProcessMesh
(batch = 4 / (h * w)), FCN3 with DistributedSphericalLayers, loads its shard of the serial state_dict, runs the
forward pass on its tile of its batch rank's samples, and all-gathers the tiles. The test process compares the
gathered outputs of every rank with the serial network's output, and checks that gathering the sharded
state_dict reproduces the serial one exactly.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_workers import gloo_worker, run_workers
from tiny_net import tiny_config

from fcn3_lightning.model import FCN3
from fcn3_lightning.model.layers import DISCO_IMPLS, SphericalLayers
from fcn3_lightning.parallel import (
    DistributedSphericalLayers,
    ProcessMesh,
    gather_state_dict,
    group_ranks,
    mesh_sizes,
    rank_layout,
    shard_state_dict,
    sharded_entries,
    split_slice,
)

WORLD = 4
# (h, w, DISCO polar_mode); batch parallel size = 4 / (h * w). With "auto", h = 2 uses the halo exchange everywhere;
# h = 4 falls back to reduce-scatter for the processor's DISCO block (its reach exceeds the neighbour's 2 latent rows)
LAYOUTS = [(2, 1, "auto"), (1, 2, "auto"), (2, 2, "auto"), (4, 1, "auto"), (2, 1, "reduce-scatter")]
# 19 latitudes give uneven splits everywhere: data rows 10/9, latent (Legendre-Gauss 9 x 16) rows 5/4, spectral l 5/4
# (h = 4: 5/5/5/4, 3/2/2/2, 3/2/2/2); 3 blocks: spectral, DISCO, spectral
CONFIG = tiny_config(["xzen", "xnoise0", "xoro"])
N_SAMPLES = 2
REL_TOL = 1e-5
TIME_LIMIT_S = 180.0
PRELOAD = ["torch", "torch.distributed", "torch_harmonics.distributed", "fcn3_lightning.model", "fcn3_lightning.parallel"]


# --- rank layout (pure) ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "world,h,w,ens", [(4, 2, 1, 1), (4, 1, 2, 1), (4, 2, 2, 1), (4, 1, 1, 2), (8, 2, 1, 2), (24, 3, 2, 2), (1, 1, 1, 1)]
)
def test_rank_layout_matches_reference_formulas(world: int, h: int, w: int, ens: int) -> None:
    sizes = mesh_sizes(world, h_parallel_size=h, w_parallel_size=w, ensemble_parallel_size=ens)
    assert (sizes.batch, sizes.ensemble, sizes.h, sizes.w) == (world // (ens * h * w), ens, h, w)
    coords = {}
    for r in range(world):
        c = rank_layout(r, sizes)
        m = h * w
        model_rank, data_rank = r % m, r // m
        assert (c.model_rank, c.w_rank, c.h_rank) == (model_rank, model_rank % w, model_rank // w)
        assert (c.data_rank, c.ensemble_rank, c.batch_rank) == (data_rank, data_rank % ens, data_rank // ens)
        # row-major (batch, ensemble, h, w), w fastest
        assert r == ((c.batch_rank * ens + c.ensemble_rank) * h + c.h_rank) * w + c.w_rank
        coords[r] = c
    groups = group_ranks(sizes)
    same = {
        "spatial": ("data_rank",),
        "h": ("data_rank", "w_rank"),
        "w": ("data_rank", "h_rank"),
        "ensemble": ("batch_rank", "model_rank"),
        "batch": ("ensemble_rank", "model_rank"),
        "data": ("model_rank",),
    }
    expected_size = {"spatial": h * w, "h": h, "w": w, "ensemble": ens, "batch": sizes.batch, "data": ens * sizes.batch}
    for name, members in groups.items():
        # a partition of the world into groups of the right size, whose members agree on the group's key
        assert sorted(r for g in members for r in g) == list(range(world)), name
        for g in members:
            assert len(g) == expected_size[name] and g == sorted(g), name
            keys = {tuple(getattr(coords[r], k) for k in same[name]) for r in g}
            assert len(keys) == 1, name
    # the h group orders ranks by h_rank, the w group by w_rank (what torch-harmonics' group ranks mean)
    for g in groups["h"]:
        assert [coords[r].h_rank for r in g] == list(range(h))
    for g in groups["w"]:
        assert [coords[r].w_rank for r in g] == list(range(w))


def test_mesh_sizes_errors_name_the_option() -> None:
    with pytest.raises(ValueError, match="h_parallel_size x w_parallel_size"):
        mesh_sizes(6, h_parallel_size=2, w_parallel_size=2)
    with pytest.raises(ValueError, match="w_parallel_size must be a positive integer"):
        mesh_sizes(4, w_parallel_size=0)
    with pytest.raises(ValueError, match="batch_parallel_size=3"):
        mesh_sizes(4, h_parallel_size=2, batch_parallel_size=3)
    with pytest.raises(ValueError, match="outside the mesh"):
        rank_layout(4, mesh_sizes(4, h_parallel_size=2))
    with pytest.raises(ValueError, match="latitude"):
        split_slice(3, 4, 0, what="latitude dimension (h_parallel_size)")
    # torch-harmonics' split: the first n mod k chunks are one larger
    assert [split_slice(19, 2, i) for i in range(2)] == [slice(0, 10), slice(10, 19)]
    assert [split_slice(10, 4, i) for i in range(4)] == [slice(0, 3), slice(3, 6), slice(6, 8), slice(8, 10)]


# --- distributed network == serial network ----------------------------------------------------------------


def _serial(disco_impl: str) -> tuple[FCN3, dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    net = FCN3(**CONFIG, layers=SphericalLayers(disco_impl)).eval()
    x = torch.randn(N_SAMPLES, net.n_in_channels, *CONFIG["inp_shape"])
    return net, net.state_dict(), x


def _worker(rank: int, port: int, workdir: str) -> None:
    workdir = Path(workdir)
    with gloo_worker(rank, port, WORLD):
        blob = torch.load(workdir / "serial.pt")
        x = blob["input"]
        results = {}
        for (h, w, polar_mode), disco_impl in itertools.product(LAYOUTS, DISCO_IMPLS):
            serial_sd = blob["state_dict"][disco_impl]
            mesh = ProcessMesh(h_parallel_size=h, w_parallel_size=w)
            layers = DistributedSphericalLayers(polar_mode=polar_mode, disco_impl=disco_impl)
            torch.manual_seed(1000 + rank)  # on purpose a different init per rank: the loaded shard must win
            net = FCN3(**CONFIG, layers=layers).eval()
            net.load_state_dict(shard_state_dict(serial_sd, net))
            local_shapes = {k: tuple(v.shape) for k, v in net.state_dict().items() if k in sharded_entries(net)}
            gathered = gather_state_dict(net.state_dict(), net)
            roundtrip_equal = gathered.keys() == serial_sd.keys() and all(torch.equal(gathered[k], serial_sd[k]) for k in serial_sd)

            b = split_slice(N_SAMPLES, mesh.sizes.batch, mesh.layout.batch_rank)
            lat, lon = mesh.tile(CONFIG["inp_shape"])
            with torch.no_grad():
                out = net(x[b, :, lat, lon])
            results[(h, w, polar_mode, disco_impl)] = {
                "samples": (b.start, b.stop),  # plain ints: torch.load(weights_only=True) rejects slices
                "output": mesh.gather_tiles(out, CONFIG["inp_shape"]),
                "roundtrip_equal": roundtrip_equal,
                "local_shapes": local_shapes,
                "polar_modes": [m.polar_mode for m in net.modules() if hasattr(m, "polar_mode")],
                "disco_types": sorted({type(m).__name__ for m in net.modules() if re.search("Disco|DiscreteContinuous", type(m).__name__)}),
            }
            dist.barrier()
            mesh.destroy()
        torch.save(results, workdir / f"rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def serials() -> dict[str, tuple[FCN3, dict[str, torch.Tensor], torch.Tensor]]:
    return {impl: _serial(impl) for impl in DISCO_IMPLS}


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, serials) -> list[dict]:
    x = serials[DISCO_IMPLS[0]][2]
    assert all(torch.equal(s[2], x) for s in serials.values())
    workdir = tmp_path_factory.mktemp("parallel")
    torch.save({"state_dict": {impl: s[1] for impl, s in serials.items()}, "input": x}, workdir / "serial.pt")
    elapsed = run_workers(_worker, workdir, WORLD, TIME_LIMIT_S, PRELOAD)
    print(f"\n[world={WORLD}] spawn + {len(LAYOUTS)} layouts x {len(DISCO_IMPLS)} DISCO kernels: {elapsed:.1f} s")
    return [torch.load(workdir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("disco_impl", DISCO_IMPLS)
@pytest.mark.parametrize("h,w,polar_mode", LAYOUTS)
def test_distributed_forward_equals_serial(h: int, w: int, polar_mode: str, disco_impl: str, serials, distributed) -> None:
    net, _, x = serials[disco_impl]
    with torch.no_grad():
        want = net(x)
    scale = float(want.abs().max())
    worst = 0.0
    for rank, per_rank in enumerate(distributed):
        r = per_rank[(h, w, polar_mode, disco_impl)]
        got = r["output"]
        ref = want[slice(*r["samples"])]
        assert got.shape == ref.shape, f"rank {rank}: gathered output {tuple(got.shape)} != serial {tuple(ref.shape)}"
        diff = float((got - ref).abs().max())
        worst = max(worst, diff)
        assert diff <= REL_TOL * scale, (
            f"(h, w) = ({h}, {w}), {polar_mode}, {disco_impl}, rank {rank}: max |diff| {diff:.3g} > {REL_TOL} x {scale:.3g}"
        )
    r0 = distributed[0][(h, w, polar_mode, disco_impl)]
    fourier_twin = "DistributedFourierDisco" in r0["disco_types"]
    assert fourier_twin == (disco_impl == "fourier"), f"{disco_impl}: DISCO layers {r0['disco_types']}"
    assert "FourierDisco" not in r0["disco_types"], "a serial Fourier layer ran on a tile"
    print(
        f"[(h, w) = ({h}, {w}), polar_mode={polar_mode}, disco_impl={disco_impl}] max |diff| = {worst:.3e} (max |serial| = "
        f"{scale:.3g}, relative {worst / scale:.3e}); DISCO layers {r0['disco_types']}, polar modes {r0['polar_modes']}"
    )


@pytest.mark.parametrize("disco_impl", DISCO_IMPLS)
@pytest.mark.parametrize("h,w,polar_mode", LAYOUTS)
def test_state_dict_shard_gather_round_trip(h: int, w: int, polar_mode: str, disco_impl: str, serials, distributed) -> None:
    _, state_dict, _ = serials[disco_impl]
    spectral = [k for k in state_dict if k.startswith("blocks.") and k.endswith("filter.weight") and state_dict[k].is_complex()]
    assert spectral, "the test network has no spectral block"
    if (h, polar_mode, disco_impl) == (4, "auto", "torch-harmonics"):
        # (with the Fourier layers the processor block is the twin, which has no polar mode)
        modes = distributed[0][(h, w, polar_mode, disco_impl)]["polar_modes"]
        assert "reduce-scatter" in modes, "the h = 4 layout should exercise the fallback"
    for rank, per_rank in enumerate(distributed):
        r = per_rank[(h, w, polar_mode, disco_impl)]
        assert r["roundtrip_equal"], f"(h, w) = ({h}, {w}), {polar_mode}, rank {rank}: gathered state_dict differs from the serial one"
        # exactly the spectral weights are sharded, along l over h, in compute_split_shapes chunks
        assert sorted(r["local_shapes"]) == sorted(spectral)
        h_rank = (rank % (h * w)) // w
        for k in spectral:
            full = state_dict[k].shape
            l_local = split_slice(full[3], h, h_rank)
            assert r["local_shapes"][k] == (*full[:3], l_local.stop - l_local.start), k
