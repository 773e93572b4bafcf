"""Gradient reduction and gradient-norm clipping for a network built with distributed layers.

Reference section 5.5, with the ensemble fix noted there. After ``loss.backward()`` on a tile:

* a parameter **replicated** over the spatial group (DISCO weights, MLP weights and biases, LayerScale) has, on
  each rank, the gradient of the loss through its own tile only: the full gradient is the SUM over the spatial
  group;
* a **sharded** parameter (:func:`~fcn3_lightning.parallel.state.sharded_entries`) holds its own chunk, and its
  gradient is partial only over the spatial axes it is *not* split over. The spectral weight ``K[g, i, o, l]``
  (l over h) is broadcast over the orders m, which are split over w: each w rank contracts its local m only, so
  it is summed over the w group (torch-harmonics' ``DistributedSpectralConvS2`` documents the same requirement),
  not over h (the h ranks hold different l). A spectral bias (l over h, m over w) needs no spatial sum.
* then over the data group: every ensemble rank computed the full-ensemble loss, but its backward covers only
  its own members (:func:`~fcn3_lightning.parallel.comm.gather_members`), so ensemble ranks SUM; batch ranks hold
  different samples and the loss is a batch mean, so batch ranks AVERAGE. (The reference averages over both and
  so scales the gradient by 1 / ensemble_parallel_size.)

:func:`clip_grad_norm_` computes the norm of the full (serial) gradient: each shard counted once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fcn3_lightning.parallel.comm import ReduceOp, all_reduce_, all_reduce_coalesced_
from fcn3_lightning.parallel.mesh import Layout
from fcn3_lightning.parallel.state import sharded_entries

#: The spatial mesh axes a parameter can be split over.
SPATIAL_AXES = ("h", "w")


@dataclass(frozen=True)
class GradTag:
    """How one parameter's gradient is reduced: ``sharded`` = spatial axes it is split over (subset of "h", "w")."""

    sharded: tuple[str, ...] = ()

    @property
    def partial(self) -> tuple[str, ...]:
        """Spatial axes over which its gradient is a partial sum (SUM-reduced): those it is replicated over."""
        return tuple(a for a in SPATIAL_AXES if a not in self.sharded)

    @property
    def replicated(self) -> bool:
        return not self.sharded


def _axes_group(mesh: Layout, axes: tuple[str, ...]) -> dist.ProcessGroup | None:
    """The group spanning the given spatial axes (None if they span one rank)."""
    if not axes:
        return None
    if set(axes) == set(SPATIAL_AXES):
        return mesh.group("spatial")
    (axis,) = axes
    return mesh.group(axis)


def gradient_tags(model: nn.Module) -> dict[str, GradTag]:
    """Reduction tag of every parameter of ``model`` (by ``named_parameters`` name), read off its modules.

    Parameters that are not sharded (:func:`~fcn3_lightning.parallel.state.sharded_entries`) are replicated over the
    spatial group.
    """
    specs = sharded_entries(model)
    tags: dict[str, GradTag] = {}
    for name, _ in model.named_parameters():
        dims = specs.get(name, ())
        unknown = [d.axis for d in dims if d.axis not in SPATIAL_AXES]
        if unknown:
            raise ValueError(f"{name}: sharded over unknown axis/axes {unknown}; expected {SPATIAL_AXES}")
        tags[name] = GradTag(tuple(sorted({d.axis for d in dims}, key=SPATIAL_AXES.index)))
    return tags


