"""WeatherBench2-style scorecards: the model's score relative to a baseline, per variable and lead time.

A panel per (model, score, baseline) — e.g. RMSE vs persistence, RMSE vs climatology, CRPS vs persistence, CRPS vs
probabilistic climatology. Rows are variables (the headline ones first: z500, t850, q700, wv850, t2m, ws10, msl,
then every other variable and level the scores have), columns lead times; a cell shows
``100 · (model − baseline) / baseline`` in % and is coloured blue where the model is better, red where it is worse
(one symmetric diverging scale for the whole figure; for ACC, where higher is better, the colour is flipped, the
number is not).

Several models: **one row of panels per model** (the same columns of (score, baseline) pairs for every model, so
a column compares the models against the same kind of baseline). Each model is compared with the baselines of
its own scores (the same evaluation period); a pair the model or its run lacks leaves an empty, labelled panel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fcn3_lightning.eval.leaderboard import (
    NO_LEVEL,
    SCORES,
    baseline_years,
    collect_entries,
    select_leads,
    variable_key,
)

from fcn3_lightning.channels import WB2_HEADLINE

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (
    ("RMSE", "persistence"),
    ("RMSE", "climatology"),
    ("CRPS", "persistence"),
    ("CRPS", "probabilistic climatology"),
)


@dataclass
class Panel:
    model: str
    score: str
    baseline: str
    rel: pd.DataFrame  # relative difference in %, rows variable keys, columns lead hours
    years: str = ""  # the years of the truth the baseline used (climatologies; from meta.json), e.g. "2000-2001"
    p: pd.DataFrame | None = None  # p-values of the paired test, like rel (NaN: not tested); None: no test at all
    keys: list = field(default_factory=list)  # (variable, level) of rel's rows


def _as_runs(runs: Mapping[str, pd.DataFrame] | pd.DataFrame) -> dict[str, pd.DataFrame]:
    import pandas as pd

    if isinstance(runs, pd.DataFrame):
        return {str((runs.attrs.get("meta") or {}).get("name") or "model"): runs}
    return dict(runs)


def _row_order(keys: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    head = [(v, NO_LEVEL if lev is None else lev) for v, lev in WB2_HEADLINE.values()]
    return [k for k in head if k in keys] + sorted(k for k in keys if k not in head)


def reference_pairs(reference: str) -> tuple[tuple[str, str], ...]:
    """The comparisons with another model (``leaderboard --reference``): its RMSE and CRPS as the baseline's."""
    return (("RMSE", reference), ("CRPS", reference))


def scorecard_panels(
    runs: Mapping[str, pd.DataFrame] | pd.DataFrame,
    region: str = "global",
    pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS,
    reference: str | None = None,
) -> list[Panel]:
    """The (model, score, baseline) comparisons the scores allow, in model then ``pairs`` order. ``reference``: the
    name of a model (of any run) that serves every other model as a baseline (scored on the same inits)."""

    runs = _as_runs(runs)
    ref = None
    if reference is not None:
        found = [e for run, df in runs.items() for e in collect_entries({run: df}, region) if e.kind == "model" and e.name == reference]
        if not found:
            names = sorted({e.name for run, df in runs.items() for e in collect_entries({run: df}, region) if e.kind == "model"})
            raise ValueError(f"--reference {reference!r} is none of the models {names}")
        ref = found[0]
    panels = []
    if ref is not None:  # every other model and baseline (a shared one once) against the reference
        for e in collect_entries(runs, region):
            if e.name == reference:
                continue
            for score, base in pairs:
                if score not in SCORES:
                    raise ValueError(f"unknown score {score!r} (known: {list(SCORES)})")
                if base == ref.name:
                    _add_panel(panels, e, ref, score, base, "")
        return panels
    for run, df in runs.items():
        entries = collect_entries({run: df}, region)
        models = [e for e in entries if e.kind == "model"]
        baselines = {e.name: e for e in entries if e.kind == "baseline"}
        years = baseline_years(df.attrs.get("meta") or {})
        for model in models:
            for score, base in pairs:
                if score not in SCORES:
                    raise ValueError(f"unknown score {score!r} (known: {list(SCORES)})")
                if base in baselines:
                    _add_panel(panels, model, baselines[base], score, base, years.get(base, ""))
    return panels


