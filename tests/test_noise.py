"""Tests for the spherical diffusion noise (reference section 2.8) and its random streams.

Grids: the statistical tests run on small equiangular grids, 33x64 (5.6 degrees, ~625 km at the
equator) and 65x128 (2.8 degrees, ~313 km). On these grids the 50-400 km channels are below (or at)
the grid spacing: their fields are essentially white noise up to the truncation, which is fine for
the pointwise std, the AR(1) autocorrelation and independence (these do not depend on resolution),
but the correlation-length test must use the finer 65x128 grid and only compare lengths with L_c
where L_c spans a few grid points.

Statistics are pooled over many streams and draws because the large-scale channels carry few
degrees of freedom per field (the 6400 km channel is ~90% l = 1, i.e. ~4 effective numbers).
"""

from __future__ import annotations

import math

import pytest
import torch

from fcn3_lightning.model.layers import SphericalLayers
from fcn3_lightning.model.noise import NoiseStreams, SphericalDiffusionNoise

REFERENCE_KT = [3.0806e-5, 1.2322e-4, 4.9289e-4, 1.9716e-3, 7.8862e-3, 3.1545e-2, 1.2618e-1, 5.0472e-1]
LENGTHS_KM = [50.0, 100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0, 6400.0]
EARTH_RADIUS_KM = 6370.0


# --------------------------------------------------------------------------------------------
# helpers


def latitudes_deg(nlat: int) -> torch.Tensor:
    """Equiangular grid latitudes, north pole first (torch-harmonics' ordering)."""
    return torch.linspace(90.0, -90.0, nlat, dtype=torch.float64)


def area_weights(nlat: int, nlon: int) -> torch.Tensor:
    """cos(latitude) weights, so the oversampled polar rows do not dominate pooled statistics."""
    return torch.cos(torch.deg2rad(latitudes_deg(nlat))).clamp_min(0.0).view(nlat, 1).expand(nlat, nlon)


def stationary_fields(noise: SphericalDiffusionNoise, streams: NoiseStreams, n_draws: int = 1) -> torch.Tensor:
    """(n_draws * n_streams, C, nlat, nlon) float64 fields of fresh stationary draws."""
    with torch.no_grad():
        fields = [noise.to_grid(noise.stationary(streams)) for _ in range(n_draws)]
    return torch.cat(fields).double()


