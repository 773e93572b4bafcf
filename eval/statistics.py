"""Statistics over initialisation times: bootstrap confidence intervals and paired significance (plain numpy).

A score of a forecast is an average over its initialisation times ("inits") of per-init values (``per_init.csv``,
the ``*_temporal`` evals): ``mse``, ``bias``, ``mae``, ``acc``, ``crps``, ... are means of the per-init values,
``rmse``, ``ensemble_mean_rmse`` and ``ensemble_spread`` the square roots of the means of their squares
(:data:`RMS_METRICS`). Ratios (spread-skill ratios) and ``debiased_ensemble_mean_rmse`` are not a function of one
per-init mean and get no interval (:func:`aggregation` says None).

Nearby inits are correlated (a weather regime lasts days), so resampling them independently (the IID bootstrap)
makes intervals too narrow. The **stationary bootstrap** (Politis & Romano 1994) resamples blocks of consecutive
inits (wrapping around at the end) whose lengths are geometric with mean ``block_length``. The block length is
chosen automatically per series by the rule of Politis & White (2004) with the correction of Patton, Politis &
White (2009) — the rule WeatherBench-X uses (through ``arch``) — computed here from the series' autocorrelations
(:func:`optimal_block_length`), at least 1 and at most ``min(3 sqrt(n), n / 3)``, rounded to two significant
digits; or fixed by the caller. It needs at least 8 inits; with fewer the automatic rule is refused and the caller
must give a block length (or use the IID bootstrap).

Intervals are percentile intervals of ``n_boot`` resampled scores. Paired significance of the difference of two
forecasts scored on the same inits: the paired bootstrap (both forecasts resampled with the same inits, the
difference of their scores recomputed; two-sided p-value by inverting the percentile interval,
``2 min(P*(D <= 0), P*(D >= 0))``), and a t-test on the per-init differences of the averaged quantity (MSE for
RMSE) with the AR(1) effective sample size ``n_eff = n (1 - r1) / (1 + r1)`` (r1 the lag-1 autocorrelation of the
differences; ``n_eff`` kept within [2, n]), standard error ``s / sqrt(n_eff)``, ``n_eff - 1`` degrees of freedom.
WeatherBench-X's t-test inflates the standard error by an AR(2) factor (Geer 2016) and keeps ``n - 1`` degrees of
freedom; the AR(1) rule here is the textbook one (Wilks, *Statistical Methods in the Atmospheric Sciences*).

Random draws (so that another implementation can repeat them, as the tests do): ``rng = numpy.random.default_rng(
[seed, key])`` with ``key = 0`` for the IID bootstrap and ``round(1000 * block_length)`` for the stationary one;
IID: ``rng.integers(0, n, size=(n_boot, n))``; stationary: ``starts = rng.integers(0, n, size=(n_boot, n))`` then
``new = rng.random((n_boot, n)) < 1 / block_length`` (column 0 always starts a block); a position that starts a block
takes its ``starts`` index, any other the previous position's index plus one (mod n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import stdtr  # the t distribution's CDF

#: scores that are the square root of the mean of the squared per-init values
RMS_METRICS = frozenset({"rmse", "ensemble_mean_rmse", "ensemble_spread"})
#: the fewest inits a bootstrap interval or test is made with; the automatic block length needs MIN_INITS_AUTO
MIN_INITS = 2
MIN_INITS_AUTO = 8
CONFIDENCE = 0.95
N_BOOT = 1000


class TooFewInits(ValueError):
    """Fewer initialisation times than a bootstrap needs."""


def aggregation(metric: str) -> str | None:
    """How a score is made of its per-init values: ``"mean"``, ``"rms"``, or None (a ratio: no interval)."""
    if "ratio" in metric or metric == "debiased_ensemble_mean_rmse":
        return None
    return "rms" if metric in RMS_METRICS else "mean"


# ---------------------------------------------------------------------------------------------- resampling


def _rng(seed: int, block_length: float | None) -> np.random.Generator:
    return np.random.default_rng([int(seed), 0 if block_length is None else int(round(1000 * block_length))])


def resample_indices(n: int, n_boot: int, block_length: float | None = None, seed: int = 0) -> np.ndarray:
    """``(n_boot, n)`` indices of resampled inits: IID (``block_length`` None) or the stationary bootstrap."""
    if n < 1:
        raise TooFewInits("no initialisation times to resample")
    rng = _rng(seed, block_length)
    if block_length is None:
        return rng.integers(0, n, size=(n_boot, n))
    if not block_length >= 1:
        raise ValueError(f"block_length must be at least 1, got {block_length}")
    starts = rng.integers(0, n, size=(n_boot, n))
    new = rng.random((n_boot, n)) < 1.0 / block_length
    new[:, 0] = True
    pos = np.arange(n)
    # the position at which each position's block began: a running maximum of the block starts
    began = np.maximum.accumulate(np.where(new, pos, 0), axis=1)
    return (np.take_along_axis(starts, began, axis=1) + (pos - began)) % n


def resample_counts(n: int, n_boot: int, block_length: float | None = None, seed: int = 0) -> np.ndarray:
    """``(n_boot, n)`` how often each init occurs in each resample (float64: resampled means are a matrix product)."""
    idx = resample_indices(n, n_boot, block_length, seed)
    flat = (idx + n * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n * n_boot).reshape(n_boot, n).astype(np.float64)


# ---------------------------------------------------------------------------------------------- block length


def _autocorrelations(x: np.ndarray, max_lag: int) -> np.ndarray:
    """``(R, max_lag + 1)`` sample autocorrelations (biased autocovariance / variance) of the rows of ``x``."""
    d = x - x.mean(axis=1, keepdims=True)
    n = x.shape[1]
    acov = np.stack([(d[:, : n - k] * d[:, k:]).sum(axis=1) / n for k in range(max_lag + 1)], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(acov[:, :1] > 0, acov / acov[:, :1], 0.0), acov


def _flat_top(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(b, g)`` of each row of ``x`` ``(R, n)``: Politis & White's stationary-bootstrap block length (unrounded)
    and the flat-top estimate ``g`` of the long-run variance ``sum_k R(k)`` (n times the variance of the mean)."""
    n = x.shape[1]
    k_n = max(5, int(math.ceil(math.sqrt(math.log10(n)))))
    m_max = int(math.ceil(math.sqrt(n))) + k_n
    max_lag = min(n - 1, m_max + k_n)
    rho, acov = _autocorrelations(x, max_lag)
    crit = 2.0 * math.sqrt(math.log10(n) / n)
    small = np.abs(rho[:, 1:]) < crit  # small[:, j]: lag j + 1 insignificant
    m_hat = np.full(x.shape[0], m_max, dtype=np.int64)
    for m in range(m_max, -1, -1):  # the smallest m whose next k_n lags are all small wins
        run = small[:, m : m + k_n]
        if run.shape[1] == k_n:  # short series: lags beyond n - 1 count as significant
            m_hat = np.where(run.all(axis=1), m, m_hat)
    big_m = np.minimum(np.minimum(2 * np.maximum(m_hat, 1), m_max), max_lag)
    b_max = math.ceil(min(3.0 * math.sqrt(n), n / 3.0))
    b, g = np.ones(x.shape[0]), acov[:, 0].copy()
    for r in range(x.shape[0]):
        mm = int(big_m[r])
        k = np.arange(1, mm + 1)
        t = k / mm
        w = np.where(t <= 0.5, 1.0, 2.0 * (1.0 - t))
        g[r] = acov[r, 0] + 2.0 * (w * acov[r, 1 : mm + 1]).sum()
        big_g = 2.0 * (w * k * acov[r, 1 : mm + 1]).sum()
        if g[r] > 0 and acov[r, 0] > 0:
            b[r] = min(max((2.0 * big_g**2 / (2.0 * g[r] ** 2)) ** (1.0 / 3.0) * n ** (1.0 / 3.0), 1.0), b_max)
    return b, g


