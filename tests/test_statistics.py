"""Bootstrap intervals and paired significance over initialisation times (fcn3_lightning.eval.statistics)."""

from __future__ import annotations

import numpy as np
import pytest
from fcn3_lightning.eval import statistics as st


def _ar1(rng: np.random.Generator, rows: int, n: int, phi: float) -> np.ndarray:
    e = rng.standard_normal((rows, n))
    x = np.empty((rows, n))
    x[:, 0] = e[:, 0] / np.sqrt(1 - phi**2)  # stationary from the first init
    for t in range(1, n):
        x[:, t] = phi * x[:, t - 1] + e[:, t]
    return x


def _reference_indices(n: int, n_boot: int, block_length: float | None, seed: int) -> np.ndarray:
    """The resampling as the module's docstring describes it, written out with loops."""
    rng = np.random.default_rng([seed, 0 if block_length is None else int(round(1000 * block_length))])
    if block_length is None:
        return rng.integers(0, n, size=(n_boot, n))
    starts = rng.integers(0, n, size=(n_boot, n))
    u = rng.random((n_boot, n))
    out = np.empty((n_boot, n), dtype=np.int64)
    for b in range(n_boot):
        for t in range(n):
            out[b, t] = starts[b, t] if (t == 0 or u[b, t] < 1.0 / block_length) else (out[b, t - 1] + 1) % n
    return out


@pytest.mark.parametrize("block_length", [None, 3.0, 7.5])
@pytest.mark.parametrize("how", ["mean", "rms"])
def test_intervals_equal_an_independent_resampling(block_length: float | None, how: str) -> None:
    rng = np.random.default_rng(3)
    values = np.abs(_ar1(rng, 5, 40, 0.5)) + 1.0
    n_boot, seed = 300, 11
    got = st.bootstrap_intervals(
        values,
        how,
        method="iid" if block_length is None else "stationary",
        block_length=block_length,
        correct=False,
        n_boot=n_boot,
        seed=seed,
    )
    idx = _reference_indices(40, n_boot, block_length, seed)
    for r in range(values.shape[0]):
        boot = np.array([values[r, i].mean() if how == "mean" else np.sqrt((values[r, i] ** 2).mean()) for i in idx])
        lo, hi = np.percentile(boot, [2.5, 97.5])
        assert abs(got.lower[r] - lo) <= 1e-12 * abs(lo) and abs(got.upper[r] - hi) <= 1e-12 * abs(hi)
        point = values[r].mean() if how == "mean" else np.sqrt((values[r] ** 2).mean())
        assert abs(got.value[r] - point) <= 1e-12 * point


def test_paired_bootstrap_equals_an_independent_resampling() -> None:
    rng = np.random.default_rng(4)
    a, b = np.abs(_ar1(rng, 3, 30, 0.5)) + 1, np.abs(_ar1(rng, 3, 30, 0.5)) + 1
    got = st.paired_test(a, b, "rms", block_length=4.0, correct=False, n_boot=400, seed=5)
    idx = _reference_indices(30, 400, 4.0, 5)
    for r in range(3):
        d = np.array([np.sqrt((a[r, i] ** 2).mean()) - np.sqrt((b[r, i] ** 2).mean()) for i in idx])
        lo, hi = np.percentile(d, [2.5, 97.5])
        p = min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0)))
        assert abs(got.lower[r] - lo) <= 1e-12 * abs(lo) and abs(got.upper[r] - hi) <= 1e-12 * abs(hi)
        assert got.p_bootstrap[r] == p


def test_stationary_variance_is_the_resampled_variance() -> None:
    """Politis & Romano's formula (used by the variance correction) against the resampling itself."""
    rng = np.random.default_rng(6)
    x = _ar1(rng, 3, 60, 0.6)
    for bl in (1.0, 4.0, 20.0):
        counts = st.resample_counts(60, 40000, bl, seed=1)
        mc = (x @ counts.T / 60).var(axis=1) * 60
        formula = st.stationary_variance(x, np.full(3, bl))
        np.testing.assert_allclose(formula, mc, rtol=0.03)


def test_t_test_without_autocorrelation_is_students() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    d = np.array([0.3, -0.2, 0.5, -0.1, 0.4, 0.0, 0.6, -0.3, 0.2, 0.1])  # lag-1 autocorrelation < 0: n_eff = n
    p, n_eff = st.t_test(d[None])
    assert n_eff[0] == 10
    assert p[0] == pytest.approx(scipy_stats.ttest_1samp(d, 0.0).pvalue, rel=1e-10)


def test_coverage_of_ar1_score_series() -> None:
    """400 series of 365 inits, mean 3, AR(1) 0.5: the block bootstrap's 95 % intervals cover about 95 %,
    the IID bootstrap's fewer (its variance is that of independent inits, 3 times too small)."""
    rng = np.random.default_rng(1)
    x = _ar1(rng, 400, 365, 0.5) + 3.0
    block = st.bootstrap_intervals(x, method="stationary", seed=0)
    iid = st.bootstrap_intervals(x, method="iid", seed=0)
    cover_block = np.mean((block.lower <= 3) & (3 <= block.upper))
    cover_iid = np.mean((iid.lower <= 3) & (3 <= iid.upper))
    print(f"coverage of the 95% intervals, 400 AR(1) 0.5 series of 365 inits: block {cover_block:.4f}, IID {cover_iid:.4f}")
    assert 0.92 <= cover_block <= 0.98
    assert cover_iid < 0.85


def test_paired_test_size_and_power() -> None:
    """Two forecasts with AR(1) 0.5 errors sharing a common part: equally good -> ~5 % rejections; one better by
    half the error's standard deviation -> almost always."""
    rng = np.random.default_rng(2)
    n = 365
    common = _ar1(rng, 400, n, 0.5)
    a = common + 0.7 * _ar1(rng, 400, n, 0.5) + 3.0
    b = common + 0.7 * _ar1(rng, 400, n, 0.5) + 3.0
    null = st.paired_test(a, b, seed=0, n_boot=500)
    alt = st.paired_test(a, b - 0.5, seed=0, n_boot=500)
    rates = {k: float(np.mean(v < 0.05)) for k, v in (("null boot", null.p_bootstrap), ("null t", null.p_ttest))}
    rates |= {k: float(np.mean(v < 0.05)) for k, v in (("better boot", alt.p_bootstrap), ("better t", alt.p_ttest))}
    print("rejections at 5 %:", rates)
    assert 0.02 <= rates["null boot"] <= 0.10 and 0.02 <= rates["null t"] <= 0.10
    assert rates["better boot"] >= 0.95 and rates["better t"] >= 0.95


def test_too_few_inits() -> None:
    with pytest.raises(st.TooFewInits, match="at least 2 initialisation times, got 1"):
        st.bootstrap_intervals(np.ones((3, 1)))
    with pytest.raises(st.TooFewInits, match="automatic block length needs at least 8 initialisation times, got 5"):
        st.bootstrap_intervals(np.arange(10.0).reshape(2, 5))
    with pytest.raises(st.TooFewInits, match="paired test needs at least 2"):
        st.paired_test(np.ones((1, 1)), np.ones((1, 1)))
