"""Fused updates for the metric classes: the same per-forecast quantities in fewer passes over the data.

The metric classes of :mod:`fcn3_lightning.metrics` compute each score with its own passes over the
``(batch, member, lead, channel, lat, lon)`` block (CRPS sorts the members, SpreadSkill runs ``var_mean``, the
rank histogram builds a one-hot array, ...); on a 10-member 121 x 240 block that is ~5 s per 100 MB. Here one
kernel per block computes every pointwise quantity those ``update`` methods compute, from the members' errors
e_m = X_m - o held as M separate fields:

* CRPS: skill (1/M) sum |e_m|; spread sum_r w_r e_(r) with the members sorted by a sorting network (Batcher's
  odd-even merge sort, unrolled min/max pairs; ``torch.sort`` above 16 members), w_r = (2r - M - 1) 2/(M(M-1));
* SpreadSkill: the mean error e_bar = (1/M) sum e_m = X_bar - o and the variance sum (e_m - e_bar)^2 / (M-1);
* EnergyScore: e_m^2 and (X_{m+1} - X_m)^2 per member, for their per-member spatial means;
* RankHistogram: #{e_m < 0} and #{e_m = 0} (x < o exactly when fl(x - o) < 0), ties broken uniformly at random
  as the class does (drawing only where there are ties: the same distribution, not the same draws), and the
  one-hot spatial means as weighted bin counts;
* DeterministicScores, ACC and PredictionActivity: e^2, e, |e|, f'o', f'^2, o'^2 stacked into one spatial-mean product.

The spatial means (``spatial_mean``), the per-forecast formulas and states (``update_from_means``) and ``compute``
are the classes' own (called on the metric objects), so states stay additive and DDP/sharding-safe; only the
pointwise work is fused. In float64 the results equal the classes' to rounding (tests/test_eval_wb2.py checks every
state against the classes' ``update``). The kernels are plain torch functions; ``compile`` runs them through
``torch.compile`` (one fused C++ loop per kernel, ~10x faster on the CPU; the first compilation takes ~15 s on 2
cores, later processes reuse inductor's on-disk cache), and falls back to running them eagerly if compilation fails.
"""

from __future__ import annotations

import shutil
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fcn3_lightning.metrics import ACC, CRPS, DeterministicScores, EnergyScore, PredictionActivity, RankHistogram, SpreadSkill
from fcn3_lightning.metrics.ensemble import break_ties

#: Inductor first dry-compiles a test program with torch's headers for every SIMD instruction set the CPU lists
#: (17 of the ~20 s of the first compilation on a 2-core machine, before any kernel is built). The CPU's own flags
#: already say what it supports; should the compiler still reject the flags, the kernel's compilation fails and
#: FusedUpdates runs the same kernel eagerly (with a warning, or raises with compile="on").
_INDUCTOR_OPTIONS = {"cpp.vec_isa_ok": True}

#: above this ensemble size the CRPS spread sorts with torch.sort instead of an unrolled network
MAX_NETWORK_MEMBERS = 16


def sorting_network(m: int) -> list[tuple[int, int]]:
    """Comparators (a, b), a < b, of Batcher's odd-even merge sort for ``m`` inputs (min to a, max to b)."""
    n = 1
    while n < m:
        n *= 2
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        a, b = i + j, i + j + k
                        if b < m:  # padding inputs are +inf at the top: comparators touching them never swap
                            pairs.append((a, b))
            k //= 2
        p *= 2
    return pairs


def crps_spread_weights(m: int) -> list[float]:
    """w_r with sum_ij |x_i - x_j| / (M(M-1)) = sum_r w_r x_(r) (as :func:`fcn3_lightning.metrics.fair_crps_parts`)."""
    return [(2.0 * (r + 1) - (m + 1)) * (2.0 / (m * (m - 1))) for r in range(m)]


