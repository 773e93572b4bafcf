"""A distributed ensemble rollout with AR(1) noise == the serial one (gloo, CPU, 4 processes).

The serial reference runs in the test process: a tiny FCN3 (as in tests/test_parallel_step.py) with two noise
channels, the cos zenith and a static field, wrapped in :class:`EnsembleForecaster` with its
:class:`SphericalDiffusionNoise`; a 3-step rollout of 2 samples x 4 members (stationary noise, then AR(1) steps).

4 workers start once (forkserver, free TCP port, time-limited) and run every (h, w, ensemble, batch) layout in
turn: each rank loads its shard of the serial weights, builds the forecaster with the distributed layers (so the
noise process keeps its (l, m) chunk and maps it to the rank's tile), takes its samples and draws the streams of its
own members (global member ids), and rolls out on its tile. The inputs are given on the full grid (the forecaster
cuts them to the tile) except in the ``TILE_INPUTS`` layout, where x0 and the static field are cut by the caller and
the cos zenith is computed on the tile's own latitudes and longitudes. The gathered tiles (and members, samples)
must equal the serial rollout to ``REL_TOL`` x max |serial|; so must the noise fields alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from gloo_workers import gloo_worker, run_workers
from tiny_net import tiny_config

from fcn3_lightning.data.zenith import cos_zenith
from fcn3_lightning.model import FCN3
from fcn3_lightning.model.noise import SphericalDiffusionNoise
from fcn3_lightning.model.rollout import EnsembleForecaster, keyed_streams
from fcn3_lightning.parallel import DistributedSphericalLayers, ProcessMesh, shard_state_dict, split_slice

WORLD = 4
#: (h, w, ensemble, batch) parallel sizes
LAYOUTS = [(2, 1, 1, 2), (1, 2, 1, 2), (2, 2, 1, 1), (2, 1, 2, 1), (1, 2, 2, 1)]
#: the layout whose caller passes tiles (zenith computed on the tile's coordinates) instead of full-grid inputs
TILE_INPUTS = (2, 2, 1, 1)
# 19 latitudes: uneven tiles (10/9 rows); noise lmax = mmax = 17: l chunks 9/8 over h, m chunks 9/8 over w
CONFIG = tiny_config(["xzen", "xnoise0", "xnoise1", "xoro"])
NOISE_KW = dict(n_channels=2, length_scales_km=(800.0, 3200.0), lambd=0.5)
N_SAMPLES, N_MEMBERS, N_STEPS = 2, 4, 3
SAMPLE_IDS = [3, 8]
NOISE_SEED, NOISE_KEY = 7, 0
INIT_TIMES = np.array(["2020-03-01T00", "2020-07-15T06"], dtype="datetime64[ns]")
REL_TOL = 1e-5
TIME_LIMIT_S = 180.0
PRELOAD = ["torch", "torch.distributed", "torch_harmonics.distributed", "fcn3_lightning.model", "fcn3_lightning.parallel"]


def _coords() -> tuple[np.ndarray, np.ndarray]:
    nlat, nlon = CONFIG["inp_shape"]
    return np.linspace(90.0, -90.0, nlat), np.arange(nlon) * (360.0 / nlon)


def _zenith(lat: np.ndarray, lon: np.ndarray) -> torch.Tensor:
    """cos zenith (B, N_STEPS, nlat, nlon) at the input time of every step (6 h apart)."""
    steps = np.arange(N_STEPS) * np.timedelta64(6, "h")
    return torch.stack([torch.from_numpy(cos_zenith(t + steps, lat, lon)).float() for t in INIT_TIMES])


def _inputs() -> dict:
    torch.manual_seed(0)
    net = FCN3(**CONFIG)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(N_SAMPLES, len(CONFIG["channel_names"]), *CONFIG["inp_shape"], generator=g)
    static = torch.randn(1, *CONFIG["inp_shape"], generator=g)
    return {"state_dict": net.state_dict(), "x0": x0, "static": static, "zenith": _zenith(*_coords())}


def _noise_fields(noise: SphericalDiffusionNoise, streams) -> torch.Tensor:
    """The noise fields the rollout uses, (N, N_STEPS, C, H, W): stationary, then AR(1) steps."""
    state, fields = noise.stationary(streams), []
    for s in range(N_STEPS):
        if s > 0:
            state = noise.ar1_step(state, streams)
        fields.append(noise.to_grid(state))
    return torch.stack(fields, dim=1)


def _serial(blob: dict) -> dict:
    net = FCN3(**CONFIG)
    net.load_state_dict(blob["state_dict"])
    forecaster = EnsembleForecaster(net, SphericalDiffusionNoise(CONFIG["inp_shape"], **NOISE_KW)).eval()
    streams = lambda: keyed_streams(NOISE_SEED, NOISE_KEY, SAMPLE_IDS, N_MEMBERS)  # noqa: E731 - fresh generators
    with torch.no_grad():
        pred = forecaster.rollout(blob["x0"], blob["zenith"], blob["static"], streams(), N_STEPS, N_MEMBERS)
        noise = _noise_fields(forecaster.noise, streams()).unflatten(0, (N_SAMPLES, N_MEMBERS))
    return {"pred": pred, "noise": noise}


def _worker(rank: int, port: int, workdir: str) -> None:
    workdir = Path(workdir)
    with gloo_worker(rank, port, WORLD):
        blob = torch.load(workdir / "inputs.pt")
        results = {}
        for h, w, ens, batch in LAYOUTS:
            t0 = time.perf_counter()
            mesh = ProcessMesh(h_parallel_size=h, w_parallel_size=w, ensemble_parallel_size=ens, batch_parallel_size=batch)
            layers = DistributedSphericalLayers()
            torch.manual_seed(1000 + rank)  # a different init per rank: the loaded shard must win
            net = FCN3(**CONFIG, layers=layers)
            net.load_state_dict(shard_state_dict(blob["state_dict"], net))
            forecaster = EnsembleForecaster(net, SphericalDiffusionNoise(CONFIG["inp_shape"], **NOISE_KW, layers=layers)).eval()
            c = mesh.layout
            b = split_slice(N_SAMPLES, batch, c.batch_rank)
            m = split_slice(N_MEMBERS, ens, c.ensemble_rank)
            n_local = m.stop - m.start

            def streams(b=b, m=m, n_local=n_local):
                # this rank's samples and its own members, by global id
                return keyed_streams(NOISE_SEED, NOISE_KEY, SAMPLE_IDS[b], n_local, member_offset=m.start)

            x0, static, zenith = blob["x0"][b], blob["static"], blob["zenith"][b]
            if (h, w, ens, batch) == TILE_INPUTS:
                lat, lon = mesh.tile(CONFIG["inp_shape"])
                lat_deg, lon_deg = _coords()
                x0, static = x0[..., lat, lon], static[..., lat, lon]
                zenith = _zenith(lat_deg[lat], lon_deg[lon])[b]
            with torch.no_grad():
                pred = forecaster.rollout(x0, zenith, static, streams(), N_STEPS, n_local)
                noise = _noise_fields(forecaster.noise, streams()).unflatten(0, (b.stop - b.start, n_local))
            results[(h, w, ens, batch)] = {
                "samples": (b.start, b.stop),
                "members": (m.start, m.stop),
                "tile_shape": tuple(pred.shape[-2:]),
                "state_shape": forecaster.noise.state_shape,
                "pred": mesh.gather_tiles(pred.contiguous(), CONFIG["inp_shape"]),
                "noise": mesh.gather_tiles(noise.contiguous(), CONFIG["inp_shape"]),
                "seconds": time.perf_counter() - t0,
            }
            dist.barrier()
            mesh.destroy()
        torch.save(results, workdir / f"rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def blob() -> dict:
    return _inputs()


@pytest.fixture(scope="module")
def serial(blob) -> dict:
    return _serial(blob)


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, blob) -> list[dict]:
    workdir = tmp_path_factory.mktemp("parallel_rollout")
    torch.save(blob, workdir / "inputs.pt")
    elapsed = run_workers(_worker, workdir, WORLD, TIME_LIMIT_S, PRELOAD)
    print(f"\n[world={WORLD}] spawn + {len(LAYOUTS)} layouts x {N_STEPS}-step rollouts: {elapsed:.1f} s")
    return [torch.load(workdir / f"rank{r}.pt") for r in range(WORLD)]


def _assemble(distributed: list[dict], layout: tuple[int, ...], key: str) -> torch.Tensor:
    """The (B, M, ...) field from every rank's (samples, members) block; blocks held by several ranks must agree."""
    out: torch.Tensor | None = None
    for per_rank in distributed:
        r = per_rank[layout]
        block = r[key]
        if out is None:
            out = torch.full((N_SAMPLES, N_MEMBERS, *block.shape[2:]), float("nan"))
        (b0, b1), (m0, m1) = r["samples"], r["members"]
        prev = out[b0:b1, m0:m1]
        if not torch.isnan(prev).any():  # another spatial rank of the same block: gathered copies are identical
            torch.testing.assert_close(block, prev, rtol=0, atol=0)
        out[b0:b1, m0:m1] = block
    assert out is not None and not torch.isnan(out).any(), f"{layout}: some (sample, member) blocks were not computed"
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_noise_fields_equal_serial(layout, serial, distributed) -> None:
    want = serial["noise"]
    got = _assemble(distributed, layout, "noise")
    scale = float(want.abs().max())
    diff = float((got - want).abs().max())
    assert diff <= REL_TOL * scale, f"{layout}: noise fields differ by {diff:.3g} (max |serial| {scale:.3g})"
    # every rank keeps only its (l, m) chunk of the spectral state
    h, w = layout[:2]
    chunks = {r[layout]["state_shape"] for r in distributed}
    assert chunks == {(2, lc, mc) for lc in ((9, 8) if h == 2 else (17,)) for mc in ((9, 8) if w == 2 else (17,))}
    print(f"[{layout}] noise: max |diff| {diff:.3e}, relative {diff / scale:.3e}; chunks {sorted(chunks)}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rollout_equals_serial(layout, serial, distributed) -> None:
    want = serial["pred"]
    got = _assemble(distributed, layout, "pred")
    assert got.shape == want.shape == (N_SAMPLES, N_MEMBERS, N_STEPS, len(CONFIG["channel_names"]), *CONFIG["inp_shape"])
    tiles = {r[layout]["tile_shape"] for r in distributed}
    assert all(t != CONFIG["inp_shape"] for t in tiles), f"{layout}: ranks ran on the full grid {tiles}"
    # the members must differ (the noise acts) for the comparison to cover it
    assert float((want[:, 0] - want[:, 1]).abs().max()) > 1e-3
    scale = float(want.abs().max())
    per_step = [float((got[:, :, s] - want[:, :, s]).abs().max()) for s in range(N_STEPS)]
    assert max(per_step) <= REL_TOL * scale, f"{layout}: rollout differs by {per_step} per step (max |serial| {scale:.3g})"
    secs = max(r[layout]["seconds"] for r in distributed)
    print(f"[{layout}] rollout: max |diff| per step {[f'{d:.2e}' for d in per_step]}, relative {max(per_step) / scale:.3e}; {secs:.1f} s")
