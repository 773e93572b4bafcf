"""Weights-only initialisation (``init_from``): hand one curriculum stage to the next, start from official weights, or
fine-tune them on other data and another channel list (:mod:`fcn3_lightning.model.channel_map`)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fcn3_lightning.checkpoint import DATA_SETTINGS, network_settings, read_network
from fcn3_lightning.model.channel_map import MappingReport, fresh_network, map_state_dict, mapped_settings
from fcn3_lightning.model.fcn3 import FCN3


def _differs(data: Mapping[str, Any], channels: Sequence[str], aux_channels: Sequence[str]) -> bool:
    return ("channel_names" in data and list(data["channel_names"]) != list(channels)) or (
        "aux_channel_names" in data and list(data["aux_channel_names"]) != list(aux_channels)
    )


def check_grid(path: str | Path, shape: Sequence[int], data: Mapping[str, Any] | None = None) -> None:
    """Refuse a data grid other than the source's, saying what would be needed (``data``: the source's data settings,
    read from ``path`` when not given)."""
    if data is None:
        found = network_settings(path)
        data = found[1] if found is not None else {}
    if "inp_shape" in data and tuple(data["inp_shape"]) != tuple(shape):
        src = "x".join(map(str, data["inp_shape"]))
        raise ValueError(
            f"init_from {path} was trained on the {src} grid, but the data grid is {'x'.join(map(str, shape))}: FCN3's weights "
            f"belong to their grid (the DISCO filters' supports and the spectral weights' modes are set by it). Regrid the data "
            f"to the source's {src} equiangular grid (both poles, 90N first), or train from scratch (no init_from)"
        )


def initial_architecture(
    configured: Mapping[str, Any], path: str | Path, channels: Sequence[str], aux_channels: Sequence[str], shape: Sequence[int]
) -> dict[str, Any]:
    """The network settings to build for ``init_from``: the source's (its weights fix the architecture), said loudly
    where they differ from the configured ``model.net``; for another channel list, the settings that hold the source's
    weights mapped onto it. A data grid other than the source's is refused here, saying what would be needed."""
    found = network_settings(path)
    if found is None:  # a bare state dict: its architecture is the configured one
        return dict(configured)
    settings, data = found
    check_grid(path, shape, data)
    defaults = {k: p.default for k, p in inspect.signature(FCN3.__init__).parameters.items()}
    merged = dict(configured)
    changed = []
    for key, value in settings.items():
        before = merged.get(key, defaults.get(key))
        if (list(before) if isinstance(before, tuple) else before) != value:
            changed.append(f"model.net.{key}: {before!r} -> {value!r}")
        merged[key] = value
    if changed:
        print(f"init_from {path}: the network is built as the source describes it: " + "; ".join(changed), flush=True)
    if _differs(data, channels, aux_channels):
        source = {**merged, **data, "inp_shape": list(shape)}
        target = mapped_settings(source, channels, aux_channels)
        merged = {k: v for k, v in target.items() if k not in DATA_SETTINGS}
        print(
            f"init_from {path}: the source's {len(data['channel_names'])} channels are mapped onto data.channels ({len(channels)})",
            flush=True,
        )
    return merged


def load_initial_weights(net: FCN3, path: str | Path, settings: Mapping[str, Any] | None = None) -> MappingReport | None:
    """Load network weights (nothing else) from ``path`` into ``net``; a source with another channel list is mapped
    onto ``net``'s (``settings``: ``net``'s full constructor arguments) and the mapping's report returned (None when
    the weights load as they are).

    Accepts whatever :func:`fcn3_lightning.load_forecaster` reads: a model package folder, a checkpoint of this project,
    a model file from ``python -m fcn3_lightning convert``, or a reference-layout (Makani) checkpoint or state dict
    (whose architecture is then ``net``'s). Missing, unexpected or misshapen tensors raise a ``ValueError`` naming them.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"init_from: {path} does not exist")
    src = read_network(path, like=net)
    state = src.state_dict
    report = None
    found = network_settings(path)
    if found is not None and _differs(found[1], net.layout.names, net.aux_channel_names):
        if settings is None:
            raise ValueError(f"init_from {path} has other channels than the network: pass the network's settings to map them")
        source = {**found[0], **found[1], "inp_shape": list(net.inp_shape)}
        fresh = fresh_network(settings)  # serial and seeded: every rank (and a rerun) starts new slices alike
        state, report = map_state_dict(source, state, fresh, settings)
        del fresh
    if net.tiled:  # a network on tiles (spatial parallelism) holds its shard of the spectral weights
        from fcn3_lightning.parallel import shard_state_dict

        state = shard_state_dict(state, net, strict=False)
    target = net.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    misshapen = [
        f"{k}: {tuple(state[k].shape)}, expected {tuple(target[k].shape)}"
        for k in target
        if k in state and state[k].shape != target[k].shape
    ]
    if missing or unexpected or misshapen:
        raise ValueError(
            f"init_from {path} does not fit the network (check the channel list and the model settings): "
            f"missing {missing}; unexpected {unexpected}; misshapen {misshapen}"
        )
    net.load_state_dict(state)
    return report
