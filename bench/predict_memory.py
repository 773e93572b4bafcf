"""Benchmark: peak memory of ``predict`` does not grow with the number of steps (streaming inference).

    python bench/predict_memory.py                          # 1-degree synthetic store, 8 members, 10 vs 60 steps (~5 min, 2 cores)
    python bench/predict_memory.py --steps 10 60 240 --members 4
    python bench/predict_memory.py --checkpoint runs/latest/checkpoints/best.ckpt    # the default world and a trained model
    python bench/predict_memory.py --score --grid 91 180 --steps 8 40   # predict --score-against --no-keep-forecast (~10 min, 2 cores)

Without ``--checkpoint`` the bench builds its own case in a temporary folder: a WB2-style store on a
1-degree grid (181x360, channels tcwv, u500, v500, z500, smooth random fields, static fields), its
statistics, and a Lightning checkpoint of this project (a small network, ``SMALL_NET``, or
``configs/base.yaml``'s with ``--base-net``; one training step on that store). The grid is large
enough that a rollout holding all its steps would show: each step of the ensemble is
``members x 4 x 181 x 360 x 4`` bytes, and the bench prints what keeping all of them would add next to
the measured figures.

Each run is a fresh process (``predict`` of ``--inits`` initial times into a new Zarr store, through
the public API). Its peak RSS is measured over the predict call alone, after the model is loaded:
VmHWM, reset through /proc/self/clear_refs just before the call (ru_maxrss where that is not
possible). Prints the figures and the ratio of the longest run's peak to the shortest's; exits with
status 1 when that ratio exceeds 1.10.

``--score``: scoring while forecasting (``predict(..., score_against=<the store>, keep_forecast=False)``, the
climatology computed from the store's one year), no forecast store written; the synthetic store then holds every
valid time of the longest run. Also printed: the peak of the forecast loop alone (the scoring holds per lead only its
metric states, 82 KB at 91x180) and the results' size: the results are every lead's rows, so building and writing
them at the end is what still grows with the lead times.
Profiled at 46x90, 8 members, 16 steps on 2 cores: ~90% of the time is the network's
forecast, ~10% the scoring (the spatial means of 16 regions most of it); the climatology is computed once per
channel group, not per step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rss import peak_rss, reset_peak, rss  # bench/rss.py (the script's folder is on sys.path)

CHANNELS = ["tcwv", "u500", "v500", "z500"]
LIMIT = 1.10
#: the network of the synthetic case: small, so that the steps are quick and the outputs weigh in the peak
SMALL_NET = {"atmo_embed_dim": 8, "surf_embed_dim": 8, "aux_embed_dim": 4, "num_layers": 2, "sfno_block_frequency": 2}


def child(args: argparse.Namespace) -> None:
    """One measured run: load the model, then predict; prints a JSON line."""
    import torch

    from fcn3_lightning.inference import init_times_in_range, load_predictor, predict

    torch.set_num_threads(args.threads)
    p = load_predictor(args.checkpoint, data_path=args.data_path, stats_path=args.stats, device=args.device)
    times = p.store.times
    start = args.start or str(times[0])
    inits = init_times_in_range(p.store, start, str(times[-1]), 24)[: args.inits]
    reset = reset_peak()
    before = rss()
    t0 = time.perf_counter()
    score: dict = {}
    if args.score:
        from fcn3_lightning.eval.harness import Options

        year = int(str(times[0])[:4])
        score = {
            "score_against": args.data_path or p.store.path,
            "score_out": f"{args.output}_scores",
            "score_options": Options(clim_years=(year, year), progress=False, block_mb=16),
            "keep_forecast": False,
        }
    loop = {"peak": 0}

    def after_step(*_: object) -> None:  # the peak so far: that of the forecast loop once the last step is done
        loop["peak"] = peak_rss()

    predict(p, inits, args.output, members=args.members, steps=args.steps, progress=False, callback=after_step, **score)
    seconds = time.perf_counter() - t0
    results = Path(f"{args.output}_scores")
    results_bytes = sum(f.stat().st_size for f in results.iterdir()) if args.score else 0
    shape = p.store.shape
    print(
        json.dumps(
            {
                "steps": args.steps,
                "inits": len(inits),
                "peak": peak_rss(),
                "loop_peak": loop["peak"],
                "results_bytes": results_bytes,
                "before": before,
                "seconds": seconds,
                "method": "VmHWM after clear_refs" if reset else "ru_maxrss",
                "step_bytes": args.members * len(p.channels) * shape[0] * shape[1] * 4,
                "grid": list(shape),
            }
        )
    )


def _synthetic_case(root: Path, nlat: int, nlon: int, net: dict | None = None, n_times: int = 12) -> tuple[Path, Path]:
    """A WB2-style store with smooth random weather, its statistics, and a one-step-trained checkpoint."""
    import lightning as L
    import torch
    import xarray as xr
    import yaml

    from fcn3_lightning.data import WB2DataModule, WB2Store, compute_stats
    from fcn3_lightning.training.module import FCN3Module

    store = root / "synthetic.zarr"
    rng = np.random.default_rng(0)
    times = np.datetime64("2000-01-01", "ns") + np.arange(n_times) * np.timedelta64(6, "h")
    lat = np.linspace(90, -90, nlat)
    lon = np.arange(nlon) * 360.0 / nlon
    la, lo = np.deg2rad(lat)[:, None], np.deg2rad(lon)[None, :]

    def field(mean: float, amp: float) -> np.ndarray:
        k = rng.integers(1, 6, size=(len(times), 2))
        phase = rng.uniform(0, 2 * np.pi, size=len(times))
        waves = np.stack([np.cos(a * lo + b * la + p) for (a, b), p in zip(k, phase, strict=True)])
        return (mean + amp * (np.cos(la) * waves + 0.1 * rng.standard_normal((len(times), nlat, nlon)))).astype(np.float32)

    ds = xr.Dataset(
        {
            "geopotential": (("time", "level", "latitude", "longitude"), field(55000, 2000)[:, None]),
            "u_component_of_wind": (("time", "level", "latitude", "longitude"), field(10, 10)[:, None]),
            "v_component_of_wind": (("time", "level", "latitude", "longitude"), field(0, 10)[:, None]),
            "total_column_water_vapour": (("time", "latitude", "longitude"), np.abs(field(20, 15))),
            "geopotential_at_surface": (("latitude", "longitude"), (np.abs(field(0, 5000)[0]))),
            "land_sea_mask": (("latitude", "longitude"), (field(0, 1)[0] > 0.3).astype(np.float32)),
        },
        coords={"time": times, "level": [500], "latitude": lat, "longitude": lon},
    )
    ds.to_zarr(store, zarr_format=2, consolidated=True)
    train = (str(times[0]), str(times[-1]))
    compute_stats(WB2Store(store, CHANNELS), *train, progress=False).save(f"{store}.stats.json")

    net = net or yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "base.yaml").read_text())["model"]["net"]
    torch.manual_seed(0)
    dm = WB2DataModule(str(store), channels=CHANNELS, train_range=train, valid_range=train, test_range=train, batch_size=1)
    module = FCN3Module(net=net, ensemble_size=2)
    trainer = L.Trainer(
        max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, datamodule=dm)
    ckpt = root / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    return store, ckpt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 60], help="forecast lengths to compare (default 10 60)")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--inits", type=int, default=1, help="initial times per run (daily from the store's first time)")
    parser.add_argument("--checkpoint", help="use this checkpoint (default: build a synthetic 1-degree case)")
    parser.add_argument("--data-path", help="store with the initial conditions (default: the checkpoint's)")
    parser.add_argument("--stats", help="statistics file (default: the checkpoint's)")
    parser.add_argument("--start", help="first initial time (default: the store's first time)")
    parser.add_argument("--grid", type=int, nargs=2, default=[181, 360], metavar=("NLAT", "NLON"), help="synthetic grid (default 181 360)")
    parser.add_argument("--base-net", action="store_true", help="the synthetic case uses configs/base.yaml's network")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--score", action="store_true", help="score against the store while forecasting, keep no forecast")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.steps = args.steps[0]
        child(args)
        return 0

    with tempfile.TemporaryDirectory(prefix="predict_memory_") as tmp:
        root = Path(tmp)
        if args.checkpoint is None:
            t0 = time.perf_counter()
            n_times = max(12, max(args.steps) + 1) if args.score else 12
            args.data_path, args.checkpoint = _synthetic_case(root, *args.grid, None if args.base_net else SMALL_NET, n_times)
            built = time.perf_counter() - t0
            print(f"synthetic case ({args.grid[0]}x{args.grid[1]}, one training step) built in {built:.0f} s", flush=True)
        results = []
        for steps in args.steps:
            cmd = [sys.executable, __file__, "--child", "--steps", str(steps), "--output", str(root / f"forecast_{steps}.zarr")]
            for opt in ("checkpoint", "data_path", "stats", "start"):
                if getattr(args, opt) is not None:
                    cmd += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
            cmd += ["--members", str(args.members), "--inits", str(args.inits), "--device", args.device, "--threads", str(args.threads)]
            cmd += ["--score"] if args.score else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 2
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    mb = 1 << 20
    r0 = results[0]
    print(
        f"predict{' --score-against --no-keep-forecast' if args.score else ''}: "
        f"{r0['inits']} initial times x {args.members} members on a {r0['grid'][0]}x{r0['grid'][1]} grid, "
        f"device {args.device}; peak RSS during predict ({r0['method']}), one process per run"
    )
    print(
        f"{'steps':>6} {'RSS before (MB)':>16} {'peak RSS (MB)':>14} {'of it: forecast loop':>21} {'time (s)':>9} "
        f"{'all steps held (MB)':>20}{' results on disk (MB)' if args.score else ''}"
    )
    for r in results:
        held = r["steps"] * r["step_bytes"] / mb
        disk = f" {r['results_bytes'] / mb:>20.1f}" if args.score else ""
        print(
            f"{r['steps']:>6} {r['before'] / mb:>16.1f} {r['peak'] / mb:>14.1f} {r['loop_peak'] / mb:>21.1f} {r['seconds']:>9.1f} "
            f"{held:>20.1f}{disk}"
        )
    ratio = results[-1]["peak"] / results[0]["peak"]
    if args.score:
        first, last = results[0], results[-1]
        n = last["steps"] - first["steps"]
        print(
            f"per added lead time: peak +{(last['peak'] - first['peak']) / mb / n:.2f} MB, forecast loop's peak "
            f"+{(last['loop_peak'] - first['loop_peak']) / mb / n:.2f} MB. The scoring holds 82 KB of metric states per lead "
            "(91x180: mostly the zonal spectrum, latitude x wavenumber); the results are every lead's rows "
            f"({(last['results_bytes'] - first['results_bytes']) / mb / n:.2f} MB on disk per lead: scores, per-init records, "
            "spectra), built and written at the end (the peak of the longer runs)"
        )
    held = (results[-1]["steps"] - results[0]["steps"]) * r0["step_bytes"] / mb
    print(
        f"peak RSS ratio {results[-1]['steps']} / {results[0]['steps']} steps: {ratio:.3f} (limit {LIMIT:.2f}); "
        f"holding every step would add {held:.0f} MB ({held / (results[0]['peak'] / mb):.0%} of the {results[0]['steps']}-step peak)"
    )
    return 0 if ratio <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