def _add_panel(panels: list[Panel], model, baseline, score: str, base: str, years: str) -> None:
    import pandas as pd

    m, b = model.scores[score].align(baseline.scores[score], join="inner")
    rel = 100.0 * (m - b) / b.abs()
    rel = rel[m.notna() & b.notna() & (b != 0)]
    if rel.empty:
        return
    grid = rel.unstack("lead_time_hours")
    order = _row_order(list(grid.index))
    grid = grid.loc[order]
    grid.index = pd.Index([variable_key(v, lev) for v, lev in order], name="variable")
    panels.append(Panel(model.name, score, base, grid, years, keys=order))


def attach_p_values(panels: Sequence[Panel], p_values: Mapping[tuple[str, str, str, float, int], float]) -> None:
    """Set each panel's ``p`` from ``(model, score, variable, level, lead) -> p`` (:meth:`.significance.Result.p_values`);
    a panel none of whose cells was tested keeps ``p = None``."""
    import numpy as np
    import pandas as pd

    for panel in panels:
        vals = np.full(panel.rel.shape, np.nan)
        for i, (var, lev) in enumerate(panel.keys):
            for j, h in enumerate(panel.rel.columns):
                level = NO_LEVEL if np.isnan(float(lev)) else float(lev)  # the key p_values() gives a 2-D variable
                vals[i, j] = p_values.get((panel.model, panel.score, var, level, int(h)), np.nan)
        panel.p = pd.DataFrame(vals, index=panel.rel.index, columns=panel.rel.columns) if np.isfinite(vals).any() else None


def wrap_title(parts: Sequence[str], width_in: float, fontsize: float) -> str:
    """Lines of ``parts`` wrapped at word boundaries to fit ``width_in`` inches at ``fontsize`` points (a panel title
    wider than its panel runs into the next one); each part starts a new line."""
    import textwrap

    chars = max(12, int(width_in * 72.0 / (0.58 * fontsize)))  # ~0.58 em per character of DejaVu Sans
    return "\n".join(textwrap.fill(p, chars, break_long_words=False, break_on_hyphens=False) for p in parts)


def _nice_ceiling(x: float) -> float:
    for step in (5, 10, 20, 30, 50, 75, 100):
        if x <= step:
            return float(step)
    return 100.0