def _params_with_grad(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # same order on every rank (module registration order): the coalesced collectives rely on it
    return [(n, p) for n, p in model.named_parameters() if p.grad is not None]


def reduce_gradients(model: nn.Module, mesh: Layout, tags: dict[str, GradTag] | None = None) -> None:
    """Complete the local gradients of ``model`` in place into the gradient of the global loss.

    SUM over the spatial axes each parameter is replicated over, then SUM over ensemble ranks and MEAN over batch
    ranks (one all-reduce over the data group, divided by the batch-parallel size). Collective over the whole mesh:
    every rank must call it with the same architecture and the same set of parameters holding gradients (true
    after the same forward/backward on every rank). ``tags`` defaults to :func:`gradient_tags` of ``model``.
    """
    tags = gradient_tags(model) if tags is None else tags
    params = _params_with_grad(model)
    missing = [n for n, _ in params if n not in tags]
    if missing:
        raise KeyError(f"no reduction tag for parameter(s) {missing}")
    for g in params:
        if not g[1].grad.is_contiguous():
            g[1].grad = g[1].grad.contiguous()
    by_axes: dict[tuple[str, ...], list[torch.Tensor]] = {}
    for name, p in params:
        by_axes.setdefault(tags[name].partial, []).append(p.grad)
    # every rank walks the same groups in the same order: (h, w), (h,), (w,)
    for axes in sorted(by_axes, key=lambda a: (-len(a), a)):
        group = _axes_group(mesh, axes)
        if group is not None:
            all_reduce_coalesced_(by_axes[axes], group)
    grads = [p.grad for _, p in params]
    all_reduce_coalesced_(grads, mesh.group("data"))
    if mesh.sizes.batch > 1:
        for g in grads:
            g.div_(mesh.sizes.batch)


def grad_norm(model: nn.Module, mesh: Layout, norm_type: float = 2.0, tags: dict[str, GradTag] | None = None) -> torch.Tensor:
    """The ``norm_type``-norm of the full gradient of ``model`` after :func:`reduce_gradients` (same on every rank).

    Replicated parameters count once (their reduced gradient is the same on every spatial rank); a sharded
    parameter's local ``sum |g|^p`` is all-reduced over the axes it is split over, so every chunk counts once.
    """
    tags = gradient_tags(model) if tags is None else tags
    params = _params_with_grad(model)
    p = float(norm_type)
    if not params:
        return torch.tensor(0.0)
    device = params[0][1].grad.device
    inf = p == float("inf")
    # one accumulator per set of sharded axes: each needs its own collective
    acc: dict[tuple[str, ...], torch.Tensor] = {}
    for name, param in params:
        # vector_norm on complex tensors uses |z|, as torch.nn.utils.clip_grad_norm_ does
        n = torch.linalg.vector_norm(param.grad, p).to(device=device, dtype=torch.float64)
        key = tags[name].sharded
        part = n if inf else n**p
        if key not in acc:
            acc[key] = part
        else:
            acc[key] = torch.maximum(acc[key], part) if inf else acc[key] + part
    total = torch.zeros((), dtype=torch.float64, device=device)
    for key in sorted(acc, key=lambda a: (len(a), a)):
        part = acc[key].clone()
        group = _axes_group(mesh, key)
        if group is not None:
            all_reduce_(part, group, ReduceOp.MAX if inf else ReduceOp.SUM)
        total = torch.maximum(total, part) if inf else total + part
    return total if inf else total ** (1.0 / p)


def clip_grad_norm_(
    model: nn.Module,
    mesh: Layout,
    max_norm: float,
    norm_type: float = 2.0,
    *,
    error_if_nonfinite: bool = False,
    tags: dict[str, GradTag] | None = None,
) -> torch.Tensor:
    """Clip the (reduced) gradients of ``model`` in place like ``torch.nn.utils.clip_grad_norm_`` on the serial net.

    The total norm is :func:`grad_norm` (every shard counted once), so every rank applies the same factor
    ``min(1, max_norm / (norm + 1e-6))``, the serial one. Returns the total norm (float32, as torch does), the same
    on every rank. Call it after :func:`reduce_gradients`.
    """
    total = grad_norm(model, mesh, norm_type, tags)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({float(total)}), so it cannot be clipped")
    grads: Iterable[torch.Tensor] = [p.grad for _, p in _params_with_grad(model)]
    total32 = total.to(torch.float32)
    coef = torch.clamp(float(max_norm) / (total32 + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))
    return total32
