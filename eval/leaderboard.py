"""Leaderboard of headline scores (Markdown and HTML) from one or several evaluation output directories.

An evaluation output directory holds ``scores.csv`` (columns ``eval, variable, metric, region, level,
lead_time_hours, value``; WeatherBench2 metric and variable names) and ``meta.json`` (``{"name": ...}``).
Rows of the leaderboard are the evaluated models and the baselines found in their scores
(``persistence_baseline``, ``climatology_baseline_deterministic``, ``probabilistic_climatology_baseline``,
any other ``*baseline*`` eval); a baseline shared by several runs (same values) appears once.

Scores per headline variable and lead time:

* RMSE: ``rmse`` of the deterministic forecast; for an ensemble ``rmse`` of ``ensemble_mean_deterministic``,
  else ``ensemble_mean_rmse`` of ``probabilistic`` (the same number: RMSE of the ensemble mean);
* ACC: ``acc`` where present (deterministic forecast, ensemble mean, persistence);
* CRPS: ``crps`` where present (ensembles, persistence = its MAE, probabilistic climatology).

``python -m fcn3_lightning leaderboard RUN_DIR [RUN_DIR ...] --out DIR`` (:mod:`.reports`) writes ``leaderboard.md``,
``leaderboard.html`` and ``scorecard.png`` (see :mod:`fcn3_lightning.eval.scorecard`).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcn3_lightning.channels import WB2_HEADLINE, WB2_SHORT_NAMES, WB2_UNITS, display_units

if TYPE_CHECKING:  # pandas is imported inside the functions: registering the CLI must stay cheap
    import pandas as pd

SCORE_COLUMNS = ("eval", "variable", "metric", "region", "level", "lead_time_hours", "value")


@dataclass(frozen=True)
class Score:
    metrics: tuple[str, ...]  # WB2 metric names, first found wins
    higher_is_better: bool
    unit: str | None  # None: the variable's unit


SCORES: dict[str, Score] = {
    "RMSE": Score(("rmse", "ensemble_mean_rmse"), False, None),
    "ACC": Score(("acc",), True, "1"),
    "CRPS": Score(("crps",), False, None),
}

# model evals in priority order (for a metric found in several of them)
MODEL_EVALS = ("deterministic", "ensemble_mean_deterministic", "probabilistic")
BASELINE_NAMES = {
    "persistence_baseline": "persistence",
    "climatology_baseline_deterministic": "climatology",
    "probabilistic_climatology_baseline": "probabilistic climatology",
}
NO_LEVEL = -1.0  # stands for the empty level of 2-D variables inside index keys (NaN does not compare equal)


def is_baseline(eval_name: str) -> bool:
    return "baseline" in eval_name


def baseline_name(eval_name: str) -> str:
    return BASELINE_NAMES.get(eval_name, eval_name.replace("_baseline", "").replace("_", " ").strip())


def variable_key(variable: str, level: float | None) -> str:
    """Short name: ``z500``, ``t2m``; unknown variables keep their WB2 name (``foo``, ``foo_300``)."""
    short = WB2_SHORT_NAMES.get(variable)
    if level is None or (isinstance(level, float) and math.isnan(level)) or level == NO_LEVEL:
        return short or variable
    lev = f"{level:g}"
    return f"{short}{lev}" if short else f"{variable}_{lev}"


def variable_description(variable: str, level: float | None) -> str:
    if level is None or (isinstance(level, float) and math.isnan(level)) or level == NO_LEVEL:
        return variable
    return f"{variable} at {level:g} hPa"


def unit_of(variable: str) -> str:
    return display_units(WB2_UNITS[variable]) if variable in WB2_UNITS else ""


def lead_label(hours: int) -> str:
    """``24 h (1 d)`` for whole days, else ``6 h``."""
    hours = int(hours)
    return f"{hours} h ({hours // 24} d)" if hours and hours % 24 == 0 else f"{hours} h"


def block_decimals(values: Iterable[float], digits: int = 4) -> int | None:
    """Decimals that give the smallest |value| of a block ``digits`` significant digits (one count of decimals per block
    keeps a column aligned and comparable); None: use scientific notation (tiny values)."""
    finite = [abs(v) for v in values if v is not None and math.isfinite(v) and v != 0]
    if not finite:
        return 0
    exp = math.floor(math.log10(min(finite)))
    if exp < -5:
        return None
    return max(0, digits - 1 - exp)


def year_span(years: Iterable[int]) -> str:
    """``2000-2001``, ``2000``, ``1990, 2002-2003``: years sorted, consecutive runs collapsed."""
    out: list[list[int]] = []
    for y in sorted({int(y) for y in years}):
        if out and y == out[-1][-1] + 1:
            out[-1].append(y)
        else:
            out.append([y])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in out) if out else "none"


def format_value(v: float, decimals: int | None = 4) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.3e}" if decimals is None else f"{v:.{decimals}f}"


# ---------------------------------------------------------------------------------------------- loading


def load_scores(result_dir: str | Path) -> tuple[str, pd.DataFrame]:
    """``(name, scores)`` of an evaluation output directory (``scores.csv`` + ``meta.json``).

    The name is ``meta.json``'s ``name`` (the directory name when there is none); ``scores.attrs`` holds
    ``meta`` (the parsed meta.json) and ``source`` (the directory)."""
    import pandas as pd

    result_dir = Path(result_dir)
    csv = result_dir / "scores.csv"
    if not result_dir.is_dir():
        raise FileNotFoundError(f"{result_dir}: no such evaluation output directory")
    if not csv.is_file():
        raise FileNotFoundError(f"{result_dir}: no scores.csv (not an evaluation output directory?)")
    meta: dict[str, Any] = {}
    if (result_dir / "meta.json").is_file():
        meta = json.loads((result_dir / "meta.json").read_text())
    name = str(meta.get("name") or result_dir.resolve().name)
    df = pd.read_csv(csv, dtype={"eval": str, "variable": str, "metric": str, "region": str})
    missing = [c for c in SCORE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{csv}: missing columns {missing} (expected {list(SCORE_COLUMNS)})")
    df.attrs["meta"] = meta
    df.attrs["source"] = str(result_dir)
    return name, df


def load_runs(result_dirs: Iterable[str | Path]) -> dict[str, pd.DataFrame]:
    """Several result directories by model name; a repeated name gets its directory appended."""
    runs: dict[str, pd.DataFrame] = {}
    for d in result_dirs:
        name, df = load_scores(d)
        if name in runs:
            name = f"{name} ({Path(d).resolve().name})"
        n, base = 2, name
        while name in runs:
            name, n = f"{base} #{n}", n + 1
        runs[name] = df
    return runs


def _regions_of(df: pd.DataFrame) -> set[str]:
    return {r if isinstance(r, str) and r else "global" for r in df["region"].unique()}


def _model_keys(df: pd.DataFrame, region: str) -> set[str]:
    """Variable keys (``z500``, ``t2m``) of the run's model scores in ``region``."""
    rows = _region_rows(df, region)
    rows = rows[~rows["eval"].map(is_baseline)]
    return {variable_key(v, lev) for v, lev in zip(rows["variable"], rows["level"], strict=True)}