def optimal_block_length(x: np.ndarray) -> np.ndarray:
    """Mean block length of the stationary bootstrap for each row of ``x`` ``(R, n)`` (or one series ``(n,)``):
    Politis & White (2004), corrected by Patton, Politis & White (2009), rounded to one significant digit.

    The lag ``M`` of the flat-top window: ``2 m``, where ``m`` is the smallest lag after which ``K = max(5,
    sqrt(log10 n))`` autocorrelations in a row are below ``2 sqrt(log10 n / n)``, at most ``sqrt(n) + K``. Then
    ``G = sum_k w(k/M) |k| R(k)``, ``g = sum_k w(k/M) R(k)`` (k from -M to M, ``w`` the flat-top window: 1 up to
    1/2, then ``2 (1 - |t|)``), ``b = (2 G^2 / (2 g^2))^(1/3) n^(1/3)``, within [1, min(3 sqrt(n), n / 3)]."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    if x.shape[1] < MIN_INITS_AUTO:
        raise TooFewInits(f"the automatic block length needs at least {MIN_INITS_AUTO} initialisation times, got {x.shape[1]}")
    b, _ = _flat_top(x)
    return _round1(b)


def _round1(b: np.ndarray) -> np.ndarray:
    """One significant digit (1, 2, ..., 9, 10, 20, ...): few distinct block lengths, few index matrices to draw."""
    return np.array([float(f"{v:.1g}") for v in np.atleast_1d(b)])


def stationary_variance(x: np.ndarray, block_length: np.ndarray) -> np.ndarray:
    """The stationary bootstrap's variance of the resampled mean, times n, for each row of ``x`` ``(R, n)``
    (its expectation over the resampling; Politis & Romano 1994, Lemma 1): ``c(0) + 2 sum_k b(k) c(k)``,
    ``b(k) = (1 - k/n) q^k + (k/n) q^(n-k)``, ``q = 1 - 1/block_length``, ``c`` the sample autocovariances."""
    x = np.atleast_2d(x)
    n = x.shape[1]
    d = x - x.mean(axis=1, keepdims=True)
    f = np.fft.rfft(d, 2 * n, axis=1)
    acov = np.fft.irfft(f * np.conj(f), 2 * n, axis=1)[:, :n] / n
    k = np.arange(1, n)
    q = 1.0 - 1.0 / np.asarray(block_length, dtype=np.float64)[:, None]
    w = (1 - k / n) * q**k + (k / n) * q ** (n - k)
    return acov[:, 0] + 2.0 * (w * acov[:, 1:]).sum(axis=1)


def variance_correction(x: np.ndarray, block_length: np.ndarray) -> np.ndarray:
    """Factor (at least 1) by which the stationary bootstrap's spread around the estimate is widened, per row of
    ``x`` ``(R, n)``: ``sqrt(g / v)``, ``g`` the larger of two long-run variance estimates, the flat-top one of
    :func:`optimal_block_length` and the AR(1) one ``c(0) (1 + r1) / (1 - r1)`` (that of the t-test), ``v``
    the bootstrap's own (:func:`stationary_variance`). Without it the block bootstrap's variance of a mean is low by
    about ``G / (g b) + 2 b / n`` (short blocks cut correlations; long blocks of a demeaned series wrap around),
    ~17 % for AR(1) 0.5 at n = 365 whatever the block length: its 95 % intervals cover ~90 %."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    if x.shape[1] < MIN_INITS_AUTO:
        return np.ones(x.shape[0])
    _, g = _flat_top(x)
    rho, acov = _autocorrelations(x, 1)
    r1 = np.clip(rho[:, 1], -0.99, 0.99)
    g = np.maximum(g, acov[:, 0] * (1 + r1) / (1 - r1))  # the t-test's n_eff, as a variance: the larger one wins
    v = stationary_variance(x, block_length)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((v > 0) & (g > v), np.sqrt(g / v), 1.0)


