"""Metrics under data parallelism and spatial sharding equal the single-process values (gloo, CPU).

Real multi-process runs: 2 or 4 workers (tests/gloo_workers.py: from a forkserver, gloo on a free TCP port,
time-limited). One start per world size runs
every layout in turn; in each, a rank feeds its share of the data (a subset of the forecasts, a latitude or
longitude band, a 2D tile, or both) to every metric, in mini-batches, calls ``compute()`` (torchmetrics syncs the
states over the world) and saves the results and its local states. The test process computes the same metrics on
the whole data in one process and compares every value of every rank to a relative 1e-6, and the local states
added over ranks to the single-process states (each forecast counted once).

Layouts: contiguous (uneven) and strided splits of the forecasts; uneven latitude bands with the world group as
``spatial_group``; uneven longitude bands (the spectra's partial-DFT path) with a ``new_group`` of all ranks;
with 4 ranks a 2x2 mesh of 2 data-parallel groups x 2 latitude bands, and 2x2 latitude x longitude tiles.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from gloo_workers import gloo_worker, run_workers

from fcn3_lightning.metrics import (
    ACC,
    CRPS,
    AngularPowerSpectrum,
    DeterministicScores,
    EnergyScore,
    RankHistogram,
    SpreadSkill,
    ZonalEnergySpectrum,
)

LAT = np.linspace(90.0, -90.0, 17)
LON = np.arange(32) * 11.25
CHANNELS = ["u10m", "t2m", "z500"]
LEAD_HOURS = [6.0, 12.0]
REGIONS = ["global", "tropics", "northern-hemisphere", "europe", "global_land"]
N_FORECASTS, N_MEMBERS = 8, 4
RTOL = 1e-6
# absolute slack, relative to the largest magnitude of each output, for values that are ~0 (e.g. spectra at the poles)
ATOL_REL = 1e-12
CHUNK = 2  # forecasts per update() on a rank: states must add up over several updates too
# the forkserver imports the metrics once: importing torch_harmonics and torchmetrics takes ~10 s a process on 2 cores,
# which 6 spawned workers would pay each
TIME_LIMIT_S = 300.0
PRELOAD = ["torch", "torch.distributed", "fcn3_lightning.metrics"]

# case -> world sizes it runs with
CASES = {
    "data_contiguous": (2, 4),
    "data_strided": (2, 4),
    "lat_bands": (2, 4),
    "lon_bands": (2, 4),
    "mesh_2x2_data_x_lat": (4,),
    "tiles_2x2_lat_x_lon": (4,),
}
_CONTIGUOUS_SIZES = {2: (3, 5), 4: (0, 3, 3, 2)}  # uneven on purpose; with 4, rank 0 gets no forecast at all
_LAT_BOUNDS = {2: (0, 7, 17), 4: (0, 3, 9, 13, 17)}  # 17 rows: 7/10 and 3/6/4/4
_LON_BOUNDS = {2: (0, 13, 32), 4: (0, 5, 16, 25, 32)}  # 32 columns: 13/19 and 5/11/9/7


def _bands(bounds: tuple[int, ...], i: int) -> slice:
    return slice(bounds[i], bounds[i + 1])


def _layout(case: str, world: int, rank: int) -> tuple[list[int], slice, slice, str | tuple[int, ...] | None]:
    """This rank's forecasts, latitude and longitude slices, and spatial group (None, "world" or a rank tuple)."""
    everything = list(range(N_FORECASTS))
    full = slice(None)
    if case == "data_contiguous":
        sizes = _CONTIGUOUS_SIZES[world]
        start = sum(sizes[:rank])
        return list(range(start, start + sizes[rank])), full, full, None
    if case == "data_strided":
        return everything[rank::world], full, full, None
    if case == "lat_bands":
        return everything, _bands(_LAT_BOUNDS[world], rank), full, "world"
    if case == "lon_bands":
        return everything, full, _bands(_LON_BOUNDS[world], rank), tuple(range(world))
    if case == "mesh_2x2_data_x_lat":
        data_group, band = divmod(rank, 2)
        forecasts = everything[:3] if data_group == 0 else everything[3:]
        return forecasts, _bands((0, 8, 17), band), full, (2 * data_group, 2 * data_group + 1)
    if case == "tiles_2x2_lat_x_lon":
        band, column = divmod(rank, 2)
        return everything, _bands((0, 10, 17), band), _bands((0, 20, 32), column), "world"
    raise ValueError(case)