def harmonise(runs: Mapping[str, pd.DataFrame], region: str = "global") -> tuple[dict[str, pd.DataFrame], list[str]]:
    """The runs restricted to what they have in common, and a line per thing left out.

    Every run must have ``region`` (an error names those that lack it and what they have). Variables (with
    level) that some run's models were not scored on are left out of every run, by name; regions not in every
    run are named too (the leaderboard shows one region)."""
    if len(runs) < 2:
        return dict(runs), []
    regions = {run: _regions_of(df) for run, df in runs.items()}
    lacking = [run for run, r in regions.items() if region not in r]
    if lacking:
        have = "; ".join(f"{run}: {sorted(regions[run])}" for run in lacking)
        raise ValueError(
            f"region {region!r} is not in the scores of {', '.join(lacking)} ({have}); choose --region among those all runs have"
        )
    left: list[str] = []
    every = set.intersection(*regions.values())
    some = set.union(*regions.values()) - every
    if some:
        left.append(f"regions not in every run, left out: {', '.join(sorted(some))} (the leaderboard shows {region!r})")
    keys = {run: _model_keys(df, region) for run, df in runs.items()}
    common = set.intersection(*keys.values())
    if not common:
        raise ValueError(
            "the runs share no scored variable in region "
            f"{region!r}: " + "; ".join(f"{run}: {', '.join(sorted(k)) or 'none'}" for run, k in keys.items())
        )
    out = {}
    for run, df in runs.items():
        extra = sorted(keys[run] - common)
        if extra:
            left.append(f"{run}: {', '.join(extra)} left out (not scored in every run)")
        lev = df["level"].astype(float).fillna(NO_LEVEL)
        k = [variable_key(v, lv) for v, lv in zip(df["variable"], lev, strict=True)]
        kept = df[[x in common for x in k]].copy()
        kept.attrs.update(df.attrs)
        out[run] = kept
    return out, left


# ---------------------------------------------------------------------------------------------- tables


def _region_rows(df: pd.DataFrame, region: str) -> pd.DataFrame:
    """The rows of one region; rows without a region (an eval that has none) count as ``global``."""
    reg = df["region"].fillna("").astype(str)
    keep = reg == region
    if region == "global":
        keep |= reg == ""
    out = df.loc[keep, ["eval", "variable", "metric", "level", "lead_time_hours", "value"]].copy()
    out["level"] = out["level"].astype(float).fillna(NO_LEVEL)
    out["lead_time_hours"] = out["lead_time_hours"].astype(int)
    out["value"] = out["value"].astype(float)
    dup = out.duplicated(["eval", "variable", "metric", "level", "lead_time_hours"])
    if dup.any():
        first = out[dup].iloc[0]
        raise ValueError(
            f"duplicate score records, e.g. eval={first['eval']} variable={first['variable']} metric={first['metric']} "
            f"level={first['level']} lead={first['lead_time_hours']}"
        )
    return out


def check_region(runs: Mapping[str, pd.DataFrame], region: str) -> None:
    regions: set[str] = set()
    for df in runs.values():
        regions |= {r if isinstance(r, str) and r else "global" for r in df["region"].unique()}
    if region not in regions:
        raise ValueError(f"unknown region {region!r}; the scores have {sorted(regions)}")


def score_series(rows: pd.DataFrame, evals: Sequence[str], score: str) -> pd.Series:
    """One score of one entry, indexed by (variable, level, lead_time_hours): the first (metric, eval) pair that has it."""
    import pandas as pd

    out: pd.Series | None = None
    for metric in SCORES[score].metrics:
        for ev in evals:
            sel = rows[(rows["eval"] == ev) & (rows["metric"] == metric)]
            if sel.empty:
                continue
            s = sel.set_index(["variable", "level", "lead_time_hours"])["value"]
            out = s if out is None else out.combine_first(s)
    if out is None:
        idx = pd.MultiIndex.from_arrays([[], [], []], names=["variable", "level", "lead_time_hours"])
        return pd.Series([], index=idx, dtype=float)
    return out


@dataclass
class Entry:
    """A row group of the leaderboard: an evaluated model or a baseline."""

    name: str
    kind: str  # "model" | "baseline"
    run: str  # the run it comes from (the first one for a shared baseline)
    scores: dict[str, pd.Series]  # score -> values by (variable, level, lead_time_hours)


def collect_entries(runs: Mapping[str, pd.DataFrame], region: str = "global") -> list[Entry]:
    """Models (one per run) then baselines; a baseline with the same values in several runs appears once,
    one that differs between runs once per version, named ``persistence [run]``."""
    if not runs:
        raise ValueError("no runs given")
    check_region(runs, region)
    models: list[Entry] = []
    versions: dict[str, list[Entry]] = {}  # baseline name -> distinct versions
    for run, df in runs.items():
        rows = _region_rows(df, region)
        evals = list(dict.fromkeys(rows["eval"]))
        model_evals = [e for e in MODEL_EVALS if e in evals] + [e for e in evals if e not in MODEL_EVALS and not is_baseline(e)]
        if model_evals:
            models.append(Entry(run, "model", run, {s: score_series(rows, model_evals, s) for s in SCORES}))
        for ev in evals:
            if not is_baseline(ev):
                continue
            entry = Entry(baseline_name(ev), "baseline", run, {s: score_series(rows, [ev], s) for s in SCORES})
            for known in versions.setdefault(entry.name, []):
                if _same_values(known, entry):
                    for s in SCORES:  # a run may have more lead times or variables than the other
                        known.scores[s] = known.scores[s].combine_first(entry.scores[s])
                    break
            else:
                versions[entry.name].append(entry)
    names = {m.name for m in models}
    baselines: list[Entry] = []
    order = list(BASELINE_NAMES.values())
    for name in sorted(versions, key=lambda n: (order.index(n) if n in order else len(order), n)):
        vs = versions[name]
        for v in vs:
            if len(vs) > 1:
                v.name = f"{v.name} [{v.run}]"
            if v.name in names:
                v.name = f"{v.name} (baseline)"
            baselines.append(v)
    return models + baselines