# ---------------------------------------------------------------------------------------------- intervals


def _resampled(values: np.ndarray, counts: np.ndarray, how: str) -> np.ndarray:
    """``(R, n_boot)`` scores of the resamples; NaN per-init values drop out of their means."""
    valid = np.isfinite(values)
    x = np.where(valid, values, 0.0)
    if how == "rms":
        x = x * x
    with np.errstate(invalid="ignore", divide="ignore"):
        m = (x @ counts.T) / (valid.astype(np.float64) @ counts.T)
    return np.sqrt(m) if how == "rms" else m


def point_estimate(values: np.ndarray, how: str) -> np.ndarray:
    """The score of ``(R, n)`` per-init values: their mean, or root mean square (NaN values skipped)."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        if how == "rms":
            return np.sqrt(np.nanmean(values * values, axis=-1))
        return np.nanmean(values, axis=-1)


def _averaged(values: np.ndarray, how: str) -> np.ndarray:
    """The per-init quantity whose mean makes the score (squares for RMS scores), NaN filled with the row mean
    (for the autocorrelations)."""
    x = values * values if how == "rms" else values
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(x), x, np.nanmean(x, axis=1, keepdims=True))


@dataclass
class Intervals:
    value: np.ndarray  # (R,) the score
    lower: np.ndarray
    upper: np.ndarray
    block_length: np.ndarray  # (R,) NaN for the IID bootstrap
    widened: np.ndarray  # (R,) the variance correction applied (1: none)


def _groups(block_length: np.ndarray | None, rows: int) -> dict[float | None, np.ndarray]:
    if block_length is None:
        return {None: np.arange(rows)}
    return {float(b): np.flatnonzero(block_length == b) for b in np.unique(block_length)}


def _blocks(x: np.ndarray, method: str, block_length: float | np.ndarray | None) -> np.ndarray | None:
    if method not in ("iid", "stationary"):
        raise ValueError(f"unknown bootstrap method {method!r} (iid or stationary)")
    if method == "iid":
        return None
    if block_length is None:
        return optimal_block_length(x)
    return np.broadcast_to(np.asarray(block_length, dtype=np.float64), (x.shape[0],)).copy()


def bootstrap_intervals(
    values: np.ndarray,
    how: str = "mean",
    *,
    method: str = "stationary",
    block_length: float | np.ndarray | None = None,
    correct: bool = True,
    n_boot: int = N_BOOT,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Intervals:
    """Percentile bootstrap intervals of the score of each row of ``values`` ``(R, n)`` (n inits in time order).

    ``method``: ``"iid"`` or ``"stationary"`` (block length: ``block_length``, one number or one per row, else
    automatic per row, see :func:`optimal_block_length`). ``correct`` (stationary only): widen the resampled
    scores' spread around the estimate by :func:`variance_correction` (on the scale of the mean, before an RMS
    score's square root)."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    n = values.shape[1]
    if n < MIN_INITS:
        raise TooFewInits(f"a bootstrap needs at least {MIN_INITS} initialisation times, got {n}")
    x = _averaged(values, how)
    blocks = _blocks(x, method, block_length)
    widen = variance_correction(x, blocks) if (blocks is not None and correct) else np.ones(values.shape[0])
    lo, hi = np.full(values.shape[0], np.nan), np.full(values.shape[0], np.nan)
    q = [(1 - confidence) / 2, (1 + confidence) / 2]
    centre = point_estimate(values, "mean" if how != "rms" else "rms") ** (2 if how == "rms" else 1)
    for b, rows in _groups(blocks, values.shape[0]).items():
        counts = resample_counts(n, n_boot, b, seed)
        boot = _resampled(values[rows], counts, how)
        if how == "rms":
            boot = boot * boot
        boot = centre[rows, None] + widen[rows, None] * (boot - centre[rows, None])
        if how == "rms":
            boot = np.sqrt(np.maximum(boot, 0.0))
        lo[rows], hi[rows] = np.quantile(boot, q, axis=1)
    return Intervals(point_estimate(values, how), lo, hi, np.full(values.shape[0], np.nan) if blocks is None else blocks, widen)


