"""Benchmark: state encoders shared across members at the first rollout step, vs every member through the whole network.

    python bench/shared_encoders.py                          # 61x120 and 181x360, 2 threads (~10 min on 2 quiet cores)
    python bench/shared_encoders.py --grids 721x1440 --device cuda --forecast-members 16

Two cases per grid, each timed shared and unshared (``EnsembleForecaster.share_encoders``), alternating, after a
warm-up; medians and minimums of ``--repeats`` runs:

- training: the first step of a ``--train-members`` (4) member rollout, forward and backward (loss: mean square of the
  output), as the training step makes it;
- forecast: the first step of a ``--forecast-members`` (16) member forecast in inference mode, as ``predict`` makes
  it with all members in one member batch.

One sample each (training's ``data.batch_size`` 1 and ``predict``'s one initial condition). On the CPU that is the
lockstep of ``EnsembleForecaster.steps`` (one network call per member); on a GPU the members run as one batch.
FCN3's 72 channels and auxiliary inputs with random weights; embeddings ``--embed`` wide (atmosphere and surface),
aux 8; below 100 latitudes the default world's 4 blocks with a global block every 2, else FCN3's 10 every 5.
Prints shared / unshared time ratios and the max |shared - unshared| of the outputs (and of the gradients,
relative to each tensor's max |grad|).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from networks import bench_network, timed  # bench/networks.py (the script's folder is on sys.path)

from fcn3_lightning.model.noise import NoiseStreams
from fcn3_lightning.model.rollout import EnsembleForecaster


def _inputs(f: EnsembleForecaster, device: torch.device):
    h, w = f.net.inp_shape
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, f.net.n_channels, h, w, generator=g).to(device)
    zenith = torch.rand(1, 1, h, w, generator=g).to(device)
    static = torch.randn(len(f.static_names), h, w, generator=g).to(device) if f.static_names else None
    return x0, zenith, static


def first_step(f: EnsembleForecaster, members: int, train: bool, device: torch.device):
    """A closure running the first rollout step (and backward when ``train``), returning output and gradients."""
    x0, zenith, static = _inputs(f, device)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        streams = NoiseStreams(0, [0], members)  # the same noise on every call
        if not train:
            with torch.inference_mode():
                return f.rollout(x0, zenith, static, streams, 1, members), {}
        f.net.zero_grad(set_to_none=True)
        y = f.rollout(x0, zenith, static, streams, 1, members)
        y.square().mean().backward()
        return y.detach(), {n: p.grad for n, p in f.net.named_parameters()}

    return run


def compare(f: EnsembleForecaster, members: int, train: bool, repeats: int, device: torch.device) -> dict:
    run = first_step(f, members, train, device)
    times: dict[bool, list[float]] = {True: [], False: []}
    outs = {}
    for share in (True, False):  # warm-up, and the outputs compared
        f.share_encoders = share
        outs[share] = run()
    for _ in range(repeats):
        for share in (True, False):
            f.share_encoders = share
            times[share].append(timed(run, device))
    f.share_encoders = True
    (ys, gs), (yu, gu) = outs[True], outs[False]
    grad = max((float((gs[n] - g).abs().max() / g.abs().max()) for n, g in gu.items() if g.abs().max() > 0), default=0.0)
    return {"shared": times[True], "unshared": times[False], "out_diff": float((ys - yu).abs().max()), "grad_rel": grad}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", nargs="+", default=["61x120", "181x360"], help="grids NLATxNLON")
    p.add_argument("--train-members", type=int, default=4)
    p.add_argument("--forecast-members", type=int, default=16)
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
        f = EnsembleForecaster(net).to(device)
        for what, members, train in [("training", args.train_members, True), ("forecast", args.forecast_members, False)]:
            f.train(train)
            r = compare(f, members, train, args.repeats, device)
            ms, mu = statistics.median(r["shared"]), statistics.median(r["unshared"])
            kind = "fwd+bwd" if train else "inference"
            grads = f"; gradients max |diff| / max |grad| = {r['grad_rel']:.3g}" if train else ""
            print(
                f"{grid} ({args.device}, {args.threads} threads) {what} first step, {members} members ({kind}): "
                f"shared median {ms:.3f} s (min {min(r['shared']):.3f}), unshared median {mu:.3f} s (min {min(r['unshared']):.3f}); "
                f"shared / unshared = {ms / mu:.2f} (mins {min(r['shared']) / min(r['unshared']):.2f}); "
                f"outputs max |diff| = {r['out_diff']:.3g}{grads}",
                flush=True,
            )


if __name__ == "__main__":
    main()
