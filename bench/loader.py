"""Benchmark: data-module throughput on a local 721x1440 WB2-style store with FCN3's 72 channels.

    python bench/loader.py                      # writes the store once (24 times, about 7 GB), then measures
    python bench/loader.py --workers 0 1 2      # loader settings to compare
    python bench/loader.py --url --nlat 181 --nlon 360 --times 10 --workers 0 2 4
                                                # the same store served over HTTP on 127.0.0.1 with 20 ms per request

The store is chunked as WeatherBench2's and ARCO's ERA5 are: one chunk per variable and time (all levels, the whole
globe), so a sample (input + one target) is 2 x 12 chunk requests. Prints samples/s of the raw Zarr read of exactly the
chunks a sample needs (input + one target, every variable, in one process) next to the data module's loader (read into
the flipped, channel-ordered output + cos zenith + worker transfer; normalisation runs on the device), per worker setting.

``--url``: the loader reading the store over HTTP (:class:`fcn3_lightning.store_server.StoreServer`, another process on
127.0.0.1 that waits ``--delay-ms`` before every answer, as a bucket's latency) next to the loader reading the local copy,
per worker setting, in ``--rounds`` alternating rounds (medians: a shared machine's load drifts); the target is >= 80% of
the local rate. Also printed: CPU ms per sample of the loader (main process and workers) and of the server, which hardly
depend on the machine's load; the server's share is work a real bucket does elsewhere. ``--url URL`` measures that
remote store instead (no local comparison).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
import zarr
from torch.utils.data import DataLoader, Subset

from fcn3_lightning.channels import FCN3_CHANNELS, FCN3_LEVELS, parse_channel
from fcn3_lightning.data import ForecastDataset, WB2Store, compute_stats
from fcn3_lightning.data.datamodule import collate_batch, loader_worker_init
from fcn3_lightning.store_server import StoreServer

NLAT, NLON = 721, 1440


def write_store(path: Path, n_times: int, nlat: int = NLAT, nlon: int = NLON) -> None:
    """A WB2-layout store, chunked like WB2's ERA5 (one chunk per variable and time), ascending latitude like it, smooth fields
    (so they compress like real ones)."""
    lat = np.linspace(-90, 90, nlat)
    lon = np.arange(nlon) * 360.0 / nlon
    rng = np.random.default_rng(0)
    phase = rng.uniform(0, 2 * np.pi, size=8)
    variables = dict.fromkeys(parse_channel(c).long_name for c in FCN3_CHANNELS)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".bench-"))
    try:
        for t in range(n_times):
            base = np.cos(np.deg2rad(lat))[:, None] * np.sin(np.deg2rad(lon)[None, :] * 3 + phase[t % 8] + t * 0.1)
            data = {}
            for k, var in enumerate(variables):
                field = (base * (k + 1) + 0.01 * rng.standard_normal((nlat, nlon))).astype(np.float32)
                if parse_channel(next(c for c in FCN3_CHANNELS if parse_channel(c).long_name == var)).level is None:
                    data[var] = (("time", "latitude", "longitude"), field[None])
                else:
                    data[var] = (("time", "level", "latitude", "longitude"), np.repeat(field[None, None], len(FCN3_LEVELS), axis=1))
            ds = xr.Dataset(
                data,
                coords={
                    "time": [np.datetime64("2020-01-01", "ns") + np.timedelta64(6 * t, "h")],
                    "level": np.array(FCN3_LEVELS),
                    "latitude": lat,
                    "longitude": lon,
                },
            )
            # hourly time units: appending with xarray's default (units of the first write) would truncate the 6 h steps
            # one chunk per variable and time, all levels, the whole globe: how WeatherBench2's and ARCO's ERA5 are chunked
            encoding = {v: {"chunks": ds[v].shape} for v in variables}
            encoding["time"] = {"units": "hours since 2000-01-01", "dtype": "int64"}
            kw = {"append_dim": "time"} if t else {"mode": "w", "encoding": encoding}
            ds.to_zarr(tmp, zarr_format=2, consolidated=True, **kw)
            print(f"\rwriting {path}: {t + 1}/{n_times} times", end="", flush=True)
        print()
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def raw_rate(path: Path, samples: list[int]) -> float:
    """Samples/s of reading the chunks of (input, target) for every variable straight from Zarr."""
    group = zarr.open_group(str(path), mode="r")
    names = list(dict.fromkeys(parse_channel(c).long_name for c in FCN3_CHANNELS))
    arrays = [group[n] for n in names]
    t0 = time.perf_counter()
    for s in samples:
        for a in arrays:
            a[s : s + 2]
    return len(samples) / (time.perf_counter() - t0)


def loader_rate(dataset: ForecastDataset, workers: int, samples: int) -> tuple[float, float]:
    """(samples/s, CPU seconds per sample) of the data loader in steady state: ``samples`` reads (the dataset's samples over
    and over, so that a small store still fills every worker's prefetch queue many times), the first batch (worker start-up)
    excluded from the time. The CPU is this process's and its workers' (reaped when the loader ends), all samples."""
    order = Subset(dataset, [i % len(dataset) for i in range(samples + 1)])
    kw = {"prefetch_factor": 2, "worker_init_fn": loader_worker_init} if workers else {}  # as the data module's loaders
    loader = DataLoader(order, batch_size=1, num_workers=workers, collate_fn=collate_batch, **kw)
    cpu0 = _cpu_s()
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    rate = n / (time.perf_counter() - t0)
    del it  # the workers exit and are reaped: their CPU time joins RUSAGE_CHILDREN
    return rate, (_cpu_s() - cpu0) / (samples + 1)


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) of this process and its reaped children, or of process ``pid`` (Linux /proc)."""
    if pid is not None:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "fcn3_loader_bench"))
    p.add_argument("--times", type=int, default=24, help="time steps in the store (each about 300 MB)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nlat", type=int, default=NLAT, help="grid of the written store (default 721x1440)")
    p.add_argument("--nlon", type=int, default=NLON)
    p.add_argument("--url", nargs="?", const="", help="read over HTTP: no value serves the local store on 127.0.0.1; or a store URL")
    p.add_argument("--samples", type=int, default=64, help="samples read per loader setting (the store's samples repeated)")
    p.add_argument("--rounds", type=int, default=3, help="with --url: rounds of local then HTTP per setting (medians)")
    p.add_argument("--delay-ms", type=float, default=20.0, help="with --url: the server's delay before every answer (default 20)")
    args = p.parse_args()

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"wb2_chunks_{args.nlat}x{args.nlon}_{args.times}.zarr"
    if args.url is not None:
        return url_bench(args, root, path)
    if not path.exists():
        write_store(path, args.times, args.nlat, args.nlon)
    store = WB2Store(path, FCN3_CHANNELS)
    stats_path = root / f"stats_{args.nlat}x{args.nlon}.json"
    if not stats_path.exists():
        compute_stats(store, str(store.times[0]), str(store.times[3]), progress=False).save(stats_path)
    from fcn3_lightning.data.stats import ChannelStats

    normalizer = ChannelStats.load(stats_path).normalizer(FCN3_CHANNELS)
    # as the data module builds it: normalisation and the NaN screen run on the device after transfer
    dataset = ForecastDataset(store, normalizer, str(store.times[0]), str(store.times[-1]), n_targets=1, on_device=True)
    sample_mb = 2 * 72 * args.nlat * args.nlon * 4 / 2**20
    print(f"store {path}: {args.times} times, 72 channels, {args.nlat}x{args.nlon}; one sample = input + 1 target = {sample_mb:.0f} MB")

    raw_rate(path, list(range(len(dataset))))  # warm the page cache so both runs read the same way
    raw = raw_rate(path, list(range(len(dataset))))
    print(f"raw Zarr read of the same chunks (1 process): {raw:6.2f} samples/s  ({raw * sample_mb:.0f} MB/s)")
    for w in args.workers:
        rate, _ = loader_rate(dataset, w, args.samples)
        print(f"data loader, num_workers={w}:               {rate:6.2f} samples/s  ({100 * rate / raw:5.1f}% of raw)")


