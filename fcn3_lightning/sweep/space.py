"""The search-space file (``configs/sweep/*.yaml``): what varies, what is optimised, how trials are sampled and pruned.

Example::

    base: [../stage2.yaml]          # fit configs layered on configs/base.yaml (paths relative to this file)
    overrides:                      # fit settings of every trial (dotted keys of the resolved fit config)
      trainer.max_steps: 40
    objective: {metric: val/crps_lead24h, mode: min}
    sampler: {name: tpe, seed: 0}
    pruner: {name: median, n_startup_trials: 2}
    report_every_n_steps: 10        # validation (and a report to the pruner) every 10 training steps
    params:
      model.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      model.net.num_layers: {type: int, low: 2, high: 6}
      model.crps: {type: categorical, choices: [cdf, fair]}
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

#: keys the sweep sets itself in every trial
RESERVED = (
    "trainer.default_root_dir",  # each trial has its own directory
    "trainer.val_check_interval",  # report_every_n_steps
    "trainer.check_val_every_n_epoch",
    "trainer.logger.init_args.run_id",  # the trial's nested MLflow run
)
TOP_KEYS = ("base", "overrides", "objective", "sampler", "pruner", "report_every_n_steps", "params", "study_name", "n_trials")
SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "qmc": optuna.samplers.QMCSampler,
}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "none": optuna.pruners.NopPruner,
}
_MISSING = object()


class SweepError(ValueError):
    """A problem with the sweep's configuration; the message names the file, option or key at fault."""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Param:
    """One searched config key: a float or int range, or categorical choices."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.key, list(self.choices))

    def extremes(self) -> tuple[Any, Any]:
        """The two ends of the range (first and last choice): the values checked against the fit config up front."""
        if self.type == "categorical":
            return self.choices[0], self.choices[-1]
        return self.low, self.high

    def describe(self) -> str:
        if self.type == "categorical":
            return f"categorical {list(self.choices)}"
        extra = " log" if self.log else (f" step {self.step}" if self.step else "")
        return f"{self.type} [{self.low}, {self.high}]{extra}"

    @classmethod
    def parse(cls, key: str, spec: Any, where: str) -> Param:
        where = f"{where}: params.{key}"
        if not isinstance(spec, dict):
            raise SweepError(f"{where}: expected a mapping with 'type' (float, int or categorical), got {spec!r}")
        kind = spec.get("type")
        allowed = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"}}
        allowed["categorical"] = {"type", "choices"}
        if kind not in allowed:
            raise SweepError(f"{where}.type: must be float, int or categorical, got {kind!r}")
        unknown = sorted(set(spec) - allowed[kind])
        if unknown:
            raise SweepError(f"{where}: unknown fields {unknown} for type {kind} (allowed: {sorted(allowed[kind])})")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise SweepError(f"{where}.choices: empty or missing; give a non-empty list of values")
            bad = [c for c in choices if c is not None and not isinstance(c, bool | int | float | str)]
            if bad:
                raise SweepError(f"{where}.choices: Optuna choices must be None, bool, int, float or str, got {bad}")
            if len({repr(c) for c in choices}) != len(choices):
                raise SweepError(f"{where}.choices: duplicate values in {choices}")
            return cls(key, kind, choices=tuple(choices))
        low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
        for name, v in (("low", low), ("high", high)):
            if not _is_number(v) or (kind == "int" and not isinstance(v, int)):
                raise SweepError(f"{where}.{name}: expected {'an integer' if kind == 'int' else 'a number'}, got {v!r}")
        if not low < high:
            raise SweepError(f"{where}: empty range: low ({low}) must be smaller than high ({high})")
        if not isinstance(log, bool):
            raise SweepError(f"{where}.log: expected true or false, got {log!r}")
        if log and low <= 0:
            raise SweepError(f"{where}: a log range needs low > 0, got {low}")
        if step is not None:
            if log:
                raise SweepError(f"{where}: 'step' and 'log: true' cannot be combined")
            if not _is_number(step) or step <= 0 or (kind == "int" and not isinstance(step, int)):
                raise SweepError(f"{where}.step: expected a positive {'integer' if kind == 'int' else 'number'}, got {step!r}")
            if step > high - low:
                raise SweepError(f"{where}: empty range: step ({step}) is larger than high - low ({high - low})")
        return cls(key, kind, low=float(low) if kind == "float" else low, high=float(high) if kind == "float" else high, log=log, step=step)


@dataclass(frozen=True)
class SweepSpec:
    """A parsed search-space file (see the module docstring)."""

    path: Path
    params: dict[str, Param]
    metric: str
    mode: str = "min"
    base: tuple[Path, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    report_every_n_steps: int = 10
    study_name: str = ""
    n_trials: int | None = None

    @property
    def direction(self) -> str:
        return "minimize" if self.mode == "min" else "maximize"

    def make_sampler(self, trial_number: int = 0) -> optuna.samplers.BaseSampler:
        """The sampler for trial ``trial_number``: a seeded TPE or random sampler is seeded ``seed + trial_number``,
        so parallel workers (each with its own sampler) do not draw the same values; QMC keeps its seed (its
        sequence is indexed by trial number already)."""
        cfg = dict(self.sampler)
        if cfg["name"] in ("tpe", "random") and cfg.get("seed") is not None:
            cfg["seed"] = int(cfg["seed"]) + trial_number
        return _build(SAMPLERS, cfg, f"{self.path}: sampler")

    def make_pruner(self) -> optuna.pruners.BasePruner:
        return _build(PRUNERS, self.pruner, f"{self.path}: pruner")

    def summary(self) -> dict[str, str]:
        """Flat description of the search (for MLflow's parent run and the study's attributes)."""
        out = {
            "objective.metric": self.metric,
            "objective.mode": self.mode,
            "sampler": _describe(self.sampler),
            "pruner": _describe(self.pruner),
            "report_every_n_steps": str(self.report_every_n_steps),
            "base": str([str(p) for p in self.base]),
        }
        out.update({f"space.{k}": p.describe() for k, p in self.params.items()})
        out.update({f"override.{k}": str(v)[:400] for k, v in self.overrides.items()})
        return out


def _describe(cfg: dict[str, Any]) -> str:
    rest = {k: v for k, v in cfg.items() if k != "name"}
    return f"{cfg['name']} {rest}" if rest else str(cfg["name"])


def _build(registry: dict[str, type], cfg: dict[str, Any], where: str) -> Any:
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    try:
        return registry[cfg["name"]](**kwargs)
    except (TypeError, ValueError) as e:  # an unknown or bad keyword argument
        raise SweepError(f"{where} {cfg['name']!r}: {e}") from e


def _named(value: Any, registry: dict[str, type], where: str, default: str) -> dict[str, Any]:
    cfg = {"name": default} if value is None else ({"name": value} if isinstance(value, str) else value)
    if not isinstance(cfg, dict) or cfg.get("name") not in registry:
        name = cfg.get("name") if isinstance(cfg, dict) else cfg
        raise SweepError(f"{where}.name: unknown {name!r}; choose one of {sorted(registry)}")
    return dict(cfg)


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a search-space file (structure and ranges; keys are checked against the fit config later)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"--config {path}: no such sweep file")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown keys {unknown} (allowed: {list(TOP_KEYS)})")

    base = raw.get("base") or []
    if isinstance(base, str):
        base = [base]
    resolved = []
    for b in base:
        p = (path.parent / b).resolve()
        if not p.is_file():
            raise SweepError(f"{path}: base: {b} not found (looked for {p}; paths are relative to the sweep file)")
        resolved.append(p)

    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
        raise SweepError(f"{path}: overrides: expected a mapping of dotted fit-config keys to values")

    objective = raw.get("objective")
    if not isinstance(objective, dict) or not isinstance(objective.get("metric"), str):
        raise SweepError(f"{path}: objective: expected {{metric: <a validation metric, e.g. val/crps_lead24h>, mode: min|max}}")
    extra = sorted(set(objective) - {"metric", "mode"})
    if extra:
        raise SweepError(f"{path}: objective: unknown keys {extra} (allowed: metric, mode)")
    metric, mode = objective["metric"], objective.get("mode", "min")
    if not metric.startswith("val/"):
        raise SweepError(f"{path}: objective.metric {metric!r}: the objective is a validation metric (val/...)")
    if mode not in ("min", "max"):
        raise SweepError(f"{path}: objective.mode: must be min or max, got {mode!r}")

    every = raw.get("report_every_n_steps", 10)
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise SweepError(f"{path}: report_every_n_steps: expected a positive integer, got {every!r}")
    n_trials = raw.get("n_trials")
    if n_trials is not None and (not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1):
        raise SweepError(f"{path}: n_trials: expected a positive integer, got {n_trials!r}")

    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise SweepError(f"{path}: params: the search space is empty; give at least one config key with a range or choices")
    params = {str(k): Param.parse(str(k), v, str(path)) for k, v in params_raw.items()}
    for key in [*params, *overrides]:
        if key in RESERVED or any(key.startswith(r + ".") for r in RESERVED):
            raise SweepError(f"{path}: {key}: set by the sweep itself in every trial ({', '.join(RESERVED)})")
    clash = sorted(set(params) & set(overrides))
    if clash:
        raise SweepError(f"{path}: {clash}: both searched (params) and fixed (overrides)")

    return SweepSpec(
        path=path,
        params=params,
        metric=metric,
        mode=mode,
        base=tuple(resolved),
        overrides=dict(overrides),
        sampler=_named(raw.get("sampler"), SAMPLERS, f"{path}: sampler", "tpe"),
        pruner=_named(raw.get("pruner"), PRUNERS, f"{path}: pruner", "median"),
        report_every_n_steps=every,
        study_name=str(raw.get("study_name") or path.stem),
        n_trials=n_trials,
    )


# --- dotted keys in a resolved config ---------------------------------------------------------------


def _step(node: Any, part: str) -> Any:
    if isinstance(node, dict):
        return node.get(part, _MISSING)
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return _MISSING


def get_key(cfg: dict[str, Any], key: str) -> Any:
    """The value at a dotted key (``model.net.num_layers``; list items by index, ``trainer.callbacks.0``)."""
    node: Any = cfg
    for part in key.split("."):
        node = _step(node, part)
        if node is _MISSING:
            raise KeyError(key)
    return node


def set_key(cfg: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key; its parent must exist (a new leaf is allowed in a mapping: the fit parser checks it)."""
    *parents, leaf = key.split(".")
    node: Any = cfg
    for part in parents:
        node = _step(node, part)
        if node is _MISSING or not isinstance(node, dict | list):
            raise KeyError(key)
    if isinstance(node, list):
        if not leaf.isdigit() or int(leaf) >= len(node):
            raise KeyError(key)
        node[int(leaf)] = value
    else:
        node[leaf] = value


def flat_keys(cfg: Any, prefix: str = "") -> list[str]:
    if isinstance(cfg, dict):
        items = cfg.items()
    elif isinstance(cfg, list):
        items = ((str(i), v) for i, v in enumerate(cfg))
    else:
        return [prefix]
    out = [prefix] if prefix else []
    for k, v in items:
        out += flat_keys(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def unknown_key_error(where: str, key: str, cfg: dict[str, Any], what: str) -> SweepError:
    keys = flat_keys(cfg)
    section, _, leaf = key.rpartition(".")
    # an abbreviation of the words first (model.learning_rate -> model.lr), then keys that look alike
    acronym = "".join(w[0] for w in leaf.split("_") if w)
    close = [k for k in keys if k.rpartition(".")[0] == section and k.rpartition(".")[2] == acronym and k != key]
    close += [k for k in difflib.get_close_matches(key, keys, n=3, cutoff=0.5) if k not in close]
    close = close[:3]
    hint = f"; did you mean {close}?" if close else ""
    return SweepError(f"{where}: {key}: no such key in {what}{hint} (a key of model.net that is not set can be added under overrides)")
