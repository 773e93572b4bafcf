"""Benchmark: CRPS update time and peak memory against the ensemble size M, next to a naive pairwise CRPS.

    python bench/metrics.py                                  # M = 4, 16, 50 on a 181x360 field, on the CPU
    python bench/metrics.py --members 4 16 50 100 --channels 4 --device cuda

The metric's fair CRPS sorts the members (O(M log M) time, O(M) memory per point); the contrast is the
textbook pairwise form, mean |X_i - X_j| over all M^2 pairs by broadcasting (O(M^2) time and memory per
point), run through the same metric class so the overheads are the same. Inputs are float32
(batch 1, lead 1, --channels channels); both compute in the metric's float64.

Each (implementation, M) runs in its own new process: forked on the CPU from this one (which has
imported everything but computed nothing), spawned for CUDA. Peak memory is the update's high-water
mark beyond what was resident before it, with the inputs and metric already allocated: on the CPU the
peak RSS (VmHWM, reset through /proc/self/clear_refs just before the update; ru_maxrss where that is
not possible), on CUDA torch.cuda.max_memory_allocated. The measured update is the process's first big
one (a small-grid update first warms the thread pool and kernels); time is the median of --repeats
updates after --warmup more. The two implementations' scores after the first update (crps, skill,
spread) and their per-point spreads are compared.

Prints the figures, the growth exponents between the two largest M and a one-line conclusion drawn from them.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import resource
import statistics
import sys
import time
import traceback

import numpy as np
import torch
from torch import Tensor

from fcn3_lightning.metrics.ensemble import CRPS, fair_crps_parts

NLAT, NLON = 181, 360
IMPLS = ("sorted", "pairwise")


def pairwise_crps_parts(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`fair_crps_parts` the textbook way: the spread as the mean |X_i - X_j| over all M^2 pairs."""
    m = pred.shape[1]
    err = pred - target.unsqueeze(1)
    skill = err.abs().mean(1)
    spread = (err.unsqueeze(2) - err.unsqueeze(1)).abs_().sum((1, 2)) / (m * (m - 1))
    return skill, spread


class PairwiseCRPS(CRPS):
    """The same fair CRPS with the O(M^2) pairwise spread (the contrast, not for use)."""

    def update(self, pred: Tensor, target: Tensor) -> None:
        x, o = self._check_pair(pred, target)
        skill, spread = pairwise_crps_parts(x, o)
        self._add_means(skill=self.spatial_mean(skill), spread=self.spatial_mean(spread))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_cpu_peak() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


def _metric(impl: str, nlat: int, nlon: int, channels: int, device: torch.device) -> CRPS:
    lat, lon = np.linspace(90, -90, nlat), np.arange(nlon) * (360.0 / nlon)
    cls = PairwiseCRPS if impl == "pairwise" else CRPS
    return cls(lat, lon, [f"c{i}" for i in range(channels)], [6.0]).to(device)