def url_bench(args: argparse.Namespace, root: Path, path: Path) -> None:
    """Loader samples/s over HTTP (latency added by the server) next to the local copy, per worker setting."""
    if args.url:
        stores = {"url": WB2Store(args.url, FCN3_CHANNELS)}
        server = None
    else:
        if not path.exists():
            write_store(path, args.times, args.nlat, args.nlon)
        server = StoreServer(root, delay_s=args.delay_ms / 1000)
        stores = {"local": WB2Store(path, FCN3_CHANNELS), "url": WB2Store(server.url(path.name), FCN3_CHANNELS)}
    try:
        first = next(iter(stores.values()))
        stats = compute_stats(first, str(first.times[0]), str(first.times[1]), progress=False)
        normalizer = stats.normalizer(FCN3_CHANNELS)
        nlat, nlon = first.shape
        sample_mb = 2 * 72 * nlat * nlon * 4 / 2**20
        where = args.url or f"{path} served on 127.0.0.1 with {args.delay_ms:g} ms per request"
        print(f"store {where}: {first.times.size} times, 72 channels, {nlat}x{nlon}; one sample = {sample_mb:.0f} MB")
        for store in stores.values():  # warm: the page cache for both, the HTTP connections
            ForecastDataset(store, normalizer, str(store.times[0]), str(store.times[-1]), n_targets=1, on_device=True)[0]
        for w in args.workers:
            # rounds alternate local and HTTP, so that a machine whose load drifts slows both alike; medians over rounds
            rates: dict[str, list[float]] = {name: [] for name in stores}
            cpu: dict[str, list[float]] = {name: [] for name in (*stores, *(("server",) if server else ()))}
            for _ in range(args.rounds):
                for name, store in stores.items():
                    dataset = ForecastDataset(store, normalizer, str(store.times[0]), str(store.times[-1]), n_targets=1, on_device=True)
                    server_cpu0 = _cpu_s(server.process.pid) if server is not None else 0.0
                    rate, cpu_s = loader_rate(dataset, w, args.samples)
                    rates[name].append(rate)
                    cpu[name].append(cpu_s)
                    if server is not None and name == "url":
                        cpu["server"].append((_cpu_s(server.process.pid) - server_cpu0) / (args.samples + 1))
            med = {k: float(np.median(v)) for k, v in rates.items()}
            line = f"num_workers={w}: " + ", ".join(f"{k} {v:6.2f} samples/s ({v * sample_mb:.0f} MB/s)" for k, v in med.items())
            if "local" in rates:
                ratios = [u / loc for u, loc in zip(rates["url"], rates["local"], strict=True)]
                ratio = float(np.median(ratios))
                line += f"; HTTP/local = {100 * ratio:5.1f}% ({'meets' if ratio >= 0.8 else 'MISSES'} the 80% target)"
                if args.rounds > 1:
                    line += f" [rounds: {' '.join(f'{100 * r:.0f}%' for r in ratios)}]"
            # CPU per sample hardly depends on what else runs on the machine: the figure to compare on a shared one
            line += "; CPU ms/sample: " + ", ".join(f"{k} {1000 * float(np.median(v)):.0f}" for k, v in cpu.items())
            print(line, flush=True)
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
