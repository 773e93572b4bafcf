"""Converter between the reference (Makani) FCN3 parameter layout and ours.

This is how users load official FCN3 checkpoints: :func:`model_from_reference_config` builds the
network from the reference ``config.json`` (or a golden ``manifest.json``), and
:func:`load_reference_state_dict` maps, checks and loads the reference parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fcn3_lightning.io import read_checkpoint
from fcn3_lightning.model.fcn3 import FCN3

_Reshape = Callable[[torch.Tensor, torch.Size], torch.Tensor]


def _as_target(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # LayerScale is a depthwise 1x1 conv weight (C, 1, 1, 1) in the reference, a (C,) vector here
    return t.reshape(shape) if t.numel() == shape.numel() else t


# (reference pattern, our name template, reshape); the same table converts in both directions
_RULES: list[tuple[str, str, _Reshape | None]] = [
    (r"(atmo|surf|aux)_encoder\.conv\.weight", r"\1_encoder.conv.weight", None),
    (r"(atmo|surf)_decoder\.conv\.weight", r"\1_decoder.conv.weight", None),
    (r"blocks\.(\d+)\.(?:global|local)_conv\.weight", r"blocks.\1.filter.weight", None),
    (r"blocks\.(\d+)\.mlp\.fwd\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2", None),
    (r"blocks\.(\d+)\.mlp\.fwd\.3\.(weight|bias)", r"blocks.\1.mlp.fc2.\2", None),
    (r"blocks\.(\d+)\.layer_scale\.weight", r"blocks.\1.layer_scale", _as_target),
]

# reference architecture settings this implementation reproduces only at FCN3's value
_FIXED_SETTINGS: dict[str, Any] = {
    "use_mlp": True,
    "activation_function": "gelu",
    "normalization_layer": "none",
    "hard_thresholding_fraction": 1.0,
    "big_skip": False,
    "bias": False,
    "encoder_mlp": False,
    "upsample_sht": False,
    "add_grid": False,
    "n_history": 0,
}
# reference keys passed straight to our constructor
_DIRECT_KEYS = (
    "inp_shape", "channel_names", "aux_channel_names", "scale_factor", "model_grid_type", "sht_grid_type",
    "atmo_embed_dim", "surf_embed_dim", "aux_embed_dim", "num_layers", "sfno_block_frequency", "kernel_shape",
    "filter_basis_type", "filter_basis_norm_mode", "mlp_ratio", "layer_scale", "clamp_water",
)  # fmt: skip
#: settings of this project beyond the reference (set by channel mapping, see model/channel_map.py): written to a
#: config.json only when set, read back by this project; the reference code ignores them and would build another net
EXTENSION_KEYS = ("mlp_hidden_channels", "encoder_groups")


#: reference network types this converter reproduces (the package's ``nettype``)
FCN3_NETTYPES = ("FCN3", "fcn3")


def reference_shape(config: Mapping[str, Any]) -> list[int]:
    """The data grid of a reference config: ``inp_shape`` (golden manifests) or ``img_shape_x/y`` (model packages)."""
    if "inp_shape" in config:
        return [int(s) for s in config["inp_shape"]]
    if "img_shape_x" in config and "img_shape_y" in config:
        shape = [int(config["img_shape_x"]), int(config["img_shape_y"])]
        resampled = [int(config.get("img_shape_x_resampled", shape[0])), int(config.get("img_shape_y_resampled", shape[1]))]
        if resampled != shape:
            raise ValueError(
                f"reference config resamples the data grid {shape} to {resampled} (img_shape_*_resampled): not supported, "
                "this FCN3 runs on the data grid"
            )
        return shape
    raise ValueError("reference config has no grid: it lacks both 'inp_shape' and 'img_shape_x'/'img_shape_y'")


def reference_config_to_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Map a reference architecture config (a package's ``config.json`` or a golden manifest) to :class:`FCN3`
    keyword arguments (validated)."""
    config = dict(config.get("config", config))  # accept a whole manifest too
    nettype = config.get("nettype")
    if nettype is not None and nettype not in FCN3_NETTYPES:
        raise ValueError(f"reference config: network type (nettype) {nettype!r} is not FCN3; only FCN3 can be loaded")
    for key, value in _FIXED_SETTINGS.items():
        if key in config and config[key] not in (value, str(value)) and not (value in (0, False) and config[key] in (None, "None")):
            raise ValueError(f"reference setting {key}={config[key]!r} is not supported: this FCN3 implementation has {key}={value!r}")
    shape = reference_shape(config)
    if "out_shape" in config and list(config["out_shape"]) != shape:
        raise ValueError(f"reference out_shape {config['out_shape']} differs from the input grid {shape}; FCN3 predicts on its input grid")
    if "channel_names" not in config:
        raise ValueError("reference config lacks ['channel_names']")
    kwargs = {k: config[k] for k in _DIRECT_KEYS + EXTENSION_KEYS if config.get(k) is not None}
    kwargs["inp_shape"] = shape
    return kwargs


