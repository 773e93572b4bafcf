"""Benchmark: per-rank activation memory of one FCN3 training step at 1, 2 and 4 spatial ranks (gloo, CPU).

    python bench/parallel_memory.py                                   # serial, 1x1, 2x1, 1x2, 2x2 on 181x360
    python bench/parallel_memory.py --layouts serial 2x2 --members 2  # quicker
    python bench/parallel_memory.py --grid 91 180 --atmo-embed-dim 8  # a smaller case

Issue 7, acceptance item 4: per-rank peak activation memory of one training step at 2 and 4 spatial ranks must
be at most 0.6x and 0.35x of the 1-rank figure.

Network: FCN3 (``--grid``, default 181x360, scale factor 2: latent Legendre-Gauss grid 90x180) with the channels
of ``CHANNELS`` (3 pressure levels x 5 variables + 5 surface fields) and auxiliary inputs ``AUX``, embed dims
``--atmo-embed-dim`` / ``--surf-embed-dim`` / ``--aux-embed-dim`` and ``--num-layers`` blocks alternating spectral
(Driscoll-Healy) and DISCO filters; the configuration is printed. The parent process builds the serial network
once (seeded) and saves its state_dict, the input and the target; every layout loads its shard of that state_dict
(:func:`~fcn3_lightning.parallel.shard_state_dict`), so all layouts compute the same step.

Layouts: ``serial`` (one process, the serial torch-harmonics layers), ``HxW`` (H x W processes, gloo on
127.0.0.1, one :class:`~fcn3_lightning.parallel.ProcessMesh` with ``h_parallel_size=H, w_parallel_size=W``, the
network built with :class:`~fcn3_lightning.parallel.DistributedSphericalLayers`; ``1x1`` is that code path on one
rank). Every layout runs in fresh processes (spawned), with ``--threads`` torch threads in total, split over the
ranks. The 1-rank figure the ratios refer to is ``--reference`` (default: the larger of ``serial`` and ``1x1``
among the layouts run, i.e. the network as the project trains it on one device; both are printed).

One training step: forward of the ensemble batch (``--batch`` samples x ``--members`` members folded into the batch
dimension, as the ensemble forecaster does; the members differ in their noise channels), a loss, backward. The loss
is the mean squared error against a fixed target over the whole grid, computed on each rank as the sum over its
tile divided by the number of grid points of the whole grid: the global loss is the sum of the tile losses, and
its gradient with respect to a rank's output tile is that tile's own term, so ``backward`` on the local term gives
exactly the activation gradients of the global loss without a differentiable all-reduce (an all-reduce is an
identity in backward). The detached tile losses are all-reduced (plain ``dist.all_reduce``) only to print the
global loss and check it against the serial one (``loss rel. diff``: the layouts do compute the same step).

Activation memory (the figure checked): the bytes of the tensors autograd saves for backward, recorded with
``torch.autograd.graph.saved_tensors_hooks`` around forward and loss. The pack hook keys each saved tensor by its
storage (``untyped_storage().data_ptr()``), so views of one storage and tensors saved by several nodes count once,
and wraps it in a handle whose release (when autograd frees the node after using it in backward) decrements the
storage's count; a storage's bytes are live from its first save to the release of its last handle. The figure is
the peak of live bytes over the step (forward, loss and backward), which for a plain forward + backward is
reached at the end of the forward (the hooks also report the total at that point). Storages of parameters and
buffers (weights, DISCO / Legendre / resampling tables, also when saved through a view) are counted apart as
"state": they are not activations. Not counted: transient temporaries freed inside the forward, the gradients
during backward and communication buffers that autograd does not keep; the peak RSS shows them all.

Allocation peak per rank (for reference, not checked; off with ``--no-allocations``): the step runs under
``torch.profiler`` with ``profile_memory=True``; replaying its allocation / free events gives the peak of all bytes
allocated during the step and live at once (saved activations plus transients: workspaces, gradients, all-to-all
buffers), and the largest blocks live at that peak with the operators that allocated them, printed per layout.
The profiler logs start/stop lines on stderr in every rank (kineto); they are harmless.

Peak RSS per rank (for reference): VmHWM over the step alone, reset through /proc/self/clear_refs right before it
(ru_maxrss where that is not possible), next to the RSS before the step (the Python runtime, torch, the network and
its tables). The printed "max" is the maximum over the ranks of a layout (ranks differ by uneven splits and halos).

Exit status: 0 when the activation ratios of every layout with 2 ranks are <= 0.6 and with 4 ranks <= 0.35, 1 when
a target is missed, 2 when a run fails (its traceback is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rss import peak_rss, reset_peak, rss  # bench/rss.py (the script's folder is on sys.path)

#: 3 pressure levels x (z, t, u, v, q) and 5 surface fields: 20 prognostic channels (FCN3 has 13 levels, 72 channels)
CHANNELS = [f"{v}{lev}" for lev in (250, 500, 850) for v in ("z", "t", "u", "v", "q")] + ["t2m", "u10m", "v10m", "msl", "tcwv"]
AUX = ["xzen", "xnoise0", "xnoise1", "xoro", "xlsml"]
TARGETS = {2: 0.6, 4: 0.35}
TIME_LIMIT_S = 900.0


@dataclass(frozen=True)
class Layout:
    """One run: ``serial`` or an h x w spatial mesh."""

    name: str
    h: int
    w: int

    @property
    def ranks(self) -> int:
        return self.h * self.w

    @property
    def serial(self) -> bool:
        return self.name == "serial"


def parse_layout(text: str) -> Layout:
    if text == "serial":
        return Layout("serial", 1, 1)
    try:
        h, w = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layout must be 'serial' or HxW (e.g. 2x1), got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"layout sizes must be positive, got {text!r}")
    return Layout(f"{h}x{w}", h, w)


def net_config(args: argparse.Namespace) -> dict:
    return dict(
        inp_shape=tuple(args.grid),
        channel_names=CHANNELS,
        aux_channel_names=AUX,
        scale_factor=2,
        atmo_embed_dim=args.atmo_embed_dim,
        surf_embed_dim=args.surf_embed_dim,
        aux_embed_dim=args.aux_embed_dim,
        num_layers=args.num_layers,
        sfno_block_frequency=2,
    )


# --- measurement ------------------------------------------------------------------------------------------


def _storages(t: torch.Tensor) -> list[tuple[int, int]]:
    """(data_ptr, nbytes) of the storages behind a tensor (sparse: indices and values); empty when it has none."""
    if t.is_sparse:
        return _storages(t._indices()) + _storages(t._values())
    if t.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        parts = (t.crow_indices(), t.col_indices(), t.values()) if t.layout == torch.sparse_csr else (t.values(),)
        return [s for p in parts for s in _storages(p)]
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return []
    return [(s.data_ptr(), s.nbytes())] if s.nbytes() else []


class SavedTensorMeter:
    """Live bytes of the storages autograd holds for backward (see the module docstring).

    Use its :meth:`hooks` as the context around the forward; handles released during backward decrement the count.
    """

    def __init__(self, state: torch.nn.Module):
        self.state_ptrs = {p for t in [*state.parameters(), *state.buffers()] for p, _ in _storages(t)}
        self.count: dict[int, int] = {}  # storage -> live handles
        self.size: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self.state_bytes = 0  # parameter / buffer storages saved (each counted once)
        self._state_seen: set[int] = set()

    def _release(self, keys: list[int]) -> None:
        for k in keys:
            self.count[k] -= 1
            if self.count[k] == 0:
                del self.count[k]
                self.live -= self.size.pop(k)

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        meter = self

        class Handle:
            """Keeps the saved tensor; its release is the storage's release by autograd."""

            __slots__ = ("keys", "tensor")

            def __init__(self, tensor: torch.Tensor, keys: list[int]):
                self.tensor, self.keys = tensor, keys

            def __del__(self) -> None:
                meter._release(self.keys)

        def pack(t: torch.Tensor) -> Handle:
            keys = []
            for ptr, nbytes in _storages(t):
                if ptr in meter.state_ptrs:
                    if ptr not in meter._state_seen:
                        meter._state_seen.add(ptr)
                        meter.state_bytes += nbytes
                    continue
                keys.append(ptr)
                if ptr not in meter.count:
                    meter.count[ptr] = 0
                    meter.size[ptr] = nbytes
                    meter.live += nbytes
                meter.count[ptr] += 1
            meter.peak = max(meter.peak, meter.live)
            return Handle(t, keys)

        def unpack(h: Handle) -> torch.Tensor:
            return h.tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def allocation_peak(trace: Path) -> tuple[int, list[tuple[int, str]]]:
    """Peak of live CPU allocations in a profiler chrome trace, and the largest blocks live at the peak.

    The profiler (``profile_memory=True``) records every allocation and free ("[memory]" events with address and
    size); replaying them gives the bytes allocated during the profiled region and still live, at every instant.
    Each block is labelled with the innermost operators that were running when it was allocated.
    """
    import json

    events = json.loads(trace.read_text())["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    live: dict[int, tuple[int, float]] = {}
    current = peak = 0
    peak_live: dict[int, tuple[int, float]] = {}
    for e in mem:
        a = e["args"]
        if a["Bytes"] > 0:
            live[a["Addr"]] = (a["Bytes"], e["ts"])
            current += a["Bytes"]
        elif a["Addr"] in live:  # frees of blocks allocated before the region do not count
            current -= live.pop(a["Addr"])[0]
        if current > peak:
            peak, peak_live = current, dict(live)

    def where(ts: float) -> str:
        enclosing = sorted((o for o in ops if o["ts"] <= ts <= o["ts"] + o.get("dur", 0)), key=lambda o: o["ts"])
        names = [o["name"].split(": ")[-1] for o in enclosing if not o["name"].startswith("aten::empty")]
        return " > ".join(n[:48] for n in names[-2:]) or "?"

    top = sorted(peak_live.values(), key=lambda r: -r[0])[:6]
    return peak, [(b, where(ts)) for b, ts in top]


# --- one rank ---------------------------------------------------------------------------------------------


def _worker(rank: int, layout: Layout, port: int, workdir: str, threads: int, allocations: bool) -> None:
    try:
        _run_rank(rank, layout, port, Path(workdir), threads, allocations)
    except BaseException:
        traceback.print_exc()
        raise


def _run_rank(rank: int, layout: Layout, port: int, workdir: Path, threads: int, allocations: bool) -> None:
    from fcn3_lightning.model import FCN3
    from fcn3_lightning.parallel import DistributedSphericalLayers, ProcessMesh, shard_state_dict

    torch.set_num_threads(threads)
    blob = torch.load(workdir / "case.pt")
    config, x, target = blob["config"], blob["input"], blob["target"]
    mesh = None
    if layout.serial:
        net = FCN3(**config)
        lat, lon = slice(None), slice(None)
        net.load_state_dict(blob["state_dict"])
    else:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=layout.ranks, timeout=datetime.timedelta(seconds=300)
        )
        mesh = ProcessMesh(h_parallel_size=layout.h, w_parallel_size=layout.w)
        net = FCN3(**config, layers=DistributedSphericalLayers())
        net.load_state_dict(shard_state_dict(blob["state_dict"], net))
        lat, lon = mesh.tile(config["inp_shape"])
    del blob
    net.train()
    # contiguous tiles, as the data module hands them over
    x, target = x[..., lat, lon].contiguous(), target[..., lat, lon].contiguous()
    n_points = math.prod(config["inp_shape"])
    if mesh is not None:
        dist.barrier()

    meter = SavedTensorMeter(net)
    profiler = (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        if allocations
        else contextlib.nullcontext()
    )
    reset = reset_peak()
    before = rss()
    t0 = time.perf_counter()
    with profiler:
        with meter.hooks():
            out = net(x)
            # the tile's term of the global mean squared error (see the module docstring)
            loss = (out - target).square().sum() / (n_points * out.shape[0] * out.shape[1])
        at_forward_end = meter.live
        loss.backward()
    seconds = time.perf_counter() - t0
    peak = peak_rss()
    alloc_peak, alloc_top = None, []
    if allocations:
        trace = workdir / f"{layout.name}.rank{rank}.trace.json"
        profiler.export_chrome_trace(str(trace))
        alloc_peak, alloc_top = allocation_peak(trace)
        trace.unlink()
    after_backward = meter.live
    # check value, sensitive to the outputs (the loss is dominated by the random target): sum of out^2 in float64
    total = torch.stack([loss.detach().double(), out.detach().double().square().sum()])
    del out
    if mesh is not None:
        dist.all_reduce(total, group=mesh.group("spatial"))
    result = {
        "rank": rank,
        "tile": tuple(x.shape[-2:]),
        "latent_tile": tuple(net.local_latent_shape),
        "activation_peak": meter.peak,
        "activation_at_forward_end": at_forward_end,
        "activation_after_backward": after_backward,
        "state_saved": meter.state_bytes,
        "rss_before": before,
        "rss_peak": peak,
        "alloc_peak": alloc_peak,
        "alloc_top": alloc_top,
        "rss_method": "VmHWM after clear_refs" if reset else "ru_maxrss",
        "seconds": seconds,
        "loss": float(total[0]),
        "out_sq": float(total[1]),
    }
    torch.save(result, workdir / f"{layout.name}.rank{rank}.pt")
    if mesh is not None:
        dist.barrier()
        mesh.destroy()
        dist.destroy_process_group()