def plot_scorecard(
    runs: Mapping[str, pd.DataFrame] | pd.DataFrame,
    out_png: str | Path,
    *,
    region: str = "global",
    pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS,
    lead_times: Sequence[int] | None = None,
    max_leads: int | None = 20,
    vmax: float | None = None,
    title: str | None = None,
    dpi: int = 120,
    reference: str | None = None,
    p_values: Mapping[tuple[str, str, str, float, int], float] | None = None,
    alpha: float = 0.05,
) -> Path:
    """Draw the scorecard of one run's scores (a DataFrame) or of several runs (name -> scores) to ``out_png``
    (atomically). ``vmax``: the colour scale's limit in % (default: a round number near the 95th percentile of
    |difference|, 5 … 100; larger values saturate). ``p_values`` (reference mode): cells whose paired test gives
    ``p >= alpha`` are hatched (not significant); a panel without any test says so in its title."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's state alone
    from matplotlib.patches import Rectangle

    from fcn3_lightning.io import atomic_path

    runs = _as_runs(runs)
    panels = scorecard_panels(runs, region, pairs, reference)
    if p_values is not None:
        attach_p_values(panels, p_values)
    if not panels:
        raise ValueError(f"nothing to compare in region {region!r}: no model has a score together with a baseline of {list(pairs)}")
    all_leads = sorted({int(h) for p in panels for h in p.rel.columns})
    leads = sorted(int(h) for h in lead_times) if lead_times is not None else select_leads(all_leads, max_leads)
    models = list(dict.fromkeys(p.model for p in panels))
    cols = [pr for pr in pairs if any((p.score, p.baseline) == pr for p in panels)]
    by_key = {(p.model, p.score, p.baseline): p for p in panels}
    nvars = max(len(p.rel.index) for p in panels)

    colour_vals = []
    for p in panels:
        v = p.rel.reindex(columns=leads).to_numpy(dtype=float)
        colour_vals.append(np.abs(v[np.isfinite(v)]))
    every = np.concatenate(colour_vals) if colour_vals else np.array([])
    if vmax is None:
        vmax = _nice_ceiling(float(np.percentile(every, 95))) if every.size else 10.0
    norm = Normalize(-vmax, vmax)
    cmap = colormaps["RdBu_r"].with_extremes(bad="#e6e6e6")  # low (model better) = blue, high = red

    wrap = max(1, min(len(cols), 48 // max(len(leads), 1)))  # panels per figure row for one model
    rows_per_model = math.ceil(len(cols) / wrap)
    panel_w, panel_h = 1.3 + 0.6 * len(leads), 1.0 + 0.34 * nvars
    width, height = max(wrap * panel_w + 1.8, 7.0), max(len(models) * rows_per_model * panel_h + 1.2, 4.0)
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(len(models) * rows_per_model, wrap, squeeze=False)
    days = all(h % 24 == 0 for h in leads)
    fs = 7 if len(leads) > 10 else 8
    for mi, model in enumerate(models):
        for ci in range(rows_per_model * wrap):
            ax = axes[mi * rows_per_model + ci // wrap, ci % wrap]
            if ci >= len(cols):
                ax.set_axis_off()
                continue
            score, base = cols[ci]
            p = by_key.get((model, score, base))
            if p is None:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{model}:\nno {score} vs {base}", ha="center", va="center", transform=ax.transAxes, color="#777")
                continue
            rel = p.rel.reindex(columns=leads)
            values = rel.to_numpy(dtype=float)
            sign = -1.0 if SCORES[score].higher_is_better else 1.0  # colour by "better", also for ACC
            ax.imshow(np.ma.masked_invalid(sign * values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
            for (i, j), v in np.ndenumerate(values):
                if not math.isfinite(v):
                    continue
                txt = (f"{v:+.1f}" if abs(v) < 10 else f"{v:+.0f}") + ("%" if len(leads) <= 12 else "")  # narrow cells: no "%"
                ax.text(j, i, txt, ha="center", va="center", fontsize=fs, color="white" if abs(v) > 0.6 * vmax else "black")
                pv = float(p.p.reindex(columns=leads).iloc[i, j]) if p.p is not None else math.nan
                if math.isfinite(pv) and pv >= alpha:  # not significant: hatched, as WeatherBench-X's scorecards grey them
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="////", edgecolor="#555555", linewidth=0))
            ax.set_xticks(range(len(leads)), [f"{h // 24}" if days else f"{h}" for h in leads], fontsize=fs + 1)
            ax.set_yticks(range(len(rel.index)), list(rel.index), fontsize=fs + 1)
            ax.set_xlabel(f"lead time [{'days' if days else 'hours'}]")
            if ci % wrap == 0:
                ax.set_ylabel("variable")
            better = "higher" if SCORES[score].higher_is_better else "lower"
            used = f"years {p.years}; " if p.years else ""
            if p_values is not None:
                used += "no per-init scores: not tested; " if p.p is None else ""
            ax.set_title(wrap_title([f"{model}: {score} vs {base}", f"({used}{better} is better)"], panel_w - 0.6, 10), fontsize=10)
            ax.set_xticks(np.arange(-0.5, len(leads)), minor=True)
            ax.set_yticks(np.arange(-0.5, len(rel.index)), minor=True)
            ax.grid(which="minor", color="white", linewidth=1.0)
            ax.tick_params(which="minor", length=0)
    fig.colorbar(
        ScalarMappable(norm=norm, cmap=cmap),
        ax=axes,
        extend="both",
        shrink=min(0.9, 4.0 / fig.get_figheight() + 0.2),
        aspect=30,
        label=(
            f"100·(panel's entry − {reference}) / {reference} [%]\nblue: the entry better than {reference}, red: worse"
            if reference
            else "100·(model − baseline) / baseline [%]\nblue: model better, red: model worse"
        ),
    )
    against = f"the model {reference}" if reference else "baselines"
    sub = f"\nhatched: difference not significant (paired stationary bootstrap over inits, p ≥ {alpha:g})" if p_values is not None else ""
    fig.suptitle(title or f"Scorecard: {', '.join(models)} vs {against}, region {region}{sub}", fontsize=12)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return out_png
