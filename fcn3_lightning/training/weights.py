"""Weights-only initialisation (``init_from``): hand one curriculum stage to the next, or start from official weights."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fcn3_lightning.forecaster import network_settings, read_network
from fcn3_lightning.model.fcn3 import FCN3


def initial_architecture(
    configured: Mapping[str, Any], path: str | Path, channels: Sequence[str], aux_channels: Sequence[str]
) -> dict[str, Any]:
    """The network settings to build for ``init_from``: the source's (its weights fix the architecture), said loudly
    where they differ from the configured ``model.net``; channels the data does not have are refused here, naming them.
    """
    found = network_settings(path)
    if found is None:  # a bare state dict: its architecture is the configured one
        return dict(configured)
    settings, data = found
    for key, ours, what in (("channel_names", channels, "data.channels"), ("aux_channel_names", aux_channels, "data.aux_channels")):
        if key in data and list(data[key]) != list(ours):
            raise ValueError(
                f"init_from {path} was trained on the channels {list(data[key])}, but {what} is {list(ours)}: "
                "train on data with the same channel list"
            )
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
    return merged


def load_initial_weights(net: FCN3, path: str | Path) -> str:
    """Load network weights (nothing else) from ``path`` into ``net``; returns the layout found ("ours" or "reference").

    Accepts whatever :func:`fcn3_lightning.load_forecaster` reads: a model package folder, a checkpoint of this project,
    a model file from ``python -m fcn3_lightning convert``, or a reference-layout (Makani) checkpoint or state dict
    (whose architecture is then ``net``'s). Missing, unexpected or misshapen tensors raise a ``ValueError`` naming them.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"init_from: {path} does not exist")
    src = read_network(path, like=net)
    state = src.state_dict
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
    return "reference" if src.kind in ("package", "reference") else "ours"