def _make_data() -> dict[str, torch.Tensor]:
    """float32 fields with per-channel scales and offsets; no ties between members and truth (RankHistogram)."""
    g = torch.Generator().manual_seed(1234)
    shape = (N_FORECASTS, len(LEAD_HOURS), len(CHANNELS), LAT.size, LON.size)
    offset = torch.tensor([0.0, 280.0, 5.4e4]).view(1, 1, -1, 1, 1)
    scale = torch.tensor([1.0, 10.0, 1.0e3]).view(1, 1, -1, 1, 1)
    target = offset + scale * torch.randn(shape, generator=g)
    clim = offset + scale * torch.randn(shape, generator=g)
    bias = 0.3 * scale * torch.randn((1, 1, len(CHANNELS), LAT.size, LON.size), generator=g)
    pred = target.unsqueeze(1) + bias.unsqueeze(1) + 0.8 * scale.unsqueeze(1) * torch.randn((shape[0], N_MEMBERS, *shape[1:]), generator=g)
    target, clim, pred = target.float(), clim.float(), pred.float()
    tie = pred == target.unsqueeze(1)
    pred = torch.where(tie, torch.nextafter(pred, torch.full_like(pred, math.inf)), pred)
    assert not (pred == target.unsqueeze(1)).any()
    lsm = torch.rand((LAT.size, LON.size), generator=g, dtype=torch.float64)
    return {"pred": pred, "target": target, "clim": clim, "land_sea_mask": lsm}


def _build_metrics(land_sea_mask: np.ndarray, tile=None, spatial_group=None) -> dict:
    common = dict(lat=LAT, lon=LON, channels=CHANNELS, lead_hours=LEAD_HOURS, tile=tile, spatial_group=spatial_group)
    gridded = dict(common, regions=REGIONS, land_sea_mask=land_sea_mask)
    return {
        "DeterministicScores": (DeterministicScores(**gridded), "deterministic"),
        "ACC": (ACC(**gridded), "acc"),
        "CRPS": (CRPS(**gridded), "ensemble"),
        "SpreadSkill": (SpreadSkill(**gridded), "ensemble"),
        "EnergyScore": (EnergyScore(**gridded), "ensemble"),
        "RankHistogram": (RankHistogram(**gridded, n_members=N_MEMBERS), "ensemble"),
        "ZonalEnergySpectrum[ensemble]": (ZonalEnergySpectrum(**common, ensemble=True), "members"),
        "ZonalEnergySpectrum[truth]": (ZonalEnergySpectrum(**common, ensemble=False), "truth"),
        "AngularPowerSpectrum[ensemble]": (AngularPowerSpectrum(**common, ensemble=True), "members"),
        "AngularPowerSpectrum[ensemble mean]": (AngularPowerSpectrum(**common, ensemble=False), "mean"),
    }


def _compute_all(data: dict[str, torch.Tensor], forecasts: list[int], lat: slice, lon: slice, chunk: int, **kwargs) -> dict:
    """Feed the (forecasts, lat, lon) part of the data to every metric in mini-batches of ``chunk``; compute()."""
    metrics = _build_metrics(data["land_sea_mask"].numpy(), **kwargs)
    idx = torch.tensor(forecasts, dtype=torch.long)
    pred = data["pred"][idx][..., lat, lon]
    target = data["target"][idx][..., lat, lon]
    clim = data["clim"][idx][..., lat, lon]
    for start in range(0, len(forecasts), chunk):
        b = slice(start, start + chunk)
        p, t, c = pred[b], target[b], clim[b]
        mean = p.double().mean(1)
        for metric, kind in metrics.values():
            if kind == "deterministic":
                metric.update(mean, t)
            elif kind == "acc":
                metric.update(mean, t, c)
            elif kind == "ensemble":
                metric.update(p, t)
            elif kind == "members":
                metric.update(p)
            elif kind == "truth":
                metric.update(t)
            else:
                metric.update(mean)
    values = {name: {k: v.detach().cpu().clone() for k, v in metric.compute().items()} for name, (metric, _) in metrics.items()}
    # compute() restores the local states after syncing: across ranks they must add up to the single-process ones
    states = {name: {k: v.detach().cpu().clone() for k, v in metric.metric_state.items()} for name, (metric, _) in metrics.items()}
    return {"values": values, "states": states}


