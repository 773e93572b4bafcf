"""Which network parameters train, and how fast: freezing by name patterns, parameter groups, learning-rate warm-up.

Patterns are shell-style (:func:`fnmatch.fnmatchcase`) on the network's parameter names, e.g. ``blocks.0.*`` (the
first processor block), ``*_encoder.*``, ``blocks.*.layer_scale``. The special pattern ``@new`` selects the tensors
that channel mapping extended or created (new variables and levels; :mod:`fcn3_lightning.model.channel_map`).
Frozen parameters are left out of the optimizer, so they carry no optimizer state and get no gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

NEW = "@new"


def matching(names: Sequence[str], patterns: Iterable[str], new: Sequence[str] = (), what: str = "model.freeze") -> list[str]:
    """The names matching any of ``patterns``; a pattern that matches nothing raises, listing what exists."""
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if n in new] if pattern == NEW else [n for n in names if fnmatchcase(n, pattern)]
        if not hits:
            groups = sorted({".".join(n.split(".")[:2]) for n in names})
            why = "channel mapping made no new tensors" if pattern == NEW else f"the network's parameters are {', '.join(groups)}.*"
            raise ValueError(f"{what}: the pattern {pattern!r} matches no parameter ({why})")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def freeze(net: nn.Module, patterns: Iterable[str], new: Sequence[str] = ()) -> list[str]:
    """Stop the matching parameters from training (requires_grad False); returns their names."""
    params = dict(net.named_parameters())
    names = matching(list(params), patterns, new)
    for n in names:
        params[n].requires_grad_(False)
    return names


def optimizer_groups(
    net: nn.Module, groups: Sequence[Mapping[str, Any]] | None, lr: float, new: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Parameter groups for the optimizer: each configured group ``{"params": [patterns], "lr": ...}`` (any other key
    is passed on, e.g. ``weight_decay``) takes the trainable parameters it matches first; the rest train at ``lr``.
    Frozen parameters are in no group."""
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    taken: set[str] = set()
    out = []
    for k, group in enumerate(groups or ()):
        group = dict(group)
        patterns = group.pop("params", None)
        if not patterns:
            raise ValueError(f"model.param_groups[{k}] needs 'params': a list of name patterns (or '{NEW}')")
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        names = [n for n in matching(list(params), patterns, new, what=f"model.param_groups[{k}]") if n not in taken]
        if not names:
            raise ValueError(f"model.param_groups[{k}] {patterns}: every parameter it matches is in an earlier group")
        taken.update(names)
        out.append({"params": [params[n] for n in names], "names": names, **group})
    rest = [n for n in params if n not in taken]
    if rest:
        out.append({"params": [params[n] for n in rest], "names": rest, "lr": lr})
    return out


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: the learning rate of optimizer step ``step`` (0-based) is this fraction of the scheduled one."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps
