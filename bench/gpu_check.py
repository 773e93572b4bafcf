"""The Python that ``bench/gpu.sh`` runs: DISCO kernels in use, forward time per step, one training step, a forecast.

    python bench/gpu_check.py kernels                     # what fit/predict would decide on this machine
    python bench/gpu_check.py forward --dtype bf16        # full size (configs/model/fcn3.yaml, 721x1440) on CUDA
    python bench/gpu_check.py train-step --checkpointing blocks
    python bench/gpu_check.py forecast --steps 60 --members 4
    python bench/gpu_check.py forward --small --device cpu   # the CPU-safe path (configs/model/fcn3_small.yaml)

Prints the figures (one JSON line per measurement); no pass/fail. Random weights and inputs: the timings and the
memory do not depend on them. Each measurement warms up first; CUDA times are taken after synchronising.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fcn3_lightning.kernels import check_disco_kernels, cuda_kernels_available, slow_path_allowed
from fcn3_lightning.model import build_model
from fcn3_lightning.model.noise import NoiseStreams
from fcn3_lightning.model.rollout import EnsembleForecaster

REPO = Path(__file__).resolve().parents[1]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def _forecaster(args: argparse.Namespace, dev: torch.device) -> EnsembleForecaster:
    config = REPO / "configs/model" / ("fcn3_small.yaml" if args.small else "fcn3.yaml")
    torch.manual_seed(0)
    f = EnsembleForecaster(build_model(config)).to(dev)
    return f


def _checkpointing(f: EnsembleForecaster, level: str) -> str:
    """Use the network's activation checkpointing when this checkout has it (another change of issue 18)."""
    if level == "none":
        return "none"
    if not hasattr(f.net, "set_checkpointing"):
        return f"not available in this checkout (FCN3.set_checkpointing missing): ran without, asked {level}"
    f.net.set_checkpointing(level)
    return level


def _inputs(f: EnsembleForecaster, batch: int, members: int, dev: torch.device):
    h, w = f.net.inp_shape
    x0 = torch.randn(batch, f.net.n_channels, h, w, device=dev)
    static = torch.randn(len(f.static_names), h, w, device=dev) if f.static_names else None

    def zenith(s: int) -> torch.Tensor:
        return torch.rand(batch, h, w, device=dev)

    return x0, static, zenith, NoiseStreams(0, list(range(batch)), members)


def _autocast(dtype: str, dev: torch.device):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def kernels(args: argparse.Namespace, dev: torch.device) -> None:
    import torch_harmonics
    from torch_harmonics.disco import DiscreteContinuousConvS2

    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_harmonics": torch_harmonics.__version__,
        "device": str(dev),
        "cuda_kernels_in_build": cuda_kernels_available(),
        "slow_path_allowed": slow_path_allowed(),
    }
    info["decision"] = check_disco_kernels(dev)  # raises with the install commands where fit/predict would stop
    f = _forecaster(args, dev)
    discos = [m for m in f.modules() if isinstance(m, DiscreteContinuousConvS2)]
    info["disco_layers"] = len(discos)
    info["disco_optimized_kernel"] = sorted({bool(m.optimized_kernel) for m in discos})
    x0, static, zenith, streams = _inputs(f, 1, 1, dev)
    with torch.no_grad(), torch.profiler.profile() as prof:
        next(iter(f.steps(x0, zenith, static, streams, 1, 1)))
        _sync(dev)
    names = {e.key for e in prof.key_averages()}
    info["disco_ops_called"] = sorted(n for n in names if "disco" in n.lower())[:8]
    _emit(check="kernels", **info)


def forward(args: argparse.Namespace, dev: torch.device) -> None:
    f = _forecaster(args, dev).eval()
    x0, static, zenith, streams = _inputs(f, 1, 1, dev)
    times = []
    with torch.no_grad(), _autocast(args.dtype, dev):
        for _ in f.steps(x0, zenith, static, streams, args.warmup + args.steps, 1):
            _sync(dev)
            times.append(time.perf_counter())
    per_step = (times[-1] - times[args.warmup - 1]) / args.steps if args.warmup else (times[-1] - times[0]) / max(1, args.steps - 1)
    _emit(check="forward", dtype=args.dtype, grid=list(f.net.inp_shape), s_per_step=round(per_step, 4), steps=args.steps)


def train_step(args: argparse.Namespace, dev: torch.device) -> None:
    from fcn3_lightning.losses import EnsembleCRPSLoss

    f = _forecaster(args, dev).train()
    used = _checkpointing(f, args.checkpointing)
    m = args.members
    x0, static, zenith, streams = _inputs(f, 1, m, dev)
    target = torch.randn(1, args.rollout, f.net.n_channels, *f.net.inp_shape, device=dev)
    loss_fn = EnsembleCRPSLoss(f.net.inp_shape, torch.ones(f.net.n_channels) / f.net.n_channels).to(dev)
    opt = torch.optim.Adam(f.parameters(), lr=1e-5)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    try:
        with _autocast(args.dtype, dev):
            pred = torch.stack(list(f.steps(x0, zenith, static, streams, args.rollout, m)), dim=2)
        loss, _ = loss_fn(pred, target)
        loss.backward()
        opt.step()
        _sync(dev)
    except torch.OutOfMemoryError as e:  # the exact error is the figure
        _emit(check="train-step", dtype=args.dtype, checkpointing=used, members=m, rollout=args.rollout, oom=str(e))
        return
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    _emit(
        check="train-step",
        dtype=args.dtype,
        checkpointing=used,
        members=m,
        rollout=args.rollout,
        grid=list(f.net.inp_shape),
        s_per_step=round(time.perf_counter() - t0, 3),
        peak_gib=None if peak is None else round(peak, 2),
        loss=float(loss.detach()),
    )


def forecast(args: argparse.Namespace, dev: torch.device) -> None:
    f = _forecaster(args, dev).eval()
    x0, static, zenith, streams = _inputs(f, 1, args.members, dev)
    with torch.no_grad(), _autocast(args.dtype, dev):
        next(iter(f.steps(x0, zenith, static, NoiseStreams(1, [0], args.members), 1, args.members)))  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        for _ in f.steps(x0, zenith, static, streams, args.steps, args.members):
            pass
        _sync(dev)
    s = time.perf_counter() - t0
    _emit(
        check="forecast",
        dtype=args.dtype,
        members=args.members,
        steps=args.steps,
        grid=list(f.net.inp_shape),
        s_total=round(s, 2),
        s_per_member=round(s / args.members, 2),
        s_per_step_per_member=round(s / args.members / args.steps, 4),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["kernels", "forward", "train-step", "forecast"])
    p.add_argument("--small", action="store_true", help="configs/model/fcn3_small.yaml (33x64) instead of the full size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--steps", type=int, default=5, help="forward: timed steps; forecast: steps (60: 15 days)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--members", type=int, default=2)
    p.add_argument("--rollout", type=int, default=1, help="train-step: autoregressive steps")
    p.add_argument("--checkpointing", default="blocks", help="train-step: activation checkpointing level (none, blocks, ...)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    {"kernels": kernels, "forward": forward, "train-step": train_step, "forecast": forecast}[args.what](args, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
