"""Benchmark: what fine-tuning the full-size FCN3 needs in GPU memory, counted and measured on the CPU (no GPU).

    python bench/finetune_memory.py            # 3 reduced grids for the activation fit (~2-3 min on 2 cores)
    python bench/finetune_memory.py --quick    # 2 smaller grids, no frozen-activation fit (~1 min)

Issue 17, acceptance item 2: the optimizer-state and gradient memory with and without freezing the global blocks
of the full-size configuration (``configs/model/fcn3.yaml``), and what the reference fine-tune recipe needs on 1, 8
and 64 GPUs.

1. **Parameters.** The full-size network is built with ``build_model(configs/model/fcn3.yaml, meta=True)``: every
   parameter lives on the ``meta`` device (shapes and dtypes, no memory); the fixed tables (DISCO sparse filters,
   Legendre tables, resampling weights) are real, computed on the CPU. Parameters are counted per group: encoders,
   decoders, global (spectral) blocks ``blocks.{i}`` with ``i % sfno_block_frequency == 0`` and local (DISCO)
   blocks. A complex weight counts as two real parameters; bytes are the tensors' own (fp32 / complex64).

2. **Gradients and Adam state** of the trainable parameters only: a frozen parameter (``requires_grad=False``,
   left out of the optimizer, as ``model.freeze: [patterns]`` does; the patterns are ``fnmatch`` patterns on the
   network's parameter names) has neither. Per trainable tensor: a gradient of its size, Adam's ``exp_avg`` and
   ``exp_avg_sq`` of its size (complex parameters get complex moments: the same bytes per real parameter) and a
   4-byte ``step`` scalar. The formula is checked once for real: the small network (``configs/model/fcn3_small.yaml``)
   is frozen with the same patterns, one forward/backward and one ``torch.optim.Adam`` step run, and the bytes of
   its ``p.grad`` and ``optimizer.state`` tensors are compared with the formula; exit 1 if they differ by a byte.

3. **Activations** of one network step (one field = one ensemble member of one sample, one rollout step): the bytes
   of the tensors autograd saves for backward, recorded with ``torch.autograd.graph.saved_tensors_hooks``
   (:class:`SavedTensorMeter` of ``bench/parallel_memory.py``: each storage counted once, parameters and buffers
   counted apart), at the end of the forward, which is their peak in a plain forward + backward. The network has
   the full-size widths (72 channels, embed dims 45 / 56 / 36, 10 blocks, a global block every 5th) on reduced
   data grids; the bytes are fitted as ``a * N_data + b * N_latent`` (points of the data and of the latent grid,
   no intercept) and the relative residuals printed, then extrapolated to 721x1440 (latent 360x720). With scale
   factor 2, N_latent / N_data is nearly the same on every grid, so a and b apart are ill-determined (only their
   combination is); the figure of the largest grid scaled by N_data and by N_latent brackets the fit. The same
   for the training loss (``EnsembleCRPSLoss``: fair CRPS + spectral CRPS on the data grid) per member and step,
   measured on a 4-member, 4-step prediction. A check on the smallest grid runs the real rollout
   (``EnsembleForecaster``, noise included, 2 members x 2 steps) and the loss, and compares the saved bytes with
   members x steps x (network + loss per member-step). The fixed tables are counted at full size from the meta
   build (unique storages of the buffers).

4. **Per-GPU memory** for the reference fine-tune recipe (``configs/finetune.yaml``: ``data.batch_size`` 2 per
   process, ``model.ensemble_size`` 4, ``data.train_rollout`` 4, fp32 as the trainer's default precision, Adam) at
   full size, per layout (h x w spatial ranks, e ensemble ranks, the rest data-parallel; ``configs/parallel.yaml``):

   * weights + gradients + Adam state: replicated on every rank, except the spectral weights
     ``blocks.{i}.filter.weight``, split over the h ranks along l (``fcn3_lightning/parallel/state.py``): the
     largest chunk counts;
   * activations: batch x members per rank x rollout steps x the network's per-field figure on the rank's tile
     (the fit evaluated at the largest data and latent tile, i.e. an ideal spatial split: halo rows and the
     reduce-scatter buffers of the distributed DISCO convolutions are not in it; ``bench/parallel_memory.py``
     measures the real per-rank figure: with ``--grid 121 240 --layouts serial 3x1 --members 1``, i.e. 20 latent
     rows per rank as at 16 h ranks at full size, it gave 0.321 of the serial figure, the ideal being 0.333), plus
     the loss over all members (the distributed loss
     gathers the ensemble) on the tile. Without activation checkpointing (``model.checkpointing: none``): every
     rollout step's activations stay until backward;
   * the batch tensors (input, targets and cos zenith of every step, fp32) on the tile, and the fixed tables at
     their full-grid size (an upper bound under a split: the distributed layers hold parts of them).

   The sum is compared with 80 GB (80e9 bytes; an H100 80GB exposes about 85e9 bytes to CUDA, the difference is
   left for the CUDA context, workspaces and allocator fragmentation). Not counted: the gradients of activations
   during backward, workspaces, communication buffers. Counting the gradients together with the saved activations
   is conservative: Lightning sets them to None before each step, so they are not allocated at the end of the
   forward. For every layout the table gives the largest configuration that fits (rollout steps reduced first,
   then the batch, then the members).

Exit status: 0, or 1 when the optimizer-state / gradient formula disagrees with the real Adam step or the real
rollout's saved bytes differ from members x steps x (network + loss) by more than 2 %.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_harmonics.distributed as thd
from parallel_memory import SavedTensorMeter  # bench/parallel_memory.py (the script's folder is on sys.path)
from torch import nn

from fcn3_lightning.losses import EnsembleCRPSLoss
from fcn3_lightning.model import FCN3, build_model
from fcn3_lightning.model.rollout import EnsembleForecaster, keyed_streams
from fcn3_lightning.model.summary import count_parameters

REPO = Path(__file__).resolve().parents[1]
FULL_CONFIG = REPO / "configs" / "model" / "fcn3.yaml"
SMALL_CONFIG = REPO / "configs" / "model" / "fcn3_small.yaml"
GB = 1e9
GPU_BYTES = 80e9
#: the reference fine-tune recipe (configs/finetune.yaml)
RECIPE = dict(batch=2, members=4, steps=4)
#: |real rollout - members x steps x (network + loss)| / the latter, on the smallest grid
COMPOSITION_TOLERANCE = 0.02
GROUPS = ("encoders", "global blocks", "local blocks", "decoders")


# --- parameters, freezing, optimizer state ------------------------------------------------------------------


def param_group(name: str, block_frequency: int) -> str:
    """Which part of FCN3 a parameter belongs to (by its name in the network)."""
    head = name.split(".")[0]
    if head.endswith("_encoder"):
        return "encoders"
    if head.endswith("_decoder"):
        return "decoders"
    if head == "blocks":
        return "global blocks" if int(name.split(".")[1]) % block_frequency == 0 else "local blocks"
    raise ValueError(f"parameter {name!r} is in no known part of FCN3")


def global_block_patterns(net: FCN3, block_frequency: int) -> list[str]:
    return [f"blocks.{i}.*" for i in range(len(net.blocks)) if i % block_frequency == 0]


def is_frozen(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def real_count(p: torch.Tensor) -> int:
    return p.numel() * (2 if p.is_complex() else 1)


def nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


@dataclass(frozen=True)
class TrainState:
    """Bytes of what training keeps per parameter: weights (all), gradients and Adam state (trainable only)."""

    trainable: int  # real parameters
    frozen: int
    weights: int
    grads: int
    adam: int  # exp_avg + exp_avg_sq + step scalars

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.adam


def train_state(params: Sequence[tuple[str, torch.Tensor]], patterns: Sequence[str], shard: dict[str, float] | None = None) -> TrainState:
    """The formula: grad = param bytes, Adam = 2 x param bytes + a 4-byte step, for trainable parameters only.

    ``shard``: the fraction of a parameter a rank holds (spectral weights split over h ranks); default all of it.
    """
    shard = shard or {}
    trainable = frozen = weights = grads = adam = 0
    for name, p in params:
        f = shard.get(name, 1.0)
        b = round(nbytes(p) * f)
        weights += b
        if is_frozen(name, patterns):
            frozen += real_count(p)
            continue
        trainable += real_count(p)
        grads += b
        adam += 2 * b + 4
    return TrainState(trainable, frozen, weights, grads, adam)


def freeze_scenarios(net: FCN3, block_frequency: int) -> list[tuple[str, list[str]]]:
    return [
        ("nothing frozen", []),
        ("global blocks frozen", global_block_patterns(net, block_frequency)),
        ("all blocks frozen (train encoders/decoders)", ["blocks.*"]),
    ]


def verify_formula() -> bool:
    """One real Adam step on the small network per freezing scenario; the formula must give the exact bytes."""
    torch.manual_seed(0)
    net = build_model(SMALL_CONFIG)
    freq = int(net_config_value(SMALL_CONFIG, "sfno_block_frequency"))
    x = torch.randn(1, net.n_in_channels, *net.inp_shape)
    small = f"{SMALL_CONFIG.relative_to(REPO)} ({count_parameters(net):,} parameters)"
    print(f"\nCheck of the formula on {small}: forward/backward, one Adam step, bytes of p.grad and optimizer.state")
    print(f"  {'scenario':<44} {'patterns':<26} {'grads (real)':>13} {'formula':>13} {'Adam state (real)':>18} {'formula':>13}  ok")
    ok_all = True
    for label, patterns in freeze_scenarios(net, freq):
        for name, p in net.named_parameters():
            p.requires_grad_(not is_frozen(name, patterns))
            p.grad = None
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        net(x).square().mean().backward()
        opt.step()
        real_grads = sum(nbytes(p.grad) for p in net.parameters() if p.grad is not None)
        real_adam = sum(nbytes(t) for state in opt.state.values() for t in state.values() if torch.is_tensor(t))
        frozen_with_state = [n for n, p in net.named_parameters() if not p.requires_grad and (p.grad is not None or p in opt.state)]
        expected = train_state(list(net.named_parameters()), patterns)
        ok = real_grads == expected.grads and real_adam == expected.adam and not frozen_with_state
        ok_all &= ok
        print(
            f"  {label:<44} {', '.join(patterns) or '-':<26} {real_grads:>13,} {expected.grads:>13,} {real_adam:>18,} "
            f"{expected.adam:>13,}  {'yes' if ok else 'NO'}"
        )
        if frozen_with_state:
            print(f"    frozen parameters with a gradient or optimizer state: {frozen_with_state}")
    return ok_all


def net_config_value(config: Path, key: str) -> object:
    from fcn3_lightning.model.build import model_kwargs

    return model_kwargs(config)[key]


def unique_buffer_bytes(net: nn.Module) -> int:
    seen: dict[int, int] = {}
    for b in net.buffers():
        if b.device.type == "meta" or b.is_sparse:
            continue
        s = b.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


# --- activations ------------------------------------------------------------------------------------------


def saved_bytes(state: nn.Module, fn) -> int:
    """Bytes autograd holds for backward at the end of ``fn()`` (its peak for a plain forward + backward)."""
    meter = SavedTensorMeter(state)
    with meter.hooks():
        out = fn()
    live = meter.live
    del out
    return live


def network_activations(grid: tuple[int, int], scenarios: Sequence[tuple[str, list[str]]]) -> tuple[tuple[int, int], dict[str, int], FCN3]:
    """Saved bytes of one network step on one field, per freezing scenario, at full-size widths on ``grid``."""
    torch.manual_seed(0)
    net = build_model(FULL_CONFIG, inp_shape=grid)
    x = torch.randn(1, net.n_in_channels, *grid)
    out = {}
    for label, patterns in scenarios:
        for name, p in net.named_parameters():
            p.requires_grad_(not is_frozen(name, patterns))
        out[label] = saved_bytes(net, lambda: net(x))
    for p in net.parameters():
        p.requires_grad_(True)
    return net.latent_shape, out, net


def loss_activations(grid: tuple[int, int], n_channels: int, members: int, steps: int) -> int:
    """Saved bytes of the training loss (fair CRPS + spectral CRPS) on a (1, M, S, C, H, W) prediction."""
    loss_fn = EnsembleCRPSLoss(grid, torch.ones(n_channels), kind="fair", alpha=1.0)
    pred = torch.randn(1, members, steps, n_channels, *grid, requires_grad=True)
    target = torch.randn(1, steps, n_channels, *grid)
    return saved_bytes(loss_fn, lambda: loss_fn(pred, target)[0])


def rollout_activations(net: FCN3, members: int, steps: int) -> int:
    """Saved bytes of a real training rollout (noise, auxiliary inputs, members folded) and its loss; batch 1."""
    forecaster = EnsembleForecaster(net)
    grid = net.inp_shape
    loss_fn = EnsembleCRPSLoss(grid, torch.ones(net.n_channels), kind="fair", alpha=1.0)
    x0 = torch.randn(1, net.n_channels, *grid)
    zenith = torch.rand(1, steps, *grid)
    static = torch.randn(3, *grid)
    target = torch.randn(1, steps, net.n_channels, *grid)
    streams = keyed_streams(0, 1, [0], members, antithetic=True)

    def step() -> torch.Tensor:
        pred = forecaster.rollout(x0, zenith, static, streams, steps, members)
        return loss_fn(pred, target)[0]

    state = nn.ModuleList([forecaster, loss_fn])
    return saved_bytes(state, step)


@dataclass(frozen=True)
class LinearFit:
    """bytes = a * N_data + b * N_latent (least squares, no intercept)."""

    a: float
    b: float

    def __call__(self, data: tuple[int, int], latent: tuple[int, int]) -> float:
        return self.a * math.prod(data) + self.b * math.prod(latent)


def fit(points: Sequence[tuple[tuple[int, int], tuple[int, int], int]]) -> tuple[LinearFit, list[float]]:
    A = np.array([[math.prod(d), math.prod(lat)] for d, lat, _ in points], dtype=np.float64)
    y = np.array([v for *_, v in points], dtype=np.float64)
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    f = LinearFit(float(a), float(b))
    return f, [(f(d, lat) - v) / v for d, lat, v in points]


# --- per-GPU table ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    gpus: int
    h: int
    w: int
    e: int

    @property
    def dp(self) -> int:
        return self.gpus // (self.h * self.w * self.e)

    @property
    def name(self) -> str:
        return f"{self.h}x{self.w} sp. x {self.e} ens. x {self.dp} dp"


LAYOUTS = [
    Layout(1, 1, 1, 1),
    Layout(8, 8, 1, 1),
    Layout(8, 4, 1, 2),
    Layout(64, 16, 1, 4),
    Layout(64, 4, 4, 4),
    Layout(64, 8, 2, 4),
]


def max_tile(shape: tuple[int, int], h: int, w: int) -> tuple[int, int]:
    return max(thd.compute_split_shapes(shape[0], h)), max(thd.compute_split_shapes(shape[1], w))


def spectral_shard(params: Sequence[tuple[str, torch.Tensor]], net: FCN3, freq: int, h: int) -> dict[str, float]:
    """Fraction of each sharded parameter the largest h rank holds: spectral weights split along l (dim 3)."""
    out = {}
    for i in range(len(net.blocks)):
        if i % freq == 0:
            name = f"blocks.{i}.filter.weight"
            p = dict(params)[name]
            n_l = p.shape[3]
            out[name] = max(thd.compute_split_shapes(n_l, h)) / n_l
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two smaller grids, frozen activations not fitted (~1 min)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    mb = 1e6  # MB = 1e6 bytes, GB = 1e9 bytes throughout

    # 1. parameters of the full-size network, on the meta device
    t0 = time.perf_counter()
    full = build_model(FULL_CONFIG, meta=True)
    build_s = time.perf_counter() - t0
    freq = int(net_config_value(FULL_CONFIG, "sfno_block_frequency"))
    params = list(full.named_parameters())
    devices = sorted({p.device.type for _, p in params})
    print(
        f"Full-size FCN3 ({FULL_CONFIG.relative_to(REPO)}): data grid {full.inp_shape} -> latent {full.latent_shape}, "
        f"{full.n_channels} channels + {len(full.aux_channel_names)} auxiliary, latent width {full.latent_channels} + "
        f"{full.aux_embed_dim}, {len(full.blocks)} blocks (global every {freq}th); parameters on {', '.join(devices)} "
        f"(built in {build_s:.0f} s)"
    )
    print(f"\n{'group':<16} {'tensors':>8} {'real parameters':>16} {'share':>7} {'fp32 bytes':>12}")
    total = sum(real_count(p) for _, p in params)
    for g in GROUPS:
        ps = [p for n, p in params if param_group(n, freq) == g]
        n = sum(real_count(p) for p in ps)
        print(f"{g:<16} {len(ps):>8} {n:>16,} {n / total:>7.2%} {sum(nbytes(p) for p in ps) / GB:>9.3f} GB")
    print(f"{'total':<16} {len(params):>8} {total:>16,} {1:>7.0%} {sum(nbytes(p) for _, p in params) / GB:>9.3f} GB")
    assert total == count_parameters(full)
    tables = unique_buffer_bytes(full)
    print(f"fixed tables (DISCO filters, Legendre and resampling tables; buffers, mostly float64): {tables / GB:.3f} GB")

    # 2. gradients and Adam state per freezing scenario
    scenarios = freeze_scenarios(full, freq)
    print("\nGradients and Adam state (exp_avg + exp_avg_sq + step), trainable parameters only, whole network (one GPU):")
    print(f"  {'scenario':<44} {'trainable':>13} {'frozen':>13} {'weights':>9} {'grads':>9} {'Adam':>9} {'total':>9}")
    states = {}
    for label, patterns in scenarios:
        s = train_state(params, patterns)
        states[label] = s
        print(
            f"  {label:<44} {s.trainable:>13,} {s.frozen:>13,} {s.weights / GB:>6.2f} GB {s.grads / GB:>6.2f} GB "
            f"{s.adam / GB:>6.2f} GB {s.total / GB:>6.2f} GB"
        )
    for label, patterns in scenarios[1:]:
        print(f"  model.freeze for '{label}': {patterns}")
    formula_ok = verify_formula()

    # 3. activations per field (member) and rollout step, fitted on reduced grids at full-size widths
    grids = [(41, 80), (61, 120)] if args.quick else [(61, 120), (91, 180), (121, 240)]
    act_scenarios = scenarios[:1] if args.quick else scenarios[:2]
    print(
        f"\nSaved activations of one network step on one field (full-size widths), and of the loss per member and step "
        f"(4 members x 4 steps), on {len(grids)} grids:"
    )
    labels = [lab for lab, _ in act_scenarios]
    print(f"  {'grid':>9} {'latent':>8} " + " ".join(f"{('net: ' + lab):>28}" for lab in labels) + f" {'loss/member-step':>17} {'time':>6}")
    net_points: dict[str, list] = {lab: [] for lab in labels}
    loss_points = []
    small_net = None
    for grid in grids:
        t0 = time.perf_counter()
        latent, by_scenario, net = network_activations(grid, act_scenarios)
        loss_b = loss_activations(grid, net.n_channels, RECIPE["members"], RECIPE["steps"]) / (RECIPE["members"] * RECIPE["steps"])
        if small_net is None:
            small_net = net
        else:
            del net
        for lab in labels:
            net_points[lab].append((grid, latent, by_scenario[lab]))
        loss_points.append((grid, latent, loss_b))
        print(
            f"  {'x'.join(map(str, grid)):>9} {'x'.join(map(str, latent)):>8} "
            + " ".join(f"{by_scenario[lab] / mb:>25.1f} MB" for lab in labels)
            + f" {loss_b / mb:>14.2f} MB {time.perf_counter() - t0:>5.0f}s",
            flush=True,
        )
    fits = {}
    full_grid, full_latent = full.inp_shape, full.latent_shape
    at = f"{full_grid[0]}x{full_grid[1]} (latent {full_latent[0]}x{full_latent[1]})"
    print(f"\n  fit bytes = a * N_data + b * N_latent (N: points of the data / latent grid); extrapolated to {at}:")
    for lab, pts in [*((f"net: {k}", v) for k, v in net_points.items()), ("loss per member-step", loss_points)]:
        f, res = fit(pts)
        fits[lab] = f
        print(
            f"  {lab:<34} a = {f.a:>9.1f} B/point, b = {f.b:>9.1f} B/point; residuals "
            f"{', '.join(f'{r:+.1e}' for r in res)}; at full size {f(full_grid, full_latent) / GB:8.2f} GB"
        )
    # N_latent / N_data is nearly the same on every grid (scale factor 2), so a and b apart are ill-determined; their
    # sum at the full grid is not. Bracket it with the bytes per point of the largest grid, scaled by either count.
    (g, lat, v) = net_points[labels[0]][-1]
    per_data, per_latent = v * math.prod(full_grid) / math.prod(g), v * math.prod(full_latent) / math.prod(lat)
    print(
        f"  cross-check, net: {labels[0]}: the {g[0]}x{g[1]} figure scaled by N_data gives {per_data / GB:.2f} GB, "
        f"by N_latent {per_latent / GB:.2f} GB"
    )
    net_fit = fits[f"net: {labels[0]}"]
    net_fit_frozen = fits.get(f"net: {scenarios[1][0]}", net_fit)
    loss_fit = fits["loss per member-step"]

    # check the composition members x steps x (network + loss) against a real rollout on the smallest grid
    m, s = 2, 2
    grid0 = grids[0]
    real = rollout_activations(small_net, m, s)
    predicted = m * s * net_points[labels[0]][0][2] + loss_activations(grid0, small_net.n_channels, m, s)
    rel = (real - predicted) / predicted
    composition_ok = abs(rel) <= COMPOSITION_TOLERANCE
    print(
        f"\n  check on {grid0[0]}x{grid0[1]}: real rollout ({m} members x {s} steps, noise, loss) saves {real / mb:.1f} MB; "
        f"{m} x {s} x network step + loss = {predicted / mb:.1f} MB (rel. diff {rel:+.2%}, "
        f"{'within' if composition_ok else 'OUTSIDE'} +-{COMPOSITION_TOLERANCE:.0%})"
    )
    del small_net

    # 4. per-GPU memory for the recipe at full size
    n_ch = full.n_channels

    def per_rank(layout: Layout, patterns: list[str], frozen_act: bool, batch: int, members: int, steps: int) -> dict[str, float]:
        shard = spectral_shard(params, full, freq, layout.h)
        st = train_state(params, patterns, shard)
        tile, ltile = max_tile(full_grid, layout.h, layout.w), max_tile(full_latent, layout.h, layout.w)
        act_f = net_fit_frozen if frozen_act else net_fit
        local_members = members // layout.e
        act = batch * local_members * steps * act_f(tile, ltile) + batch * members * steps * loss_fit(tile, ltile)
        data = batch * ((1 + steps) * n_ch + steps) * math.prod(tile) * 4  # input, targets, cos zenith (fp32)
        parts = dict(weights=st.weights, grads=st.grads, adam=st.adam, activations=act, batch=data, tables=tables)
        parts["total"] = sum(parts.values())
        return parts

    def largest_fit(layout: Layout, patterns: list[str], frozen_act: bool) -> str:
        b0, m0, s0 = RECIPE["batch"], RECIPE["members"], RECIPE["steps"]
        for members in (m0, 2):
            if members % layout.e:
                continue
            for batch in range(b0, 0, -1):
                for steps in range(s0, 0, -1):
                    t = per_rank(layout, patterns, frozen_act, batch, members, steps)["total"]
                    if t <= GPU_BYTES:
                        return f"B={batch} M={members} S={steps} ({t / GB:.1f} GB)"
        members = max(2, layout.e)
        t = per_rank(layout, patterns, frozen_act, 1, members, 1)["total"]
        return f"none (B=1 M={members} S=1 needs {t / GB:.0f} GB)"

    b, mm, ss = RECIPE["batch"], RECIPE["members"], RECIPE["steps"]
    print(
        f"\nPer-GPU memory, fine-tune recipe at full size (configs/finetune.yaml: batch {b} per process, {mm} members, {ss}-step "
        f"rollouts, fp32, Adam; model.checkpointing none), GB = 1e9 bytes, capacity {GPU_BYTES / GB:.0f} GB per GPU:"
    )
    frozen_label = scenarios[1][0]
    head = (
        f"  {'GPUs':>4} {'layout (h x w spatial, ens., data-par.)':<34} {'tile':>9} {'M/rank':>6} {'freeze':<8} {'weights':>8} "
        f"{'grads':>7} {'Adam':>7} {'activ.':>8} {'batch':>6} {'tables':>6} {'total':>8} {'fits':>5}  largest that fits (B, M, S)"
    )
    print(head)
    for layout in LAYOUTS:
        tile = max_tile(full_grid, layout.h, layout.w)
        for tag, patterns, frozen_act in (("none", [], False), ("global", scenarios[1][1], True)):
            p = per_rank(layout, patterns, frozen_act, b, mm, ss)
            print(
                f"  {layout.gpus:>4} {layout.name:<34} {'x'.join(map(str, tile)):>9} {mm // layout.e:>6} {tag:<8} "
                f"{p['weights'] / GB:>8.2f} {p['grads'] / GB:>7.2f} {p['adam'] / GB:>7.2f} {p['activations'] / GB:>8.1f} "
                f"{p['batch'] / GB:>6.2f} {p['tables'] / GB:>6.2f} {p['total'] / GB:>8.1f} "
                f"{'yes' if p['total'] <= GPU_BYTES else 'no':>5}  {largest_fit(layout, patterns, frozen_act)}"
            )
    print(
        f"  freeze 'global' = {frozen_label} ({', '.join(scenarios[1][1])}); activations then from the frozen fit"
        + ("" if not args.quick else " (--quick: the unfrozen fit)")
    )
    print(
        "  activ. = B x members per rank x S x network step on the largest tile + B x all members x S x loss on the tile "
        "(ideal spatial split: halo rows and reduce-scatter buffers not counted); tables = full-grid size (upper bound); "
        "not counted: activation gradients in backward, workspaces, communication buffers, CUDA context"
    )
    print(
        f"\ntotal {time.perf_counter() - t_start:.0f} s; optimizer-state formula check {'passed' if formula_ok else 'FAILED'}, "
        f"activation composition check {'passed' if composition_ok else 'FAILED'}"
    )
    return 0 if formula_ok and composition_ok else 1


if __name__ == "__main__":
    sys.exit(main())
