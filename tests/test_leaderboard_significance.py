"""``leaderboard --reference``: intervals and paired significance from per_init.csv, scorecard marks, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

N_INITS = 40
INITS = [str(t) for t in pd.date_range("2002-01-01", periods=N_INITS, freq="12h").strftime("%Y-%m-%dT%H:%M:%S")]
LEADS = (24, 48)


def _write(tmp: Path, name: str, per_init: dict[tuple[str, float | None, int], np.ndarray], region: str = "global") -> Path:
    """An evaluation output directory with deterministic rmse records: per-init values and their RMS in scores.csv."""
    d = tmp / name
    d.mkdir()
    rows, pi = [], []
    for (var, lev, lead), vals in per_init.items():
        rows.append(["deterministic", var, "rmse", region, lev, lead, float(np.sqrt(np.mean(vals**2)))])
        pi += [
            ["deterministic_temporal", var, "rmse", region, lev, lead, t, float(v)] for t, v in zip(INITS[: len(vals)], vals, strict=True)
        ]
    cols = ["eval", "variable", "metric", "region", "level", "lead_time_hours"]
    pd.DataFrame(rows, columns=[*cols, "value"]).to_csv(d / "scores.csv", index=False)
    pd.DataFrame(pi, columns=[*cols, "init_time", "value"]).to_csv(d / "per_init.csv", index=False)
    (d / "meta.json").write_text(json.dumps({"name": name, "inits": INITS[: len(next(iter(per_init.values())))]}))
    return d


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcn3_lightning", "leaderboard", *args], capture_output=True, text=True, timeout=300)


def _series(rng: np.random.Generator, scale: float, n: int = N_INITS) -> np.ndarray:
    x = np.empty(n)
    x[0] = rng.standard_normal()
    for t in range(1, n):
        x[t] = 0.5 * x[t - 1] + rng.standard_normal()
    return scale * (5.0 + 0.3 * x)


def test_reference_significance_files_and_scorecard(tmp_path):
    rng = np.random.default_rng(0)
    ref24, same48 = _series(rng, 1.0), _series(rng, 1.0)
    better24 = 0.7 * ref24  # clearly better on every init
    a = _write(tmp_path, "ref", {("geopotential", 500.0, 24): ref24, ("geopotential", 500.0, 48): same48})
    b = _write(tmp_path, "new", {("geopotential", 500.0, 24): better24, ("geopotential", 500.0, 48): same48.copy()})
    res = _cli(str(a), str(b), "--reference", "ref", "--out", str(tmp_path / "board"))
    assert res.returncode == 0, res.stderr
    sig = pd.read_csv(tmp_path / "board" / "significance.csv")
    s24 = sig[(sig["lead_time_hours"] == 24) & (sig["model"] == "new")].iloc[0]
    s48 = sig[(sig["lead_time_hours"] == 48) & (sig["model"] == "new")].iloc[0]
    # the scores of the merged results: the RMS of the per-init values written above
    assert abs(s24["value"] - np.sqrt(np.mean(better24**2))) <= 1e-12 * s24["value"]
    assert abs(s24["reference_value"] - np.sqrt(np.mean(ref24**2))) <= 1e-12 * s24["value"]
    assert s24["p_bootstrap"] < 0.01 and s24["p_ttest"] < 0.01 and s24["upper"] < 0
    assert s48["difference"] == 0 and s48["p_bootstrap"] == 1 and s48["p_ttest"] == 1
    iv = pd.read_csv(tmp_path / "board" / "intervals.csv")
    r = iv[(iv["model"] == "ref") & (iv["lead_time_hours"] == 24)].iloc[0]
    assert r["lower"] < r["value"] < r["upper"] and r["lower_iid"] < r["value"] < r["upper_iid"] and r["n_inits"] == N_INITS
    import xarray as xr

    with xr.open_dataset(tmp_path / "board" / "significance.nc", engine="h5netcdf") as ds:
        assert float(ds["p_bootstrap"].sel(model="new", score="RMSE", variable="geopotential", level=500.0, lead_time_hours=48)) == 1.0
    assert (tmp_path / "board" / "scorecard.png").stat().st_size > 0


def test_panels_marked_where_not_significant(tmp_path):
    from fcn3_lightning.eval import significance
    from fcn3_lightning.eval.leaderboard import collect_entries, load_runs
    from fcn3_lightning.eval.scorecard import attach_p_values, reference_pairs, scorecard_panels

    rng = np.random.default_rng(1)
    ref24, same48 = _series(rng, 1.0), _series(rng, 1.0)
    a = _write(tmp_path, "ref", {("geopotential", 500.0, 24): ref24, ("geopotential", 500.0, 48): same48})
    b = _write(tmp_path, "new", {("geopotential", 500.0, 24): 0.7 * ref24, ("geopotential", 500.0, 48): same48})
    runs = load_runs([a, b])
    result = significance.compute(collect_entries(runs, "global"), runs, "global", "ref")
    panels = scorecard_panels(runs, "global", reference_pairs("ref"), "ref")
    attach_p_values(panels, result.p_values())
    (p,) = [p for p in panels if p.score == "RMSE"]
    assert p.p.loc["z500", 24] < 0.05 and p.p.loc["z500", 48] == 1.0
    assert round(float(p.rel.loc["z500", 24]), 9) == -30.0


def test_two_dimensional_variables_are_marked(tmp_path):
    """A 2-D variable (no level) gets its p-values in the scorecard too (its level is NaN in significance.csv)."""
    from fcn3_lightning.eval import significance
    from fcn3_lightning.eval.leaderboard import collect_entries, load_runs
    from fcn3_lightning.eval.scorecard import attach_p_values, reference_pairs, scorecard_panels

    rng = np.random.default_rng(2)
    ref24, same48 = _series(rng, 1.0), _series(rng, 1.0)
    a = _write(tmp_path, "ref", {("2m_temperature", None, 24): ref24, ("2m_temperature", None, 48): same48})
    b = _write(tmp_path, "new", {("2m_temperature", None, 24): 0.7 * ref24, ("2m_temperature", None, 48): same48})
    runs = load_runs([a, b])
    result = significance.compute(collect_entries(runs, "global"), runs, "global", "ref")
    panels = scorecard_panels(runs, "global", reference_pairs("ref"), "ref")
    attach_p_values(panels, result.p_values())
    (p,) = [p for p in panels if p.score == "RMSE"]
    assert p.p is not None, "the 2-D variable's cells were not looked up"
    row = p.p.iloc[0]
    assert row[24] < 0.05 and row[48] == 1.0


def test_different_variables_merged_and_named(tmp_path):
    rng = np.random.default_rng(2)
    a = _write(tmp_path, "ref", {("geopotential", 500.0, 24): _series(rng, 1), ("temperature", 850.0, 24): _series(rng, 1)})
    b = _write(tmp_path, "new", {("geopotential", 500.0, 24): _series(rng, 1)})
    res = _cli(str(a), str(b), "--reference", "ref", "--out", str(tmp_path / "board"))
    assert res.returncode == 0, res.stderr
    assert "ref: t850 left out (not scored in every run)" in res.stderr
    md = (tmp_path / "board" / "leaderboard.md").read_text()
    assert "t850 left out" in md and "## t850" not in md and "## z500" in md


def test_bad_input_errors(tmp_path):
    rng = np.random.default_rng(3)
    a = _write(tmp_path, "ref", {("geopotential", 500.0, 24): _series(rng, 1)})
    b = _write(tmp_path, "new", {("geopotential", 500.0, 24): _series(rng, 1)}, region="tropics")
    res = _cli(str(a), str(b), "--reference", "ref", "--out", str(tmp_path / "o1"))
    assert res.returncode == 2
    assert "region 'global' is not in the scores of new (new: ['tropics'])" in res.stderr
    c = _write(tmp_path, "other", {("geopotential", 500.0, 24): _series(rng, 1)})
    res = _cli(str(a), str(c), "--reference", "nope", "--out", str(tmp_path / "o2"))
    assert res.returncode == 2 and "--reference 'nope' is none of the models ['ref', 'other']" in res.stderr
    assert not (tmp_path / "o2" / "leaderboard.md").exists()


def test_one_init_warns_and_tests_nothing(tmp_path):
    a = _write(tmp_path, "ref", {("geopotential", 500.0, 24): np.array([5.0])})
    b = _write(tmp_path, "new", {("geopotential", 500.0, 24): np.array([4.0])})
    res = _cli(str(a), str(b), "--reference", "ref", "--out", str(tmp_path / "board"))
    assert res.returncode == 0, res.stderr
    assert "ref: 1 initialisation time(s): a bootstrap needs at least 2; no RMSE intervals" in res.stderr
    assert "new vs ref: 1 shared initialisation time(s) for RMSE: a paired test needs at least 2; no significance" in res.stderr
    assert len(pd.read_csv(tmp_path / "board" / "significance.csv")) == 0


def test_baselines_of_evaluate_are_tested(tmp_path):
    """``evaluate`` keeps the baselines' per-init records, so ``leaderboard --reference`` tests them like the models."""
    from fcn3_lightning.eval.harness import Options, evaluate

    fixture = Path(__file__).parent / "data" / "wb2_fixture_5p625"
    out = {}
    for kind in ("det", "ens"):
        out[kind] = tmp_path / kind
        evaluate(
            fixture / f"forecast_{kind}.zarr",
            fixture / "obs.zarr",
            out[kind],
            fixture / "climatology.zarr",
            Options(regions=["global"], variables=["geopotential"], levels=[500], progress=False),
        )
    res = _cli(str(out["det"]), str(out["ens"]), "--reference", "forecast_ens", "--out", str(tmp_path / "board"))
    assert res.returncode == 0, res.stderr
    assert "no per-init" not in res.stderr and "no per_init" not in res.stderr, res.stderr
    sig = pd.read_csv(tmp_path / "board" / "significance.csv")
    tested = set(zip(sig["model"], sig["score"], strict=True))
    # persistence's CRPS is its MAE (a one-member ensemble); the climatology has no CRPS
    expected = {("persistence", "RMSE"), ("persistence", "CRPS"), ("climatology", "RMSE"), ("probabilistic climatology", "CRPS")}
    assert expected <= tested, tested
    assert sig["p_bootstrap"].between(0, 1).all() and len(sig) == len(tested) * 3  # 3 lead times each
    # the baselines' scores in the test are the leaderboard's (the time means of evaluate's scores.csv)
    scores = pd.read_csv(out["ens"] / "scores.csv")
    p = sig[(sig["model"] == "persistence") & (sig["score"] == "RMSE") & (sig["lead_time_hours"] == 24)].iloc[0]
    want = scores[(scores["eval"] == "persistence_baseline") & (scores["metric"] == "rmse") & (scores["lead_time_hours"] == 24)]
    np.testing.assert_allclose(p["value"], want["value"].item(), rtol=1e-12)
