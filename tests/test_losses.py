"""Tests of the ensemble CRPS losses (fcn3_lightning.losses)."""

from __future__ import annotations

import math

import pytest
import torch

from fcn3_lightning.channels import FCN3_CHANNELS
from fcn3_lightning.grid import quadrature_weights
from fcn3_lightning.losses import (
    EnsembleCRPSLoss,
    SpectralCRPS,
    channel_weights,
    crps_ensemble,
    spatial_crps,
)

SHAPE = (17, 32)  # small equiangular grid (poles included): SHTs cost milliseconds


def brute_force_crps(pred: torch.Tensor, obs: torch.Tensor, kind: str, alpha: float = 1.0) -> torch.Tensor:
    """O(M^2) reference: members along dim 1, written straight from the definitions."""
    m = pred.shape[1]
    skill = (pred - obs.unsqueeze(1)).abs().mean(1)
    pairs = (pred.unsqueeze(1) - pred.unsqueeze(2)).abs().sum((1, 2))
    if kind == "cdf":
        return skill - pairs / (2 * m * m)
    return skill - 0.5 * (m - 1 + alpha) / (m * m * (m - 1)) * pairs


def _ensemble(m: int, n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(n, m, generator=g, dtype=torch.float64) * 1.5 + 0.3
    obs = torch.randn(n, generator=g, dtype=torch.float64)
    return pred, obs


# ---------------------------------------------------------------------------------------------- pointwise CRPS


# fair CRPS is undefined for one member (an error, see test_bad_inputs)
KIND_M = [("cdf", 1), ("cdf", 2), ("cdf", 5), ("cdf", 16), ("fair", 2), ("fair", 5), ("fair", 16)]


@pytest.mark.parametrize(("kind", "m"), KIND_M)
def test_crps_matches_brute_force(kind: str, m: int) -> None:
    pred, obs = _ensemble(m)
    got = crps_ensemble(pred, obs, member_dim=1, kind=kind)
    torch.testing.assert_close(got, brute_force_crps(pred, obs, kind), rtol=0, atol=1e-12)
    if m == 1:
        torch.testing.assert_close(got, (pred[:, 0] - obs).abs(), rtol=0, atol=0)


@pytest.mark.parametrize(("kind", "m"), KIND_M)
def test_crps_matches_scoringrules(kind: str, m: int) -> None:
    sr = pytest.importorskip("scoringrules")
    pred, obs = _ensemble(m, seed=m)
    got = crps_ensemble(pred, obs, member_dim=1, kind=kind).numpy()
    # "nrg" (energy form) and "int" (integral of the empirical CDF, properscoring's algorithm) are the cdf CRPS;
    # "fair" and "pwm" are the fair one.
    estimators = ("nrg", "int") if kind == "cdf" else ("fair", "pwm")
    for est in estimators:
        ref = sr.crps_ensemble(obs.numpy(), pred.numpy(), m_axis=-1, estimator=est, backend="numpy")
        assert abs(got - ref).max() < 1e-6, (est, abs(got - ref).max())


def test_almost_fair_interpolates() -> None:
    pred, obs = _ensemble(4)
    cdf = crps_ensemble(pred, obs, kind="cdf")
    fair = crps_ensemble(pred, obs, kind="fair", alpha=1.0)
    torch.testing.assert_close(crps_ensemble(pred, obs, kind="fair", alpha=0.0), cdf, rtol=0, atol=1e-12)
    # CRPS_alpha is linear in alpha between the standard (0) and the fair (1) kernel.
    torch.testing.assert_close(crps_ensemble(pred, obs, kind="fair", alpha=0.3), 0.7 * cdf + 0.3 * fair, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        crps_ensemble(pred, obs, kind="skillspread", alpha=0.3), brute_force_crps(pred, obs, "fair", 0.3), rtol=0, atol=1e-12
    )
    assert (fair <= cdf).all()  # the fair kernel subtracts more spread


def test_crps_any_member_dim_and_dtype() -> None:
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(3, 4, 5, 6, generator=g)
    obs = torch.randn(3, 4, 6, generator=g)
    ref = brute_force_crps(pred.movedim(2, 1).double(), obs.double(), "fair")
    torch.testing.assert_close(crps_ensemble(pred, obs, member_dim=2).double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(crps_ensemble(pred, obs, member_dim=-2).double(), ref, rtol=1e-5, atol=1e-6)
    half = crps_ensemble(pred.bfloat16(), obs.bfloat16(), member_dim=2)
    assert half.dtype == torch.bfloat16 and half.shape == obs.shape
    torch.testing.assert_close(half.double(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ["cdf", "fair"])
def test_crps_gradcheck(kind: str) -> None:
    pred, obs = _ensemble(5, n=6, seed=3)  # continuous random draws: no ties between members or with obs
    pred.requires_grad_(True)
    obs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, o: crps_ensemble(p, o, kind=kind, alpha=0.7), (pred, obs))


# ---------------------------------------------------------------------------------------------- spatial CRPS


def test_quadrature_weights() -> None:
    nlat, nlon = 33, 64
    q = quadrature_weights(nlat, nlon)
    assert q.shape == (nlat, 1)
    assert q.expand(nlat, nlon).sum().item() == pytest.approx(1.0, abs=1e-6)
    assert q[0].item() == 0.0 and q[-1].item() == 0.0
    assert torch.equal(q, q.flip(0))
    colat = torch.linspace(0, math.pi, nlat, dtype=torch.float64)
    torch.testing.assert_close(q[:, 0].double(), torch.sin(colat) / (torch.sin(colat).sum() * nlon), rtol=1e-6, atol=1e-9)
    lg = quadrature_weights(16, 32, grid="legendre-gauss")
    assert lg.expand(16, 32).sum().item() == pytest.approx(1.0, abs=1e-6) and (lg > 0).all()


def test_spatial_crps_is_area_weighted_mean() -> None:
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(2, 3, 4, *SHAPE, generator=g, dtype=torch.float64)
    obs = torch.randn(2, 4, *SHAPE, generator=g, dtype=torch.float64)
    q = quadrature_weights(*SHAPE, dtype=torch.float64)
    got = spatial_crps(pred, obs, q, kind="cdf")
    assert got.shape == (2, 4)
    ref = (brute_force_crps(pred, obs, "cdf") * q).sum((-2, -1))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # a constant pointwise CRPS has that constant as its area mean
    const = spatial_crps(torch.zeros(1, 1, 1, *SHAPE, dtype=torch.float64), torch.full((1, 1, *SHAPE), 2.5, dtype=torch.float64), q, "cdf")
    assert const.item() == pytest.approx(2.5)


# ---------------------------------------------------------------------------------------------- spectral CRPS


def test_spectral_truncations() -> None:
    assert (SpectralCRPS(SHAPE).lmax, SpectralCRPS(SHAPE).mmax) == (17, 17)  # release: lmax = mmax = nlat
    assert SpectralCRPS(SHAPE, normalization="head").lmax == 8  # head: (nlat - 1)//2
    assert SpectralCRPS((17, 16)).mmax == 9  # clipped to nlon//2 + 1
    assert SpectralCRPS(SHAPE, lmax=5).lmax == 5


def test_spectral_zero_for_identical_fields() -> None:
    g = torch.Generator().manual_seed(4)
    obs = torch.randn(2, 3, *SHAPE, generator=g)
    pred = obs.unsqueeze(1).expand(2, 4, 3, *SHAPE).contiguous()
    for norm in ("release", "head"):
        sc = SpectralCRPS(SHAPE, normalization=norm)
        for kind in ("cdf", "fair"):
            assert sc(pred, obs, kind).abs().max().item() < 1e-6


def test_spectral_zonal_difference_only_changes_m0() -> None:
    g = torch.Generator().manual_seed(5)
    b, m, c = 2, 3, 2
    obs = torch.randn(b, c, *SHAPE, generator=g, dtype=torch.float64)
    zonal = torch.randn(b, m, c, SHAPE[0], 1, generator=g, dtype=torch.float64)  # a function of latitude only
    pred = obs.unsqueeze(1) + zonal
    sc = SpectralCRPS(SHAPE)
    coeffs = sc.sht(zonal.expand(b, m, c, *SHAPE))
    assert coeffs[..., 1:].abs().max().item() < 1e-12  # the difference has no m > 0 content
    for kind in ("cdf", "fair"):
        per_lm = sc.coefficient_crps(pred, obs, kind)
        assert per_lm.shape == (b, c, sc.lmax, sc.mmax)
        assert per_lm[..., 1:].abs().max().item() < 1e-12  # |c_lm| of members equal the target's for m > 0
        assert (per_lm[..., 0].sum(-1) > 0).all()
        # coefficient_crps already scores |c| / (4 pi) (release); w_0 = 1
        torch.testing.assert_close(sc(pred, obs, kind), per_lm[..., 0].sum(-1), rtol=1e-12, atol=1e-12)


def test_spectral_positive_and_weights() -> None:
    g = torch.Generator().manual_seed(6)
    obs = torch.randn(2, 3, *SHAPE, generator=g, dtype=torch.float64)
    pred = torch.randn(2, 4, 3, *SHAPE, generator=g, dtype=torch.float64)
    rel, head = SpectralCRPS(SHAPE), SpectralCRPS(SHAPE, normalization="head")
    for kind in ("cdf", "fair"):
        assert (rel(pred, obs, kind) > 0).all()
    # release: sum_lm w_m CRPS(|c|/(4 pi)), w = {1, 2}; head: sum_lm w_m/(4 pi) CRPS(|c|/sqrt(4 pi))
    per = rel.coefficient_crps(pred, obs, "cdf") * (4 * math.pi)  # CRPS is 1-homogeneous: undo the 1/(4 pi)
    wm = torch.ones(rel.mmax, dtype=torch.float64)
    wm[1:] = 2
    torch.testing.assert_close(rel(pred, obs, "cdf"), (per * wm).sum((-2, -1)) / (4 * math.pi))
    per_h = per[..., : head.lmax, : head.mmax]
    torch.testing.assert_close(head(pred, obs, "cdf"), (per_h * wm[: head.mmax]).sum((-2, -1)) / (4 * math.pi) ** 1.5)


def test_spectral_gradcheck() -> None:
    g = torch.Generator().manual_seed(7)
    shape = (5, 8)
    pred = torch.randn(1, 3, 1, *shape, generator=g, dtype=torch.float64, requires_grad=True)
    obs = torch.randn(1, 1, *shape, generator=g, dtype=torch.float64)
    # entries with m > l are 0 for every member (tied): their gradient is 0 (sgn(0) = 0), as finite differences see
    sc = SpectralCRPS(shape, normalization="head", lmax=3)
    assert torch.autograd.gradcheck(lambda p: sc(p, obs, "fair"), (pred,))


# ---------------------------------------------------------------------------------------------- channel weights


def test_channel_weights_auto() -> None:
    names = ["u10m", "t2m", "z500", "q50", "d2m", "sst", "t1000"]
    ones = [1.0] * len(names)
    base = torch.tensor([0.1, 1.0, 0.5, 0.05, 0.01, 0.1, 1.0], dtype=torch.float64)
    w = channel_weights(names, ones, ones)
    torch.testing.assert_close(w.double(), base / base.sum())
    assert w.sum().item() == pytest.approx(1.0)
    # tendency scaling: scale / max(tdstd, 1e-4)
    scale = [2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    tdstd = [4.0, 1.0, 0.5, 1e-7, 1.0, 1.0, 1.0]
    w2 = channel_weights(names, scale, tdstd)
    torch.testing.assert_close(w2.double(), base / base.sum() * torch.tensor([0.5, 1.0, 2.0, 1e4, 1.0, 1.0, 1.0], dtype=torch.float64))
    const = channel_weights(names, scale, tdstd, mode="constant")
    torch.testing.assert_close(const, torch.full((7,), 1 / 7))


def test_channel_weights_fcn3() -> None:
    n = len(FCN3_CHANNELS)
    w = channel_weights(FCN3_CHANNELS, [1.0] * n, [1.0] * n).double()
    assert w.sum().item() == pytest.approx(1.0)
    idx = {c: i for i, c in enumerate(FCN3_CHANNELS)}
    assert w[idx["t2m"]].item() == pytest.approx(10 * w[idx["msl"]].item())
    assert w[idx["z1000"]].item() == pytest.approx(w[idx["t2m"]].item())
    assert w[idx["u50"]].item() == pytest.approx(0.05 * w[idx["t2m"]].item())
    assert w[idx["tcwv"]].item() == pytest.approx(w[idx["u100m"]].item())


# ---------------------------------------------------------------------------------------------- full loss


def _rollout(b: int, m: int, s: int, c: int, seed: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, m, s, c, *SHAPE, generator=g, dtype=torch.float64),
        torch.randn(b, s, c, *SHAPE, generator=g, dtype=torch.float64),
    )


def test_loss_composition_and_multistep_quirk() -> None:
    b, m, s, c = 2, 3, 4, 3
    pred, obs = _rollout(b, m, s, c)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    sw = 0.1
    kw = dict(kind="fair", alpha=1.0, spectral_weight=sw)
    intended = EnsembleCRPSLoss(SHAPE, w, multistep_weighting="intended", **kw)
    reference = EnsembleCRPSLoss(SHAPE, w, multistep_weighting="reference", **kw)

    q = quadrature_weights(*SHAPE, dtype=torch.float64)
    sc = SpectralCRPS(SHAPE)
    sp = [spatial_crps(pred[:, :, i], obs[:, i], q, "fair") for i in range(s)]  # each (B, C)
    spec = [sc(pred[:, :, i], obs[:, i], "fair") for i in range(s)]

    def term(x: torch.Tensor, weight: float) -> torch.Tensor:
        return weight * (x * w).sum(-1)  # (B,)

    want_intended = sum(term(sp[i], 1.0) + term(spec[i], sw) for i in range(s)) / s
    # The quirk, by hand: spatial of steps 1 and 3 gets the spectral weight, spectral of steps 0 and 2 the full weight.
    want_reference = (
        term(sp[0], 1.0)
        + term(sp[1], sw)
        + term(sp[2], 1.0)
        + term(sp[3], sw)
        + term(spec[0], 1.0)
        + term(spec[1], sw)
        + term(spec[2], 1.0)
        + term(spec[3], sw)
    ) / s

    loss_i, details = intended(pred, obs)
    loss_r, _ = reference(pred, obs)
    torch.testing.assert_close(loss_i, want_intended.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_r, want_reference.mean(), rtol=1e-12, atol=1e-12)
    assert abs(loss_i.item() - loss_r.item()) > 1e-3
    assert details["spatial_crps"].shape == (s, c) and not details["spatial_crps"].requires_grad
    torch.testing.assert_close(details["spatial_crps"], torch.stack(sp, 0).mean(1))
    torch.testing.assert_close(details["spectral_crps"], torch.stack(spec, 0).mean(1))

    # one step: both layouts agree, with or without a step dimension
    one_i, _ = intended(pred[:, :, :1], obs[:, :1])
    one_r, _ = reference(pred[:, :, :1], obs[:, :1])
    torch.testing.assert_close(one_i, one_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(intended(pred[:, :, 0], obs[:, 0])[0], one_i)
    torch.testing.assert_close(one_i, (term(sp[0], 1.0) + term(spec[0], sw)).mean())


def test_loss_backward_and_no_spectral() -> None:
    pred, obs = _rollout(1, 2, 2, 2)
    pred = pred.float().requires_grad_(True)
    loss_fn = EnsembleCRPSLoss(SHAPE, torch.tensor([0.6, 0.4]), kind="cdf", spectral_normalization="head")
    loss, _ = loss_fn(pred, obs.float())
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    no_spec = EnsembleCRPSLoss(SHAPE, torch.tensor([0.6, 0.4]), kind="cdf", spectral_weight=0.0)
    assert no_spec.spectral is None
    loss0, details = no_spec(pred.detach(), obs.float())
    assert "spectral_crps" not in details
    want = (details["spatial_crps"] * torch.tensor([0.6, 0.4])).sum() / 2
    torch.testing.assert_close(loss0, want)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_inputs() -> None:
    pred, obs = _ensemble(3, n=4)
    with pytest.raises(ValueError, match="at least 2 members"):
        crps_ensemble(pred[:, :1], obs, kind="fair")
    with pytest.raises(ValueError, match=r"with member_dim=1 removed: \(4,\)"):
        crps_ensemble(pred, obs[:2])
    with pytest.raises(ValueError, match="member_dim=3 is out of range"):
        crps_ensemble(pred, obs, member_dim=3)
    with pytest.raises(ValueError, match="unknown CRPS kind"):
        crps_ensemble(pred, obs, kind="energy")
    with pytest.raises(ValueError, match="alpha"):
        crps_ensemble(pred, obs, kind="fair", alpha=1.5)
    with pytest.raises(TypeError, match="floating-point"):
        crps_ensemble(pred.long(), obs.long())
    with pytest.raises(ValueError, match="nlat >= 3"):
        quadrature_weights(2, 4)
    with pytest.raises(ValueError, match="lobatto"):
        quadrature_weights(10, 20, grid="lobatto")
    with pytest.raises(ValueError, match="unknown spectral normalization"):
        SpectralCRPS(SHAPE, normalization="v2")

    with pytest.raises(ValueError, match="3 channels but 2 scales and 3"):
        channel_weights(["u10m", "t2m", "z500"], [1.0, 1.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="unknown channel 'foo'"):
        channel_weights(["foo"], [1.0], [1.0])
    with pytest.raises(ValueError, match="unknown channel weight mode"):
        channel_weights(["t2m"], [1.0], [1.0], mode="equal")

    loss_fn = EnsembleCRPSLoss(SHAPE, torch.ones(2) / 2, kind="fair", spectral_weight=0.0)
    p, o = _rollout(1, 2, 1, 2)
    with pytest.raises(ValueError, match="at least 2 members"):
        loss_fn(p[:, :1], o)
    with pytest.raises(ValueError, match="2 channel weights but the fields have 3 channels"):
        loss_fn(torch.zeros(1, 2, 1, 3, *SHAPE), torch.zeros(1, 1, 3, *SHAPE))
    with pytest.raises(ValueError, match="expected"):
        loss_fn(p, o[:, :, :1])
    with pytest.raises(ValueError, match="built for a"):
        loss_fn(torch.zeros(1, 2, 1, 2, 9, 16), torch.zeros(1, 1, 2, 9, 16))
    with pytest.raises(ValueError, match=r"pred \(B, M, S, C, H, W\)"):
        loss_fn(p[0], o)
    with pytest.raises(ValueError, match="multistep_weighting"):
        EnsembleCRPSLoss(SHAPE, torch.ones(2), multistep_weighting="fixed")
    with pytest.raises(ValueError, match="1-D"):
        EnsembleCRPSLoss(SHAPE, torch.ones(2, 2))
