"""Load FCN3 weights into a network with another channel list: shared variables keep their weights, dropped ones go,
new ones start with no effect.

FCN3's encoders are grouped per variable kind (one DISCO encoder shared across pressure levels, one for the surface
channels, one for the auxiliary inputs) and its latent state is level by level (``atmo_embed_dim`` channels per
pressure level, then the surface embedding). So a channel list maps onto another as follows:

- a level variable or surface channel present in both keeps its encoder input column and decoder output row;
- a dropped one loses them; a dropped pressure level (or the whole surface group) removes its latent channels from
  every processor block;
- a new variable gets an encoder input column of zeros (the latent state, hence every old channel's forecast, is
  unchanged before training) and a freshly initialised decoder row (it affects only its own channel);
- a new pressure level widens the latent state by ``atmo_embed_dim`` channels, encoded by the shared level encoder:
  the processor blocks read nothing from them (zero filter weights and MLP input columns from the new channels), so
  the old channels' forecast is unchanged, while everything the blocks write to them starts as a fresh network's.

Two settings beyond the reference make this exact: ``encoder_groups`` (1 = dense where the new channel counts would
give another grouping under the reference's gcd rule, which cannot hold the source's weights) and
``mlp_hidden_channels`` (the blocks keep the source's hidden units when their width changes).

Plain torch on state dicts (no Lightning): :func:`mapped_settings` gives the target network's settings,
:func:`map_state_dict` the weights and a :class:`MappingReport` of what was loaded, extended, new and dropped.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fcn3_lightning.channels import FCN3_AUX_CHANNELS, ChannelLayout, channel_layout
from fcn3_lightning.model.fcn3 import FCN3

#: seed of the fresh network whose values new slices take: the same in every run, on every rank, in every command
FRESH_SEED = 0

_DEFAULTS = {k: p.default for k, p in inspect.signature(FCN3.__init__).parameters.items() if k not in ("self", "layers")}


@dataclass(frozen=True)
class _Structure:
    """What a network's settings imply for its tensors: channel groups, embedding widths, grouping, latent order."""

    layout: ChannelLayout
    aux: tuple[str, ...]
    atmo: int  # latent channels per level (0 without levels)
    surf: int
    aux_dim: int
    groups: dict[str, int]
    hidden: int

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> _Structure:
        k = {**_DEFAULTS, **dict(kwargs)}
        layout = channel_layout(k["channel_names"])
        aux = tuple(FCN3_AUX_CHANNELS if kwargs.get("aux_channel_names") is None else k["aux_channel_names"])
        atmo = int(k["atmo_embed_dim"]) if layout.levels else 0
        surf = int(k["surf_embed_dim"]) if layout.surface_index else 0
        aux_dim = int(k["aux_embed_dim"]) if aux else 0
        explicit = dict(k.get("encoder_groups") or {})
        sizes = {
            "atmo_encoder": (len(layout.level_variables), atmo),
            "surf_encoder": (len(layout.surface_index), surf),
            "aux_encoder": (len(aux), aux_dim),
            "atmo_decoder": (atmo, len(layout.level_variables)),
            "surf_decoder": (surf, len(layout.surface_index)),
        }
        groups = {m: int(explicit.get(m, math.gcd(i, o))) for m, (i, o) in sizes.items() if i and o}
        width = len(layout.levels) * atmo + surf + aux_dim
        hidden = int(k["mlp_ratio"] * width) if k.get("mlp_hidden_channels") is None else int(k["mlp_hidden_channels"])
        return cls(layout, aux, atmo, surf, aux_dim, groups, hidden)

    def names(self, module: str) -> tuple[str, ...]:
        """The named channels on the variable side of an encoder or decoder."""
        if module.startswith("atmo"):
            return self.layout.level_variables
        if module.startswith("surf"):
            return self.layout.surface_names
        return self.aux

    def embed(self, module: str) -> int:
        return {"atmo": self.atmo, "surf": self.surf, "aux": self.aux_dim}[module.split("_")[0]]

    def latent_keys(self) -> list[tuple]:
        """One key per channel of a block's input: each level's embedding, the surface embedding, then the aux one."""
        keys: list[tuple] = [("level", p, e) for p in self.layout.levels for e in range(self.atmo)]
        keys += [("surface", e) for e in range(self.surf)]
        return keys + [("aux", e) for e in range(self.aux_dim)]

    @property
    def n_latent(self) -> int:
        return len(self.layout.levels) * self.atmo + self.surf