def _worker(rank: int, port: int, workdir: str, world: int, cases: list[str]) -> None:
    workdir = Path(workdir)
    with gloo_worker(rank, port, world, timeout_s=120.0):
        # every rank creates every group, in the same order
        groups = {"world": dist.group.WORLD, tuple(range(world)): dist.new_group(list(range(world)))}
        if world == 4:
            for pair in ((0, 1), (2, 3)):
                groups[pair] = dist.new_group(list(pair))
        data = torch.load(workdir / "data.pt")
        results = {}
        for case in cases:
            forecasts, lat, lon, spatial = _layout(case, world, rank)
            kwargs = {} if spatial is None else {"tile": (lat, lon), "spatial_group": groups[spatial]}
            results[case] = _compute_all(data, forecasts, lat, lon, CHUNK, **kwargs)
            dist.barrier()
        torch.save(results, workdir / f"results_rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    return _make_data()


@pytest.fixture(scope="module")
def serial(data) -> dict:
    return _compute_all(data, list(range(N_FORECASTS)), slice(None), slice(None), chunk=N_FORECASTS)


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, data):
    """``run(world)``: every rank's results of every case for that world size; one spawn per world size."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    cache: dict[int, list[dict] | BaseException] = {}

    def run(world: int) -> list[dict]:
        if world not in cache:
            workdir = tmp_path_factory.mktemp(f"world{world}")
            torch.save(data, workdir / "data.pt")
            cases = [c for c, worlds in CASES.items() if world in worlds]
            try:
                elapsed = run_workers(_worker, workdir, world, TIME_LIMIT_S, PRELOAD, args=(world, cases))
                cache[world] = [torch.load(workdir / f"results_rank{r}.pt") for r in range(world)]
                print(f"\n[world={world}] spawn + {len(cases)} cases: {elapsed:.1f} s")
            except BaseException as exc:  # a failed spawn fails every case of this world size, without re-running
                cache[world] = exc
        result = cache[world]
        if isinstance(result, BaseException):
            raise result
        return result

    return run


def _compare(got: dict, want: dict) -> tuple[float, str, list[str]]:
    """Largest relative difference over all values, where it is, and the failures (beyond RTOL/ATOL_REL)."""
    worst, where, failures = 0.0, "", []
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for key, ref in want[name].items():
            val = got[name][key].to(ref.dtype)
            label = f"{name}.{key}"
            assert val.shape == ref.shape, f"{label}: shape {tuple(val.shape)} != {tuple(ref.shape)}"
            nan = ref.isnan()
            if not torch.equal(nan, val.isnan()):
                failures.append(f"{label}: NaN at different places")
                continue
            ref, val = ref[~nan], val[~nan]
            if ref.numel() == 0:
                continue
            diff = (val - ref).abs()
            nonzero = ref != 0
            rel = diff[nonzero] / ref[nonzero].abs()
            if rel.numel() and float(rel.max()) > worst:
                worst, where = float(rel.max()), label
            bad = diff > RTOL * ref.abs() + ATOL_REL * float(ref.abs().max())
            if bad.any():
                failures.append(f"{label}: {int(bad.sum())} of {bad.numel()} values differ, max |difference| {float(diff.max()):.3g}")
    return worst, where, failures


@pytest.mark.parametrize("world,case", [(w, c) for c, worlds in CASES.items() for w in worlds])
def test_split_equals_single_process(world: int, case: str, distributed, serial) -> None:
    results = distributed(world)
    for rank, per_rank in enumerate(results):
        worst, where, failures = _compare(per_rank[case]["values"], serial["values"])
        print(f"[world={world} {case} rank {rank}] computed values: max relative difference {worst:.3g} ({where or 'all equal'})")
        assert not failures, f"world={world}, {case}, rank {rank}:\n" + "\n".join(failures)
    # the states are sums: added over ranks they are the single-process states (each forecast counted once, also
    # when its spatial means were formed across a spatial group)
    # (the ensemble size is a max-reduced state)
    combine = {"members": lambda xs: torch.stack(xs).amax(0)}
    summed = {
        name: {k: combine.get(k, sum)([per_rank[case]["states"][name][k] for per_rank in results]) for k in states}
        for name, states in serial["states"].items()
    }
    worst, where, failures = _compare(summed, serial["states"])
    print(f"[world={world} {case}] states summed over ranks: max relative difference {worst:.3g} ({where or 'all equal'})")
    assert not failures, f"world={world}, {case}, summed states:\n" + "\n".join(failures)
    for name, states in summed.items():
        assert float(states["n_forecasts"]) == N_FORECASTS, f"{name}: {float(states['n_forecasts'])} forecasts counted"