def ensemble_kernel(
    x: Tensor, o: Tensor, dtype: torch.dtype, pairs: list[tuple[int, int]], weights: list[float], rank: bool
) -> tuple[Tensor, ...]:
    """Pointwise ensemble quantities of ``x`` (M, N) against ``o`` (N,), computed in ``dtype``.

    Returns skill, spread, e_bar^2, variance (N,), e^2 (M, N), (dX)^2 (M-1, N), the counts below/ties
    (int32 (N,); zero-size when ``rank`` is false) and the member mean in the data's dtype (N,) (WB2's).
    """
    m = x.shape[0]
    ot = o.to(dtype)
    xs = [x[i].to(dtype) for i in range(m)]
    xmean = x[0]
    for i in range(1, m):
        xmean = xmean + x[i]
    xmean = xmean / m
    e = [xi - ot for xi in xs]
    skill = e[0].abs()
    for t in e[1:]:
        skill = skill + t.abs()
    skill = skill / m
    ebar = e[0]
    for t in e[1:]:
        ebar = ebar + t
    ebar = ebar / m
    var = (e[0] - ebar) ** 2
    for t in e[1:]:
        var = var + (t - ebar) ** 2
    var = var / (m - 1)
    e2 = torch.stack([t * t for t in e])
    d2 = torch.stack([(xs[i + 1] - xs[i]) ** 2 for i in range(m - 1)])
    if rank:
        below = (e[0] < 0).to(torch.int32)
        ties = (e[0] == 0).to(torch.int32)
        for t in e[1:]:
            below = below + (t < 0).to(torch.int32)
            ties = ties + (t == 0).to(torch.int32)
    else:
        below = ties = ebar.new_zeros((0,), dtype=torch.int32)
    if pairs:
        s = list(e)
        for a, b in pairs:
            s[a], s[b] = torch.minimum(s[a], s[b]), torch.maximum(s[a], s[b])
    else:
        sorted_ = torch.sort(torch.stack(e), dim=0).values
        s = [sorted_[i] for i in range(m)]
    spread = s[0] * weights[0]
    for w, t in zip(weights[1:], s[1:], strict=True):
        spread = spread + t * w
    return skill, spread, ebar * ebar, var, e2, d2, below, ties, xmean


def deterministic_kernel(f: Tensor, o: Tensor, c: Tensor | None, dtype: torch.dtype) -> Tensor:
    """(e^2, e, |e|[, f'o', f'^2, o'^2]) stacked on a new first axis, e = f - o, ' = minus the climatology."""
    ft, ot = f.to(dtype), o.to(dtype)
    e = ft - ot
    parts = [e * e, e, e.abs()]
    if c is not None:
        ct = c.to(dtype)
        fa, oa = ft - ct, ot - ct
        parts += [fa * oa, fa * fa, oa * oa]
    return torch.stack(parts)


