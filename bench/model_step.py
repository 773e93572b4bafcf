"""Benchmark: FCN3 forward and forward+backward time per sample.

    python bench/model_step.py                                    # small config on the CPU
    python bench/model_step.py --config configs/model/fcn3.yaml --device cuda --dtype bf16 --forward-only --batch 1

Prints the figures; no pass/fail. bf16 runs the processor under autocast, while encoders,
decoders and SHTs stay in float32 as in the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from fcn3_lightning.model import build_model
from fcn3_lightning.model.summary import count_parameters

REPO = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "model" / "fcn3_small.yaml"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--forward-only", action="store_true")
    args = p.parse_args()

    device = torch.device(args.device)
    t0 = time.perf_counter()
    model = build_model(args.config).to(device)
    build_s = time.perf_counter() - t0
    x = torch.randn(args.batch, model.n_in_channels, *model.inp_shape, device=device)
    x[:, model.water_index] = x[:, model.water_index].abs().clamp(max=1.0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()

    def forward() -> None:
        with torch.no_grad(), autocast:
            model(x)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        with autocast:
            y = model(x)
        y.float().square().mean().backward()

    print(f"config {args.config}: grid {model.inp_shape}, latent {model.latent_shape}, {count_parameters(model):,} parameters")
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"dtype {args.dtype}, batch {args.batch}, build {build_s:.1f} s")  # fmt: skip
    runs = [("forward", forward)] + ([] if args.forward_only else [("forward+backward", forward_backward)])
    for name, fn in runs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = _timed(fn, device, args.warmup, args.repeats)
        per_sample = statistics.median(times) / args.batch
        mem = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
        best = min(times) / args.batch
        print(f"{name:>17}: {per_sample * 1e3:9.1f} ms per sample (median of {args.repeats}, min {best * 1e3:.1f} ms){mem}")


if __name__ == "__main__":
    main()