def pooled_corr(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-channel correlation of zero-mean fields a, b (..., C, H, W), pooled over leading dims and points."""
    dims = [d for d in range(a.dim()) if d != a.dim() - 3]
    return (w * a * b).sum(dims) / torch.sqrt((w * a * a).sum(dims) * (w * b * b).sum(dims))


def expected_variance_by_latitude(noise: SphericalDiffusionNoise) -> torch.Tensor:
    """Exact pointwise variance of the stationary field, (C, nlat), from the spec's spectrum.

    The field is linear in the 2 * lmax * mmax real coefficients, each N(0, s_l^2) with
    s_l = sigma_l / sqrt(1 - phi^2). Its variance at (theta, lambda = 0) is sum s_l^2 B_lm(theta, 0)^2
    where B_lm is the field of a unit real coefficient (the unit imaginary coefficient's field
    vanishes at lambda = 0, and the variance does not depend on longitude). B_lm is obtained by
    pushing unit coefficients through the module's own iSHT, so the expectation includes exactly
    what the iSHT keeps and drops (m > l, the imaginary part of m = 0 and of the Nyquist order).
    """
    lmax, mmax = noise.lmax, noise.mmax
    unit = torch.zeros(lmax * mmax, lmax, mmax, dtype=torch.complex64)
    unit.view(lmax * mmax, -1)[torch.arange(lmax * mmax), torch.arange(lmax * mmax)] = 1.0
    with torch.no_grad():
        basis = noise.isht(unit)[..., 0].double().view(lmax, mmax, -1)  # (l, m, nlat) at lambda = 0
    s2 = spec_sigma_l(noise.kT, lmax, sigma=noise.sigma, phi=noise.phi) ** 2 / (1 - noise.phi**2)  # (C, lmax)
    return torch.einsum("cl,lmk->ck", s2, basis**2)


def spec_sigma_l(kT: tuple[float, ...] | list[float], lmax: int, *, sigma: float = 1.0, phi: float = math.exp(-1.0)) -> torch.Tensor:
    """The reference formula, written out independently of the module, in float64: (C, lmax)."""
    ell = torch.arange(lmax, dtype=torch.float64)
    out = []
    for k in kT:
        f0norm = sum((2 * deg + 1) * math.exp(-k * deg * (deg + 1)) for deg in range(1, lmax))
        s = math.sqrt(4 * math.pi) * sigma * math.sqrt(0.5 * (1 - phi**2) / f0norm) * torch.exp(-0.5 * k * ell * (ell + 1))
        s[0] = 0.0
        out.append(s)
    return torch.stack(out)


# --------------------------------------------------------------------------------------------
# construction and spectrum


def test_reference_kT_and_default_length_scales() -> None:
    noise = SphericalDiffusionNoise((33, 64))
    assert noise.length_scales_km == tuple(LENGTHS_KM)
    # The config lists kT to 5 significant digits (its 800 km entry, 7.8862e-3, is 0.77 of a unit in
    # the last digit below 0.5 (800 / 6370)^2 = 7.88626e-3), so compare to a relative 5e-5.
    assert noise.kT == pytest.approx(REFERENCE_KT, rel=5e-5)
    assert noise.phi == pytest.approx(math.exp(-1.0))


def test_lmax_defaults_to_nlat_clipped_by_nlon() -> None:
    assert (SphericalDiffusionNoise((33, 64)).lmax, SphericalDiffusionNoise((33, 64)).mmax) == (33, 33)
    # lmax = mmax = nlat is clipped to the longitude Nyquist limit nlon // 2 + 1.
    narrow = SphericalDiffusionNoise((33, 32))
    assert (narrow.lmax, narrow.mmax) == (17, 17)
    assert SphericalDiffusionNoise((33, 64), lmax=10).state_shape == (8, 10, 10)


def test_sigma_l_buffer_matches_reference_formula() -> None:
    noise = SphericalDiffusionNoise((33, 64), sigma=1.3, lambd=0.7)
    expected = spec_sigma_l(noise.kT, noise.lmax, sigma=1.3, phi=math.exp(-0.7))
    assert noise.sigma_l.shape == (8, 33, 1) and noise.sigma_l.dtype == torch.float32
    # atol only for the entries that underflow float32 (exp(-0.5 kT l (l + 1)) < 1e-38 at kT = 0.5).
    torch.testing.assert_close(noise.sigma_l[..., 0].double(), expected, rtol=1e-6, atol=1e-40)
    assert torch.all(noise.sigma_l[:, 0] == 0)
    # Derived from the constructor arguments: not checkpointed.
    assert "sigma_l" not in noise.state_dict()


def test_builds_the_isht_through_the_layer_factory() -> None:
    calls = []

    class Recording(SphericalLayers):
        def isht(self, shape, *, lmax, mmax, grid):
            calls.append((tuple(shape), lmax, mmax, grid))
            return super().isht(shape, lmax=lmax, mmax=mmax, grid=grid)

    SphericalDiffusionNoise((33, 64), grid="legendre-gauss", layers=Recording())
    assert calls == [((33, 64), 33, 33, "legendre-gauss")]


# --------------------------------------------------------------------------------------------
# statistics of the fields


def test_pointwise_std_is_one_per_channel() -> None:
    nlat, nlon = 33, 64
    noise = SphericalDiffusionNoise((nlat, nlon))
    fields = stationary_fields(noise, NoiseStreams(11, range(64), 4), n_draws=8)  # 2048 fields
    var_by_lat = (fields**2).mean((0, 3))  # (C, nlat)

    # 1) Acceptance: std 1 +- 0.1 for every channel. Away from the poles: the iSHT drops the
    #    imaginary part of the m = 0 coefficients, so the variance falls to exactly 1/2 at the poles
    #    for every channel and, for the 3200/6400 km channels (power in l = 1, 2), already at
    #    mid-latitudes (std ~0.87 at 45 degrees for 6400 km). The tropics are where "std ~ 1" holds.
    tropics = latitudes_deg(nlat).abs() <= 30.0
    std_tropics = var_by_lat[:, tropics].mean(-1).sqrt()
    print(f"\npointwise std per channel (|lat| <= 30): {[round(v, 3) for v in std_tropics.tolist()]}")
    assert torch.all((std_tropics - 1.0).abs() < 0.1), f"tropical std per channel {std_tropics.tolist()}"

    # 2) Everywhere, including the poles, the variance matches the exact expectation of the spec's
    #    spectrum (this catches a wrong sigma_l, a missing 1/sqrt(1 - phi^2), unequal re/im scaling...).
    expected = expected_variance_by_latitude(noise)
    torch.testing.assert_close(expected[:, 0], torch.full((8,), 0.5, dtype=torch.float64), rtol=1e-4, atol=0.0)
    ratio = var_by_lat / expected
    assert torch.all((ratio - 1.0).abs() < 0.15), f"empirical / expected variance in [{ratio.min():.3f}, {ratio.max():.3f}]"
    # Tighter on the area mean, where sampling noise is ~1.5% even for the 6400 km channel.
    w = area_weights(nlat, nlon)[:, 0]
    mean_ratio = (var_by_lat * w).sum(-1) / (expected * w).sum(-1)
    assert torch.all((mean_ratio - 1.0).abs() < 0.05), f"area-mean empirical / expected variance {mean_ratio.tolist()}"


def test_ar1_lag1_autocorrelation_is_exp_minus_lambda() -> None:
    nlat, nlon = 33, 64
    n_steps = 32
    noise = SphericalDiffusionNoise((nlat, nlon))
    streams = NoiseStreams(5, range(16), 4)
    w = area_weights(nlat, nlon)
    # Running per-channel sums (the trajectory itself would be ~300 MB in float64).
    cross = torch.zeros(8, dtype=torch.float64)
    prev_sq = torch.zeros(8, dtype=torch.float64)
    next_sq = torch.zeros(8, dtype=torch.float64)
    with torch.no_grad():
        state = noise.stationary(streams)
        prev = noise.to_grid(state).double()
        for _ in range(n_steps):
            state = noise.ar1_step(state, streams)
            cur = noise.to_grid(state).double()
            cross += (w * prev * cur).sum((0, 2, 3))
            prev_sq += (w * prev**2).sum((0, 2, 3))
            next_sq += (w * cur**2).sum((0, 2, 3))
            prev = cur
    lag1 = cross / torch.sqrt(prev_sq * next_sq)
    print(f"\nAR(1) lag-1 autocorrelation per channel: {[round(v, 4) for v in lag1.tolist()]} (e^-1 = {math.exp(-1):.4f})")
    assert torch.all((lag1 - math.exp(-1.0)).abs() < 0.05), f"lag-1 autocorrelation per channel {lag1.tolist()}"
    # The AR(1) step keeps the stationary variance (innovation scale consistent with the fresh draw):
    # compare the area-mean variance of the stepped states with the exact stationary expectation.
    expected = (expected_variance_by_latitude(noise) * w[:, 0]).sum(-1) / w[:, 0].sum()
    var_ratio = next_sq / (w.sum() * n_steps * streams.n_streams) / expected
    assert torch.all((var_ratio - 1.0).abs() < 0.1), f"stepped / stationary variance per channel {var_ratio.tolist()}"


def test_correlation_length_grows_with_length_scale() -> None:
    # 65x128: one longitude step at the equator is ~313 km, so 400-1600 km span 1.3-5 grid steps.
    nlat, nlon = 65, 128
    noise = SphericalDiffusionNoise((nlat, nlon))
    fields = stationary_fields(noise, NoiseStreams(3, range(16), 4))  # 64 fields
    eq = nlat // 2
    band = fields[:, :, eq - 2 : eq + 3]  # 5 rows within 6 degrees of the equator, nearly isotropic there
    dx_km = 2 * math.pi * EARTH_RADIUS_KM / nlon
    var = (band**2).mean((0, 2, 3))
    lags = range(nlon // 2)
    corr = torch.stack([(band * band.roll(k, -1)).mean((0, 2, 3)) / var for k in lags], -1)  # (C, lag)

    # Distance at which the correlation drops to exp(-1/2), linearly interpolated. For the heat-kernel
    # spectrum exp(-kT l (l + 1)) with kT = 0.5 (L / R)^2 the correlation is ~exp(-d^2 / (2 L^2)) at
    # small angles, so this distance estimates L itself.
    target = math.exp(-0.5)
    lengths = []
    for c in range(8):
        k = int(torch.nonzero(corr[c] < target)[0])
        lengths.append((k - 1 + (corr[c, k - 1] - target) / (corr[c, k - 1] - corr[c, k])).item() * dx_km)

    # Correlation one grid step apart increases strictly with L, for every channel: even the
    # sub-grid channels differ through the decay of their spectra within the truncation.
    lag1 = corr[:, 1]
    print(
        f"\nneighbour correlation per channel: {[round(v, 3) for v in lag1.tolist()]}; e^-1/2 lengths (km): {[round(v) for v in lengths]}"
    )
    assert torch.all(lag1[1:] > lag1[:-1]), f"lag-1 correlations {lag1.tolist()}"
    # The e-folding length grows with L once L reaches ~2/3 of the grid spacing; below that it is
    # pinned at the truncation floor (~150 km here for both 50 and 100 km).
    assert all(b > a for a, b in zip(lengths[2:], lengths[3:], strict=False)), f"correlation lengths {lengths}"
    assert lengths[0] < dx_km and lengths[1] < dx_km
    # Where the small-angle Gaussian form holds and L spans >1 grid step it recovers L. (At 3200 and
    # 6400 km the sphere's curvature and the zeroed l = 0 mode shorten it to ~2900 and ~4900 km.)
    for c in (3, 4, 5):
        assert abs(lengths[c] / LENGTHS_KM[c] - 1) < 0.15, f"channel {c}: {lengths[c]:.0f} km vs L = {LENGTHS_KM[c]:.0f} km"


def test_different_members_and_samples_are_uncorrelated() -> None:
    nlat, nlon = 33, 64
    n_samples, n_members, n_draws = 16, 4, 64
    noise = SphericalDiffusionNoise((nlat, nlon))
    streams = NoiseStreams(2024, range(n_samples), n_members)
    w = area_weights(nlat, nlon).reshape(-1)
    # Gram matrix over streams per channel, accumulated over draws: G[c, a, b] = sum w f_a f_b.
    gram = torch.zeros(8, streams.n_streams, streams.n_streams, dtype=torch.float64)
    for _ in range(n_draws):
        f = stationary_fields(noise, streams).permute(1, 0, 2, 3).reshape(8, streams.n_streams, -1)  # (C, N, HW)
        gram += (f * w) @ f.transpose(1, 2)
    gram = gram.view(8, n_samples, n_members, n_samples, n_members)

    def corr(pairs: list[tuple[int, int, int, int]]) -> torch.Tensor:
        """Per-channel correlation pooled over the listed (sample_a, member_a, sample_b, member_b) pairs."""
        sa, ma, sb, mb = (torch.tensor(x) for x in zip(*pairs, strict=True))
        cross = gram[:, sa, ma, sb, mb].sum(-1)
        return cross / torch.sqrt(gram[:, sa, ma, sa, ma].sum(-1) * gram[:, sb, mb, sb, mb].sum(-1))

    samples = range(n_samples)
    # Same sample, different members: one statistic per member pair, pooled over samples and draws.
    r_members = [corr([(s, i, s, j) for s in samples]) for i in range(n_members) for j in range(i + 1, n_members)]
    # Different samples, same member: one per sample offset, pooled over samples, members and draws.
    r_samples = [corr([(s, m, (s + d) % n_samples, m) for s in samples for m in range(n_members)]) for d in range(1, n_samples)]
    # Different sample and member, both diagonals (naive "seed + sample + member" schemes collide on
    # (s, m + 1) vs (s + 1, m)).
    members = range(n_members)
    r_cross = [
        corr([(s, m, (s + 1) % n_samples, (m + 1) % n_members) for s in samples for m in members]),
        corr([(s, (m + 1) % n_members, (s + 1) % n_samples, m) for s in samples for m in members]),
    ]
    r = torch.stack(r_members + r_samples + r_cross)
    print(f"\nmax |r| between streams: {r.abs().max():.4f} (members {torch.stack(r_members).abs().max():.4f})")
    assert r.abs().max() < 0.05, f"max |r| = {r.abs().max():.4f} (members {torch.stack(r_members).abs().max():.4f})"
    # Sanity check of the statistic itself: a stream is perfectly correlated with itself.
    torch.testing.assert_close(corr([(0, 0, 0, 0)]), torch.ones(8, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# reproducibility of the streams


def test_same_seed_same_fields_different_seed_different_fields() -> None:
    noise = SphericalDiffusionNoise((33, 64))
    a = noise.to_grid(noise.stationary(NoiseStreams(7, [3, 9], 2)))
    b = noise.to_grid(noise.stationary(NoiseStreams(7, [3, 9], 2)))
    c = noise.to_grid(noise.stationary(NoiseStreams(8, [3, 9], 2)))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # And so on along an AR(1) trajectory.
    sa, sb = NoiseStreams(7, [3], 2), NoiseStreams(7, [3], 2)
    xa, xb = noise.stationary(sa), noise.stationary(sb)
    for _ in range(3):
        xa, xb = noise.ar1_step(xa, sa), noise.ar1_step(xb, sb)
    assert torch.equal(xa, xb)


def test_stream_depends_only_on_seed_sample_and_member() -> None:
    noise = SphericalDiffusionNoise((33, 64))
    alone = noise.stationary(NoiseStreams(7, [9], 3))
    batched = noise.stationary(NoiseStreams(7, [2, 9, 4], 3))
    # Sample-major, member-minor: sample 9 is the second sample -> streams 3, 4, 5.
    assert torch.equal(batched[3:6], alone)
    assert NoiseStreams(7, [2, 9, 4], 3).n_streams == 9
    # Different members of one sample differ.
    assert not torch.allclose(alone[0], alone[1])


def test_normal_returns_float32_on_the_requested_device() -> None:
    streams = NoiseStreams(1, [0, 1], 3)
    x = streams.normal((4, 5), device="cpu")
    assert x.shape == (6, 4, 5) and x.dtype == torch.float32 and x.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_fields_on_cuda_as_on_cpu() -> None:
    cpu = SphericalDiffusionNoise((33, 64))
    gpu = SphericalDiffusionNoise((33, 64)).cuda()
    s_cpu = cpu.stationary(NoiseStreams(7, [3], 2))
    s_gpu = gpu.stationary(NoiseStreams(7, [3], 2))
    assert s_gpu.is_cuda
    torch.testing.assert_close(s_gpu.cpu(), s_cpu)
    torch.testing.assert_close(gpu.to_grid(s_gpu).cpu(), cpu.to_grid(s_cpu), rtol=1e-4, atol=1e-5)


def test_antithetic_pairs_are_exact_negatives() -> None:
    noise = SphericalDiffusionNoise((33, 64))
    streams = NoiseStreams(7, [0, 5], 4, antithetic=True)
    state = noise.stationary(streams)
    for _ in range(2):  # pairs stay in lock-step along the AR(1) trajectory
        state = noise.ar1_step(state, streams)
    fields = noise.to_grid(state).view(2, 4, 8, 33, 64)
    assert torch.equal(fields[:, 1], -fields[:, 0])
    assert torch.equal(fields[:, 3], -fields[:, 2])
    assert not torch.allclose(fields[:, 0], fields[:, 2])  # different pairs differ
    assert not torch.allclose(fields[0], fields[1])  # different samples differ
    # The pair's odd member is the plain stream of key k = member // 2; the even one negates it (reference rule).
    plain = NoiseStreams(7, [0, 5], 2).normal((3,))
    anti = NoiseStreams(7, [0, 5], 4, antithetic=True).normal((3,))
    assert torch.equal(anti[[1, 3, 5, 7]], plain)
    assert torch.equal(anti[[0, 2, 4, 6]], -plain)


# --------------------------------------------------------------------------------------------
# precision and errors


def test_to_grid_is_float32_under_autocast() -> None:
    noise = SphericalDiffusionNoise((33, 64))
    state = noise.stationary(NoiseStreams(0, [0], 1))
    plain = noise.to_grid(state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = noise.to_grid(state)
    assert plain.shape == (1, 8, 33, 64)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"img_shape": (33,)}, ValueError, "two ints"),
        ({"img_shape": (33.0, 64)}, ValueError, "two ints"),
        ({"img_shape": (33, 64), "n_channels": 4}, ValueError, r"n_channels=4.*len\(length_scales_km\)=8"),
        ({"img_shape": (33, 64), "n_channels": 2, "length_scales_km": [100.0, 200.0, 400.0]}, ValueError, "n_channels=2"),
        ({"img_shape": (33, 64), "length_scales_km": [0.0] * 8}, ValueError, "positive"),
        ({"img_shape": (33, 64), "lambd": 0.0}, ValueError, "lambd"),
        ({"img_shape": (33, 64), "grid": "healpix"}, ValueError, "unknown grid"),
        ({"img_shape": (33, 64), "lmax": 1}, ValueError, "lmax"),
    ],
)
def test_noise_rejects_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    kwargs = dict(kwargs)
    img_shape = kwargs.pop("img_shape")
    if "n_channels" in kwargs and "length_scales_km" not in kwargs:
        kwargs["length_scales_km"] = LENGTHS_KM
    with pytest.raises(error, match=match):
        SphericalDiffusionNoise(img_shape, **kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((0, [0], 0), {}, ValueError, "n_members must be >= 1"),
        ((0, [0], -1), {}, ValueError, "non-negative"),
        ((0, [], 2), {}, ValueError, "at least one sample"),
        ((0, [1, 1], 2), {}, ValueError, "distinct"),
        ((0, [0], 3), {"antithetic": True}, ValueError, "even"),
        ((-1, [0], 2), {}, ValueError, "seed"),
        ((0, [0.5], 2), {}, TypeError, "sample id"),
    ],
)
def test_streams_reject_bad_arguments(args: tuple, kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        NoiseStreams(*args, **kwargs)


def test_ar1_step_rejects_mismatched_state() -> None:
    noise = SphericalDiffusionNoise((33, 64))
    state = noise.stationary(NoiseStreams(0, [0, 1], 2))
    with pytest.raises(ValueError, match="expected"):
        noise.ar1_step(state, NoiseStreams(0, [0], 2))
    with pytest.raises(ValueError, match="expected"):
        noise.to_grid(state[:, :4])


def test_member_offset_gives_the_global_members_streams() -> None:
    # ensemble parallelism: a rank holding members 2..3 draws exactly their streams of the whole ensemble
    whole = NoiseStreams(7, [3, 9], 4).normal((5,)).view(2, 4, 5)
    shard = NoiseStreams(7, [3, 9], 2, member_offset=2).normal((5,)).view(2, 2, 5)
    torch.testing.assert_close(shard, whole[:, 2:], rtol=0, atol=0)
    # antithetic pairing is by global id: a pair split over two ranks still mirrors
    anti = NoiseStreams(7, [3], 4, antithetic=True).normal((5,))
    split = [NoiseStreams(7, [3], 1, antithetic=True, member_offset=k).normal((5,)) for k in (1, 2)]
    torch.testing.assert_close(torch.cat(split), anti[1:3], rtol=0, atol=0)
    assert "member_offset=2" in repr(NoiseStreams(7, [3], 2, member_offset=2))
