"""Benchmark: FCN3 forward and forward+backward time per sample.

    python bench/model_step.py                                    # small config on the CPU
    python bench/model_step.py --config configs/model/fcn3.yaml --device cuda --dtype bf16 --forward-only --batch 1
    python bench/model_step.py --compare-kernels --grid 61 120 --embed 8 8 8 --num-layers 4 --frequency 2 --batch 1

``--compare-kernels`` (issue 19): the same network (same seed, same weights) built twice, with the DISCO layers in
Fourier space (``disco_impl: fourier``, the default) and with torch-harmonics' kernels (``torch-harmonics``, the
reference implementation's speed), timed alternately in one run (A, B, A, B, ...), medians and mins and the ratio
printed, plus the saved-activation memory of one forward+backward of each (bench/parallel_memory.py's meter).

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
from fcn3_lightning.model.layers import SphericalLayers
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
    p.add_argument("--compare-kernels", action="store_true", help="Fourier-space DISCO vs torch-harmonics' kernels, alternating")
    p.add_argument("--grid", type=int, nargs=2, metavar=("NLAT", "NLON"), help="override the config's data grid")
    p.add_argument("--embed", type=int, nargs=3, metavar=("ATMO", "SURF", "AUX"), help="override the embedding widths")
    p.add_argument("--num-layers", type=int)
    p.add_argument("--frequency", type=int, help="sfno_block_frequency")
    args = p.parse_args()
    overrides = {}
    if args.grid:
        overrides["inp_shape"] = tuple(args.grid)
    if args.embed:
        overrides.update(atmo_embed_dim=args.embed[0], surf_embed_dim=args.embed[1], aux_embed_dim=args.embed[2])
    if args.num_layers:
        overrides["num_layers"] = args.num_layers
    if args.frequency:
        overrides["sfno_block_frequency"] = args.frequency
    if args.compare_kernels:
        compare_kernels(args, overrides)
        return

    device = torch.device(args.device)
    t0 = time.perf_counter()
    model = build_model(args.config, **overrides).to(device)
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


def _inputs(model: torch.nn.Module, batch: int, device: torch.device) -> torch.Tensor:
    x = torch.randn(batch, model.n_in_channels, *model.inp_shape, device=device)
    x[:, model.water_index] = x[:, model.water_index].abs().clamp(max=1.0)
    return x


def compare_kernels(args: argparse.Namespace, overrides: dict) -> None:
    """Fourier-space DISCO layers vs torch-harmonics' kernels, same weights, alternating runs."""
    from parallel_memory import SavedTensorMeter  # bench/parallel_memory.py (the script's folder is on sys.path)

    device = torch.device(args.device)
    models = {}
    for impl in ("fourier", "torch-harmonics"):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        models[impl] = build_model(args.config, layers=SphericalLayers(impl), **overrides).to(device)
        print(f"built {impl} in {time.perf_counter() - t0:.1f} s")
    ours, theirs = models["fourier"], models["torch-harmonics"]
    torch.manual_seed(1)
    x = _inputs(ours, args.batch, device)
    print(f"config {args.config} {overrides}: grid {ours.inp_shape}, latent {ours.latent_shape}, {count_parameters(ours):,} parameters")
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"dtype fp32, batch {args.batch}, {args.repeats} alternating repeats after {args.warmup} warm-up each")  # fmt: skip

    def step(model: torch.nn.Module, backward: bool) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        if not backward:
            with torch.no_grad():
                return model(x)
        y = model(x)
        y.square().mean().backward()
        return y

    y_o, y_t = step(ours, True), step(theirs, True)
    rel = ((y_o - y_t).norm() / y_t.norm()).item()
    grad = max(((p.grad - q.grad).norm() / q.grad.norm()).item() for p, q in zip(ours.parameters(), theirs.parameters(), strict=True))
    print(f"output rel. diff {rel:.2e}, worst parameter-gradient rel. diff {grad:.2e}")
    for backward in [False] if args.forward_only else [False, True]:
        name = "forward+backward" if backward else "forward"
        for _ in range(args.warmup):
            step(ours, backward), step(theirs, backward)
        times: dict[str, list[float]] = {"fourier": [], "torch-harmonics": []}
        for _ in range(args.repeats):
            for impl, model in models.items():
                _sync(device)
                t0 = time.perf_counter()
                step(model, backward)
                _sync(device)
                times[impl].append((time.perf_counter() - t0) / args.batch)
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        for impl in models:
            print(f"{name:>17} {impl:>15}: {med[impl] * 1e3:9.1f} ms per sample (median), min {low[impl] * 1e3:.1f} ms")
        print(f"{name:>17}     ours/theirs: {med['fourier'] / med['torch-harmonics']:.3f}x (medians), "
              f"{low['fourier'] / low['torch-harmonics']:.3f}x (mins)")  # fmt: skip
    saved = {}
    for impl, model in models.items():
        model.zero_grad(set_to_none=True)
        meter = SavedTensorMeter(model)
        with meter.hooks():
            y = model(x)
        y.square().mean().backward()
        saved[impl] = meter.peak
        print(f"saved activations {impl:>15}: {meter.peak / 2**20:9.1f} MiB (peak live bytes autograd saves)")
    print(f"saved activations     ours/theirs: {saved['fourier'] / saved['torch-harmonics']:.3f}x")


if __name__ == "__main__":
    main()