def kwargs_to_reference_config(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The network part of a reference ``config.json`` for :class:`FCN3` keyword arguments: every architecture
    setting written out (the reference loader falls back to its own defaults for missing ones, which are not all
    FCN3's), the grid as ``img_shape_x/y``, and the settings fixed in this implementation."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(FCN3.__init__).parameters.items() if k not in ("self", "layers")}
    full = {**defaults, **dict(kwargs)}
    if full.get("water_channels") is not None:
        raise ValueError("water_channels other than the reference rule (q*, r*, tcwv) cannot be written to a reference config")
    out: dict[str, Any] = {k: _plain(full[k]) for k in _DIRECT_KEYS if k != "inp_shape"}
    out.update({k: _plain(full[k]) for k in EXTENSION_KEYS if full.get(k) is not None})
    nlat, nlon = (int(s) for s in full["inp_shape"])
    for suffix in ("", "_resampled"):
        out[f"img_shape_x{suffix}"], out[f"img_shape_y{suffix}"] = nlat, nlon
    out.update({k: _plain(v) for k, v in _FIXED_SETTINGS.items()})
    out["nettype"] = "FCN3"
    return out


def _plain(v: Any) -> Any:
    """JSON-friendly values (tuples as lists)."""
    return list(v) if isinstance(v, tuple) else v


def model_from_reference_config(config: Mapping[str, Any], **overrides: Any) -> FCN3:
    """Build our network from a reference architecture config (``config.json`` / manifest ``config``)."""
    return FCN3(**{**reference_config_to_kwargs(config), **overrides})


def _strip(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or a reference checkpoint; drop DDP/wrapper prefixes."""
    for key in ("model_state", "state_dict", "model"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    out = {}
    for name, tensor in state.items():
        for prefix in ("module.", "model."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
        out[name] = tensor
    return out


def reference_to_ours(name: str) -> str | None:
    """Our parameter name for a reference parameter name (None if the name is not a known parameter)."""
    for pattern, template, _ in _RULES:
        m = re.fullmatch(pattern, name)
        if m:
            return m.expand(template)
    return None


def convert_reference_state_dict(reference: Mapping[str, Any], model: FCN3, *, progress: bool = False) -> dict[str, torch.Tensor]:
    """Map a reference state dict onto ``model``'s parameter names and shapes, checking everything.

    Raises ``ValueError`` naming every unknown, missing or misshapen tensor.
    """
    reference = _strip(reference)
    target = model.state_dict()
    reshapes = {t: r for _, t, r in _RULES}
    out: dict[str, torch.Tensor] = {}
    unknown, misshapen = [], []
    for name, tensor in tqdm(reference.items(), desc="converting", disable=not progress, unit="tensor"):
        ours = reference_to_ours(name)
        if ours is None or ours not in target:
            unknown.append(name)
            continue
        want = target[ours]
        rule = next(r for p, t, r in _RULES if re.fullmatch(p, name))
        if rule is not None:
            tensor = rule(tensor, want.shape)
        if tuple(tensor.shape) != tuple(want.shape) or tensor.is_complex() != want.is_complex():
            misshapen.append(f"{name}: {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(want.shape)} {want.dtype}")
            continue
        out[ours] = tensor.to(want.dtype)
    del reshapes
    missing = [n for n in target if n not in out]
    problems = []
    if missing:
        problems.append(f"missing tensors for {missing}")
    if unknown:
        problems.append(f"tensors unknown to this network: {unknown}")
    if misshapen:
        problems.append("misshapen tensors: " + "; ".join(misshapen))
    if problems:
        raise ValueError("reference state dict does not fit the network: " + " | ".join(problems))
    return out


def load_reference_state_dict(model: FCN3, reference: Mapping[str, Any] | str | Path, *, progress: bool = False) -> FCN3:
    """Load reference (Makani-layout) parameters into ``model``, from a dict or a checkpoint file."""
    if isinstance(reference, (str, Path)):
        path = Path(reference)
        if not path.is_file():
            raise FileNotFoundError(f"reference checkpoint {path} does not exist")
        reference = read_checkpoint(path, "reference checkpoint", mmap=False)
    model.load_state_dict(convert_reference_state_dict(reference, model, progress=progress), strict=True)
    return model


def ours_to_reference_state_dict(model: FCN3 | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Export our parameters (a network or its state dict) in the reference layout (the inverse of the conversion)."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    out = {}
    for name, tensor in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.filter\.weight", name)
        if m:
            kind = "global" if tensor.is_complex() else "local"
            out[f"blocks.{m.group(1)}.{kind}_conv.weight"] = tensor
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)", name)
        if m:
            out[f"blocks.{m.group(1)}.mlp.fwd.{0 if m.group(2) == '1' else 3}.{m.group(3)}"] = tensor
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.layer_scale", name)
        if m:
            out[f"blocks.{m.group(1)}.layer_scale.weight"] = tensor.reshape(-1, 1, 1, 1)
            continue
        out[name] = tensor
    return out