def _same_values(a: Entry, b: Entry) -> bool:
    """Equal on every record both have (and they share at least one)."""
    import numpy as np

    shared = 0
    for s in SCORES:
        x, y = a.scores[s].align(b.scores[s], join="inner")
        ok = x.notna() & y.notna()
        shared += int(ok.sum())
        if not np.allclose(x[ok].to_numpy(), y[ok].to_numpy(), rtol=1e-9, atol=0.0):
            return False
    return shared > 0


def _variables(entries: Sequence[Entry]) -> list[tuple[str, float]]:
    """Headline (variable, level) pairs that some entry has, else every (variable, level) present."""
    present: set[tuple[str, float]] = set()
    for e in entries:
        for s in e.scores.values():
            present |= {(v, float(lev)) for v, lev in zip(s.index.get_level_values(0), s.index.get_level_values(1), strict=True)}
    head = [(v, NO_LEVEL if lev is None else lev) for v, lev in WB2_HEADLINE.values()]
    found = [vl for vl in head if vl in present]
    return found or sorted(present)


# whole days to keep first when there are too many lead times (the days WeatherBench2's headline plots show first)
PREFERRED_DAYS = (1, 3, 5, 7, 10, 14, 2, 4, 6, 8, 12, 15, 9, 11, 13)


def select_leads(leads: Iterable[int], max_leads: int | None) -> list[int]:
    """All lead times if at most ``max_leads``; else the whole days; still too many: the days of ``PREFERRED_DAYS`` in
    its order, then the others evenly thinned, up to ``max_leads``."""
    import numpy as np

    leads = sorted({int(h) for h in leads})
    if max_leads is None or len(leads) <= max_leads:
        return leads
    days = [h for h in leads if h % 24 == 0 and h > 0] or leads
    if len(days) <= max_leads:
        return days
    chosen = [24 * d for d in PREFERRED_DAYS if 24 * d in days][:max_leads]
    rest = [h for h in days if h not in chosen]
    if len(chosen) < max_leads and rest:
        idx = np.unique(np.round(np.linspace(0, len(rest) - 1, max_leads - len(chosen))).astype(int))
        chosen += [rest[k] for k in idx]
    return sorted(chosen)


def headline_table(
    runs: Mapping[str, pd.DataFrame],
    region: str = "global",
    lead_times: Sequence[int] | None = None,
    max_leads: int | None = 12,
) -> pd.DataFrame:
    """Headline scores: index (variable, score, model), columns the lead times in hours.

    ``variable`` is the short key (``z500``, ``t850``, ``q700``, ``wv850``, ``t2m``, ``ws10``, ``msl``; only those the
    scores have; if none of them, every variable present), ``score`` one of RMSE, ACC, CRPS, ``model`` a run name or a
    baseline name. Rows without any value are left out. ``attrs`` holds ``region``, ``variables`` (key ->
    {variable, level, unit, description}), ``kinds`` (model -> "model" | "baseline") and ``sources`` (model -> run).
    Lead times: ``lead_times`` if given, else all of them (or, above ``max_leads``, the whole days, thinned)."""
    import pandas as pd

    entries = collect_entries(runs, region)
    variables = _variables(entries)
    if not variables:
        raise ValueError(f"no RMSE, ACC or CRPS records in region {region!r}")
    all_leads = {int(h) for e in entries for s in e.scores.values() for h in s.index.get_level_values(2)}
    leads = sorted(int(h) for h in lead_times) if lead_times is not None else select_leads(all_leads, max_leads)
    records, index = [], []
    info: dict[str, dict[str, Any]] = {}
    for var, lev in variables:
        key = variable_key(var, lev)
        level = None if lev == NO_LEVEL else lev
        info[key] = {"variable": var, "level": level, "unit": unit_of(var), "description": variable_description(var, level)}
        for score in SCORES:
            for e in entries:
                s = e.scores[score]
                vals = [float(s.get((var, lev, h), math.nan)) for h in leads]
                if all(math.isnan(v) for v in vals):
                    continue
                records.append(vals)
                index.append((key, score, e.name))
    table = pd.DataFrame(
        records,
        index=pd.MultiIndex.from_tuples(index, names=["variable", "score", "model"]),
        columns=pd.Index(leads, name="lead_time_hours"),
        dtype=float,
    )
    table.attrs.update(
        region=region,
        variables=info,
        kinds={e.name: e.kind for e in entries},
        sources={e.name: e.run for e in entries},
    )
    return table


