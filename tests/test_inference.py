"""Ensemble inference to a WeatherBench2 forecast Zarr: schema, values, resume after kill -9, clear errors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import xarray as xr
from tiny_net import FIT_NET as NET
from wb2_synthetic import make_store

from fcn3_lightning.channels import FCN3_AUX_CHANNELS, parse_channel
from fcn3_lightning.data import WB2DataModule, WB2Store, compute_stats
from fcn3_lightning.data.datamodule import normalize_batch
from fcn3_lightning.forecaster import noise_sample_id
from fcn3_lightning.inference import PROGRESS_FILE, add_cli, load_predictor, predict
from fcn3_lightning.model.build import save_model
from fcn3_lightning.training.module import FCN3Module

CHANNELS = ["tcwv", "u500", "v500", "z500"]
TRAIN = ("2000-01-01", "2000-01-05T18")
TEST = ("2000-01-06", "2000-01-09T18")
INITS = ["2000-01-06T00:00:00", "2000-01-06T18:00:00", "2000-01-07T12:00:00"]
SHAPE = (9, 16)
MEMBERS, STEPS = 3, 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store (latitude ascending: the output must flip back), its statistics, a 2-step fit and its checkpoint."""
    root = tmp_path_factory.mktemp("inference")
    store, _ = make_store(root / "era.zarr", CHANNELS, n_times=40, nlat=SHAPE[0], nlon=SHAPE[1], ascending_lat=True)
    compute_stats(WB2Store(store, CHANNELS), *TRAIN, progress=False).save(f"{store}.stats.json")
    torch.manual_seed(0)
    dm = WB2DataModule(
        str(store), channels=CHANNELS, train_range=TRAIN, valid_range=TEST, test_range=TEST, valid_rollout=STEPS, batch_size=2
    )
    module = FCN3Module(net=NET, ensemble_size=2, valid_ensemble_size=MEMBERS)
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(root / "model.ckpt")
    predictor = load_predictor(root / "model.ckpt", device="cpu")
    out = predict(predictor, INITS, root / "reference.zarr", steps=STEPS, progress=False)
    return SimpleNamespace(root=root, store=store, ckpt=root / "model.ckpt", module=module.eval(), dm=dm, predictor=predictor, out=out)


def _fields(path: Path) -> dict[str, np.ndarray]:
    with xr.open_zarr(path) as ds:
        return {k: ds[k].values for k in ds.data_vars}


def test_schema(world):
    ds = xr.open_zarr(world.out)
    assert set(ds.data_vars) == {"total_column_water_vapour", "u_component_of_wind", "v_component_of_wind", "geopotential"}
    assert ds["geopotential"].dims == ("time", "number", "prediction_timedelta", "level", "latitude", "longitude")
    assert ds["total_column_water_vapour"].dims == ("time", "number", "prediction_timedelta", "latitude", "longitude")
    assert [str(t) for t in ds.time.values.astype("datetime64[s]")] == INITS
    assert ds.number.values.tolist() == list(range(MEMBERS))
    assert (ds.prediction_timedelta.values == np.arange(1, STEPS + 1) * np.timedelta64(6, "h")).all()
    assert ds.level.values.tolist() == [500]
    with xr.open_zarr(world.store) as src:  # latitude as the store has it (ascending here)
        np.testing.assert_array_equal(ds.latitude.values, src.latitude.values)
        np.testing.assert_array_equal(ds.longitude.values, src.longitude.values)
    units = {k: ds[k].attrs["units"] for k in ds.data_vars}
    assert units == {
        "total_column_water_vapour": "kg m**-2",
        "u_component_of_wind": "m s**-1",
        "v_component_of_wind": "m s**-1",
        "geopotential": "m**2 s**-2",
    }
    assert all(ds[k].dtype == np.float32 for k in ds.data_vars)
    assert ds["geopotential"].encoding["chunks"] == (1, 1, 1, 1, *SHAPE)
    assert ds["prediction_timedelta"].encoding["units"] == "hours"  # CF-encoded timedelta
    assert not ds["geopotential"].isnull().any()
    # physical units: z500 of the synthetic world is ~4000 (1000 * variable id + ...), not a normalised ~0
    assert 3000 < float(ds["geopotential"].mean()) < 5000


