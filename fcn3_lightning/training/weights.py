"""Weights-only initialisation (``init_from``): hand one curriculum stage to the next, or start from official weights."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fcn3_lightning.io import read_checkpoint
from fcn3_lightning.model.build import FORMAT as MODEL_FORMAT
from fcn3_lightning.model.convert import convert_reference_state_dict, reference_to_ours
from fcn3_lightning.model.fcn3 import FCN3

_LIGHTNING_PREFIX = "forecaster.net."


def _network_state(blob: Any, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The network's parameters in some layout, and which layout: "ours" or "reference"."""
    if not isinstance(blob, Mapping):
        raise ValueError(f"{source}: not a state dict or checkpoint")
    if blob.get("format") == MODEL_FORMAT:  # a model file written by `convert` / save_model
        return dict(blob["state_dict"]), "ours"
    if "state_dict" in blob and any(k.startswith(_LIGHTNING_PREFIX) for k in blob["state_dict"]):  # a Lightning checkpoint
        sd = blob["state_dict"]
        return {k[len(_LIGHTNING_PREFIX) :]: v for k, v in sd.items() if k.startswith(_LIGHTNING_PREFIX)}, "ours"
    state = blob.get("model_state", blob)  # reference checkpoints keep the weights under model_state
    names = [k.removeprefix("module.").removeprefix("model.") for k in state]
    if any(reference_to_ours(n) is not None and ("_conv." in n or ".fwd." in n) for n in names):
        return dict(blob), "reference"
    return dict(state), "ours"


def load_initial_weights(net: FCN3, path: str | Path) -> str:
    """Load network weights (nothing else) from ``path`` into ``net``; returns the layout found.

    Accepts a checkpoint of this project, a model file from ``python -m fcn3_lightning convert``, or a
    reference-layout (Makani) state dict or checkpoint. Missing, unexpected or misshapen tensors raise
    a ``ValueError`` naming them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: {path} does not exist")
    blob = read_checkpoint(path, "init_from file")
    state, layout = _network_state(blob, str(path))
    if layout == "reference":
        state = convert_reference_state_dict(state, net)
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
    return layout