def best_mask(table: pd.DataFrame) -> pd.DataFrame:
    """True where a value is the best of its (variable, score) block and lead time (ties all marked; a column
    with fewer than two values marks nothing)."""
    import pandas as pd

    mask = pd.DataFrame(False, index=table.index, columns=table.columns)
    for (_, score), block in table.groupby(level=["variable", "score"], sort=False):
        for col in block.columns:
            v = block[col].dropna()
            if len(v) < 2:
                continue
            best = v.max() if SCORES[score].higher_is_better else v.min()
            mask.loc[v.index[v == best], col] = True
    return mask


# ---------------------------------------------------------------------------------------------- writing


def _decimals(block: pd.DataFrame) -> dict[str, int | None]:
    """Decimals per score within one variable's block."""
    return {score: block_decimals(sub.to_numpy().ravel()) for score, sub in block.groupby(level="score", sort=False)}


def _score_unit(score: str, var_unit: str) -> str:
    u = SCORES[score].unit
    return "dimensionless" if u == "1" else (u or var_unit or "units of the variable")


# meta.json fields shown with the baselines instead of with the model
_BASELINE_FIELDS = ("climatology", "climatology_years", "probabilistic_climatology_years")


def _runs_lines(runs: Mapping[str, pd.DataFrame]) -> list[tuple[str, str]]:
    """(name, details) per run: the result directory and the scalar fields of meta.json, in full."""
    out = []
    for name, df in runs.items():
        meta = df.attrs.get("meta", {}) or {}
        parts = [f"source: {df.attrs['source']}"] if df.attrs.get("source") else []
        inits = meta.get("inits")
        if isinstance(inits, list) and inits:
            parts.append(f"{len(inits)} inits {inits[0]} to {inits[-1]}" if len(inits) > 1 else f"init {inits[0]}")
        for k, v in meta.items():
            if k not in ("name", "created", *_BASELINE_FIELDS) and isinstance(v, str | int | float | bool):
                parts.append(f"{k}: {v}")
        out.append((name, "; ".join(parts)))
    return out


def baseline_notes(meta: Mapping[str, Any]) -> dict[str, str]:
    """What each baseline of an evaluation was made of (meta.json), by leaderboard name; the years of the truth it
    used, so that a reader can tell a baseline of earlier years from one that has seen the scored period."""
    notes = {"persistence": "the truth at the initialisation time"}
    clim = meta.get("climatology")
    years = meta.get("climatology_years")
    if isinstance(years, list) and years:
        notes["climatology"] = f"WB2 hour x day-of-year climatology of the truth, years {year_span(years)} (61-day window)"
    elif clim:
        notes["climatology"] = f"the climatology {clim}" if not str(clim).startswith("computed") else str(clim)
    pyears = meta.get("probabilistic_climatology_years")
    if isinstance(pyears, list) and pyears:
        notes["probabilistic climatology"] = f"the truth of the years {year_span(pyears)} at the valid times' dates (one member a year)"
    return notes


