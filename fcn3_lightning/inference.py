"""Ensemble inference: forecasts from a checkpoint, streamed step by step into a WeatherBench2 forecast Zarr.

``python -m fcn3_lightning predict --checkpoint best.ckpt --init-times 2002-07-01T00 --members 4 --steps 40``

For each initial time the initial condition is read from the data store and normalised, the
ensemble is rolled forward one 6 h step at a time (:meth:`EnsembleForecaster.steps`: fresh
stationary noise at the initial time, an AR(1) noise step before every later step, the cos zenith
of each step's input time), and every step is denormalised and written to the output at once, so
memory does not depend on the number of steps or initial times.

The noise is that of validation (key 0 of :func:`keyed_streams`, the checkpoint's noise seed) with
the initial time itself as the sample id (:func:`fcn3_lightning.forecaster.noise_sample_id`): a forecast depends only on its
initial time, never on which other initial times are in the run, so a resumed run writes exactly
what an uninterrupted one would have.

Output layout (WeatherBench2 "by init" forecast): one array per variable with WB2 long names, dims
``(time, number, prediction_timedelta, [level], latitude, longitude)``, float32, physical units,
latitude in the data store's order, one chunk per (initial time, member, step).

Atomic and resumable: the store is built as ``<output>.partial`` and renamed to ``<output>`` when every
initial time is done, so ``<output>`` is never half-written. ``<output>.partial/fcn3_predict.json``
records the run's arguments and the finished initial times (rewritten atomically after each); a
rerun of the same command skips those and recomputes only the unfinished ones. A rerun with other
arguments is refused, naming what differs.

Physical bounds: every step is checked against the bounds of :mod:`fcn3_lightning.bounds` (derived from the
training statistics). The first lead time at which a channel leaves them is warned about at once on stderr
(channel, lead time, initial time, member, value and bounds), once per channel; a summary with each channel's
worst excursion follows at the end; the bounds and what left them are kept in the progress record and, in the
finished store, in the attribute ``fcn3_lightning_bounds`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fcn3_lightning.bounds import Bounds, Extremes, Report
from fcn3_lightning.channels import WB2_UNITS, parse_channel
from fcn3_lightning.io import atomic_path, publish_folder
from fcn3_lightning.paths import local_path, parse_storage_options, store_location

if TYPE_CHECKING:  # the heavy imports (torch, torch-harmonics, zarr) wait until a command runs
    import torch

    from fcn3_lightning.data.store import WB2Store
    from fcn3_lightning.forecaster import Forecaster

FORMAT = "fcn3_lightning.forecast/v1"
PROGRESS_FILE = "fcn3_predict.json"
PARTIAL_SUFFIX = ".partial"
DEFAULT_MEMBERS = 4


def default_member_batch(members: int) -> int:
    """``predict``'s member batch when ``--member-batch`` is not given: all ``members`` of an initial time.

    The rule, and what it rests on:

    - CPU (measured, 2 threads): the members of a batch go through the network one call each anyway
      (``EnsembleForecaster.steps``: one at a time is 0.95x / 0.78x the batched time at 33x64 / 181x360,
      ``bench/member_batch.py``), so a larger batch costs only memory (a state and a noise state per member), and at the
      first step the state encoders run once per batch instead of once per member (``bench/shared_encoders.py``).
    - GPU and other devices (unmeasured: this project's sessions had no GPU): the members run as one batch, which is
      expected to use the device better than one at a time, with the same encoder sharing; neither has been timed, and
      a batch too large for the device's memory fails with its out-of-memory error: lower ``--member-batch`` then.
      ``python bench/member_batch.py --device cuda`` and ``python bench/shared_encoders.py --device cuda`` measure both.
    """
    return members


def _iso(t: np.datetime64) -> str:
    return str(np.datetime64(t, "s"))


# --- the predictor -----------------------------------------------------------------------------------


@dataclass
class Predictor:
    """A forecaster and the data store its initial conditions come from.

    Build it with :func:`load_predictor`; :meth:`forecast` streams one initial time's ensemble.
    """

    forecaster: Forecaster
    store: WB2Store
    default_members: int = DEFAULT_MEMBERS
    #: physical bounds of the forecast (from the training statistics): predict reports where a forecast leaves them
    bounds: Bounds | None = None

    @property
    def channels(self) -> list[str]:
        return list(self.forecaster.channels)

    @property
    def step_hours(self) -> int:
        return self.forecaster.step_hours

    @property
    def device(self) -> torch.device:
        return self.forecaster.device

    @property
    def noise_seed(self) -> int:
        return self.forecaster.noise_seed

    @property
    def source(self) -> dict[str, Any]:
        return self.forecaster.source

    def initial_state(self, init_time: np.datetime64) -> torch.Tensor:
        """The initial condition ``(1, C, H, W)`` in physical units on the device (90N first)."""
        import torch

        x = self.store.read([self.store.time_index(init_time)])  # refuses NaN/Inf, naming the channel and time
        return torch.from_numpy(x).to(self.device)

    def forecast(
        self, init_time: np.datetime64, members: int, steps: int, batch_members: int | None = None
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(first member, step index, values)`` with values ``(m, C, H, W)`` float32 in physical units (90N first).

        ``batch_members`` members run at once (default: :func:`default_member_batch`); each member draws from its own
        noise stream, so the split changes only how much memory a step takes.
        """
        batch_members = batch_members or default_member_batch(members)
        x0 = self.initial_state(init_time)
        for m0 in range(0, members, batch_members):
            m1 = min(members, m0 + batch_members)
            for s, y in enumerate(self.forecaster.rollout(x0, init_time, members, steps, member_slice=slice(m0, m1))):
                yield m0, s, y[0].float().cpu().numpy()

    def forecast_steps(self, init_time: np.datetime64, members: int, steps: int, batch_members: int | None = None) -> Iterator[np.ndarray]:
        """Yield every step's ``(members, C, H, W)`` (as :meth:`forecast`), all members of a step together: the member
        batches advance in lockstep (each keeps its own noise stream, so the values are :meth:`forecast`'s)."""
        batch_members = batch_members or members
        x0 = self.initial_state(init_time)
        batches = [
            self.forecaster.rollout(x0, init_time, members, steps, member_slice=slice(m0, min(members, m0 + batch_members)))
            for m0 in range(0, members, batch_members)
        ]
        for ys in zip(*batches, strict=True):
            yield np.concatenate([y[0].float().cpu().numpy() for y in ys])


def load_predictor(
    checkpoint: str | Path,
    *,
    data_path: str | Path | None = None,
    stats_path: str | Path | None = None,
    config: str | Path | None = None,
    device: str | None = None,
    noise_seed: int | None = None,
    storage_options: dict | None = None,
) -> Predictor:
    """Build a :class:`Predictor`: :func:`fcn3_lightning.load_forecaster` and the store of the initial conditions.

    Args:
        checkpoint: anything :func:`~fcn3_lightning.load_forecaster` reads: a model package folder, a checkpoint of
            this project, a model file from ``convert``, a reference (Makani) checkpoint with ``config``.
        data_path: the WB2 store to read initial conditions from; default: the checkpoint's training store (the
            default world where there was none). A model package (or a model file from one) needs it: only the
            prognostic variables are read from it, the static fields come with the package.
        stats_path: normalisation statistics for checkpoints without their own (default: the checkpoint's
            ``stats_path``, else the training store's ``.stats.json``, else ``<data store>.stats.json``).
        config: reference architecture (``config.json`` or a golden ``manifest.json``) for reference checkpoints.
        device: "cpu", "cuda", ... (default: CUDA if available).
        noise_seed: base seed of the noise (default: the checkpoint's, else 333).
        storage_options: fsspec options for a URL ``data_path`` (see :mod:`fcn3_lightning.paths`).
    """
    from fcn3_lightning.data.store import WB2Store

    if data_path is not None:
        data_path = store_location(data_path, "--data", storage_options)
    from fcn3_lightning.forecaster import load_forecaster

    forecaster = load_forecaster(checkpoint, device, config=config, data_path=data_path, stats_path=stats_path, noise_seed=noise_seed)
    data = data_path if data_path is not None else forecaster.source.get("data")
    if data is None:
        raise ValueError(
            f"{checkpoint} ({forecaster.source['kind']}) brings no data store: pass --data-path, a WB2 Zarr store with the "
            f"initial conditions of its channels {forecaster.channels}"
        )
    try:
        store = WB2Store(data, forecaster.channels, step_hours=None)  # initial states only: any cadence serves
    except ValueError as e:
        raise ValueError(f"the data store {data} does not hold what {checkpoint} needs: {e}") from e
    store.require_single_member("predict (the initial condition of each forecast)")
    if store.shape != forecaster.shape or not (
        np.allclose(store.lat, forecaster.lat, atol=1e-6) and np.allclose(store.lon, forecaster.lon, atol=1e-6)
    ):
        raise ValueError(
            f"the data store {data} has the grid {store.shape} (lat {store.lat[0]:g} .. {store.lat[-1]:g}, lon {store.lon[0]:g} .. "
            f"{store.lon[-1]:g}), the model {forecaster.shape} (lat {forecaster.lat[0]:g} .. {forecaster.lat[-1]:g}, lon "
            f"{forecaster.lon[0]:g} .. {forecaster.lon[-1]:g})"
        )
    members = int(forecaster.source.get("members") or DEFAULT_MEMBERS)
    where = forecaster.stats.source.get("file", forecaster.source.get("path"))
    bounds = Bounds.from_stats(forecaster.stats, forecaster.channels, reference=f"the training data's statistics ({where})")
    return Predictor(forecaster=forecaster, store=store, default_members=members, bounds=bounds)


# --- initial times ------------------------------------------------------------------------------------


def init_times_in_range(store: WB2Store, start: str, end: str, every_hours: int) -> np.ndarray:
    """The store times in ``start .. end`` (inclusive) every ``every_hours`` hours counted from ``start``."""
    if every_hours <= 0:
        raise ValueError(f"--init-every-hours must be positive, got {every_hours}")
    i0, i1 = store.index_range(start, end)
    times = store.times[i0 : i1 + 1]
    times = times[((times - np.datetime64(start, "ns")) / np.timedelta64(1, "h")) % every_hours == 0]
    if times.size == 0:
        raise ValueError(f"no store time in {start} .. {end} lies on a {every_hours}-hourly cadence from {start}")
    return times


def lead_days_to_steps(lead_days: float, step_hours: int) -> int:
    """Number of model steps of a lead time in days (which must be a whole number of steps)."""
    steps = lead_days * 24 / step_hours
    if lead_days <= 0 or abs(steps - round(steps)) > 1e-9:
        raise ValueError(f"--lead-days {lead_days:g} is not a positive whole number of {step_hours} h steps")
    return int(round(steps))


def _check_init_times(store: WB2Store, init_times: Sequence[str | np.datetime64]) -> np.ndarray:
    from fcn3_lightning.forecaster import noise_sample_id

    if len(init_times) == 0:
        raise ValueError("no initial times given")
    times = np.array([np.datetime64(t, "ns") for t in init_times])
    for t in times:
        try:
            store.time_index(t)
        except ValueError as e:
            raise ValueError(f"initial time {_iso(t)} has no initial condition in the data store: {e}") from e
        noise_sample_id(t)  # a time before 1900 has none
    uniq, counts = np.unique(times, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"initial times given more than once: {[_iso(t) for t in uniq[counts > 1]]}")
    return uniq  # sorted: the output's time axis ascends


def _check_count(name: str, value: int, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (high is not None and value > high):
        limit = f">= {low}" if high is None else f"in {low} .. {high}"
        raise ValueError(f"{name} must be a whole number {limit}, got {value!r}")
    return int(value)


# --- the output store ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Variable:
    """One output array: its WB2 name and the channel of each of its levels (-1 where the channel list lacks one)."""

    name: str
    channel_index: tuple[int, ...]
    has_level: bool


def _output_variables(channels: Sequence[str]) -> tuple[list[_Variable], list[int]]:
    parsed = [parse_channel(c) for c in channels]
    levels = sorted({c.level for c in parsed if c.level is not None})  # WB2 order: ascending hPa
    by_name: dict[str, dict[int | None, int]] = {}
    for i, c in enumerate(parsed):
        by_name.setdefault(c.long_name, {})[c.level] = i
    out = []
    for name, entries in by_name.items():
        if None in entries:
            out.append(_Variable(name, (entries[None],), False))
        else:
            out.append(_Variable(name, tuple(entries.get(lev, -1) for lev in levels), True))
    return out, levels


def _attrs(source: Any, name: str, default: dict[str, Any]) -> dict[str, Any]:
    """Descriptive attributes of ``name`` in the data store, else ``default``."""
    have = dict(source[name].attrs) if name in source.variables else {}
    keep = {k: v for k, v in have.items() if k in ("units", "long_name", "standard_name")}
    return {**default, **keep}


def _coords(predictor: Predictor, times: np.ndarray, members: int, lead: np.ndarray) -> dict[str, Any]:
    """The output's coordinates (store order of latitude) for ``times`` x ``members`` x ``lead``."""
    src = predictor.store.dataset
    _, levels = _output_variables(predictor.channels)
    coords: dict[str, Any] = {
        "time": ("time", times.astype("datetime64[ns]"), {"long_name": "initial time"}),
        "number": ("number", np.arange(members, dtype=np.int64), {"long_name": "ensemble member"}),
        "prediction_timedelta": ("prediction_timedelta", lead, {"long_name": "lead time"}),
        # the store's own latitude order (the model works 90N first; writes flip back)
        "latitude": ("latitude", src["latitude"].values, _attrs(src, "latitude", {"units": "degrees_north", "long_name": "latitude"})),
        "longitude": ("longitude", src["longitude"].values, _attrs(src, "longitude", {"units": "degrees_east", "long_name": "longitude"})),
    }
    if levels:
        coords["level"] = ("level", np.array(levels, dtype=np.int64), _attrs(src, "level", {"units": "hPa", "long_name": "pressure level"}))
    return coords


def _variable_attrs(predictor: Predictor, v: _Variable) -> dict[str, Any]:
    default = {"units": WB2_UNITS[v.name]} if v.name in WB2_UNITS else {}
    default["long_name"] = v.name.replace("_", " ")
    return _attrs(predictor.store.dataset, v.name, default)


def _dims(v: _Variable) -> list[str]:
    return ["time", "number", "prediction_timedelta", *(["level"] if v.has_level else []), "latitude", "longitude"]


def _leads(predictor: Predictor, steps: int) -> np.ndarray:
    return (np.arange(1, steps + 1) * np.timedelta64(predictor.step_hours, "h")).astype("timedelta64[ns]")


def _template(predictor: Predictor, times: np.ndarray, members: int, steps: int) -> Any:
    """The output's layout as an in-memory dataset whose arrays hold no memory (a broadcast NaN): what a scorer plans from."""
    import xarray as xr

    coords = _coords(predictor, times, members, _leads(predictor, steps))
    variables, levels = _output_variables(predictor.channels)
    h, w = predictor.store.shape
    data = {}
    for v in variables:
        shape = (times.size, members, steps, *((len(levels),) if v.has_level else ()), h, w)
        data[v.name] = (_dims(v), np.broadcast_to(np.float32(np.nan), shape), _variable_attrs(predictor, v))
    return xr.Dataset(data, coords=coords)


def _step_dataset(predictor: Predictor, time: np.datetime64, step: int, values: np.ndarray) -> Any:
    """One step of all members, ``values`` (M, C, H, W) 90N first, as the output store would hold it (one init, one lead)."""
    import xarray as xr

    lead = _leads(predictor, step + 1)[-1:]
    coords = _coords(predictor, np.array([time], dtype="datetime64[ns]"), values.shape[0], lead)
    data = {
        v.name: (_dims(v), block[None, :, None], {}) for v, block in _variable_blocks(predictor.channels, values, predictor.store.flip_lat)
    }
    return xr.Dataset(data, coords=coords)


def _variable_blocks(channels: Sequence[str], values: np.ndarray, flip_lat: bool) -> Iterator[tuple[_Variable, np.ndarray]]:
    """Each output variable's part of ``values`` (m, C, H, W) 90N first: (m, [level], H, W) in the store's latitude order,
    NaN at levels the channel list lacks."""
    if flip_lat:
        values = values[..., ::-1, :]
    variables, _ = _output_variables(channels)
    for v in variables:
        if v.has_level:
            idx = np.asarray(v.channel_index)
            block = values[:, np.maximum(idx, 0)]  # a copy: fancy indexing
            block[:, idx < 0] = np.nan
        else:
            block = np.ascontiguousarray(values[:, v.channel_index[0]])
        yield v, block


def _create_store(path: Path, predictor: Predictor, times: np.ndarray, members: int, steps: int, arguments: dict[str, Any]) -> None:
    """An empty forecast store (coordinates, attributes, NaN-filled arrays chunked by (init, member, step))."""
    import xarray as xr
    import zarr

    store = predictor.store
    variables, levels = _output_variables(predictor.channels)
    coords = _coords(predictor, times, members, _leads(predictor, steps))
    attrs = {
        "title": "FCN3 ensemble forecast",
        "source": "fcn3_lightning.inference (python -m fcn3_lightning predict)",
        "fcn3_lightning_predict": json.dumps(arguments),
    }
    xr.Dataset(coords=coords, attrs=attrs).to_zarr(path, mode="w-", zarr_format=2, consolidated=False)
    group = zarr.open_group(str(path), mode="r+")
    h, w = store.shape
    for v in variables:
        shape = (times.size, members, steps, *((len(levels),) if v.has_level else ()), h, w)
        group.create_array(
            v.name,
            shape=shape,
            chunks=(1, 1, 1, *shape[3:]),
            dtype="float32",
            fill_value=np.nan,
            attributes={**_variable_attrs(predictor, v), "_ARRAY_DIMENSIONS": _dims(v)},
        )
    zarr.consolidate_metadata(str(path))


class _Writer:
    """Writes one (member batch, step) of one initial time into every output array."""

    def __init__(self, path: Path, channels: Sequence[str], flip_lat: bool):
        import zarr

        group = zarr.open_group(str(path), mode="r+")
        self.arrays = {v.name: group[v.name] for v in _output_variables(channels)[0]}
        self.channels = list(channels)
        self.flip_lat = flip_lat

    def write(self, i: int, m0: int, s: int, values: np.ndarray) -> None:
        """``values`` (m, C, H, W), latitude 90N first."""
        for v, block in _variable_blocks(self.channels, values, self.flip_lat):
            self.arrays[v.name][i, m0 : m0 + values.shape[0], s] = block


def _read_progress(path: Path) -> dict[str, Any] | None:
    f = path / PROGRESS_FILE
    if not f.is_file():
        return None
    blob = json.loads(f.read_text())
    return blob if blob.get("format") == FORMAT else None


def _write_progress(path: Path, arguments: dict[str, Any], complete: list[str], run: dict[str, Any], out_of_bounds: Report) -> None:
    # atomically: a kill leaves the previous list, never a torn one
    blob = {"format": FORMAT, "arguments": arguments, "complete": complete, "run": run, "out_of_bounds": out_of_bounds.as_dict()}
    with atomic_path(path / PROGRESS_FILE) as tmp:
        tmp.write_text(json.dumps(blob, indent=1))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            a, b = (_short(x.get(k)) for x in (old, new))
            out.append(f"{k}: {a} there, {b} now")
    return out


def _short(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _written_by_predict(path: Path) -> bool:
    try:
        return "fcn3_lightning_predict" in json.loads((path / ".zattrs").read_text())
    except (OSError, ValueError):
        return False


def predict(
    predictor: Predictor,
    init_times: Sequence[str | np.datetime64],
    output: str | Path,
    *,
    members: int | None = None,
    steps: int = 40,
    batch_members: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    callback: Callable[[np.datetime64, int, int], None] | None = None,
    score_against: str | Path | Any | None = None,
    score_out: str | Path | None = None,
    climatology: str | Path | Any | None = None,
    score_options: Any = None,
    keep_forecast: bool = True,
) -> Path:
    """Forecast every initial time and write the WB2 forecast store ``output``; returns its path (``score_out`` when
    the forecast is not kept).

    Args:
        predictor: from :func:`load_predictor`.
        init_times: initial times (each must be a time of the data store).
        output: the Zarr store to write (built as ``<output>.partial``, renamed when complete).
        members: ensemble size (default: the checkpoint's validation ensemble size).
        steps: number of 6 h steps (lead times step, 2 step, ...).
        batch_members: members run at once (default: :func:`default_member_batch`, all); lower it to save memory.
        overwrite: replace an existing ``output`` (kept until the new one is complete) or a ``.partial``
            store of another run.
        progress: show a progress bar.
        callback: called after every write with (initial time, first member, step index).
        score_against: the truth (a WB2 Zarr, as ``evaluate --obs``): score the forecast while it is made
            (:mod:`fcn3_lightning.eval.stream`) and write ``evaluate``'s results to ``score_out``; all members of a step
            are made together (member batches in lockstep), so memory does not grow with the lead times.
        score_out: the results folder (required with ``score_against``).
        climatology: as ``evaluate --climatology`` (default: computed from ``score_against``).
        score_options: :class:`fcn3_lightning.eval.harness.Options` of the scoring.
        keep_forecast: write the forecast store too (default); False: only the scores (requires ``score_against``).
    """
    import torch
    from tqdm.auto import tqdm

    from fcn3_lightning.forecaster import NOISE_KEY, fingerprint

    members = _check_count("members", predictor.default_members if members is None else members, 1)
    steps = _check_count("steps", steps, 1)
    batch_members = default_member_batch(members) if batch_members is None else batch_members
    batch_members = _check_count("batch_members", batch_members, 1, members)
    times = _check_init_times(predictor.store, init_times)
    if not keep_forecast and score_against is None:
        raise ValueError("--no-keep-forecast needs --score-against: without scores and without the forecast nothing would be kept")
    if score_against is not None and score_out is None:
        raise ValueError("--score-against needs --score-out, the folder for the results")
    output = Path(output)
    partial = output.with_name(output.name + PARTIAL_SUFFIX)
    arguments = {
        "format": FORMAT,
        "model_sha256": fingerprint(predictor.forecaster),
        "data": predictor.store.path if predictor.store.location.remote else str(predictor.store.path.resolve()),
        "channels": predictor.channels,
        "init_times": [_iso(t) for t in times],
        "members": members,
        "steps": steps,
        "step_hours": predictor.step_hours,
        "noise_seed": predictor.noise_seed,
        "noise_key": NOISE_KEY,
    }
    run = {**predictor.source, "device": str(predictor.device), "batch_members": batch_members, "torch": torch.__version__}

    scoring = None
    if score_against is not None:
        from fcn3_lightning.eval.stream import StreamingEvaluation

        if keep_forecast and output.exists() and not overwrite and _read_progress(output) is not None:
            if not _differences(_read_progress(output)["arguments"], arguments):  # complete already: score the store itself
                from fcn3_lightning.eval.harness import evaluate

                print(f"{output} is complete already: scoring it", file=sys.stderr)
                evaluate(output, score_against, score_out, climatology, score_options)
                return output
        # planned now: a truth that lacks a variable or a valid time fails before any forecast is made
        desc = str(output) if keep_forecast else f"not kept (predict --no-keep-forecast, model {arguments['model_sha256'][:12]})"
        scoring = StreamingEvaluation(
            _template(predictor, times, members, steps), score_against, score_out, climatology, score_options, desc
        )
        if not keep_forecast:
            return _forecast_and_score(predictor, times, members, steps, batch_members, scoring, progress, callback, Path(score_out))

    if output.exists() and not overwrite:
        done = _read_progress(output)
        if done is None:
            raise ValueError(f"{output} exists and is not a forecast written by predict; choose another --output or pass --overwrite")
        diff = _differences(done["arguments"], arguments)
        if diff:
            raise ValueError(
                f"{output} holds a forecast with other arguments ({'; '.join(diff)}); choose another --output or pass --overwrite"
            )
        print(f"{output} is complete already: nothing to do", file=sys.stderr)
        return output

    complete: set[str] = set()
    out_of_bounds = Report()  # channels that left their physical bounds (in the finished initial times and this run)
    if partial.exists():
        prev = _read_progress(partial)
        if prev is None and not _written_by_predict(partial):
            raise ValueError(f"{partial} exists and was not written by predict; move it out of the way")
        diff = [] if prev is None else _differences(prev["arguments"], arguments)
        if diff and not overwrite:
            raise ValueError(
                f"{partial} holds an unfinished forecast with other arguments ({'; '.join(diff)}); rerun with those "
                "arguments to finish it, or pass --overwrite to start over"
            )
        if prev is None or diff:  # killed while being created, or replaced on request: nothing to keep
            shutil.rmtree(partial)
        elif scoring is not None and prev["complete"]:
            raise ValueError(
                f"{partial} holds {len(prev['complete'])} finished initial times, whose scores were not kept: finish it without "
                "--score-against and run evaluate on it, or pass --overwrite to start over and score while forecasting"
            )
        else:
            complete = set(prev["complete"]) & set(arguments["init_times"])
            out_of_bounds = Report.from_dict(prev.get("out_of_bounds"))
            for stale in partial.glob(f".{PROGRESS_FILE}.*.tmp"):  # a progress rewrite cut short by a kill
                stale.unlink()
    if not partial.exists():
        _create_store(partial, predictor, times, members, steps, arguments)
        _write_progress(partial, arguments, [], run, out_of_bounds)
    elif complete:
        print(f"resuming {partial}: {len(complete)} of {times.size} initial times are finished", file=sys.stderr)
        for line in out_of_bounds.lines(_units(predictor.channels)):
            print(f"predict: WARNING: the finished initial times left their physical bounds: {line}", file=sys.stderr)

    todo = [i for i, t in enumerate(times) if _iso(t) not in complete]
    writer = _Writer(partial, predictor.channels, predictor.store.flip_lat)
    n_batches = -(-members // batch_members)
    bar = tqdm(total=len(todo) * n_batches * steps, desc="predict", unit="step", disable=not progress)
    watch = _BoundsWatch(predictor, steps, out_of_bounds, lambda msg: tqdm.write(msg, file=sys.stderr))
    try:
        for i in todo:
            t = times[i]
            bar.set_postfix_str(_iso(t))
            watch.begin(_iso(t))
            if scoring is None:
                stream: Iterator[tuple[int, int, np.ndarray]] = predictor.forecast(t, members, steps, batch_members)
            else:  # all members of a step together, scored at once
                stream = ((0, k, v) for k, v in enumerate(predictor.forecast_steps(t, members, steps, batch_members)))
            for m0, s, values in stream:
                writer.write(i, m0, s, values)  # at once: memory does not grow with the steps
                watch.check(m0, s, values)
                if scoring is not None:
                    scoring.add(_step_dataset(predictor, t, s, values))
                bar.update(1 if scoring is None else n_batches)
                if callback is not None:
                    callback(t, m0, s)
            complete.add(_iso(t))
            _write_progress(partial, arguments, [x for x in arguments["init_times"] if x in complete], run, out_of_bounds)
    except BaseException:
        bar.close()
        print(
            f"predict stopped: {len(complete)} of {times.size} initial times are finished in {partial}; rerun the same command to resume",
            file=sys.stderr,
        )
        raise
    bar.close()
    watch.finish(partial)
    if scoring is not None:
        scoring.finish()  # before the swap: a failure here leaves the forecast in .partial, resumable
    publish_folder(partial, output)  # an old output stays until the new one is complete
    return output


def _forecast_and_score(
    predictor: Predictor,
    times: np.ndarray,
    members: int,
    steps: int,
    batch_members: int,
    scoring: Any,
    progress: bool,
    callback: Callable[[np.datetime64, int, int], None] | None,
    score_out: Path,
) -> Path:
    """``predict --score-against --no-keep-forecast``: every step is scored and dropped; only the results are written."""
    from tqdm.auto import tqdm

    watch = _BoundsWatch(predictor, steps, Report(), lambda msg: tqdm.write(msg, file=sys.stderr))
    with tqdm(total=times.size * steps, desc="predict+score", unit="step", disable=not progress) as bar:
        for t in times:
            bar.set_postfix_str(_iso(t))
            watch.begin(_iso(t))
            for s, values in enumerate(predictor.forecast_steps(t, members, steps, batch_members)):
                watch.check(0, s, values)
                scoring.add(_step_dataset(predictor, t, s, values))
                bar.update(1)
                if callback is not None:
                    callback(t, 0, s)
    watch.finish(None)
    scoring.finish()
    return score_out


def _units(channels: Sequence[str]) -> dict[str, str]:
    return {c: WB2_UNITS.get(parse_channel(c).long_name, "") for c in channels}


class _BoundsWatch:
    """Checks every step of a forecast against the predictor's physical bounds (:mod:`fcn3_lightning.bounds`).

    Warns at once at the first lead time a channel leaves them (once per channel and run, not once per point or
    step), adds every excursion to ``report`` (kept in the progress record, so a resumed run knows the finished
    initial times'), and at the end prints a summary and records the bounds and the report in the store's attributes.
    """

    ATTRIBUTE = "fcn3_lightning_bounds"

    def __init__(self, predictor: Predictor, steps: int, report: Report, say: Callable[[str], None]):
        self.bounds = predictor.bounds
        self.channels = predictor.channels
        self.lat = predictor.store.lat  # the rows of the fields predict yields: 90N first
        self.lead_hours = [(s + 1) * predictor.step_hours for s in range(steps)]
        self.report = report
        self.say = say
        self.units = _units(self.channels)
        self.warned = set(report.channels)
        self.extremes: Extremes | None = None

    def begin(self, init: str) -> None:
        self.init = init
        self.extremes = None if self.bounds is None else Extremes(self.channels, self.lead_hours, self.lat)

    def check(self, m0: int, step: int, values: np.ndarray) -> None:
        """``values`` (m, C, H, W): members ``m0 ..`` at step index ``step``, physical units, 90N first."""
        if self.extremes is None:
            return
        self.extremes.update(values[None, :, None], [self.init], [step], members=range(m0, m0 + values.shape[0]))
        found = self.bounds.check(self.extremes, leads=[step])
        self.report.update(found)
        for name in found.channels:
            if name not in self.warned:
                self.warned.add(name)
                line = found.channels[name].describe(self.units[name])
                self.say(f"predict: WARNING: the forecast leaves its physical bounds: {line}")

    def finish(self, path: Path | None) -> None:
        """The summary on stderr; the bounds and what left them in the store's attributes (``path``: None, no store)."""
        import zarr

        if self.bounds is None:
            return
        if self.report:
            lines = "\n".join(f"  {line}" for line in self.report.lines(self.units))
            print(
                f"predict: WARNING: the forecast left its physical bounds in {len(self.report.channels)} of {len(self.channels)} "
                f"channels; do not trust a channel from the first lead time named below on (bounds: {self.bounds.definition()}):\n"
                f"{lines}",
                file=sys.stderr,
            )
        else:
            print(f"predict: every channel stayed within its physical bounds ({self.bounds.definition()})", file=sys.stderr)
        if path is None:
            return
        group = zarr.open_group(str(path), mode="r+")
        group.attrs[self.ATTRIBUTE] = json.dumps({**self.bounds.as_dict(), "out_of_bounds": self.report.as_dict()}, sort_keys=True)
        with warnings.catch_warnings():  # the progress record in the store is not a Zarr array: zarr says so, harmlessly
            warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
            zarr.consolidate_metadata(str(path))


# --- command line -------------------------------------------------------------------------------------


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``predict`` on an argparse sub-command parser (``func`` runs it)."""
    p = subparsers.add_parser(
        "predict",
        help="ensemble forecasts from a checkpoint into a WeatherBench2 forecast Zarr",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--checkpoint", required=True, help="a model package folder, a checkpoint of this project, a model file, or a reference checkpoint"
    )
    p.add_argument("--config", help="reference architecture (config.json / manifest.json) for a reference checkpoint file")
    p.add_argument(
        "--data-path",
        "--data",
        dest="data_path",
        help="WB2 store with the initial conditions (default: the checkpoint's training store / default world; "
        "required for a model package, whose static fields come with it)",
    )
    p.add_argument(
        "--storage-options",
        type=parse_storage_options,
        metavar="JSON",
        help='fsspec options for a URL --data, e.g. \'{"token": "google_default"}\' (default: anonymous for gs:// and s3://)',
    )
    p.add_argument(
        "--stats", help="normalisation statistics (default: the checkpoint's, else <store>.stats.json; required with a URL --data)"
    )
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--init-times", nargs="+", metavar="TIME", help="initial times, e.g. 2002-07-01T00 2002-07-02T12")
    when.add_argument("--init-range", nargs=2, metavar=("START", "END"), help="every store time in START .. END (inclusive) ...")
    p.add_argument("--init-every-hours", type=int, default=12, help="... every this many hours from START (default 12)")
    p.add_argument("--members", type=int, help="ensemble size (default: the checkpoint's validation ensemble size, else 4)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="number of 6 h steps (default 40: 10 days)")
    length.add_argument("--lead-days", type=float, help="forecast length in days (a whole number of steps; e.g. 60)")
    p.add_argument("--output", default="forecast.zarr", help="output Zarr store (default forecast.zarr)")
    p.add_argument("--seed", type=int, help="noise seed (default: the checkpoint's noise_seed, else 333)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--member-batch",
        "--batch-members",  # the earlier name, kept as an alias
        dest="batch_members",
        type=int,
        help="members held in memory at once (default: all; lower saves memory; the forecast is the same). CPU: each runs "
        "through the network on its own (measured not slower than batched), and the first step encodes the initial state "
        "once per member batch; GPU: one batch (unmeasured); see the README",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output, or a .partial store of another run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    score = p.add_argument_group("scoring while forecasting (the results of a later `evaluate`, memory flat in the lead times)")
    score.add_argument("--score-against", metavar="OBS", help="the truth (WB2 Zarr, as evaluate --obs): score every step as it is made")
    score.add_argument("--score-out", metavar="DIR", help="folder for the results (default: <output>_scores)")
    score.add_argument("--climatology", help="WB2 climatology Zarr, as evaluate --climatology (default: computed from the truth)")
    score.add_argument("--score-name", help="model name in the results (default: the output's name)")
    score.add_argument(
        "--score-dtype",
        choices=("float32", "float64"),
        default="float32",
        help="as evaluate --dtype (the same dtype reproduces a later evaluate to ~1e-14)",
    )
    score.add_argument(
        "--no-keep-forecast", action="store_true", help="do not write the forecast Zarr, only the scores (needs --score-against)"
    )
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> None:
    """``predict``: the argparse entry point."""
    # cheap checks before the (slow) model load
    if args.data_path is not None:
        store_location(args.data_path, "--data", args.storage_options)
    local_path(args.output, "--output")
    if args.members is not None:
        _check_count("--members", args.members, 1)
    if args.steps is not None:
        _check_count("--steps", args.steps, 1)
    if args.batch_members is not None:
        _check_count("--member-batch", args.batch_members, 1, args.members)
    if args.no_keep_forecast and not args.score_against:
        raise ValueError("--no-keep-forecast needs --score-against: without scores and without the forecast nothing would be kept")
    for option in ("score_out", "climatology", "score_name"):
        if getattr(args, option) is not None and not args.score_against:
            raise ValueError(f"--{option.replace('_', '-')} is an option of --score-against, which is not given")
    score_out = args.score_out or str(Path(args.output).with_name(Path(args.output).name.removesuffix(".zarr") + "_scores"))
    if args.score_against:
        store_location(args.score_against, "--score-against", args.storage_options)
        local_path(score_out, "--score-out")
    predictor = load_predictor(
        args.checkpoint,
        data_path=args.data_path,
        stats_path=args.stats,
        config=args.config,
        device=args.device,
        noise_seed=args.seed,
        storage_options=args.storage_options,
    )
    if args.init_times:
        times = args.init_times
    else:
        times = init_times_in_range(predictor.store, args.init_range[0], args.init_range[1], args.init_every_hours)
    steps = lead_days_to_steps(args.lead_days, predictor.step_hours) if args.lead_days is not None else (args.steps or 40)
    members = args.members or predictor.default_members
    score_kw: dict[str, Any] = {}
    if args.score_against:
        from fcn3_lightning.eval.harness import Options

        name = args.score_name or Path(args.output).name.removesuffix(".zarr")
        score_kw = {
            "score_against": store_location(args.score_against, "--score-against", args.storage_options),
            "score_out": score_out,
            "climatology": args.climatology,
            "score_options": Options(name=name, progress=False, dtype=args.score_dtype),
            "keep_forecast": not args.no_keep_forecast,
        }
    predict(
        predictor,
        times,
        args.output,
        members=members,
        steps=steps,
        batch_members=args.batch_members,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        **score_kw,
    )
    kept = "" if args.no_keep_forecast else f"wrote {args.output}: "
    print(f"{kept}{len(times)} initial times x {members} members x {steps} steps of {predictor.step_hours} h")
    if args.score_against:
        from fcn3_lightning.eval.reports import write_reports

        print(f"scores (as evaluate writes them) -> {score_out}")
        for path in write_reports(score_out):  # leaderboard.md/.html and the scorecard, as evaluate's
            print(f"wrote {path}")
