"""Laying a run out in channel groups and blocks: the unit of reading and of scoring.

Variables are packed into channel groups (whole variables with all their levels; the wind components with their
speed, so the wind vectors can be scored), as many as fit the block budget (``Options.block_mb``) over all lead
times. Each group is read in blocks of (a few inits) x (a range of lead times) x (its channels), aligned with the
forecast's chunks, so nothing larger than a block is ever in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from fcn3_lightning.eval.climatology import SEEPS_VARIABLE
from fcn3_lightning.eval.data import LEAD_DIM, Channel
from fcn3_lightning.eval.derived import wind_of

if TYPE_CHECKING:  # plan imports this module
    from fcn3_lightning.eval.plan import Plan


@dataclass
class Group:
    """Channels scored together: whole variables (with all their levels), wind components with their speed."""

    index: int
    channels: list[Channel]
    seeps: list[int] = field(default_factory=list)
    vectors: list[tuple[Channel, int, int]] = field(default_factory=list)  # (vector, u position, v position)
    spectra: list[int] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.channels]


@dataclass
class Block:
    """One read and one update: some scored inits x some scored leads of one group."""

    group: int
    inits: np.ndarray  # indices into the scored inits
    leads: np.ndarray  # indices into the scored leads
    key: tuple[int, int]  # (group, first lead index): which metric set


def layout_groups(plan: Plan) -> tuple[list[Group], int, int]:
    """The channel groups, the largest item size of the forecast's variables and the bytes of one field.

    A field here is one (lat, lon) slice of every source scored at a point: the members, the truth, the
    climatology and the probabilistic climatology's years.
    """
    units: list[list[Channel]] = []
    seen: dict[str, int] = {}
    for c in plan.channels:
        w = wind_of(c.variable)
        key = f"wind:{w.prefix}" if w is not None else c.variable
        if key not in seen:
            seen[key] = len(units)
            units.append([])
        units[seen[key]].append(c)
    n_fields_per_point = plan.members + 1 + 1 + (len(plan.pclim.years) if plan.pclim else 0)
    itemsize = max(np.dtype(plan.fc[v].dtype).itemsize for v in plan.fc_vars)
    field_bytes = plan.lat.size * plan.lon.size * itemsize * n_fields_per_point
    budget = plan.opt.block_mb * 2**20
    groups: list[list[Channel]] = []
    for u in units:
        if groups and (len(groups[-1]) + len(u)) * len(plan.leads) * field_bytes <= budget:
            groups[-1] += u
        else:
            groups.append(list(u))
    out: list[Group] = []
    for gi, chans in enumerate(groups):
        g = Group(gi, chans)
        pos = {c.label: i for i, c in enumerate(chans)}
        g.seeps = [i for i, c in enumerate(chans) if c.variable == SEEPS_VARIABLE] if plan.seeps_on else []
        for vec in plan.vectors:
            w = wind_of(vec.variable)
            u, v = Channel(w.u, vec.level).label, Channel(w.v, vec.level).label  # type: ignore[union-attr]
            if u in pos and v in pos:
                g.vectors.append((vec, pos[u], pos[v]))
        g.spectra = [i for i, c in enumerate(chans) if c.label in plan.spectra]
        out.append(g)
    return out, itemsize, field_bytes


def _chunk(plan: Plan, dim: str, group: Group) -> int:
    """The forecast's chunk length along ``dim`` (1 when unknown): blocks align with it to read each chunk once."""
    sizes = []
    for var in dict.fromkeys(c.variable for c in group.channels):
        if var not in plan.fc.data_vars:
            continue
        da = plan.fc[var]
        chunks = da.encoding.get("chunks") or da.encoding.get("preferred_chunks")
        if isinstance(chunks, dict):
            sizes.append(int(chunks.get(dim, 1)))
        elif chunks is not None and dim in da.dims:
            sizes.append(int(chunks[da.dims.index(dim)]))
    return max(sizes, default=1)


def layout_blocks(plan: Plan) -> list[Block]:
    """The blocks of every group, group by group: as many inits x leads as fit the budget, aligned with the chunks."""
    budget = plan.opt.block_mb * 2**20
    n_inits, n_leads = len(plan.inits), len(plan.leads)
    blocks: list[Block] = []
    for g in plan.groups:
        per_lead = len(g.channels) * plan.field_bytes
        lead_chunk = _chunk(plan, LEAD_DIM, g)
        nl = n_leads if n_leads * per_lead <= budget else max(1, int(budget // per_lead))
        if nl < n_leads:
            # never split a lead chunk unless it is far over budget: a split chunk is read once per part
            if nl < lead_chunk and lead_chunk * per_lead <= 4 * budget:
                nl = min(lead_chunk, n_leads)
            elif nl >= lead_chunk:
                nl = (nl // lead_chunk) * lead_chunk
        nb = 1
        if nl == n_leads:
            nb = max(1, min(n_inits, int(budget // (n_leads * per_lead))))
            time_chunk = _chunk(plan, plan.init_dim, g)
            if nb >= time_chunk:
                nb = (nb // time_chunk) * time_chunk
        for b0 in range(0, n_inits, nb):
            for l0 in range(0, n_leads, nl):
                blocks.append(Block(g.index, np.arange(b0, min(b0 + nb, n_inits)), np.arange(l0, min(l0 + nl, n_leads)), (g.index, l0)))
    return blocks