def baseline_years(meta: Mapping[str, Any]) -> dict[str, str]:
    """The years each year-based baseline used (``{"climatology": "2000-2001", ...}``), where meta.json records them."""
    out = {}
    for name, key in (("climatology", "climatology_years"), ("probabilistic climatology", "probabilistic_climatology_years")):
        years = meta.get(key)
        if isinstance(years, list) and years:
            out[name] = year_span(years)
    return out


def _baseline_lines(table: pd.DataFrame, runs: Mapping[str, pd.DataFrame]) -> list[tuple[str, str]]:
    """(baseline, description) for each baseline row of the table, from the meta.json of the run(s) it comes from."""
    kinds, sources = table.attrs.get("kinds", {}), table.attrs.get("sources", {})
    out = []
    for entry, kind in kinds.items():
        if kind != "baseline":
            continue
        base = entry.split(" [", 1)[0].removesuffix(" (baseline)")
        texts: dict[str, list[str]] = {}
        for run, df in runs.items():
            if run == sources.get(entry) or (entry == base and is_baseline_of(df, base)):
                text = baseline_notes(df.attrs.get("meta", {}) or {}).get(base)
                if text:
                    texts.setdefault(text, []).append(run)
        if texts:
            many = len(runs) > 1
            out.append((entry, "; ".join(f"{t} ({', '.join(r)})" if many else t for t, r in texts.items())))
    return out


def is_baseline_of(df: pd.DataFrame, name: str) -> bool:
    """Whether the scores ``df`` hold the baseline shown as ``name``."""
    return any(is_baseline(ev) and baseline_name(ev) == name for ev in df["eval"].dropna().unique())


def out_of_bounds_notes(runs: Mapping[str, pd.DataFrame]) -> list[str]:
    """One line per run whose forecast left its physical bounds (meta.json ``physical_bounds``, see fcn3_lightning.bounds)."""
    out = []
    for name, df in runs.items():
        found = ((df.attrs.get("meta") or {}).get("physical_bounds") or {}).get("out_of_bounds") or {}
        if found:
            firsts = sorted((float(r["first"]["lead_hours"]), c) for c, r in found.items())
            where = ", ".join(f"{variable_key(*_split_label(c))} from {lead_label(int(h))}" for h, c in firsts)
            out.append(
                f"{name}'s forecast leaves its physical bounds ({where}; meta.json: physical_bounds): "
                "its scores from there on may be those of a diverging model"
            )
    return out


def _split_label(label: str) -> tuple[str, float | None]:
    variable, _, level = label.partition("/")
    return variable, (float(level) if level else None)


