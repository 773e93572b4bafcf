"""Physical bounds: predict and evaluate report a forecast that leaves them (channel, lead, value), and a sane one not.

The world: a small WB2 store whose fields vary as weather does (means and spreads of u500, v500, z500 of the right
size), its statistics, and model files of one small network: with all weights zero it forecasts the training mean
everywhere (bounded); with its initial weights doubled it diverges within a few steps. Expected bounds and global
means are computed here from the statistics file and the written forecast, not by fcn3_lightning.bounds.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import xarray as xr
from tiny_net import FIT_NET as NET

from fcn3_lightning.bounds import Bounds, Extremes
from fcn3_lightning.channels import FCN3_AUX_CHANNELS
from fcn3_lightning.data import WB2Store, compute_stats
from fcn3_lightning.inference import PROGRESS_FILE, load_predictor, predict
from fcn3_lightning.model.build import save_model
from fcn3_lightning.model.fcn3 import FCN3

CHANNELS = ["u500", "v500", "z500"]
NAMES = {"u500": "u_component_of_wind", "v500": "v_component_of_wind", "z500": "geopotential"}
SHAPE = (9, 16)
INITS = ["2000-01-07T00:00:00", "2000-01-08T00:00:00"]
STEPS = 6


def _area_weights(lat: np.ndarray) -> np.ndarray:
    """Cell areas of a latitude column (cells end half-way between points and at the poles), written out here."""
    mid = (lat[1:] + lat[:-1]) / 2
    edges = np.clip(np.concatenate([[2 * lat[0] - mid[0]], mid, [2 * lat[-1] - mid[-1]]]), -90, 90)
    return np.abs(np.sin(np.deg2rad(edges[1:])) - np.sin(np.deg2rad(edges[:-1])))


def _global_mean(field: np.ndarray, lat: np.ndarray) -> float:
    w = _area_weights(lat)
    return float((field.astype(np.float64) * w[:, None]).sum() / (w.sum() * field.shape[-1]))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds")
    rng = np.random.default_rng(0)
    times = np.datetime64("2000-01-01", "ns") + np.arange(40) * np.timedelta64(6, "h")
    lat, lon = np.linspace(90, -90, SHAPE[0]), np.arange(SHAPE[1]) * 360.0 / SHAPE[1]
    lat2 = np.broadcast_to(lat[:, None], SHAPE)

    def weather(mean: float, std: float) -> np.ndarray:
        return (mean + std * rng.standard_normal((times.size, 1, *SHAPE))).astype(np.float32)

    dims = ("time", "level", "latitude", "longitude")
    ds = xr.Dataset(
        {
            "u_component_of_wind": (dims, weather(5.0, 10.0)),
            "v_component_of_wind": (dims, weather(0.0, 8.0)),
            "geopotential": (dims, weather(55000.0, 2000.0)),
            "geopotential_at_surface": (("latitude", "longitude"), (np.abs(lat2) * 100.0).astype(np.float32)),
            "land_sea_mask": (("latitude", "longitude"), np.clip((lat2 + 30) / 60, 0, 1).astype(np.float32)),
        },
        coords={"time": times, "latitude": lat, "longitude": lon, "level": np.array([500])},
    )
    store = root / "world.zarr"
    ds.to_zarr(store, zarr_format=2, consolidated=True)
    compute_stats(WB2Store(store, CHANNELS), "2000-01-01", "2000-01-05T18", progress=False).save(f"{store}.stats.json")
    stats = json.loads(Path(f"{store}.stats.json").read_text())

    kwargs = dict(inp_shape=SHAPE, channel_names=CHANNELS, aux_channel_names=list(FCN3_AUX_CHANNELS), **NET)
    models = {}
    for name, scale in (("calm", 0.0), ("diverging", 2.0)):
        torch.manual_seed(0)
        net = FCN3(**kwargs)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(scale)
        save_model(net, kwargs, root / f"{name}.pt")
        models[name] = load_predictor(root / f"{name}.pt", data_path=store, device="cpu")
    return SimpleNamespace(root=root, store=store, stats=stats, ds=ds, lat=lat, **models)


def _gm_bounds(stats: dict, channel: str) -> tuple[float, float]:
    i = stats["channels"].index(channel)
    return stats["mean"][i] - 0.5 * stats["std"][i], stats["mean"][i] + 0.5 * stats["std"][i]


def test_a_diverging_forecast_is_reported_by_predict_with_channel_lead_and_value(world, tmp_path, capfd):
    out = predict(world.diverging, INITS[:1], tmp_path / "fc.zarr", members=2, steps=STEPS, progress=False)
    err = capfd.readouterr().err
    fc = xr.open_zarr(out)
    record = json.loads(fc.attrs["fcn3_lightning_bounds"])
    prefix = "predict: WARNING: the forecast leaves its physical bounds: "
    warnings = [line.removeprefix(prefix) for line in err.splitlines() if line.startswith(prefix)]

    # the first lead out of bounds per channel, from the written fields and the statistics file
    first_lead = {}
    for ch in CHANNELS:
        i = world.stats["channels"].index(ch)
        span = world.stats["max"][i] - world.stats["min"][i]
        lo, hi = world.stats["min"][i] - span / 2, world.stats["max"][i] + span / 2
        glo, ghi = _gm_bounds(world.stats, ch)
        da = fc[NAMES[ch]].sel(level=500).values[0]  # (member, lead, lat, lon)
        for s in range(STEPS):
            gms = [_global_mean(da[m, s], world.lat) for m in range(2)]
            if da[:, s].min() < lo or da[:, s].max() > hi or min(gms) < glo or max(gms) > ghi:
                first_lead[ch] = 6.0 * (s + 1)
                break
    assert first_lead, "the doubled weights must make the forecast diverge within the steps"
    assert sorted(record["out_of_bounds"]) == sorted(first_lead)
    assert len(warnings) == len(first_lead)  # once per channel, not once per step or point

    for ch, lead in first_lead.items():
        rec = record["out_of_bounds"][ch]["first"]
        assert (rec["lead_hours"], rec["init"]) == (lead, INITS[0])
        field = fc[NAMES[ch]].sel(level=500).values[0, rec["member"], int(lead / 6) - 1]
        value = _global_mean(field, world.lat) if rec["kind"] == "global mean" else (field.max() if rec["value"] > 0 else field.min())
        assert rec["value"] == pytest.approx(value, rel=1e-5)
        warning = next(w for w in warnings if w.startswith(f"{ch} from lead"))
        unit = fc[NAMES[ch]].attrs["units"]
        assert f"{ch} from lead {lead:g} h: {rec['kind']} {value:.4g} {unit} outside" in warning
        assert f"(init {INITS[0]}, member {rec['member']})" in warning
    assert "left its physical bounds in" in err and "worst:" in err  # the summary at the end
    # the bounds themselves: the statistics' mean +- 0.5 std and range +- half of it
    for ch in CHANNELS:
        i = world.stats["channels"].index(ch)
        span = world.stats["max"][i] - world.stats["min"][i]
        assert record["channels"][ch]["global_mean"] == pytest.approx(_gm_bounds(world.stats, ch))
        assert record["channels"][ch]["value"] == pytest.approx([world.stats["min"][i] - span / 2, world.stats["max"][i] + span / 2])


def test_a_bounded_forecast_is_not_reported(world, tmp_path, capfd):
    out = predict(world.calm, INITS, tmp_path / "fc.zarr", members=2, steps=STEPS, progress=False)
    err = capfd.readouterr().err
    assert "WARNING" not in err and "every channel stayed within its physical bounds" in err
    assert json.loads(xr.open_zarr(out).attrs["fcn3_lightning_bounds"])["out_of_bounds"] == {}


def test_a_resumed_run_keeps_what_the_finished_inits_found(world, tmp_path, capfd):
    out = tmp_path / "fc.zarr"

    def stop(t, m, s):
        if str(np.datetime64(t, "s")) == INITS[1]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict(world.diverging, INITS, out, members=2, steps=STEPS, progress=False, callback=stop)
    progress = json.loads((tmp_path / "fc.zarr.partial" / PROGRESS_FILE).read_text())
    assert progress["complete"] == INITS[:1] and progress["out_of_bounds"]  # recorded with the finished init
    capfd.readouterr()
    predict(world.diverging, INITS, out, members=2, steps=STEPS, progress=False)
    err = capfd.readouterr().err
    assert "the finished initial times left their physical bounds" in err
    whole = predict(world.diverging, INITS, tmp_path / "whole.zarr", members=2, steps=STEPS, progress=False)
    assert xr.open_zarr(out).attrs["fcn3_lightning_bounds"] == xr.open_zarr(whole).attrs["fcn3_lightning_bounds"]


def test_non_finite_values_are_reported_where_they_are():
    lat = np.linspace(90, -90, 5)
    bounds = Bounds.from_moments(["a", "b"], [0.0, 10.0], [1.0, 2.0], [-3.0, 4.0], [3.0, 16.0], "test")
    ext = Extremes(["a", "b"], [6, 12, 18], lat)
    x = np.zeros((2, 3, 3, 2, 5, 8), dtype=np.float32)  # (init, member, lead, channel, lat, lon)
    x[:, :, :, 1] = 10.0
    ext.update(x, ["i0", "i1"], [0, 1, 2], members=[0, 1, 2])
    assert not bounds.check(ext)
    x[1, 2, 1, 1, 3, 4] = np.inf  # channel b, lead 12 h, init i1, member 2
    x[0, 0, 2, 0, 0, 0] = 7.0  # channel a beyond 3 + 3, at 18 h
    ext.update(x, ["i0", "i1"], [0, 1, 2], members=[0, 1, 2])
    report = bounds.check(ext)
    b, a = report.channels["b"], report.channels["a"]
    assert (b.first.kind, b.first.lead_hours, b.first.init, b.first.member) == ("non-finite", 12.0, "i1", 2)
    assert (a.first.kind, a.first.lead_hours, a.first.init, a.first.member, a.first.value) == ("value", 18.0, "i0", 0, 7.0)
    assert a.first.bounds == (-6.0, 6.0)


def _as_forecast(truth: xr.Dataset, inits: list[str], leads: int, members: int) -> xr.Dataset:
    """The truth as a perfect ensemble forecast (every member the truth) in WB2's by-init layout."""
    init = np.array(inits, dtype="datetime64[ns]")
    lead = np.arange(1, leads + 1) * np.timedelta64(6, "h")
    out = {}
    for name in NAMES.values():
        fields = np.stack([truth[name].sel(time=init + dt).values for dt in lead], axis=1)  # (init, lead, level, lat, lon)
        fields = np.broadcast_to(fields[:, None], (len(inits), members, *fields.shape[1:])).copy()
        out[name] = (("time", "number", "prediction_timedelta", "level", "latitude", "longitude"), fields)
    coords = {"time": init, "number": np.arange(members), "prediction_timedelta": lead.astype("timedelta64[ns]"), "level": [500]}
    return xr.Dataset(out, coords={**coords, "latitude": truth.latitude.values, "longitude": truth.longitude.values})