@dataclass
class MappingReport:
    """What happened to every tensor; channels and levels kept, new and dropped."""

    loaded: list[str] = field(default_factory=list)  # copied unchanged
    mapped: list[str] = field(default_factory=list)  # the source's slices, selected or reordered; nothing new
    extended: list[str] = field(default_factory=list)  # the source's slices plus new ones
    new: list[str] = field(default_factory=list)  # not in the source: a fresh network's
    dropped: list[str] = field(default_factory=list)  # in the source only
    channels: dict[str, list] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # settings the target needs beyond the source's

    @property
    def identity(self) -> bool:
        return not (self.mapped or self.extended or self.new or self.dropped)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("loaded", "mapped", "extended", "new", "dropped", "channels", "settings")}

    def lines(self) -> list[str]:
        c = self.channels
        out = [
            f"channels: {len(c['kept'])} kept, {len(c['new'])} new {c['new']}, {len(c['dropped'])} dropped {c['dropped']}",
            f"pressure levels: kept {c['levels_kept']}, new {c['levels_new']}, dropped {c['levels_dropped']}",
        ]
        for what in ("loaded", "mapped", "extended", "new", "dropped"):
            names = getattr(self, what)
            out.append(f"{what} ({len(names)} tensors): {', '.join(names) if names else '-'}")
        if self.settings:
            out.append("settings beyond the source's: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        return out


def _group_mask(n_out: int, n_in: int, groups: int) -> torch.Tensor:
    """(out, in) True where a grouped convolution connects output and input."""
    o = torch.arange(n_out) // (n_out // groups)
    i = torch.arange(n_in) // (n_in // groups)
    return o[:, None] == i[None, :]


def _dense(w: torch.Tensor, groups: int, n_in: int) -> torch.Tensor:
    """A grouped DISCO weight (out, in / groups, K) as the equivalent dense one (out, in, K), zeros off the groups."""
    n_out = w.shape[0]
    d = w.new_zeros((n_out, n_in, *w.shape[2:]))
    opg, ipg = n_out // groups, n_in // groups
    for g in range(groups):
        d[g * opg : (g + 1) * opg, g * ipg : (g + 1) * ipg] = w[g * opg : (g + 1) * opg]
    return d


def _grouped(d: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of :func:`_dense` (the caller guarantees zeros off the groups)."""
    n_out, n_in = d.shape[:2]
    opg, ipg = n_out // groups, n_in // groups
    return torch.cat([d[g * opg : (g + 1) * opg, g * ipg : (g + 1) * ipg] for g in range(groups)], dim=0)


def _index(target: Sequence, source: Sequence) -> list[int]:
    """For each target item its source index, -1 where it is new."""
    pos = {v: i for i, v in enumerate(source)}
    return [pos.get(v, -1) for v in target]


def _module_mask(src: _Structure, tgt: _Structure, module: str) -> torch.Tensor | None:
    """The target's (out, in) connections that hold source weights (None when the source lacks the module)."""
    if module not in src.groups:
        return None
    names_s, names_t = src.names(module), tgt.names(module)
    e = tgt.embed(module)
    idx = _index(names_t, names_s)
    encoder = module.endswith("encoder")
    shape_s = (src.embed(module), len(names_s)) if encoder else (len(names_s), src.embed(module))
    mask_s = _group_mask(*shape_s, src.groups[module])
    mask = torch.zeros((e, len(names_t)) if encoder else (len(names_t), e), dtype=torch.bool)
    for j, i in enumerate(idx):
        if i < 0:
            continue
        if encoder:
            mask[:, j] = mask_s[:, i]
        else:
            mask[j] = mask_s[i]
    return mask


def mapped_settings(source: Mapping[str, Any], channel_names: Sequence[str], aux_channel_names: Sequence[str]) -> dict[str, Any]:
    """The network settings for ``channel_names`` (and the auxiliary inputs) that can hold ``source``'s weights.

    ``source``: the source network's FCN3 keyword arguments (with its channels and grid). The grid and every
    architecture setting stay the source's; ``encoder_groups`` and ``mlp_hidden_channels`` are set where the new
    channel list needs them (see the module docstring). Raises ``ValueError`` for a list that keeps no channel.
    """
    kwargs = {**dict(source), "channel_names": list(channel_names), "aux_channel_names": list(aux_channel_names)}
    src = _Structure.of(source)
    kept = [c for c in channel_names if c in src.layout.names]
    if not kept:
        raise ValueError(
            f"the channel list {list(channel_names)} keeps none of the source's channels {list(src.layout.names)}: "
            "nothing of the source network would be used (train from scratch instead: drop init_from)"
        )
    kwargs.pop("encoder_groups", None)
    kwargs.pop("mlp_hidden_channels", None)
    tgt = _Structure.of(kwargs)
    groups: dict[str, int] = {}
    for module, g in tgt.groups.items():
        mask = _module_mask(src, tgt, module)
        explicit = dict(source.get("encoder_groups") or {})
        if mask is not None and bool((mask & ~_group_mask(*mask.shape, g)).any()):
            groups[module] = 1  # the gcd rule's grouping would cut connections the source has: dense holds them all
        elif (
            module in explicit
            and explicit[module] != g
            and mask is not None
            and not (mask & ~_group_mask(*mask.shape, explicit[module])).any()
        ):
            groups[module] = int(explicit[module])
    if groups:
        kwargs["encoder_groups"] = groups
    if tgt.hidden != src.hidden or source.get("mlp_hidden_channels") is not None:
        kwargs["mlp_hidden_channels"] = src.hidden
    return kwargs


def fresh_network(settings: Mapping[str, Any]) -> FCN3:
    """A serial network with ``settings``, initialised from :data:`FRESH_SEED` (the global generator untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FRESH_SEED)
        return FCN3(**dict(settings))


def map_state_dict(
    source: Mapping[str, Any], state: Mapping[str, torch.Tensor], target: FCN3, target_settings: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], MappingReport]:
    """``state`` (a network with settings ``source``) mapped onto ``target`` (built with ``target_settings``, e.g. from
    :func:`mapped_settings`): the returned state dict loads into ``target`` strictly. New slices take ``target``'s
    current (freshly initialised) values, except where they must be zero for the old channels' forecast to stay as
    the source's."""
    src, tgt = _Structure.of(source), _Structure.of(target_settings)
    fresh = {k: v.detach().clone() for k, v in target.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    report = MappingReport()
    names_s, names_t = src.layout.names, tgt.layout.names
    report.channels = {
        "kept": [c for c in names_t if c in names_s],
        "new": [c for c in names_t if c not in names_s],
        "dropped": [c for c in names_s if c not in names_t],
        "levels_kept": [p for p in tgt.layout.levels if p in src.layout.levels],
        "levels_new": [p for p in tgt.layout.levels if p not in src.layout.levels],
        "levels_dropped": [p for p in src.layout.levels if p not in tgt.layout.levels],
        "aux_new": [a for a in tgt.aux if a not in src.aux],
        "aux_dropped": [a for a in src.aux if a not in tgt.aux],
    }
    report.settings = {k: target_settings[k] for k in ("encoder_groups", "mlp_hidden_channels") if target_settings.get(k) is not None}

    def note(name: str, kind: str) -> None:
        getattr(report, kind).append(name)

    # encoders and decoders: variables on one side, the embedding (unchanged in size) on the other
    for module in ("atmo_encoder", "surf_encoder", "aux_encoder", "atmo_decoder", "surf_decoder"):
        key = f"{module}.conv.weight"
        if key not in fresh:
            if key in state:
                note(key, "dropped")
            continue
        if key not in state:
            out[key] = fresh[key]
            note(key, "new")
            continue
        encoder = module.endswith("encoder")
        idx = _index(tgt.names(module), src.names(module))
        n_s, n_t = len(src.names(module)), len(tgt.names(module))
        ds = _dense(state[key], src.groups[module], n_s if encoder else src.embed(module))
        dt = _dense(fresh[key], tgt.groups[module], n_t if encoder else tgt.embed(module))
        for j, i in enumerate(idx):
            if encoder:  # input column: the source's, or zeros (a new variable must not change the latent state)
                dt[:, j] = ds[:, i] if i >= 0 else 0.0
            elif i >= 0:  # output row: the source's, or the fresh network's (it feeds only the new channel)
                dt[j] = ds[i]
        out[key] = _grouped(dt, tgt.groups[module])
        extended = any(i < 0 for i in idx)
        note(key, "extended" if extended else ("loaded" if idx == list(range(n_s)) and torch.equal(out[key], state[key]) else "mapped"))

    # processor blocks: channels of the block input (latent + aux embedding) mapped by key
    wmap = _index(tgt.latent_keys(), src.latent_keys())
    lmap = wmap[: tgt.n_latent]
    w_old = torch.tensor([i >= 0 for i in wmap])
    l_old = torch.tensor([i >= 0 for i in lmap])
    ws = torch.tensor([max(i, 0) for i in wmap])
    ls = torch.tensor([max(i, 0) for i in lmap])
    identity = wmap == list(range(len(src.latent_keys())))
    for key in fresh:
        if not key.startswith("blocks."):
            continue
        if key not in state:
            out[key] = fresh[key]
            note(key, "new")
            continue
        s, f = state[key], fresh[key]
        if key.endswith("filter.weight") and s.is_complex():  # spectral: (groups=1, in, out, l)
            t = f.clone()
            both = w_old[:, None] & w_old[None, :]
            mapped = s[0][ws][:, ws]
            t[0] = torch.where(both[..., None], mapped, t[0])
            t[0][~w_old[:, None] & w_old[None, :]] = 0  # new inputs must not reach old outputs
        elif key.endswith("filter.weight"):  # local DISCO: (out, in, K)
            t = f.clone()
            both = w_old[:, None] & w_old[None, :]
            mapped = s[ws][:, ws]
            t = torch.where(both[..., None], mapped, t)
            t[w_old[:, None] & ~w_old[None, :]] = 0
        elif key.endswith("fc1.weight"):  # (hidden, in, 1, 1): columns of new inputs are zero
            t = torch.where(w_old[None, :, None, None], s[:, ws], torch.zeros_like(f))
        elif key.endswith("fc2.weight"):  # (latent, hidden, 1, 1): rows of new latent channels are fresh
            t = torch.where(l_old[:, None, None, None], s[ls], f)
        elif key.endswith("fc1.bias"):
            t = s.clone()
        elif key.endswith(("fc2.bias", "layer_scale")):
            t = torch.where(l_old, s[ls], f)
        else:
            raise ValueError(f"channel mapping does not know the tensor {key!r}")
        if t.shape != f.shape:
            raise ValueError(f"channel mapping produced {key} of shape {tuple(t.shape)}, the network needs {tuple(f.shape)}")
        out[key] = t.to(f.dtype)
        if identity:
            note(key, "loaded")
        elif key.endswith("fc1.bias"):
            note(key, "loaded")
        else:
            touches_new = (key.endswith(("fc2.weight", "fc2.bias", "layer_scale")) and not bool(l_old.all())) or (
                not key.endswith(("fc2.weight", "fc2.bias", "layer_scale")) and not bool(w_old.all())
            )
            note(key, "extended" if touches_new else "mapped")
    for key in state:
        if key not in fresh and key not in report.dropped:
            note(key, "dropped")
    return out, report