# --- driver -----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(layout: Layout, workdir: Path, threads: int, allocations: bool) -> list[dict]:
    """Start the layout's ranks (fresh spawned processes), wait for them (time-limited), return their results."""
    per_rank = max(1, threads // layout.ranks)
    t0 = time.perf_counter()
    procs = mp.start_processes(
        _worker, args=(layout, _free_port(), str(workdir), per_rank, allocations), nprocs=layout.ranks, join=False, start_method="spawn"
    )
    try:
        while not procs.join(timeout=1.0):
            if time.perf_counter() - t0 > TIME_LIMIT_S:
                raise TimeoutError(f"layout {layout.name}: the ranks did not finish within {TIME_LIMIT_S:.0f} s")
    finally:
        for p in procs.processes:  # only our own workers, by handle; no-op for those that exited
            if p.is_alive():
                p.kill()
    return [torch.load(workdir / f"{layout.name}.rank{r}.pt") for r in range(layout.ranks)]


def build_case(args: argparse.Namespace, workdir: Path) -> dict:
    """The serial network's state_dict, an ensemble input and a fixed target, saved for the ranks; returns the config."""
    from fcn3_lightning.model import FCN3

    config = net_config(args)
    torch.manual_seed(0)
    net = FCN3(**config)
    n = args.batch * args.members
    x = torch.randn(n, net.n_in_channels, *config["inp_shape"])
    # members of one sample share the state and differ in their noise channels, as in the ensemble forecaster
    x[:, : net.n_channels] = x[:: args.members, : net.n_channels].repeat_interleave(args.members, 0)
    target = torch.randn(args.batch, net.n_channels, *config["inp_shape"]).repeat_interleave(args.members, 0)
    torch.save({"config": config, "state_dict": net.state_dict(), "input": x, "target": target}, workdir / "case.pt")
    n_params = sum(p.numel() for p in net.parameters())
    blocks = ["spectral" if i % config["sfno_block_frequency"] == 0 else "DISCO" for i in range(config["num_layers"])]
    print(
        f"FCN3 on {config['inp_shape'][0]}x{config['inp_shape'][1]} (latent {net.latent_shape[0]}x{net.latent_shape[1]} "
        f"Legendre-Gauss), {net.n_channels} channels ({len(net.layout.levels)} levels x {len(net.layout.level_variables)} "
        f"+ {len(net.layout.surface_index)} surface) + {len(AUX)} auxiliary {AUX}; atmo/surf/aux embed "
        f"{config['atmo_embed_dim']}/{config['surf_embed_dim']}/{config['aux_embed_dim']} (latent width "
        f"{net.latent_channels} + {net.aux_embed_dim}), {config['num_layers']} blocks {blocks}, {n_params / 1e6:.2f} M parameters"
    )
    print(
        f"step: batch {args.batch} x {args.members} members folded ({n} fields), MSE over the grid, backward; "
        f"{args.threads} torch threads in total per layout",
        flush=True,
    )
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, nargs=2, default=[181, 360], metavar=("NLAT", "NLON"), help="data grid (default 181 360)")
    parser.add_argument(
        "--layouts",
        type=parse_layout,
        nargs="+",
        default=[parse_layout(s) for s in ("serial", "1x1", "2x1", "1x2", "2x2")],
        help="'serial' and/or HxW spatial meshes (default serial 1x1 2x1 1x2 2x2)",
    )
    parser.add_argument("--reference", default="max", help="the 1-rank figure: 'serial', '1x1' or 'max' of the two run (default max)")
    parser.add_argument("--batch", type=int, default=1, help="samples per step (default 1)")
    parser.add_argument("--members", type=int, default=2, help="ensemble members per sample, folded into the batch (default 2)")
    parser.add_argument("--atmo-embed-dim", type=int, default=16)
    parser.add_argument("--surf-embed-dim", type=int, default=32)
    parser.add_argument("--aux-embed-dim", type=int, default=8)
    parser.add_argument("--num-layers", type=int, default=4, help="processor blocks, spectral and DISCO alternating (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per layout, split over its ranks (default 2)")
    parser.add_argument(
        "--no-allocations",
        dest="allocations",
        action="store_false",
        help="skip the allocator-level peak (torch profiler memory events; ~20%% slower step)",
    )
    args = parser.parse_args()

    one_rank = [lay for lay in args.layouts if lay.ranks == 1]
    if not one_rank:
        parser.error("--layouts needs a 1-rank layout ('serial' or 1x1) for the reference figure")
    t_start = time.perf_counter()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="parallel_memory_") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        build_case(args, workdir)
        print(f"case built in {time.perf_counter() - t0:.0f} s", flush=True)
        for layout in args.layouts:
            t0 = time.perf_counter()
            try:
                results[layout.name] = run_layout(layout, workdir, args.threads, args.allocations)
            except Exception as e:  # the ranks printed their tracebacks
                print(f"layout {layout.name} failed: {e}", file=sys.stderr)
                return 2
            print(f"  {layout.name}: {time.perf_counter() - t0:.0f} s (spawn, build, step)", flush=True)

    ref_names = [lay.name for lay in one_rank]
    if args.reference == "max":
        ref_name = max(ref_names, key=lambda n: results[n][0]["activation_peak"])
    elif args.reference in ref_names:
        ref_name = args.reference
    else:
        parser.error(f"--reference {args.reference!r} is not among the 1-rank layouts run {ref_names}")
    ref = results[ref_name][0]["activation_peak"]
    ref_check = results[ref_name][0]["out_sq"]
    ref_alloc = results[ref_name][0]["alloc_peak"]

    mb = 1 << 20
    r0 = results[args.layouts[0].name][0]
    print(
        f"\nper-rank figures in MB (max over the ranks of a layout); activ. = bytes saved for backward (peak of live "
        f"storages over the step); RSS: {r0['rss_method']} over the step; reference = {ref_name}"
    )
    header = (
        f"{'layout':>7} {'ranks':>5} {'tile':>9} {'latent':>8} {'activ.':>12} {'ratio':>6} {'target':>6} {'alloc peak':>10} "
        f"{'ratio':>6} {'state saved':>11} {'RSS before':>10} {'peak RSS':>9} {'step (s)':>8} {'out check':>11} {'loss':>7}"
    )
    print(header)
    ok = True
    for layout in args.layouts:
        rs = results[layout.name]
        act = max(r["activation_peak"] for r in rs)
        ratio = act / ref
        target = TARGETS.get(layout.ranks)
        verdict = ""
        if target is not None:
            met = ratio <= target
            ok &= met
            verdict = f"{target:.2f}" + ("" if met else " !")
        tile = max(rs, key=lambda r: math.prod(r["tile"]))
        alloc = f"{'-':>10} {'-':>6}"
        if ref_alloc:
            worst = max(r["alloc_peak"] for r in rs)
            alloc = f"{worst / mb:>10.1f} {worst / ref_alloc:>6.3f}"
        print(
            f"{layout.name:>7} {layout.ranks:>5} {'x'.join(map(str, tile['tile'])):>9} "
            f"{'x'.join(map(str, tile['latent_tile'])):>8} {act / mb:>12.1f} {ratio:>6.3f} {verdict:>6} {alloc} "
            f"{max(r['state_saved'] for r in rs) / mb:>11.1f} {max(r['rss_before'] for r in rs) / mb:>10.0f} "
            f"{max(r['rss_peak'] for r in rs) / mb:>9.0f} {max(r['seconds'] for r in rs):>8.1f} "
            f"{abs(rs[0]['out_sq'] - ref_check) / ref_check:>11.1e} {rs[0]['loss']:>7.4f}"
        )
        for r in rs:
            if r["activation_at_forward_end"] != r["activation_peak"] or r["activation_after_backward"] != 0:
                print(
                    f"        rank {r['rank']}: activations at the end of forward {r['activation_at_forward_end'] / mb:.1f} MB, "
                    f"still held after backward {r['activation_after_backward'] / mb:.1f} MB"
                )
        if layout.ranks > 1:
            per_rank = ", ".join(f"{r['activation_peak'] / mb:.1f}" for r in rs)
            print(f"        per rank (MB): {per_rank}")
    if ref_alloc:
        print(
            "\nalloc peak = peak of all bytes allocated during the step and live (profiler memory events): saved "
            "activations plus transients (workspaces, gradients, communication buffers); informational, not checked. "
            "Largest blocks live at that peak, on the rank with the highest peak:"
        )
        for layout in args.layouts:
            r = max(results[layout.name], key=lambda r: r["alloc_peak"])
            blocks = "; ".join(f"{b / mb:.1f} MB in {w}" for b, w in r["alloc_top"])
            print(f"  {layout.name} rank {r['rank']}: {blocks}")
    print(
        f"{'met' if ok else 'NOT met'}: activations <= {TARGETS[2]}x the 1-rank figure at 2 ranks and <= {TARGETS[4]}x at 4 ranks; "
        f"total {time.perf_counter() - t_start:.0f} s"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