class FusedUpdates:
    """Feeds blocks to the metric objects through the fused kernels (eager or compiled).

    Args:
        compile: ``"on"`` compile (errors raise), ``"off"`` run eagerly, ``"auto"`` compile when a C++ compiler
            (CPU) or CUDA is there, falling back to eager with a warning if compilation fails.
        warn: called with a message when falling back.
        work_dtype: dtype of the pointwise work (default: the metrics' compute dtype); the spatial means of its
            results are summed in the metrics' own dtype (``GriddedMetric.spatial_mean``), so float32 work with float64
            metrics halves the memory traffic of the kernels while the spatial means do not depend on how the data are
            blocked (``evaluate``, all lead times in a block, and ``predict --score-against``, one lead time, agree to
            ~1e-15; a float32 sum would differ by ~1e-6; the chunked float64 conversion measured ~3x the float32
            product's time on 2 cores).
    """

    def __init__(self, compile: str = "auto", warn: Callable[[str], None] | None = None, work_dtype: torch.dtype | None = None) -> None:
        if compile not in ("auto", "on", "off"):
            raise ValueError(f"compile must be auto, on or off, got {compile!r}")
        self.mode = compile
        self.work_dtype = work_dtype
        self.warn = warn or (lambda msg: print(f"WARNING: {msg}", file=sys.stderr))
        self._compiled: dict[str, Any] = {}
        self._failed = False
        self._background: threading.Thread | None = None
        self._background_error: BaseException | None = None

    def _can_compile(self, device: torch.device) -> bool:
        if self.mode == "off" or self._failed:
            return False
        if self.mode == "on":
            return True
        return device.type == "cuda" or shutil.which("g++") is not None or shutil.which("c++") is not None

    def compile_in_background(self, jobs: list[tuple[str, Callable[..., Any], tuple[Any, ...]]], device: torch.device) -> None:
        """Compile the kernels on small example inputs ``(name, kernel, args)`` in a background thread.

        It starts while the stores are opened and the first blocks are read (a few seconds when inductor's cache
        has the kernels, ~15 s on 2 cores the first time on a machine). The first kernel call waits for it:
        scoring eagerly meanwhile was measured slower, since the eager kernels (~6x slower) and the compiler
        then compete for the same cores while the readers keep the queue full anyway. No two compilations run
        at once: the main thread compiles (a variant not in ``jobs``) only after the background thread finished.
        """
        if not jobs or not self._can_compile(device):
            return

        def work() -> None:
            try:
                for name, fn, args in jobs:
                    if name not in self._compiled:
                        self._compiled[name] = torch.compile(fn, dynamic=True, options=_INDUCTOR_OPTIONS)
                    self._compiled[name](*args)
            except Exception as err:  # noqa: BLE001 - reported (and eager used) by the main thread
                self._background_error = err

        self._background = threading.Thread(target=work, name="compile-metric-kernels", daemon=True)
        self._background.start()

    def wait(self) -> None:
        """Wait for a background compilation (so that nothing compiles after the run)."""
        if self._background is not None:
            self._background.join()

    def _run(self, name: str, fn: Callable[..., Any], device: torch.device, *args: Any) -> Any:
        if not self._can_compile(device):
            return fn(*args)
        if self._background is not None:
            self._background.join()
            self._background = None
            if self._background_error is not None:
                self._give_up(self._background_error)
                return fn(*args)
        if name not in self._compiled:
            self._compiled[name] = torch.compile(fn, dynamic=True, options=_INDUCTOR_OPTIONS)
        try:
            return self._compiled[name](*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure: fall back to the same function, eagerly
            self._give_up(err)
            return fn(*args)

    def _give_up(self, err: BaseException) -> None:
        """Compilation failed: raise (``compile="on"``) or warn and run eagerly from now on."""
        if self.mode == "on":
            raise err
        self._failed = True
        first = str(err).splitlines()[0][:200] if str(err) else ""
        self.warn(f"torch.compile of the metric kernels failed ({type(err).__name__}: {first}); running them eagerly")

    @staticmethod
    def _validate(metrics: list[Any], pred: Tensor, target: Tensor, ensemble: bool) -> None:
        for m in metrics:
            m.check_pair(pred, target, ensemble=ensemble)

    def ensemble(
        self,
        pred: Tensor,
        target: Tensor,
        crps: CRPS | None = None,
        ss: SpreadSkill | None = None,
        es: EnergyScore | None = None,
        rank: RankHistogram | None = None,
    ) -> tuple[bool, Tensor]:
        """``update(pred, target)`` of each given metric in one pass.

        Returns whether the inputs were all finite (the spatial mean of the pointwise CRPS skill is finite exactly
        then: no separate pass looks for NaN) and the member mean in the data's dtype ``(B, L, C, lat, lon)``.
        """
        metrics = [m for m in (crps, ss, es, rank) if m is not None]
        if not metrics:
            raise ValueError("fused ensemble update without metrics")
        self._validate(metrics, pred, target, ensemble=True)
        dtype = self.work_dtype or metrics[0].compute_dtype
        m, b = pred.shape[1], pred.shape[0]
        pairs = sorting_network(m) if m <= MAX_NETWORK_MEMBERS else []
        # flat (member, point) and (point,) inputs: one compiled kernel serves every block shape (no 0/1 specialisation)
        x2 = pred.reshape(m, -1) if b == 1 else pred.transpose(0, 1).reshape(m, -1)
        out = self._run(
            "ensemble", ensemble_kernel, pred.device, x2, target.reshape(-1), dtype, pairs, crps_spread_weights(m), rank is not None
        )
        point = target.shape

        def members(t: Tensor) -> Tensor:  # (K, B * point) -> (B, K, *point)
            return t.reshape(t.shape[0], b, *point[1:]).transpose(0, 1)

        skill, spread, ebar2, var = (t.reshape(point) for t in out[:4])
        e2, d2 = members(out[4]), members(out[5])
        below, ties = (t.reshape(point) if t.numel() else t for t in out[6:8])
        skill_sm = (crps or metrics[0]).spatial_mean(skill)
        finite = bool(torch.isfinite(skill_sm).all())
        if crps is not None:
            crps.update_from_means(skill=skill_sm, spread=crps.spatial_mean(spread))
        if ss is not None:
            ss.update_from_means(se=ss.spatial_mean(ebar2), var=ss.spatial_mean(var))
        if es is not None:
            es.update_from_means(se=es.spatial_mean(e2), sd=es.spatial_mean(d2))
        if rank is not None:
            self._rank(rank, below, ties, b)
        return finite, out[8].reshape(point)

    def _rank(self, rank: RankHistogram, below: Tensor, ties: Tensor, b: int) -> None:
        """RankHistogram.update's ranks and one-hot spatial means, without a one-hot array.

        Ties are broken uniformly at random as the class does (its generator and :func:`break_ties`), drawing only at
        the points that have ties. The spatial means are weighted bin counts: per latitude row when every region's weights
        are constant along longitude (the global region), else per point.
        """
        device = below.device
        generator = rank.tie_generator(device)
        r = below.long()
        tied = ties > 0
        if bool(tied.any()):
            where = tied.nonzero(as_tuple=True)
            t = ties[where].long()
            u = torch.rand(t.shape, generator=generator, device=device, dtype=torch.float64)
            r[where] = break_ties(r[where], t, u)
        k = rank.n_members + 1
        *lead, h, w = r.shape  # (B, L, C, h, w)
        n = r.numel() // (h * w)
        sums = {}
        zonal = bool((rank.weights == rank.weights[..., :1]).all() and (rank.uniform_weights == rank.uniform_weights[..., :1]).all())
        if zonal:
            rows = (torch.arange(n * h, device=device) * k).reshape(n, h, 1)
            counts = torch.bincount((rows + r.reshape(n, h, w)).reshape(-1), minlength=n * h * k).reshape(n, h, k).to(rank.compute_dtype)
            for name, weights in (("latweighted", rank.weights), ("unweighted", rank.uniform_weights)):
                sums[name] = torch.einsum("nhk,rh->nrk", counts, weights[..., 0]).reshape(*lead, -1, k)  # (B, L, C, R, K)
        else:
            # one-hot (n, k, points) x weights (points, 2R) -> (n, k, 2R): one GEMM instead of a weighted bincount per region
            bins = torch.arange(k, device=device, dtype=r.dtype).view(1, k, 1)
            dtype = rank.compute_dtype  # summed in the metric's dtype, as spatial_mean: the same whatever the block's shape
            both = torch.cat([rank.weights, rank.uniform_weights]).reshape(-1, h * w).T.to(dtype)  # (points, 2R)
            flat, step = r.reshape(n, 1, h * w), max(1, (1 << 22) // (k * h * w))  # one-hot chunks of <= 4 M entries
            per = torch.cat([torch.matmul((flat[i : i + step] == bins).to(dtype), both) for i in range(0, n, step)])
            nreg = rank.weights.shape[0]
            for i, name in enumerate(("latweighted", "unweighted")):
                sums[name] = per[..., i * nreg : (i + 1) * nreg].transpose(1, 2).reshape(*lead, nreg, k)
        for out in sums.values():
            rank.reduce_tiles(out)
        rank.update_from_means(**sums)

    def deterministic(
        self,
        pred: Tensor,
        target: Tensor,
        scores: DeterministicScores,
        acc: ACC | None = None,
        climatology: Tensor | None = None,
        activity: PredictionActivity | None = None,
    ) -> bool:
        """``scores.update(pred, target)``, ``acc.update(pred, target, climatology)`` and ``activity.update(pred,
        climatology)`` in one pass.

        Returns whether the inputs were all finite (from the spatial means of e^2 [and f'^2, o'^2]).
        """
        anomalies = [m for m in (acc, activity) if m is not None]
        self._validate([scores, *anomalies], pred, target, ensemble=False)
        for m in anomalies:
            if climatology is None or climatology.shape != target.shape:
                raise ValueError(
                    f"{type(m).__name__}: climatology {None if climatology is None else tuple(climatology.shape)} "
                    f"and target {tuple(target.shape)} differ"
                )
            if m.compute_dtype != scores.compute_dtype or not torch.equal(m.weights, scores.weights):
                raise ValueError(f"fused deterministic update: {type(m).__name__} and the scores differ in dtype or regions")
        clim = climatology.reshape(-1) if anomalies and climatology is not None else None
        dtype = self.work_dtype or scores.compute_dtype
        flat = self._run("deterministic", deterministic_kernel, pred.device, pred.reshape(-1), target.reshape(-1), clim, dtype)
        sm = scores.spatial_mean(flat.reshape(flat.shape[0], *target.shape))  # (K, B, L, C, R)
        finite = bool(torch.isfinite(sm[[0, 4, 5]] if anomalies else sm[0]).all())
        scores.update_from_means(se=sm[0], err=sm[1], ae=sm[2])
        if acc is not None:
            acc.update_from_means(fo=sm[3], ff=sm[4], oo=sm[5])
        if activity is not None:
            activity.update_from_means(ff=sm[4])
        return finite

    def wind_vector(self, metric: Any, fu: Tensor, fv: Tensor, ou: Tensor, ov: Tensor) -> None:
        """``WindVectorScores.update(fu, fv, ou, ov)`` with the squared error summed in the work dtype."""
        self._validate([metric], fu, ou, ensemble=False)
        dtype = self.work_dtype or metric.compute_dtype
        du, dv = fu.to(dtype) - ou.to(dtype), fv.to(dtype) - ov.to(dtype)
        metric.update_from_means(se=metric.spatial_mean(du * du + dv * dv))
