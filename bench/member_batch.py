"""Benchmark: ensemble members through the network as one batch, or one at a time (the CPU rule of ``predict``).

    python bench/member_batch.py                       # 33x64 and 181x360, 4 members, 2 threads (~5 min on 2 cores)
    python bench/member_batch.py --grids 721x1440 --device cuda --members 8

FCN3's architecture (72 channels, 10 blocks with a global block every 5; the default world's 4 blocks every 2
below 100 latitudes) with ``--embed``-wide embeddings and random weights. Forward passes only (inference mode),
alternating batched / one-at-a-time, after a warm-up; medians and minimums of ``--repeats`` runs. On the CPU
``predict`` runs the members of a ``--member-batch`` one network call each (see
``fcn3_lightning.model.rollout.EnsembleForecaster.steps``); this prints why that costs nothing there.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from networks import bench_network, timed  # bench/networks.py (the script's folder is on sys.path)

from fcn3_lightning.model.fcn3 import FCN3


def compare(net: FCN3, x: torch.Tensor, repeats: int, device: torch.device) -> tuple[list[float], list[float], float]:
    """Seconds per forward of the members batched and one at a time (alternating), and the max |difference|."""

    def one_at_a_time() -> torch.Tensor:
        return torch.cat([net(x[i : i + 1]) for i in range(x.shape[0])])

    batched, single = [], []
    with torch.inference_mode():
        net(x)
        for _ in range(repeats):
            batched.append(timed(lambda: net(x), device))
            single.append(timed(one_at_a_time, device))
        diff = (net(x) - one_at_a_time()).abs().max().item()
    return batched, single, diff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", nargs="+", default=["33x64", "181x360"], help="grids NLATxNLON")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--embed", type=int, default=16, help="atmosphere and surface embedding width")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for grid in args.grids:
        h, w = (int(v) for v in grid.split("x"))
        net = bench_network(h, w, args.embed)
        net = net.to(device).eval()
        x = torch.randn(args.members, net.n_in_channels, h, w, device=device)
        batched, single, diff = compare(net, x, args.repeats, device)
        mb, ms = statistics.median(batched), statistics.median(single)
        print(
            f"{grid} ({args.device}, {args.threads} threads), {args.members} members: batched median {mb:.3f} s (min {min(batched):.3f}), "
            f"one at a time median {ms:.3f} s (min {min(single):.3f}); one at a time / batched = {ms / mb:.2f}; "
            f"max |batched - one at a time| = {diff:.3g}",
            flush=True,
        )


if __name__ == "__main__":
    main()
