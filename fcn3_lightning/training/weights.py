"""Weights-only initialisation (``init_from``): hand one curriculum stage to the next, or start from official weights."""

from __future__ import annotations

from pathlib import Path

from fcn3_lightning.forecaster import read_network
from fcn3_lightning.model.fcn3 import FCN3


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
