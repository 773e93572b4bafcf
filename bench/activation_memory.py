"""Benchmark: saved-activation memory of one FCN3 training step at each activation-checkpointing level (CPU).

    python bench/activation_memory.py                          # 181x360, FCN3's 72 + 12 channels, default widths
    python bench/activation_memory.py --rollout 2 --members 4  # a longer / larger step
    python bench/activation_memory.py --grid 91 180            # quicker

Issue 18, acceptance item 1: with ``model.checkpointing: blocks`` the activations saved for backward must be at most
0.35x of those without checkpointing.

One training step is :meth:`FCN3Module.training_step` (the ensemble forecaster with its noise, a ``--rollout``-step
rollout of ``--members`` members folded into the batch, the module's CRPS loss with its spectral term) and
``backward``, on a module built as ``fit`` builds it (``FCN3Module(checkpointing=level).build(...)``), with the same
seeded weights and batch for every level. The network has FCN3's 72 prognostic and 12 auxiliary channels on
``--grid`` (default 181x360, latent Legendre-Gauss grid 90x180) and the widths / depth given. Defaults: FCN3's
depth and block pattern (10 blocks, a spectral one every 5th) with a third of its widths (embed 15 / 19 / 12 instead
of configs/model/fcn3.yaml's 45 / 56 / 36), which keeps the proportions of decoder to block activations that set the
ratios. FCN3's own widths (``--atmo-embed-dim 45 --surf-embed-dim 56 --aux-embed-dim 36``) work too but were not
run on the 2-core development machine: the default already saves 5.4 GB and takes minutes per level there.

Activation memory (the figure checked): :class:`SavedTensorMeter` of bench/parallel_memory.py around the step, i.e.
the peak of live bytes of the storages autograd saves for backward (each storage counted once, parameters and
buffers apart). With non-reentrant checkpointing a checkpointed region saves only its inputs (what the meter sees);
the tensors its recomputation saves during backward live one region at a time and are not counted (the peak RSS,
printed for reference, includes them). The gradients of every level are compared with those of ``none``.

Exit status: 0 when the ``blocks`` ratio is <= 0.35, 1 when it is not, 2 when a gradient differs.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import torch
from parallel_memory import SavedTensorMeter  # bench/parallel_memory.py (the script's folder is on sys.path)
from rss import peak_rss, reset_peak

from fcn3_lightning.channels import FCN3_AUX_CHANNELS, FCN3_CHANNELS
from fcn3_lightning.data.stats import Normalizer
from fcn3_lightning.model.fcn3 import CHECKPOINTING_LEVELS
from fcn3_lightning.training.module import FCN3Module

TARGET = 0.35  # blocks / none
GRAD_TOL = 1e-6


def build(level: str, args: argparse.Namespace) -> FCN3Module:
    net = dict(
        atmo_embed_dim=args.atmo_embed_dim,
        surf_embed_dim=args.surf_embed_dim,
        aux_embed_dim=args.aux_embed_dim,
        num_layers=args.num_layers,
        sfno_block_frequency=args.sfno_block_frequency,
    )
    m = FCN3Module(net=net, ensemble_size=args.members, checkpointing=level)
    n = len(FCN3_CHANNELS)
    torch.manual_seed(0)  # the same weights at every level
    norm = Normalizer(list(FCN3_CHANNELS), np.zeros(n), np.ones(n), np.ones(n))
    m.build(list(FCN3_CHANNELS), list(FCN3_AUX_CHANNELS), tuple(args.grid), norm)
    n_static = len(m.forecaster.static_names)
    m.register_buffer("static", torch.randn(n_static, *args.grid, generator=torch.Generator().manual_seed(2)), persistent=False)
    return m.train()


def batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    b, s, c = args.batch, args.rollout, len(FCN3_CHANNELS)
    return {
        "input": torch.randn(b, c, *args.grid, generator=g),
        "target": torch.randn(b, s, c, *args.grid, generator=g),
        "zenith": torch.rand(b, s, *args.grid, generator=g),
        "time": torch.zeros(b, dtype=torch.int64),
        "index": torch.arange(b),
    }


def step(m: FCN3Module, data: dict[str, torch.Tensor]) -> dict:
    meter = SavedTensorMeter(m)
    reset_peak()
    t0 = time.perf_counter()
    with meter.hooks(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer: logging is a no-op
        loss = m.training_step(data, 0)
    at_forward_end = meter.live
    loss.backward()
    return {
        "activations": meter.peak,
        "at_forward_end": at_forward_end,
        "state": meter.state_bytes,
        "seconds": time.perf_counter() - t0,
        "rss_peak": peak_rss(),
        "loss": float(loss.detach()),
        "grads": {k: p.grad.clone() for k, p in m.net.named_parameters()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, nargs=2, default=[181, 360], metavar=("NLAT", "NLON"))
    parser.add_argument("--levels", nargs="+", default=list(CHECKPOINTING_LEVELS), choices=list(CHECKPOINTING_LEVELS))
    parser.add_argument("--batch", type=int, default=1, help="samples per step (default 1)")
    parser.add_argument("--members", type=int, default=2, help="ensemble members per sample (default 2)")
    parser.add_argument("--rollout", type=int, default=1, help="autoregressive steps of the training step (default 1)")
    parser.add_argument("--atmo-embed-dim", type=int, default=15)
    parser.add_argument("--surf-embed-dim", type=int, default=19)
    parser.add_argument("--aux-embed-dim", type=int, default=12)
    parser.add_argument("--num-layers", type=int, default=10)
    parser.add_argument("--sfno-block-frequency", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if "none" not in args.levels or "blocks" not in args.levels:
        parser.error("--levels must include 'none' and 'blocks' (the ratio checked)")
    torch.set_num_threads(args.threads)

    data = batch(args)
    results = {}
    t_start = time.perf_counter()
    for level in args.levels:
        m = build(level, args)
        if not results:
            net = m.net
            n_params = sum(p.numel() for p in net.parameters())
            print(
                f"FCN3 on {args.grid[0]}x{args.grid[1]} (latent {net.latent_shape[0]}x{net.latent_shape[1]}), {net.n_channels} + "
                f"{len(net.aux_channel_names)} channels, embed {args.atmo_embed_dim}/{args.surf_embed_dim}/{args.aux_embed_dim} "
                f"(latent width {net.latent_channels} + {net.aux_embed_dim}), {args.num_layers} blocks, {n_params / 1e6:.1f} M "
                f"parameters; step: batch {args.batch} x {args.members} members, {args.rollout}-step rollout, module CRPS loss, "
                f"backward; {args.threads} threads",
                flush=True,
            )
        results[level] = step(m, data)
        r = results[level]
        print(f"  {level}: {r['activations'] / 2**20:.1f} MB saved, step {r['seconds']:.1f} s", flush=True)
        del m

    mb = 2**20
    ref = results["none"]
    print(f"\n{'level':>24} {'activations (MB)':>17} {'ratio':>6} {'peak RSS (MB)':>14} {'step (s)':>9} {'grad max rel diff':>18}")
    grads_ok = True
    for level, r in results.items():
        worst = max(float((r["grads"][k] - g).abs().max()) / float(g.abs().max()) for k, g in ref["grads"].items() if g.abs().max() > 0)
        grads_ok &= worst <= GRAD_TOL and abs(r["loss"] - ref["loss"]) <= GRAD_TOL * abs(ref["loss"])
        print(
            f"{level:>24} {r['activations'] / mb:>17.1f} {r['activations'] / ref['activations']:>6.3f} {r['rss_peak'] / mb:>14.0f} "
            f"{r['seconds']:>9.1f} {worst:>18.1e}"
        )
    ratio = results["blocks"]["activations"] / ref["activations"]
    met = ratio <= TARGET
    print(
        f"blocks / none = {ratio:.3f}: {'met' if met else 'NOT met'} (target <= {TARGET}); gradients "
        f"{'equal' if grads_ok else 'DIFFER'} (<= {GRAD_TOL} relative); step times are contended CPU figures; "
        f"total {time.perf_counter() - t_start:.0f} s"
    )
    if not grads_ok:
        return 2
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
