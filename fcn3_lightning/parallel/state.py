"""Serial state_dict <-> this rank's shard, for a network built with distributed layers.

Sharded parameters (everything else, e.g. DISCO weights, MLP weights and biases, LayerScale, is replicated on
every rank and passes through unchanged):

==============================================  ==========================  =====  =======================
parameter (FCN3 name)                           serial shape                dim    split over
==============================================  ==========================  =====  =======================
``blocks.{i}.filter.weight`` (spectral blocks)  ``(groups, cin, cout, l)``  3 (l)  h (polar) group
``*.spectral_bias`` (unused by FCN3)            ``(1, c, l, m)``            2, 3   l over h, m over w
==============================================  ==========================  =====  =======================

The split is torch-harmonics' ``compute_split_shapes`` (first ``n mod k`` chunks one larger), in group-rank order.
Which entries are sharded is read off the distributed modules themselves (:func:`sharded_entries`), so the
functions work for any network built through :class:`~fcn3_lightning.parallel.layers.DistributedSphericalLayers`.

Optimizer state (:func:`gather_optimizer_state` / :func:`shard_optimizer_state`): the per-parameter state tensors of
a sharded parameter (Adam's ``exp_avg`` / ``exp_avg_sq``, ...) are split like the parameter itself; scalars such as
Adam's ``step`` and the ``param_groups`` pass through. Both work on ``optimizer.state_dict()`` layouts, so a gathered
optimizer state is exactly what a single-process run would save.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch_harmonics.distributed as thd
from torch import nn


@dataclass(frozen=True)
class ShardedDim:
    """One split dimension of a sharded tensor: ``dim`` is split in ``shapes`` over the ``axis`` ("h" or "w") group."""

    dim: int
    axis: str
    shapes: tuple[int, ...]
    rank: int

    @property
    def offset(self) -> int:
        return sum(self.shapes[: self.rank])

    @property
    def size(self) -> int:
        return self.shapes[self.rank]


def sharded_entries(model: nn.Module) -> dict[str, tuple[ShardedDim, ...]]:
    """State-dict names of the sharded tensors of ``model`` and how each is split on this rank."""
    out: dict[str, tuple[ShardedDim, ...]] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, thd.DistributedSpectralConvS2):
            p = f"{prefix}." if prefix else ""
            l_dim = ShardedDim(3, "h", tuple(module.l_shapes), module.comm_rank_polar)
            out[f"{p}weight"] = (l_dim,)
            if getattr(module, "spectral_bias", None) is not None:
                out[f"{p}spectral_bias"] = (
                    ShardedDim(2, "h", tuple(module.l_shapes), module.comm_rank_polar),
                    ShardedDim(3, "w", tuple(module.m_shapes), module.comm_rank_azimuth),
                )
    return out


def shard_state_dict(serial: Mapping[str, torch.Tensor], model: nn.Module, strict: bool = True) -> dict[str, torch.Tensor]:
    """This rank's part of a serial state_dict, ready for ``model.load_state_dict`` (no communication).

    Sharded tensors are cut to this rank's chunk (copies, so the serial dict stays independent); the others are
    passed through. ``strict=False`` tolerates missing sharded entries (as ``load_state_dict(strict=False)`` does).
    """
    specs = sharded_entries(model)
    missing = sorted(set(specs) - set(serial))
    if missing and strict:
        raise KeyError(f"the serial state_dict lacks the sharded parameter(s) {missing}")
    out: dict[str, torch.Tensor] = {}
    for name, value in serial.items():
        for d in specs.get(name, ()):
            if value.dim() <= d.dim or value.shape[d.dim] != sum(d.shapes):
                raise ValueError(
                    f"{name}: serial shape {tuple(value.shape)} does not have {sum(d.shapes)} entries in dim {d.dim} "
                    f"(split {list(d.shapes)} over the {d.axis} group); was it saved from the same architecture?"
                )
            value = value.narrow(d.dim, d.offset, d.size)
        out[name] = value.clone() if name in specs else value
    return out


def _group(axis: str) -> dist.ProcessGroup | None:
    return thd.polar_group() if axis == "h" else thd.azimuth_group()


def _all_gather_dim(t: torch.Tensor, d: ShardedDim) -> torch.Tensor:
    """All-gather the chunks of ``t`` along ``d.dim`` over its group (uneven chunks: padded to the largest)."""
    if len(d.shapes) == 1:
        return t
    group = _group(d.axis)
    if group is None:
        # the groups are gone (e.g. after the strategy's teardown): returning the shard would pass it off as serial
        raise RuntimeError(f"cannot gather a tensor split over the {d.axis} group: torch-harmonics' {d.axis} group does not exist")
    complex_ = t.is_complex()
    # gloo has no complex all_gather: move the real/imaginary pair into a trailing dim (dims before it unchanged)
    x = torch.view_as_real(t) if complex_ else t
    pad = [0] * (2 * x.dim())
    pad[2 * (x.dim() - 1 - d.dim) + 1] = max(d.shapes) - d.size  # F.pad lists dims last-first, (before, after)
    x = torch.nn.functional.pad(x, pad).contiguous()
    parts = [torch.empty_like(x) for _ in d.shapes]
    dist.all_gather(parts, x, group=group)
    full = torch.cat([p.narrow(d.dim, 0, n) for p, n in zip(parts, d.shapes, strict=True)], dim=d.dim)
    return torch.view_as_complex(full.contiguous()) if complex_ else full


def gather_state_dict(local: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The serial state_dict from this rank's shard (collective over the h / w groups; every rank gets it all).

    Every rank of the spatial group must call it with the same keys (``model.state_dict()`` of its own model).
    """
    specs = sharded_entries(model)
    out: dict[str, torch.Tensor] = {}
    for name, value in local.items():
        for d in specs.get(name, ()):
            if value.shape[d.dim] != d.size:
                raise ValueError(
                    f"{name}: local shape {tuple(value.shape)} has {value.shape[d.dim]} entries in dim {d.dim}, expected {d.size}"
                )
            value = _all_gather_dim(value.detach(), d)
        out[name] = value
    return out