def render_markdown(table: pd.DataFrame, runs: Mapping[str, pd.DataFrame] | None = None) -> str:
    mask = best_mask(table)
    kinds = table.attrs.get("kinds", {})
    info = table.attrs.get("variables", {})
    region = table.attrs.get("region", "?")
    lines = [
        f"# Leaderboard — region `{region}`",
        "",
        "Headline scores (WeatherBench2 definitions). RMSE: of the deterministic forecast, or of the ensemble mean; "
        "CRPS: fair CRPS of the ensemble (persistence: its MAE); ACC: anomaly correlation (higher is better). "
        "**Bold**: best of the column (lowest RMSE/CRPS, highest ACC). *Italic*: baselines. Lead times in hours (days).",
        "",
    ]
    if runs:
        lines += ["Models:", ""] + [f"- **{n}**" + (f" — {d}" if d else "") for n, d in _runs_lines(runs)] + [""]
        notes = _baseline_lines(table, runs)
        if notes:
            lines += ["Baselines:", ""] + [f"- *{n}* — {d}" for n, d in notes] + [""]
        warnings = out_of_bounds_notes(runs)
        lines += [f"**Warning:** {w}" for w in warnings] + ([""] if warnings else [])
    notes = table.attrs.get("notes") or []
    lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""] if notes else []
    heads = [lead_label(h) for h in table.columns]
    for key, block in table.groupby(level="variable", sort=False):
        vi = info.get(key, {})
        unit = vi.get("unit", "")
        lines += [f"## {key} — {vi.get('description', key)}" + (f" [{unit}]" if unit else ""), ""]
        lines += ["| score [unit] | model | " + " | ".join(heads) + " |", "|---|---|" + "---:|" * len(heads)]
        dec = _decimals(block)
        for (_, score, model), row in block.iterrows():
            name = f"*{model}*" if kinds.get(model) == "baseline" else model
            cells = []
            for col, v in row.items():
                txt = format_value(v, dec[score])
                cells.append(f"**{txt}**" if mask.loc[(key, score, model), col] else txt)
            lines.append(f"| {score} [{_score_unit(score, unit)}] | {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 2em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { background: #cfe8cf; font-weight: bold; }
tr.baseline td.name { font-style: italic; color: #555; }
tr.first td { border-top: 2px solid #888; }
.note { color: #555; max-width: 60em; }
"""


def render_html(table: pd.DataFrame, runs: Mapping[str, pd.DataFrame] | None = None) -> str:
    """A self-contained page (inline CSS, no scripts or external files)."""
    esc = html.escape
    mask = best_mask(table)
    kinds = table.attrs.get("kinds", {})
    info = table.attrs.get("variables", {})
    region = table.attrs.get("region", "?")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Leaderboard — {esc(region)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Leaderboard — region <code>{esc(region)}</code></h1>",
        '<p class="note">Headline scores (WeatherBench2 definitions). RMSE: of the deterministic forecast, or of the ensemble '
        "mean; CRPS: fair CRPS of the ensemble (persistence: its MAE); ACC: anomaly correlation (higher is better). "
        "Highlighted: best of the column (lowest RMSE/CRPS, highest ACC). Italic: baselines. "
        "Lead times in hours (days).</p>",
    ]
    if runs:
        out.append("<p>Models:</p><ul>")
        out += [f"<li><b>{esc(n)}</b>" + (f" — {esc(d)}" if d else "") + "</li>" for n, d in _runs_lines(runs)]
        out.append("</ul>")
        notes = _baseline_lines(table, runs)
        if notes:
            out.append("<p>Baselines:</p><ul>")
            out += [f"<li><i>{esc(n)}</i> — {esc(d)}</li>" for n, d in notes]
            out.append("</ul>")
        out += [f"<p><b>Warning:</b> {esc(w)}</p>" for w in out_of_bounds_notes(runs)]
    notes = table.attrs.get("notes") or []
    if notes:
        out.append("<p>Notes:</p><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    heads = "".join(f"<th>{esc(lead_label(h))}</th>" for h in table.columns)
    for key, block in table.groupby(level="variable", sort=False):
        vi = info.get(key, {})
        unit = vi.get("unit", "")
        out.append(f"<h2>{esc(key)} — {esc(vi.get('description', key))}" + (f" [{esc(unit)}]" if unit else "") + "</h2>")
        out.append(f"<table><thead><tr><th>score [unit]</th><th>model</th>{heads}</tr></thead><tbody>")
        prev = None
        dec = _decimals(block)
        for (_, score, model), row in block.iterrows():
            cls = ["baseline"] if kinds.get(model) == "baseline" else ["model"]
            if score != prev:
                cls.append("first")
            prev = score
            cells = "".join(
                f'<td class="num{" best" if mask.loc[(key, score, model), col] else ""}">{esc(format_value(v, dec[score]))}</td>'
                for col, v in row.items()
            )
            out.append(
                f'<tr class="{" ".join(cls)}"><td>{esc(score)} [{esc(_score_unit(score, unit))}]</td>'
                f'<td class="name">{esc(model)}</td>{cells}</tr>'
            )
        out.append("</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _write_text(path: Path, text: str) -> Path:
    from fcn3_lightning.io import atomic_path  # imports torch: only when writing

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_leaderboard(
    runs: Mapping[str, pd.DataFrame],
    out_dir: str | Path,
    region: str = "global",
    lead_times: Sequence[int] | None = None,
    max_leads: int | None = 12,
    notes: Sequence[str] = (),
) -> list[Path]:
    """Write ``leaderboard.md`` and ``leaderboard.html`` (atomically) into ``out_dir``; returns their paths."""
    table = headline_table(runs, region, lead_times=lead_times, max_leads=max_leads)
    table.attrs["notes"] = list(notes)
    out_dir = Path(out_dir)
    return [
        _write_text(out_dir / "leaderboard.md", render_markdown(table, runs)),
        _write_text(out_dir / "leaderboard.html", render_html(table, runs)),
    ]