def test_evaluate_reports_a_forecast_that_leaves_its_bounds(world, tmp_path, capfd):
    from fcn3_lightning.eval.harness import evaluate
    from fcn3_lightning.eval.reports import write_reports

    truth = xr.open_zarr(world.store)
    perfect = _as_forecast(truth, INITS, 8, 2)
    meta = evaluate(perfect, world.store, tmp_path / "perfect", regions=["global"], progress=False, spectra=(), clim_years=(2000, 2000))
    assert meta["physical_bounds"]["out_of_bounds"] == {}
    assert not any("physical bounds" in w for w in meta["warnings"])

    # z500 of member 1 drifts by 8 % a step from lead 30 h on (the 5th lead): out of mean +- 0.5 std at once
    bad = perfect.copy(deep=True)
    grow = np.maximum(np.arange(1, 9) - 4, 0) * 0.08 + 1.0
    bad["geopotential"][:, 1] = bad["geopotential"][:, 1] * grow[None, :, None, None, None]
    capfd.readouterr()
    meta = evaluate(bad, world.store, tmp_path / "bad", regions=["global"], progress=False, spectra=(), clim_years=(2000, 2000))
    err = capfd.readouterr().err
    found = meta["physical_bounds"]["out_of_bounds"]
    assert list(found) == ["geopotential/500"]
    first = found["geopotential/500"]["first"]
    z = bad["geopotential"].sel(level=500).values
    gm = max((_global_mean(z[i, 1, 4], world.lat) for i in range(len(INITS))), key=abs)
    assert (first["kind"], first["lead_hours"], first["member"]) == ("global mean", 30.0, 1)
    assert first["value"] == pytest.approx(gm, rel=1e-6)
    warning = f"the forecast leaves its physical bounds: geopotential/500 from lead 30 h: global mean {gm:.4g}"
    assert any(w.startswith(warning) for w in meta["warnings"]) and warning in err, (warning, meta["warnings"])
    written = json.loads((tmp_path / "bad" / "meta.json").read_text())
    assert written["physical_bounds"]["out_of_bounds"] == found
    write_reports(tmp_path / "bad")
    board = (tmp_path / "bad" / "leaderboard.md").read_text()
    assert "**Warning:**" in board and "z500 from 30 h" in board