def _inputs(m: int, nlat: int, nlon: int, channels: int, device: torch.device) -> tuple[Tensor, Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    target = torch.randn(1, 1, channels, nlat, nlon, generator=g, device=device)
    pred = torch.randn(1, m, 1, channels, nlat, nlon, generator=g, device=device)
    pred += target.unsqueeze(1)
    return pred, target


def child(impl: str, m: int, args: argparse.Namespace) -> dict:
    """One (implementation, M) in a fresh process: peak memory of the first big update, then the timing."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    small = _metric(impl, 3, 8, args.channels, device)  # warm the thread pool and kernels without a big allocation
    small.update(*_inputs(m, 3, 8, args.channels, device))
    metric = _metric(impl, NLAT, NLON, args.channels, device)
    pred, target = _inputs(m, NLAT, NLON, args.channels, device)
    _sync(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        metric.update(pred, target)
        _sync(device)
        peak, method = torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
        where = torch.cuda.get_device_name(device)
    else:
        reset = _reset_cpu_peak()
        base = _rss()
        before = _cpu_peak(reset)
        metric.update(pred, target)
        after = _cpu_peak(reset)
        peak = after - base
        method = "peak RSS (VmHWM after clear_refs)" if reset else "peak RSS (ru_maxrss)"
        if not reset and after <= before:  # the update did not raise the process's earlier high-water mark
            method += ", upper bound: update below an earlier peak"
        where = f"threads: {torch.get_num_threads()}"
    values = {k: v.double().cpu().flatten().tolist() for k, v in metric.compute().items()}

    for _ in range(args.warmup):
        metric.update(pred, target)
    times = []
    for _ in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        metric.update(pred, target)
        _sync(device)
        times.append(time.perf_counter() - t0)
    out = {"ms": statistics.median(times) * 1e3, "peak": peak, "method": method, "where": where, "values": values}
    if impl == "pairwise":  # pointwise agreement of the two spreads, in the metric's float64
        x, o = pred.double(), target.double()
        sorted_spread, pair_spread = fair_crps_parts(x, o)[1], pairwise_crps_parts(x, o)[1]
        out["pointwise"] = ((sorted_spread - pair_spread).abs() / pair_spread.abs()).max().item()
    return out


def _child_entry(conn, impl: str, m: int, args: argparse.Namespace) -> None:
    try:
        conn.send(child(impl, m, args))
    except BaseException:
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def run_child(impl: str, m: int, args: argparse.Namespace) -> dict:
    """Run :func:`child` in a new process: forked from this one on the CPU (which has imported but not yet
    computed anything, so the OpenMP pool is not yet up), spawned for CUDA."""
    fork = args.device == "cpu" and "fork" in mp.get_all_start_methods()
    ctx = mp.get_context("fork" if fork else "spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_entry, args=(send, impl, m, args))
    proc.start()
    send.close()
    try:
        result = recv.recv()
    except EOFError:
        proc.join()
        result = {"error": f"the worker died (exit code {proc.exitcode}); out of memory?"}
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{impl} CRPS with M={m} failed:\n{result['error']}")
    return result


def _exponent(y0: float, y1: float, m0: int, m1: int) -> float:
    return math.log(y1 / y0) / math.log(m1 / m0) if y0 > 0 and y1 > 0 else math.nan


def _max_rel_diff(a: dict, b: dict) -> float:
    diffs = [abs(x - y) / max(abs(y), 1e-300) for k in a for x, y in zip(a[k], b[k], strict=True)]
    return max(diffs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, nargs="+", default=[4, 16, 50])
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates after the memory-measured one")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--no-pairwise", action="store_true", help="skip the O(M^2) contrast")
    args = p.parse_args()

    members = sorted(set(args.members))
    if members[0] < 2:
        p.error("CRPS needs at least 2 members")
    impls = IMPLS[:1] if args.no_pairwise else IMPLS
    # no torch computation in this process before the workers are forked
    t_start = time.perf_counter()
    res: dict[str, dict[int, dict]] = {impl: {} for impl in impls}
    for m in members:
        for impl in impls:
            res[impl][m] = run_child(impl, m, args)
    first = res["sorted"][members[0]]

    print(f"CRPS.update on a {NLAT}x{NLON} field, batch 1, lead 1, {args.channels} channel(s), float32 inputs, float64 compute")
    warm = 1 + args.warmup
    print(f"device {args.device} ({first['where']}); time: median of {args.repeats} updates after {warm} warm-up(s); one process per row")
    per_member = 4 * args.channels * NLAT * NLON / 2**20
    print(f"peak memory: {first['method']}, beyond the inputs (pred {per_member:.2f} MB per member)")
    print()
    mb = 2**20
    head = f"{'M':>4} | {'sorted ms':>9} {'ms/(M log2 M)':>13} {'peak MB':>8} {'MB/M':>6}"
    if "pairwise" in res:
        head += f" | {'pairwise ms':>11} {'ms/M^2':>7} {'peak MB':>8} {'MB/M^2':>7} | {'rel diff score':>14} {'pointwise':>9}"
    print(head)
    print("-" * len(head))
    for m in members:
        s = res["sorted"][m]
        line = f"{m:>4} | {s['ms']:9.2f} {s['ms'] / (m * math.log2(m)):13.4f} {s['peak'] / mb:8.1f} {s['peak'] / mb / m:6.2f}"
        if "pairwise" in res:
            q = res["pairwise"][m]
            rel = _max_rel_diff(s["values"], q["values"])
            line += f" | {q['ms']:11.2f} {q['ms'] / m**2:7.4f} {q['peak'] / mb:8.1f} {q['peak'] / mb / m**2:7.3f}"
            line += f" | {rel:14.1e} {q['pointwise']:9.1e}"
        print(line)
    if "pairwise" in res:
        print("rel diff: max relative difference sorted vs pairwise of crps, skill and spread (score), and of the spread per point")
    print()

    if len(members) >= 2:
        m0, m1 = members[-2], members[-1]
        nlogn = _exponent(m0 * math.log2(m0), m1 * math.log2(m1), m0, m1)
        parts = []
        for impl in impls:
            a, b = res[impl][m0], res[impl][m1]
            et, em = _exponent(a["ms"], b["ms"], m0, m1), _exponent(a["peak"], b["peak"], m0, m1)
            parts.append(f"{impl} time ~ M^{et:.2f}, memory ~ M^{em:.2f}")
        s0, s1 = res["sorted"][m0], res["sorted"][m1]
        worst = max(_exponent(s0["ms"], s1["ms"], m0, m1), _exponent(s0["peak"], s1["peak"], m0, m1))
        verdict = "closer to O(M log M) than to O(M^2)" if worst < (nlogn + 2) / 2 else "NOT below the midpoint to O(M^2)"
        print(f"growth from M={m0} to M={m1} (M log2 M would be M^{nlogn:.2f}, M^2 M^2.00): {'; '.join(parts)}")
        print(f"conclusion: the sorted CRPS update grows as M^{worst:.2f} at most (time or memory), {verdict}")
    print(f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
