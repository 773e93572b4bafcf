"""Collectives for the distributed training step: differentiable ones for the loss, in-place ones for gradients.

Differentiable (autograd functions):

* :func:`reduce_from_group` -- all-reduce SUM whose backward is the identity. For a sum of per-rank partial terms
  ``L = sum_r L_r`` (the loss over tiles), every rank's ``dL/dL_r`` is 1: the incoming gradient passes through.
* :func:`gather_members` -- all-gather along the ensemble-member dim whose backward returns this rank's slice of
  the incoming gradient, *not* the sum over ranks (see its docstring for why).

Non-differentiable helpers for gradients and norms: :func:`all_reduce_` (complex-safe, size-1 groups skipped) and
:func:`all_reduce_coalesced_` (one collective for many tensors).

gloo cannot reduce complex tensors (and NCCL's complex support is partial): complex tensors travel as their
``torch.view_as_real`` views, which is exact for sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp


def group_size(group: dist.ProcessGroup | None) -> int:
    """Size of ``group`` (1 for ``None``, which here means "no group", never the world)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank in ``group`` (0 for ``None``)."""
    return 0 if group is None else dist.get_rank(group)


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def all_reduce_(tensor: torch.Tensor, group: dist.ProcessGroup | None, op: ReduceOp.RedOpType = ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` over ``group`` (complex via its real view); a no-op for a size-1 group."""
    if group_size(group) == 1:
        return tensor
    if tensor.is_complex() and op not in (ReduceOp.SUM, ReduceOp.AVG):
        raise ValueError(f"all-reducing a complex tensor with {op} is not meaningful elementwise; only SUM and AVG are")
    if not tensor.is_contiguous():
        raise ValueError("all_reduce_ needs a contiguous tensor (it reduces in place)")
    dist.all_reduce(_real(tensor), op=op, group=group)
    return tensor


def all_reduce_coalesced_(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None, op: ReduceOp.RedOpType = ReduceOp.SUM) -> None:
    """All-reduce many tensors in place with one collective per dtype (real views of complex ones).

    Every rank of ``group`` must pass tensors of the same shapes and dtypes in the same order.
    """
    if group_size(group) == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        r = _real(t)
        by_dtype.setdefault(r.dtype, []).append(r)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        parts = by_dtype[dtype]
        flat = torch.cat([p.reshape(-1) for p in parts])
        dist.all_reduce(flat, op=op, group=group)
        offset = 0
        for p in parts:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.detach().clone().contiguous()
        dist.all_reduce(_real(out), op=ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def reduce_from_group(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Differentiable all-reduce SUM over ``group``; the backward is the identity.

    Use it for ``L = sum_r L_r`` where every rank holds one partial term ``L_r`` (e.g. the loss over its tile) and
    continues with the same total: ``dL/dL_r = 1`` on every rank, so the gradient flowing back is passed through
    unchanged (a SUM in the backward would count it ``group_size`` times). A no-op for a size-1 group or ``None``.
    """
    if group_size(group) == 1:
        return x
    return _ReduceFromGroup.apply(x, group)


class _GatherMembers(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
        ctx.dim, ctx.rank, ctx.size = dim, dist.get_rank(group), x.shape[dim]
        local = _real(x.detach()).contiguous()
        # all_gather needs equal shapes: check them (a mismatch would otherwise hang or garble)
        shape = torch.tensor(list(x.shape), dtype=torch.int64)
        shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shapes, shape, group=group)
        if any(not torch.equal(s, shape) for s in shapes):
            raise ValueError(
                f"gather_members needs the same local shape on every rank of the group, got {[tuple(s.tolist()) for s in shapes]} "
                "(every ensemble rank must hold the same number of members of the same samples)"
            )
        parts = [torch.empty_like(local) for _ in shapes]
        dist.all_gather(parts, local, group=group)
        out = torch.cat(parts, dim=dim)  # dim >= 0: unchanged by the real view's trailing dim
        return torch.view_as_complex(out) if x.is_complex() else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size).contiguous(), None, None


def gather_members(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """All-gather ``x`` along ``dim`` (the member dim) over ``group``, in group-rank order; differentiable.

    The backward returns this rank's slice of the incoming gradient, with no sum over ranks. Why: every rank of the
    ensemble group evaluates the *same* loss ``L(x_0, ..., x_{E-1})`` of all members (the CRPS couples them), so the
    gradient arriving at the gathered tensor on rank r is already the full ``dL/dx`` for all members, identical on
    every rank. Rank r's members ``x_r`` only connect to rank r's parameters' graph, so rank r needs exactly
    ``dL/dx_r``: its slice. The usual all-gather backward (a reduce-scatter) would add the E identical copies and
    scale the gradient by E. The parameter gradient ``sum_r dL/dx_r dx_r/dtheta`` is then completed by summing the
    parameter gradients over the ensemble ranks (:func:`~fcn3_lightning.parallel.grads.reduce_gradients`).

    Every rank must hold the same local shape (equal member counts). A no-op for a size-1 group or ``None``.
    """
    if group_size(group) == 1:
        return x
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim={dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return _GatherMembers.apply(x, group, dim % x.ndim)