def test_values_equal_predict_step_of_the_same_init(world):
    """The streamed forecast is bit for bit FCN3Module.predict_step with the init's noise sample id."""
    dataset = world.dm.dataset("test")
    fields = _fields(world.out)
    names = {"tcwv": "total_column_water_vapour", "u500": "u_component_of_wind", "v500": "v_component_of_wind", "z500": "geopotential"}
    for i, init in enumerate(INITS):
        k = int(np.flatnonzero(world.dm.store.times[dataset.starts] == np.datetime64(init, "ns"))[0])
        batch = normalize_batch(dataset.__getitems__([k]), world.dm.normalizer, CHANNELS, 6)
        batch["index"] = torch.tensor([noise_sample_id(init)])
        with torch.no_grad():
            pred = world.module.predict_step(batch, 0)["prediction"][0].numpy()  # (M, S, C, H, W), 90N first
        for c, ch in enumerate(CHANNELS):
            got = fields[names[ch]][i]
            got = got[:, :, 0] if got.ndim == 5 else got
            np.testing.assert_array_equal(got[..., ::-1, :], pred[:, :, c], err_msg=f"{init} {ch}")


def test_member_batches_and_a_model_file_give_the_same_forecast(world, tmp_path):
    model_file = tmp_path / "model.pt"
    net = world.module.net
    save_model(net, dict(inp_shape=SHAPE, channel_names=CHANNELS, aux_channel_names=list(FCN3_AUX_CHANNELS), **NET), model_file)
    p = load_predictor(model_file, data_path=world.store, stats_path=f"{world.store}.stats.json", device="cpu")
    assert p.default_members == 4 and p.noise_seed == 333
    out = predict(p, INITS[:1], tmp_path / "a.zarr", members=MEMBERS, steps=STEPS, progress=False)
    ref = _fields(world.out)
    for k, v in _fields(out).items():
        np.testing.assert_array_equal(v[0], ref[k][0])
    # one member at a time: each member keeps its own noise stream, and on the CPU the values do not change
    out = predict(world.predictor, INITS[1:2], tmp_path / "b.zarr", members=MEMBERS, steps=STEPS, batch_members=1, progress=False)
    for k, v in _fields(out).items():
        np.testing.assert_array_equal(v[0], ref[k][1])


_KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from fcn3_lightning.inference import load_predictor, predict

    ckpt, out, inits = sys.argv[1], sys.argv[2], sys.argv[3:]

    def die_in_the_second_init(t, member, step):
        if np.datetime64(t, "s") == np.datetime64(inits[1], "s") and step == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 half-way through the second initial time

    predict(load_predictor(ckpt, device="cpu"), inits, out, steps=3, progress=False, callback=die_in_the_second_init)
    """
)


def test_a_killed_run_resumes_without_rewriting_finished_inits(world, tmp_path):
    out = tmp_path / "fc.zarr"
    partial = tmp_path / "fc.zarr.partial"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(world.ckpt), str(out), *INITS], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists() and partial.is_dir()  # never half-written under the final name
    assert json.loads((partial / PROGRESS_FILE).read_text())["complete"] == INITS[:1]
    first = {p: p.stat().st_mtime_ns for p in partial.glob("*/0.*")}  # chunks of the finished init
    assert len(first) == 4 * MEMBERS * STEPS
    assert any(partial.glob("*/1.*"))  # the second init was cut short

    writes: list[tuple[str, int, int]] = []
    predict(world.predictor, INITS, out, steps=STEPS, progress=False, callback=lambda t, m, s: writes.append((str(t), m, s)))
    assert len(writes) == 2 * STEPS and not any(str(np.datetime64(INITS[0], "ns")) == w[0] for w in writes)
    assert out.is_dir() and not partial.exists()
    assert {p.relative_to(partial): m for p, m in first.items()} == {
        p.relative_to(out): p.stat().st_mtime_ns for p in out.glob("*/0.*")
    }  # not rewritten
    xr.testing.assert_identical(xr.open_zarr(out).load(), xr.open_zarr(world.out).load())

    # a rerun of a finished forecast does nothing; other arguments are refused, naming what differs
    predict(world.predictor, INITS, out, steps=STEPS, progress=False, callback=lambda *a: writes.append(a))
    assert len(writes) == 2 * STEPS
    with pytest.raises(ValueError, match=r"other arguments \(members: 3 there, 2 now"):
        predict(world.predictor, INITS, out, members=2, steps=STEPS, progress=False)


def test_a_failed_run_keeps_only_the_partial_store_and_refuses_other_arguments(world, tmp_path):
    out = tmp_path / "fc.zarr"

    def fail(t, m, s):
        if s == 2:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        predict(world.predictor, INITS[:2], out, steps=STEPS, progress=False, callback=fail)
    assert not out.exists() and (tmp_path / "fc.zarr.partial").is_dir()
    with pytest.raises(ValueError, match=r"unfinished forecast with other arguments \(init_times: .*steps: 3 there, 2 now"):
        predict(world.predictor, INITS, out, steps=2, progress=False)
    predict(world.predictor, INITS, out, steps=2, progress=False, overwrite=True)  # starts over on request
    assert xr.open_zarr(out).sizes["prediction_timedelta"] == 2


def _errors(world, tmp_path) -> list[tuple[object, type[Exception], str]]:
    p = world.predictor
    short, _ = make_store(tmp_path / "no_tcwv.zarr", CHANNELS[1:], n_times=8)
    finer, _ = make_store(tmp_path / "finer.zarr", CHANNELS, n_times=8, nlat=17, nlon=32)
    foreign = tmp_path / "foreign.pt"
    torch.save({"blocks.0.weight": torch.zeros(2)}, foreign)
    (tmp_path / "fc.zarr").mkdir()
    (tmp_path / "fc.zarr" / "something").write_text("not ours")
    return [
        (lambda: predict(p, ["2001-01-01"], tmp_path / "x.zarr"), ValueError, "2001-01-01T00:00:00 has no initial condition .* outside"),
        (lambda: predict(p, ["2000-01-06T03"], tmp_path / "x.zarr"), ValueError, "not on the store's 6-hourly time axis"),
        (lambda: predict(p, [], tmp_path / "x.zarr"), ValueError, "no initial times"),
        (lambda: predict(p, INITS[:1] * 2, tmp_path / "x.zarr"), ValueError, "given more than once"),
        (lambda: predict(p, INITS, tmp_path / "x.zarr", members=0), ValueError, "members must be a whole number >= 1, got 0"),
        (lambda: predict(p, INITS, tmp_path / "x.zarr", members=2, batch_members=3), ValueError, r"batch_members .* in 1 \.\. 2"),
        (lambda: predict(p, INITS, tmp_path / "x.zarr", steps=0), ValueError, "steps must be"),
        (lambda: predict(p, INITS, tmp_path / "fc.zarr"), ValueError, "exists and is not a forecast written by predict"),
        (lambda: load_predictor(tmp_path / "nope.ckpt"), FileNotFoundError, "nope.ckpt does not exist"),
        (lambda: load_predictor(foreign), ValueError, "pass its architecture with --config"),
        (lambda: load_predictor(world.ckpt, data_path=short), ValueError, "do not fit the data store: .*total_column_water_vapour"),
        (lambda: load_predictor(world.ckpt, data_path=finer), ValueError, "computed on grid .*'nlat': 9.* data grid is .*'nlat': 17"),
        (lambda: load_predictor(world.ckpt, stats_path=tmp_path / "none.json"), FileNotFoundError, "no normalisation statistics found"),
    ]  # fmt: skip


def test_errors_are_clear_and_leave_nothing_behind(world, tmp_path):
    for call, kind, match in _errors(world, tmp_path):
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(kind, match=match):
            call()
        assert sorted(p.name for p in tmp_path.iterdir()) == before, match


def test_command_line(world, tmp_path):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(required=True))
    base = ["predict", "--checkpoint", str(world.ckpt), "--device", "cpu", "--no-progress"]
    when = ["--init-range", "2000-01-06", "2000-01-07", "--lead-days", "0.5"]
    args = parser.parse_args([*base, *when, "--output", str(tmp_path / "f.zarr")])
    args.func(args)
    ds = xr.open_zarr(tmp_path / "f.zarr")
    assert [str(t) for t in ds.time.values.astype("datetime64[h]")] == ["2000-01-06T00", "2000-01-06T12", "2000-01-07T00"]
    assert ds.sizes["prediction_timedelta"] == 2 and ds.sizes["number"] == MEMBERS
    args = parser.parse_args([*base, "--init-times", INITS[0], "--lead-days", "0.3", "--output", str(tmp_path / "g.zarr")])
    with pytest.raises(ValueError, match="--lead-days 0.3 is not a positive whole number of 6 h steps"):
        args.func(args)
    with pytest.raises(SystemExit):  # argparse: one of --init-times / --init-range is required
        parser.parse_args(base)


def test_member_batch_4_equals_1_through_the_command_line(world, tmp_path):
    """``predict --member-batch 4`` and ``--member-batch 1`` (and the old name ``--batch-members``) write the same values."""
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(required=True))
    base = ["predict", "--checkpoint", str(world.ckpt), "--device", "cpu", "--no-progress", "--init-times", *INITS[:2]]
    base += ["--members", "4", "--steps", str(STEPS)]
    outs = {}
    for name, flag in (("4", ["--member-batch", "4"]), ("1", ["--member-batch", "1"]), ("old", ["--batch-members", "2"])):
        args = parser.parse_args([*base, *flag, "--output", str(tmp_path / f"{name}.zarr")])
        args.func(args)
        outs[name] = _fields(tmp_path / f"{name}.zarr")
    for k, v in outs["4"].items():
        assert v.shape[1] == 4 and np.isfinite(v).all()
        diff = np.abs(v - outs["1"][k]).max()
        assert diff == 0, f"{k}: max |member-batch 4 - member-batch 1| = {diff}"
        np.testing.assert_array_equal(outs["old"][k], v)
    args = parser.parse_args([*base, "--member-batch", "5", "--output", str(tmp_path / "x.zarr")])
    with pytest.raises(ValueError, match=r"--member-batch must be a whole number in 1 \.\. 4, got 5"):
        args.func(args)


def test_steps_stream_what_rollout_stacks(world):
    f = world.predictor.forecaster.ensemble
    x0 = torch.randn(2, 4, *SHAPE)
    zen = torch.rand(2, 3, *SHAPE)
    from fcn3_lightning.model.noise import NoiseStreams

    with torch.no_grad():
        stacked = f.rollout(x0, zen, world.predictor.forecaster.static, NoiseStreams(1, [3, 4], 2), 3, 2)
        streamed = list(f.steps(x0, lambda s: zen[:, s], world.predictor.forecaster.static, NoiseStreams(1, [3, 4], 2), 3, 2))
    assert torch.equal(stacked, torch.stack(streamed, dim=2))
    with pytest.raises(ValueError, match="zenith holds 3 steps, the rollout needs 4"):
        f.steps(x0, zen, world.predictor.forecaster.static, NoiseStreams(1, [3, 4], 2), 4, 2)  # raised at the call, not at the first step


def test_a_reference_checkpoint_with_its_config(golden_dir, tmp_path):
    """A reference (Makani) state dict plus its architecture: 72 channels in 13 levels map onto WB2 arrays and levels."""
    from fcn3_lightning.channels import FCN3_CHANNELS, FCN3_LEVELS

    store, _ = make_store(tmp_path / "era72.zarr", FCN3_CHANNELS, n_times=4, nlat=33, nlon=64)
    compute_stats(WB2Store(store, FCN3_CHANNELS), "2000-01-01", "2000-01-01T18", progress=False).save(f"{store}.stats.json")
    p = load_predictor(golden_dir / "state_dict.pt", config=golden_dir / "manifest.json", data_path=store, device="cpu")
    assert p.source["kind"] == "reference"
    out = predict(p, ["2000-01-01T06"], tmp_path / "fc.zarr", members=2, steps=1, progress=False)
    ds = xr.open_zarr(out)
    assert ds.level.values.tolist() == sorted(FCN3_LEVELS)
    assert len(ds.data_vars) == 12 and ds["2m_temperature"].attrs["units"] == "K"
    # the same forecast straight from the forecaster: every channel lands in its variable and level
    t = np.datetime64("2000-01-01T06", "ns")
    want = next(p.forecaster.rollout(p.initial_state(t), t, members=2, steps=1))[0].numpy()  # (M, C, H, W)
    for c, name in enumerate(FCN3_CHANNELS):
        ch = parse_channel(name)
        got = ds[ch.long_name].isel(time=0, prediction_timedelta=0)
        got = got.sel(level=ch.level) if ch.level is not None else got
        np.testing.assert_array_equal(got.values, want[:, c], err_msg=name)


def test_an_exported_package_forecasts_exactly_as_its_checkpoint(world, tmp_path):
    """export -> load the package -> predict: bit for bit the forecast of the checkpoint it was exported from."""
    from fcn3_lightning import load_forecaster

    pkg = load_forecaster(world.ckpt, device="cpu").export(tmp_path / "package")
    p = load_predictor(pkg, data_path=world.store, device="cpu")
    assert p.forecaster.source["kind"] == "package"
    out = predict(p, INITS, tmp_path / "fc.zarr", members=MEMBERS, steps=STEPS, progress=False)
    ref = _fields(world.out)
    for k, v in _fields(out).items():
        np.testing.assert_array_equal(v, ref[k], err_msg=k)


# --- scoring while forecasting (predict --score-against) -------------------------------------------------------------

SCORE_FILES = ("scores.csv", "per_init.csv", "spectra.csv")


def _score_options(dtype: str = "float64", block_mb: float = 128.0):
    from fcn3_lightning.eval.harness import Options

    # the store holds one year: its climatology is computed from that year (with evaluate's warning)
    return Options(name="m", clim_years=(2000, 2000), progress=False, dtype=dtype, block_mb=block_mb)


#: max relative difference from predict + evaluate (acceptance 4), by the dtype of the pointwise work: the spatial means
#: are summed in float64 either way, so the block layout (one lead time per block while forecasting, all lead times in
#: evaluate) does not change them (with float32 spatial means it did: 1.4e-6 on this world's near-zero variances)
TOLERANCE = {"float64": 1e-6, "float32": 1e-6}


def _max_relative_difference(a_dir: Path, b_dir: Path) -> float:
    """Over every record of the score files, which must hold the same records; NaN only where both are NaN."""
    import pandas as pd

    worst = 0.0
    for name in SCORE_FILES:
        a, b = pd.read_csv(a_dir / name), pd.read_csv(b_dir / name)
        keys = [c for c in a.columns if c != "value"]
        assert len(a) == len(b) > 0, f"{name}: {len(a)} vs {len(b)} records"
        m = a.fillna({"level": -1}).merge(b.fillna({"level": -1}), on=keys, how="outer", indicator=True, validate="one_to_one")
        assert (m["_merge"] == "both").all(), f"{name}: records in only one of the two:\n{m[m['_merge'] != 'both'].head()}"
        x, y = m["value_x"].to_numpy(), m["value_y"].to_numpy()
        assert (np.isnan(x) == np.isnan(y)).all(), name
        ok = ~np.isnan(x)
        rel = np.abs(x[ok] - y[ok]) / np.maximum(np.abs(y[ok]), 1e-30)
        worst = max(worst, float(rel.max()))
    return worst


@pytest.fixture(scope="module")
def evaluated(world, tmp_path_factory):
    """``predict`` then ``evaluate`` (per dtype of the work): the reference for scoring while forecasting."""
    from fcn3_lightning.eval.harness import evaluate

    out = {}
    for dtype in TOLERANCE:
        out[dtype] = tmp_path_factory.mktemp("evaluated") / dtype
        evaluate(world.out, world.store, out[dtype], None, _score_options(dtype))
    return out


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_score_against_equals_predict_then_evaluate(world, evaluated, tmp_path, dtype):
    """Acceptance 4: the same scores (max relative difference <= 1e-6), and no forecast store when it is not kept. The
    members run in batches of 2 of 3, in lockstep: the values are those of the reference forecast."""
    out = predict(
        world.predictor,
        INITS,
        tmp_path / "not_kept.zarr",
        steps=STEPS,
        batch_members=2,
        progress=False,
        score_against=world.store,
        score_out=tmp_path / "scores",
        score_options=_score_options(dtype),
        keep_forecast=False,
    )
    assert out == tmp_path / "scores"
    assert not (tmp_path / "not_kept.zarr").exists() and not (tmp_path / "not_kept.zarr.partial").exists()
    worst = _max_relative_difference(tmp_path / "scores", evaluated[dtype])
    print(f"predict --score-against vs predict + evaluate ({dtype} work): max relative difference {worst:.2e}", file=sys.__stdout__)
    assert worst <= TOLERANCE[dtype]
    meta = json.loads((tmp_path / "scores" / "meta.json").read_text())
    assert meta["scored_while_forecasting"] and meta["forecast"].startswith("not kept")
    assert set(pd_read(tmp_path / "scores" / "per_init.csv")["init_time"]) == set(INITS)


def pd_read(path: Path):
    import pandas as pd

    return pd.read_csv(path)


def test_score_against_keeping_the_forecast(world, evaluated, tmp_path):
    """With the forecast kept: the store equals the reference forecast bit for bit, and the scores those of evaluate."""
    out = predict(
        world.predictor,
        INITS,
        tmp_path / "kept.zarr",
        steps=STEPS,
        progress=False,
        score_against=world.store,
        score_out=tmp_path / "scores",
        score_options=_score_options(),
    )
    assert out == tmp_path / "kept.zarr"
    ref, got = _fields(world.out), _fields(out)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    assert _max_relative_difference(tmp_path / "scores", evaluated["float64"]) <= 1e-6


def test_score_against_holds_states_not_metric_objects_per_lead(world, tmp_path):
    """Acceptance 4, memory: scoring while forecasting holds the metric objects once (per channel group), and per lead
    time only their accumulated states, the same bytes for every lead time. It held a set of ~10 metric objects per
    (group, lead) (~0.4 MB each set at 91x180), so the live objects grew with the lead times."""
    import gc

    from fcn3_lightning.eval.stream import StreamingEvaluation

    from fcn3_lightning.metrics.base import GriddedMetric

    fc = predict(world.predictor, INITS[:2], tmp_path / "f.zarr", members=MEMBERS, steps=8, progress=False)

    def live_metrics() -> int:
        gc.collect()
        return sum(isinstance(o, GriddedMetric) for o in gc.get_objects())

    held = {}
    for n_leads in (2, 8):
        before = live_metrics()
        with xr.open_zarr(fc) as ds:
            ds = ds.isel(prediction_timedelta=slice(0, n_leads)).load()
        s = StreamingEvaluation(ds, world.store, tmp_path / f"scores_{n_leads}", options=_score_options())
        for i in range(ds.sizes["time"]):
            for j in range(n_leads):
                s.add(ds.isel(time=[i], prediction_timedelta=[j]))
        sizes = [s.states[k].nbytes for k in sorted(s.states)]
        held[n_leads] = (live_metrics() - before, sizes)
        s.finish()
        del s
    (objects_2, bytes_2), (objects_8, bytes_8) = held[2], held[8]
    assert objects_2 == objects_8 > 0, f"live metric objects: {objects_2} with 2 lead times, {objects_8} with 8"
    assert len(bytes_8) == 8 and len(set(bytes_8)) == 1 and bytes_8[0] == bytes_2[0], (bytes_2, bytes_8)


def test_score_against_a_descending_latitude_store(world, tmp_path):
    """A store with latitude north to south (WB2's own ERA5 layout): the step is flipped to ascending latitude, a
    negative-stride view that torch cannot take (this crashed when a channel group held one variable, read without a copy:
    a tiny block budget makes every variable its own group); the scores equal predict + evaluate of the same store."""
    from fcn3_lightning.eval.harness import evaluate

    store, _ = make_store(tmp_path / "era_desc.zarr", CHANNELS, n_times=40, nlat=SHAPE[0], nlon=SHAPE[1], ascending_lat=False)
    compute_stats(WB2Store(store, CHANNELS), *TRAIN, progress=False).save(f"{store}.stats.json")
    with xr.open_zarr(store) as ds:
        assert ds.latitude.values[0] > ds.latitude.values[-1]
    p = load_predictor(world.ckpt, data_path=store, device="cpu")
    out = predict(
        p,
        INITS,
        tmp_path / "desc.zarr",
        members=MEMBERS,
        steps=STEPS,
        progress=False,
        score_against=store,
        score_out=tmp_path / "scores",
        score_options=_score_options("float32", block_mb=0.001),
    )
    evaluate(out, store, tmp_path / "evaluated", None, _score_options("float32", block_mb=0.001))
    worst = _max_relative_difference(tmp_path / "scores", tmp_path / "evaluated")
    print(f"descending latitude: predict --score-against vs predict + evaluate: max relative difference {worst:.2e}", file=sys.__stdout__)
    assert worst <= TOLERANCE["float32"]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--no-keep-forecast"], "--no-keep-forecast needs --score-against"),
        (["--score-out", "x"], "--score-out is an option of --score-against"),
        (["--score-against", "/nonexistent/obs.zarr", "--no-keep-forecast"], "obs.zarr"),
    ],
)
def test_score_against_errors(world, tmp_path, extra, match):
    """Bad scoring options: exit 2, a message naming the option or the store at fault."""
    cmd = [sys.executable, "-m", "fcn3_lightning", "predict", "--checkpoint", str(world.ckpt), "--init-times", INITS[0]]
    cmd += ["--steps", "1", "--output", str(tmp_path / "f.zarr"), "--no-progress", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert match in r.stderr