# --- optimizer state ------------------------------------------------------------------------------


def optimizer_param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The parameter name of every index of ``optimizer.state_dict()`` (torch numbers the parameters of all
    param_groups consecutively, in order)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise ValueError(f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not one of {type(model).__name__}'s")
            names.append(by_id[id(p)])
    return names


def _param_state_specs(
    state: Mapping[Any, Any], names: Sequence[str], model: nn.Module
) -> list[tuple[Any, tuple[ShardedDim, ...], torch.Size]]:
    """(state index, split dims, local parameter shape) of the sharded parameters that have optimizer state, in
    index order (the same on every rank: the collectives of the gather follow it)."""
    specs = sharded_entries(model)
    if not specs or "state" not in state:
        return []
    params = dict(model.named_parameters())
    out = []
    for idx in sorted(state["state"]):
        if not 0 <= idx < len(names):
            raise ValueError(f"optimizer state index {idx} is out of range for {len(names)} parameters")
        name = names[idx]
        if name in specs:
            out.append((idx, specs[name], params[name].shape))
    return out


def _is_per_element(value: Any, ndim: int) -> bool:
    # moments have the parameter's dims (plus trailing ones for real views of complex parameters); 'step' is a scalar
    return isinstance(value, torch.Tensor) and ndim > 0 and value.dim() >= ndim


def gather_optimizer_state(state: Mapping[str, Any], names: Sequence[str], model: nn.Module) -> dict[str, Any]:
    """The serial ``optimizer.state_dict()`` from this rank's (collective over the h / w groups, like
    :func:`gather_state_dict`; every rank of the spatial group must call it).

    ``names``: :func:`optimizer_param_names` of the optimizer. The input is not modified (torch's state_dict
    shares the per-parameter dicts with the live optimizer).
    """
    todo = _param_state_specs(state, names, model)
    if not todo:
        return dict(state)
    per_param = dict(state["state"])
    for idx, dims, local in todo:
        entry = dict(per_param[idx])
        for key in sorted(entry):
            value = entry[key]
            if not _is_per_element(value, len(local)):
                continue
            if value.shape[: len(local)] != local:
                raise ValueError(f"{names[idx]}: optimizer state {key!r} has shape {tuple(value.shape)}, the parameter {tuple(local)}")
            for d in dims:
                value = _all_gather_dim(value.detach(), d)
            entry[key] = value
        per_param[idx] = entry
    return {**state, "state": per_param}


def shard_optimizer_state(serial: Mapping[str, Any], names: Sequence[str], model: nn.Module) -> dict[str, Any]:
    """This rank's part of a serial ``optimizer.state_dict()``, ready for ``optimizer.load_state_dict`` (no
    communication; the reverse of :func:`gather_optimizer_state`). ``names``: :func:`optimizer_param_names`."""
    todo = _param_state_specs(serial, names, model)
    if not todo:
        return dict(serial)
    per_param = dict(serial["state"])
    for idx, dims, local in todo:
        full = list(local)
        for d in dims:
            full[d.dim] = sum(d.shapes)
        entry = dict(per_param[idx])
        for key, value in entry.items():
            if not _is_per_element(value, len(local)):
                continue
            if list(value.shape[: len(local)]) != full:
                raise ValueError(
                    f"{names[idx]}: optimizer state {key!r} has shape {tuple(value.shape)}, expected the serial parameter "
                    f"shape {tuple(full)}; was it saved from the same architecture?"
                )
            for d in dims:
                value = value.narrow(d.dim, d.offset, d.size)
            entry[key] = value.clone()
        per_param[idx] = entry
    return {**serial, "state": per_param}
