"""Leaderboard and scorecard: the right records in the headline table, best-per-column highlight, several models
side by side, shared baselines once, files written (md, html, a real PNG), clear errors.

Data: the WeatherBench2 reference scores of the 5.625° fixture. ``det.csv.gz`` (``deterministic`` +
``climatology_baseline_deterministic``) is one deterministic model, ``ens.csv.gz`` (``ensemble_mean_deterministic``,
``probabilistic``, ``ensemble_experimental``, ``probabilistic_climatology_baseline``) plus the same climatology
baseline one ensemble model. The fixture has no persistence baseline: a **synthetic** one is made from the
deterministic scores (RMSE and MAE × 1.3, ACC × 0.9, CRPS = its MAE), shared by both runs.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fcn3_lightning.eval import leaderboard as lb
from fcn3_lightning.eval import reports
from fcn3_lightning.eval.scorecard import plot_scorecard, scorecard_panels

FIXTURE = Path(__file__).resolve().parent / "data" / "wb2_fixture_5p625"


@pytest.fixture(scope="module")
def fixture_runs() -> dict[str, pd.DataFrame]:
    det = pd.read_csv(FIXTURE / "det.csv.gz")
    ens = pd.read_csv(FIXTURE / "ens.csv.gz")
    clim = det[det["eval"] == "climatology_baseline_deterministic"]
    d = det[(det["eval"] == "deterministic") & det["metric"].isin(["rmse", "mse", "mae", "bias", "acc"])]
    pers = d.copy()
    pers["eval"] = "persistence_baseline"
    pers.loc[pers["metric"].isin(["rmse", "mae"]), "value"] *= 1.3
    pers.loc[pers["metric"] == "acc", "value"] *= 0.9
    crps = pers[pers["metric"] == "mae"].assign(metric="crps")
    return {
        "det-model": pd.concat([det, pers, crps], ignore_index=True),
        "ens-model": pd.concat([ens, clim, pers, crps], ignore_index=True),
    }


def _record(df: pd.DataFrame, ev: str, var: str, metric: str, level: float | None, lead: int, region: str = "global") -> float:
    lev = df["level"].isna() if level is None else df["level"] == level
    sel = df[(df["eval"] == ev) & (df["variable"] == var) & (df["metric"] == metric) & lev & (df["lead_time_hours"] == lead)]
    sel = sel[sel["region"] == region]
    assert len(sel) == 1
    return float(sel["value"].iloc[0])


def _block(t: pd.DataFrame, var: str, score: str) -> pd.DataFrame:
    """The rows of one (variable, score), indexed by model (the table keeps its display order, unsorted)."""
    sel = (t.index.get_level_values("variable") == var) & (t.index.get_level_values("score") == score)
    return t[sel].droplevel(["variable", "score"])


def _write_run(tmp: Path, name: str, df: pd.DataFrame, **meta: object) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    df.to_csv(tmp / "scores.csv", index=False)
    (tmp / "meta.json").write_text(json.dumps({"name": name, "checkpoint": "x.ckpt", **meta}))
    return tmp


def test_headline_values_are_the_records(fixture_runs):
    t = lb.headline_table(fixture_runs)
    det, ens = fixture_runs["det-model"], fixture_runs["ens-model"]
    assert t.loc[("z500", "RMSE", "det-model"), 24] == _record(det, "deterministic", "geopotential", "rmse", 500, 24)
    assert t.loc[("t850", "ACC", "det-model"), 72] == _record(det, "deterministic", "temperature", "acc", 850, 72)
    # ensemble: RMSE of the ensemble mean (== probabilistic's ensemble_mean_rmse up to float32 round-off), CRPS
    ens_rmse = _record(ens, "ensemble_mean_deterministic", "2m_temperature", "rmse", None, 48)
    assert t.loc[("t2m", "RMSE", "ens-model"), 48] == ens_rmse
    assert math.isclose(ens_rmse, _record(ens, "probabilistic", "2m_temperature", "ensemble_mean_rmse", None, 48), rel_tol=1e-4)
    assert t.loc[("q700", "CRPS", "ens-model"), 24] == _record(ens, "probabilistic", "specific_humidity", "crps", 700, 24)
    # baselines: their own rows
    clim = _record(det, "climatology_baseline_deterministic", "mean_sea_level_pressure", "rmse", None, 24)
    assert t.loc[("msl", "RMSE", "climatology"), 24] == clim
    assert t.loc[("ws10", "CRPS", "probabilistic climatology"), 72] == _record(
        ens, "probabilistic_climatology_baseline", "10m_wind_speed", "crps", None, 72
    )
    assert t.loc[("z500", "RMSE", "probabilistic climatology"), 24] == _record(
        ens, "probabilistic_climatology_baseline", "geopotential", "ensemble_mean_rmse", 500, 24
    )
    assert t.loc[("z500", "CRPS", "persistence"), 24] == _record(det, "persistence_baseline", "geopotential", "mae", 500, 24)
    # other regions come from their own records
    te = lb.headline_table(fixture_runs, region="europe")
    assert te.loc[("z500", "RMSE", "det-model"), 24] == _record(det, "deterministic", "geopotential", "rmse", 500, 24, "europe")
    assert list(t.columns) == [24, 48, 72]


def test_models_side_by_side_shared_baselines_once_missing_headlines_skipped(fixture_runs):
    t = lb.headline_table(fixture_runs)
    # the fixture has no wind_vector at 850 hPa: wv850 is skipped, the others keep the headline order
    assert list(dict.fromkeys(t.index.get_level_values("variable"))) == ["z500", "t850", "q700", "t2m", "ws10", "msl"]
    rmse_rows = list(_block(t, "z500", "RMSE").index)
    assert rmse_rows == ["det-model", "ens-model", "persistence", "climatology", "probabilistic climatology"]
    assert ("z500", "CRPS", "det-model") not in t.index  # a deterministic model has no CRPS
    assert ("z500", "ACC", "climatology") not in t.index
    assert t.attrs["kinds"]["persistence"] == "baseline" and t.attrs["kinds"]["ens-model"] == "model"
    # a baseline that differs between runs appears once per run
    other = dict(fixture_runs)
    changed = other["ens-model"].copy()
    changed.loc[changed["eval"] == "persistence_baseline", "value"] *= 1.01
    other["ens-model"] = changed
    names = set(_block(lb.headline_table(other), "z500", "RMSE").index)
    assert {"persistence [det-model]", "persistence [ens-model]", "climatology"} <= names and "persistence" not in names


def test_best_per_column_highlight(fixture_runs):
    t = lb.headline_table(fixture_runs)
    mask = lb.best_mask(t)
    rmse = _block(t, "z500", "RMSE")
    for lead in t.columns:
        assert mask.loc[("z500", "RMSE", rmse[lead].idxmin()), lead]
        assert _block(mask, "z500", "RMSE")[lead].sum() == 1
        acc = _block(t, "z500", "ACC")[lead]
        assert mask.loc[("z500", "ACC", acc.idxmax()), lead]  # ACC: higher is better
    assert rmse[24].idxmin() == "ens-model"


def _tiny() -> pd.DataFrame:
    """Handmade scores with known numbers: one model (deterministic, only z500 and a non-headline variable) and persistence."""
    rows = []
    for ev, scale in (("deterministic", 1.0), ("persistence_baseline", 2.0)):
        for lead in (6, 24):
            rows.append((ev, "geopotential", "rmse", "global", 500.0, lead, 100.0 * scale * lead / 24))
            rows.append((ev, "geopotential", "acc", "global", 500.0, lead, 0.9 / scale))
            rows.append((ev, "foo", "rmse", "global", np.nan, lead, 3.0 * scale))
        rows.append((ev, "geopotential", "rmse", "tropics", 500.0, 24, 7.0))
    rows.append(("persistence_baseline", "geopotential", "crps", "global", 500.0, 24, 80.0))
    return pd.DataFrame(rows, columns=list(lb.SCORE_COLUMNS))


def test_tiny_known_numbers_and_fallback():
    t = lb.headline_table({"tiny": _tiny()})
    assert set(t.index.get_level_values("variable")) == {"z500"}  # headline found: "foo" not shown
    assert list(t.columns) == [6, 24]
    assert t.loc[("z500", "RMSE", "tiny")].tolist() == [25.0, 100.0]
    assert t.loc[("z500", "RMSE", "persistence")].tolist() == [50.0, 200.0]
    assert t.loc[("z500", "ACC", "persistence")].tolist() == [0.45, 0.45]
    crps = t.loc[("z500", "CRPS", "persistence")]
    assert math.isnan(crps[6]) and crps[24] == 80.0
    mask = lb.best_mask(t)
    assert mask.loc[("z500", "RMSE", "tiny")].all() and not mask.loc[("z500", "RMSE", "persistence")].any()
    assert not mask.loc[("z500", "CRPS", "persistence")].any()  # alone in its column: nothing to highlight
    assert lb.headline_table({"tiny": _tiny()}, region="tropics").loc[("z500", "RMSE", "tiny"), 24] == 7.0
    # no headline variable at all: every variable present
    nohead = _tiny()
    nohead = nohead[nohead["variable"] == "foo"]
    t2 = lb.headline_table({"tiny": nohead})
    assert set(t2.index.get_level_values("variable")) == {"foo"}
    assert t2.loc[("foo", "RMSE", "tiny")].tolist() == [3.0, 3.0]
    md = lb.render_markdown(t)
    assert "6 h" in md and "24 h (1 d)" in md and "[m² s⁻²]" in md and "**25.00**" in md and "*persistence*" in md


def test_files_cli_and_png(tmp_path, fixture_runs):
    a = _write_run(tmp_path / "a", "det-model", fixture_runs["det-model"])
    b = _write_run(tmp_path / "b", "ens-model", fixture_runs["ens-model"])
    name, df = lb.load_scores(a)
    assert name == "det-model" and df.attrs["meta"]["checkpoint"] == "x.ckpt"

    parser = argparse.ArgumentParser()
    reports.add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "board"
    args = parser.parse_args(["leaderboard", str(a), str(b), "--out", str(out)])
    args.func(args)
    assert sorted(p.name for p in out.iterdir()) == ["leaderboard.html", "leaderboard.md", "scorecard.png"]  # no temporaries
    md = (out / "leaderboard.md").read_text()
    html = (out / "leaderboard.html").read_text()
    for text in (md, html):
        assert "det-model" in text and "ens-model" in text and "probabilistic climatology" in text and "m² s⁻²" in text
    assert html.count('class="num best"') > 0 and "<style>" in html and "http" not in html  # self-contained
    z500_row = next(line for line in md.splitlines() if line.startswith("| RMSE [m² s⁻²] | ens-model"))
    assert z500_row.count("**") == 6  # the ensemble has the lowest z500 RMSE at all three lead times

    import matplotlib.image

    png = out / "scorecard.png"
    assert png.stat().st_size > 50_000
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 800 and img.shape[1] > 800
    assert img[..., :3].std() > 0.1  # not a blank image

    # one run (small, to keep the test quick): write_reports puts the reports next to scores.csv
    small = _write_run(tmp_path / "small", "tiny", _tiny())
    paths = reports.write_reports(small)
    assert [p.name for p in paths] == ["leaderboard.md", "leaderboard.html", "scorecard.png"] and all(p.parent == small for p in paths)


def test_scorecard_panels_and_sign(tmp_path, fixture_runs):
    panels = scorecard_panels(fixture_runs)
    got = [(p.model, p.score, p.baseline) for p in panels]
    assert got == [
        ("det-model", "RMSE", "persistence"),
        ("det-model", "RMSE", "climatology"),
        ("ens-model", "RMSE", "persistence"),
        ("ens-model", "RMSE", "climatology"),
        ("ens-model", "CRPS", "persistence"),
        ("ens-model", "CRPS", "probabilistic climatology"),
    ]
    rel = panels[0].rel
    assert list(rel.index[:6]) == ["z500", "t850", "q700", "t2m", "ws10", "msl"]  # headline first
    assert np.allclose(rel.to_numpy(), 100 * (1 / 1.3 - 1))  # synthetic persistence = 1.3 × the model's RMSE
    tiny = plot_scorecard(_tiny(), tmp_path / "tiny.png", pairs=[("RMSE", "persistence"), ("ACC", "persistence")])
    assert tiny.stat().st_size > 5_000


def test_errors(tmp_path, fixture_runs):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no scores.csv"):
        lb.load_scores(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such"):
        lb.load_scores(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown region 'atlantis'.*global"):
        lb.headline_table(fixture_runs, region="atlantis")
    bad = tmp_path / "bad"
    bad.mkdir()
    pd.DataFrame({"eval": ["deterministic"], "value": [1.0]}).to_csv(bad / "scores.csv", index=False)
    with pytest.raises(ValueError, match="missing columns"):
        lb.load_scores(bad)
    only_model = _tiny()
    only_model = only_model[only_model["eval"] == "deterministic"]
    with pytest.raises(ValueError, match="nothing to compare"):
        plot_scorecard(only_model, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    # without a baseline the reports are the leaderboard only
    run = _write_run(tmp_path / "solo", "solo", only_model)
    assert [p.name for p in reports.write_reports(run)] == ["leaderboard.md", "leaderboard.html"]


def test_lead_selection():
    six_hourly = range(6, 15 * 24 + 1, 6)
    assert lb.select_leads(six_hourly, None) == list(six_hourly)
    assert lb.select_leads(range(6, 10 * 24 + 1, 6), 12) == [24 * d for d in range(1, 11)]  # whole days
    assert lb.select_leads(six_hourly, 12) == [24 * d for d in (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 15)]
    assert lb.select_leads(six_hourly, 6) == [24 * d for d in (1, 3, 5, 7, 10, 14)]
    assert lb.select_leads(range(6, 61, 6), 3) == [24, 48]  # the whole days, though fewer than allowed
    assert lb.select_leads(range(6, 67, 12), 3) == [6, 30, 66]  # no whole days: evenly thinned, ends kept


def test_reports_say_which_years_the_baselines_used_and_cut_nothing_short(tmp_path, fixture_runs):
    """Issue 15: the baselines' years (meta.json) in the Markdown, the HTML and the scorecard; no field truncated."""
    import html as html_lib

    long_obs = "/a/very/long/path/to/a/shared/store/of/the/ground/truth/" + "x" * 60 + "/era5_1959-2023_6h-64x32_equiangular.zarr"
    clim_text = "computed from the truth: WB2 hour x dayofyear climatology, 61-day triangular window, years 2017-2019"
    a = _write_run(
        tmp_path / "a",
        "det-model",
        fixture_runs["det-model"],
        obs=long_obs,
        climatology=clim_text,
        climatology_years=[2017, 2018, 2019],
        inits=["2020-01-01T00:00:00", "2020-01-02T12:00:00"],
    )
    b = _write_run(
        tmp_path / "b",
        "ens-model",
        fixture_runs["ens-model"],
        climatology=clim_text.replace("2017-2019", "2018-2019"),
        climatology_years=[2018, 2019],
        probabilistic_climatology_years=[2016, 2017, 2019],
    )
    runs = lb.load_runs([a, b])
    paths = reports.write_all(runs, tmp_path / "board")
    md = (tmp_path / "board" / "leaderboard.md").read_text()
    page = html_lib.unescape((tmp_path / "board" / "leaderboard.html").read_text())
    for text in (md, page):
        assert f"obs: {long_obs}" in text  # in full (it was cut at 80 characters)
        assert "2 inits 2020-01-01T00:00:00 to 2020-01-02T12:00:00" in text
        # the same climatology values in both runs (the fixture's): one row, the years of each run named
        assert "climatology of the truth, years 2017-2019 (61-day window) (det-model)" in text
        assert "climatology of the truth, years 2018-2019 (61-day window) (ens-model)" in text
        assert "the truth of the years 2016-2017, 2019 at the valid times' dates (one member a year) (ens-model)" in text
    baselines = md.split("Baselines:", 1)[1].split("##", 1)[0]
    assert [line.split(" — ")[0] for line in baselines.strip().splitlines()] == [
        "- *persistence*",
        "- *climatology*",
        "- *probabilistic climatology*",
    ]
    assert "scorecard.png" in {p.name for p in paths}
    years = {(p.model, p.baseline): p.years for p in scorecard_panels(runs)}
    assert years[("det-model", "climatology")] == "2017-2019" and years[("ens-model", "climatology")] == "2018-2019"
    assert years[("ens-model", "probabilistic climatology")] == "2016-2017, 2019" and years[("det-model", "persistence")] == ""


def test_scorecard_titles_wrap_at_word_boundaries():
    from fcn3_lightning.eval.scorecard import wrap_title

    parts = ["fcn3-small-model: CRPS vs probabilistic climatology", "(years 2000-2001; lower is better)"]
    narrow = wrap_title(parts, 1.9, 10)
    assert narrow.replace("\n", " ") == " ".join(parts)  # every word kept whole, in order
    assert all(len(line) <= 23 for line in narrow.splitlines()) and len(narrow.splitlines()) > 2
    assert wrap_title(parts, 8.0, 10) == "\n".join(parts)  # wide panels: one line per part
    assert lb.year_span([2019, 2017, 2018, 2021]) == "2017-2019, 2021" and lb.year_span([]) == "none"