@dataclass
class Paired:
    difference: np.ndarray  # (R,) score(a) - score(b)
    lower: np.ndarray  # bootstrap interval of the difference
    upper: np.ndarray
    p_bootstrap: np.ndarray
    p_ttest: np.ndarray
    n_eff: np.ndarray
    block_length: np.ndarray


def effective_sample_size(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n_eff, r1)`` of each row of ``d`` ``(R, n)``: ``n (1 - r1) / (1 + r1)`` within [2, n]."""
    d = np.atleast_2d(d)
    n = d.shape[1]
    rho, _ = _autocorrelations(d, 1)
    r1 = rho[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        n_eff = n * (1.0 - r1) / (1.0 + r1)
    return np.clip(np.nan_to_num(n_eff, nan=2.0, posinf=n), 2.0, n), r1


def t_test(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided p-value of mean(d) = 0 per row of ``d`` ``(R, n)``, with the AR(1) effective sample size;
    returns ``(p, n_eff)``. A row of equal values: p = 1 if they are 0, else 0."""
    d = np.atleast_2d(np.asarray(d, dtype=np.float64))
    n_eff, _ = effective_sample_size(d)
    mean, sd = d.mean(axis=1), d.std(axis=1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / (sd / np.sqrt(n_eff))
    p = 2.0 * stdtr(n_eff - 1.0, -np.abs(t))
    p = np.where(sd > 0, p, np.where(mean == 0, 1.0, 0.0))
    return p, n_eff


def bootstrap_p_value(boot: np.ndarray) -> np.ndarray:
    """Two-sided p-value of "the difference is 0" from ``(R, n_boot)`` resampled differences: the percentile
    interval inverted, ``2 min(P*(D <= 0), P*(D >= 0))``, at most 1."""
    le, ge = (boot <= 0).mean(axis=1), (boot >= 0).mean(axis=1)
    return np.minimum(1.0, 2.0 * np.minimum(le, ge))


def paired_test(
    a: np.ndarray,
    b: np.ndarray,
    how: str = "mean",
    *,
    block_length: float | np.ndarray | None = None,
    correct: bool = True,
    n_boot: int = N_BOOT,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Paired:
    """Significance of score(a) - score(b), rows ``(R, n)`` of per-init values of two forecasts on the same inits.

    Paired stationary bootstrap (the same resampled inits for both; block length automatic from the per-init
    differences of the averaged quantity unless given) and the AR(1)-corrected t-test on those differences.
    Inits where either value is NaN are dropped from that row's t-test; the bootstrap skips them in the means."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired values must have the same shape, got {a.shape} and {b.shape}")
    n = a.shape[1]
    if n < MIN_INITS:
        raise TooFewInits(f"a paired test needs at least {MIN_INITS} initialisation times, got {n}")
    both = np.isfinite(a) & np.isfinite(b)
    a, b = np.where(both, a, np.nan), np.where(both, b, np.nan)
    qa, qb = (a * a, b * b) if how == "rms" else (a, b)
    d = qa - qb
    dfill = _averaged(d, "mean")
    blocks = _blocks(dfill, "stationary", block_length)
    widen = variance_correction(dfill, blocks) if correct else np.ones(a.shape[0])
    diff = point_estimate(a, how) - point_estimate(b, how)
    q = [(1 - confidence) / 2, (1 + confidence) / 2]
    lo, hi, pb = (np.full(a.shape[0], np.nan) for _ in range(3))
    for bl, rows in _groups(blocks, a.shape[0]).items():
        counts = resample_counts(n, n_boot, bl, seed)
        boot = _resampled(a[rows], counts, how) - _resampled(b[rows], counts, how)
        boot = diff[rows, None] + widen[rows, None] * (boot - diff[rows, None])
        lo[rows], hi[rows] = np.quantile(boot, q, axis=1)
        pb[rows] = bootstrap_p_value(boot)
    pt, n_eff = np.full(a.shape[0], np.nan), np.full(a.shape[0], np.nan)
    full = both.all(axis=1)
    if full.any():
        pt[full], n_eff[full] = t_test(d[full])
    for r in np.flatnonzero(~full):  # rows with missing inits: their own length
        dr = d[r][both[r]]
        if dr.size >= MIN_INITS:
            p, ne = t_test(dr[None])
            pt[r], n_eff[r] = p[0], ne[0]
    return Paired(diff, lo, hi, pb, pt, n_eff, blocks)
