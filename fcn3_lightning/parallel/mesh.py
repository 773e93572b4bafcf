"""Process mesh for spatial model parallelism: (batch, ensemble, h, w) ranks, their groups and grid tiles.

The layout follows the reference (``shared/docs/fcn3-reference.md`` section 5.1): ranks are laid out row-major over
``(batch, ensemble, h, w)``, the last dimension fastest::

    model_rank    = rank mod (h * w)        w_rank     = model_rank mod w     h_rank     = model_rank div w
    data_rank     = rank div (h * w)        ensemble_rank = data_rank mod E   batch_rank = data_rank div E

so the h * w ranks of one spatial domain are consecutive (on one node where possible: they talk the most).

Groups (every rank belongs to exactly one of each kind):

==========  =====================================  =================================================
name        members                                used for
==========  =====================================  =================================================
spatial     the h * w ranks of one data rank       loss and replicated-gradient reductions over tiles
h (polar)   same data rank and w_rank              torch-harmonics polar group; l-sharded spectral weights
w (azimuth) same data rank and h_rank              torch-harmonics azimuth group
ensemble    same batch_rank and model_rank         all-gathering ensemble members for the CRPS
batch       same ensemble_rank and model_rank      batch parallelism
data        same model_rank (ensemble x batch)     DDP gradient averaging
==========  =====================================  =================================================

The pure functions (:func:`mesh_sizes`, :func:`rank_layout`, :func:`group_ranks`, :func:`split_slice`) need no
``torch.distributed`` and are what the tests check against the reference formulas. :class:`Layout` is the one answer
to "which tile, which members, which groups" that the strategy hands out and every reader takes (serial: ``Layout()``);
:class:`ProcessMesh` is the layout of a split: it creates the groups and initialises ``torch_harmonics.distributed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch_harmonics.distributed as thd
from torch_harmonics.distributed import compute_split_shapes

#: Group kinds, in the order in which every rank creates them (torch requires the same order everywhere).
GROUP_NAMES = ("spatial", "h", "w", "ensemble", "batch", "data")


@dataclass(frozen=True)
class MeshSizes:
    """Sizes of the four mesh dimensions; ``batch * ensemble * h * w`` is the world size."""

    batch: int
    ensemble: int
    h: int
    w: int

    @property
    def model(self) -> int:
        """Ranks of one spatial domain (h * w)."""
        return self.h * self.w

    @property
    def data(self) -> int:
        """Data-parallel replicas (ensemble * batch)."""
        return self.ensemble * self.batch

    @property
    def world(self) -> int:
        return self.data * self.model


@dataclass(frozen=True)
class RankLayout:
    """Coordinates of one rank in the mesh."""

    rank: int
    sizes: MeshSizes
    model_rank: int
    h_rank: int
    w_rank: int
    data_rank: int
    ensemble_rank: int
    batch_rank: int


def mesh_sizes(
    world_size: int,
    *,
    h_parallel_size: int = 1,
    w_parallel_size: int = 1,
    ensemble_parallel_size: int = 1,
    batch_parallel_size: int | None = None,
) -> MeshSizes:
    """Validate the parallel sizes against the world size; the batch size defaults to the remainder.

    Raises ``ValueError`` naming the option at fault.
    """
    if int(world_size) != world_size or world_size < 1:
        raise ValueError(f"world size must be a positive integer, got {world_size}")
    named = {"h_parallel_size": h_parallel_size, "w_parallel_size": w_parallel_size, "ensemble_parallel_size": ensemble_parallel_size}
    if batch_parallel_size is not None:
        named["batch_parallel_size"] = batch_parallel_size
    for name, value in named.items():
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    per_replica = ensemble_parallel_size * h_parallel_size * w_parallel_size
    if world_size % per_replica != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by ensemble_parallel_size x h_parallel_size x w_parallel_size = "
            f"{ensemble_parallel_size} x {h_parallel_size} x {w_parallel_size} = {per_replica}"
        )
    batch = world_size // per_replica
    if batch_parallel_size is not None and batch_parallel_size != batch:
        raise ValueError(
            f"batch_parallel_size={batch_parallel_size} does not match world size {world_size} / "
            f"(ensemble_parallel_size x h_parallel_size x w_parallel_size = {per_replica}) = {batch}"
        )
    return MeshSizes(batch=batch, ensemble=int(ensemble_parallel_size), h=int(h_parallel_size), w=int(w_parallel_size))


def rank_layout(rank: int, sizes: MeshSizes) -> RankLayout:
    """This rank's mesh coordinates (row-major over (batch, ensemble, h, w), w fastest)."""
    if not 0 <= rank < sizes.world:
        raise ValueError(f"rank {rank} is outside the mesh of {sizes.world} ranks")
    model_rank, data_rank = rank % sizes.model, rank // sizes.model
    return RankLayout(
        rank=rank,
        sizes=sizes,
        model_rank=model_rank,
        h_rank=model_rank // sizes.w,
        w_rank=model_rank % sizes.w,
        data_rank=data_rank,
        ensemble_rank=data_rank % sizes.ensemble,
        batch_rank=data_rank // sizes.ensemble,
    )


def group_ranks(sizes: MeshSizes) -> dict[str, list[list[int]]]:
    """Every group of every kind as sorted global-rank lists, in a deterministic order (see :data:`GROUP_NAMES`)."""
    layouts = [rank_layout(r, sizes) for r in range(sizes.world)]
    # a group is the set of ranks that agree on every coordinate in its key
    keys = {
        "spatial": lambda c: (c.data_rank,),
        "h": lambda c: (c.data_rank, c.w_rank),
        "w": lambda c: (c.data_rank, c.h_rank),
        "ensemble": lambda c: (c.batch_rank, c.model_rank),
        "batch": lambda c: (c.ensemble_rank, c.model_rank),
        "data": lambda c: (c.model_rank,),
    }
    out: dict[str, list[list[int]]] = {}
    for name in GROUP_NAMES:
        members: dict[tuple[int, ...], list[int]] = {}
        for c in layouts:
            members.setdefault(keys[name](c), []).append(c.rank)
        out[name] = [members[k] for k in sorted(members)]
    return out


def split_slice(n: int, k: int, i: int, *, what: str = "dimension") -> slice:
    """Slice of chunk ``i`` when ``n`` points are split in ``k`` chunks as torch-harmonics does (first n mod k one larger)."""
    if k > n:
        raise ValueError(f"cannot split the {what} of size {n} over {k} ranks: every rank needs at least one point")
    shapes = compute_split_shapes(n, k)
    start = sum(shapes[:i])
    return slice(start, start + shapes[i])


def tile_slices(shape: Sequence[int], layout: RankLayout) -> tuple[slice, slice]:
    """(latitude, longitude) slices of this rank's tile of an (nlat, nlon) grid."""
    nlat, nlon = (int(s) for s in shape)
    return (
        split_slice(nlat, layout.sizes.h, layout.h_rank, what="latitude dimension (h_parallel_size)"),
        split_slice(nlon, layout.sizes.w, layout.w_rank, what="longitude dimension (w_parallel_size)"),
    )


class Layout:
    """Which part of the work this rank holds, and with whom it completes it: the one answer every reader takes.

    The tile of the grid (:meth:`tile`), the share of the ensemble members (:meth:`members`), the process groups
    (:meth:`group`) and the mesh coordinates (:attr:`sizes`, :attr:`layout`). The strategy hands it out
    (:func:`fcn3_lightning.parallel.strategy.layout_of`); the LightningModule, the data module, the metrics and the
    callbacks read it instead of working the tile out themselves.

    This base class is the layout without a split: one process (``Layout()``), or ``world_size`` data-parallel
    replicas that each hold the whole grid and every member. Its groups of one are ``None`` and the collectives of
    :mod:`fcn3_lightning.parallel.comm` do nothing on them, so callers need not branch on whether anything is split.
    :class:`ProcessMesh` is the layout of a (batch, ensemble, h, w) split, with real process groups.
    """

    sizes: MeshSizes
    #: this rank's mesh coordinates
    layout: RankLayout
    groups: dict[str, dist.ProcessGroup | None]
    group_members: dict[str, list[int]]

    def __init__(self, world_size: int = 1, rank: int = 0):
        self.sizes = mesh_sizes(world_size)
        self.layout = rank_layout(rank, self.sizes)
        self.group_members = {name: next(g for g in groups if rank in g) for name, groups in group_ranks(self.sizes).items()}
        # no process group of its own: groups of one are None, the replicas' batch / data group the default one (see group)
        self.groups = {name: None for name in GROUP_NAMES}

    @property
    def tiled(self) -> bool:
        """Whether the grid is split: this rank holds a tile of it, not the whole grid."""
        return self.sizes.model > 1

    @property
    def model_parallel(self) -> bool:
        """Whether the grid or the ensemble is split (the network is built on tiles / member shards)."""
        return self.sizes.model > 1 or self.sizes.ensemble > 1

    @property
    def polar_group(self) -> dist.ProcessGroup | None:
        """The h group, or None when h = 1 (what torch-harmonics expects)."""
        return self.groups["h"] if self.sizes.h > 1 else None

    @property
    def azimuth_group(self) -> dist.ProcessGroup | None:
        """The w group, or None when w = 1."""
        return self.groups["w"] if self.sizes.w > 1 else None

    @property
    def spatial_group(self) -> dist.ProcessGroup | None:
        """The spatial (h x w) group that completes this rank's tile, or None when the grid is not split."""
        return self.groups["spatial"] if self.tiled else None

    def group(self, name: str) -> dist.ProcessGroup | None:
        """This rank's group of the given kind (one of :data:`GROUP_NAMES`); None for a group of one without a
        process group (the collectives of :mod:`fcn3_lightning.parallel.comm` do nothing on it)."""
        if name not in self.groups:
            raise KeyError(f"unknown group {name!r}; choose one of {list(GROUP_NAMES)}")
        group = self.groups[name]
        if group is None and len(self.group_members[name]) > 1:
            return dist.group.WORLD  # data-parallel replicas without a mesh: the default group (looked up when asked)
        return group

    def tile(self, shape: Sequence[int]) -> tuple[slice, slice]:
        """(latitude, longitude) slices of this rank's tile of an (nlat, nlon) grid (the whole grid without a split)."""
        return tile_slices(shape, self.layout)

    def local_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """Shape of this rank's tile of an (nlat, nlon) grid."""
        lat, lon = self.tile(shape)
        return lat.stop - lat.start, lon.stop - lon.start

    def members(self, n_members: int) -> slice:
        """Global ids of this rank's ensemble members out of ``n_members``: all of them, or its share under a split."""
        return split_slice(n_members, self.sizes.ensemble, self.layout.ensemble_rank, what="ensemble (ensemble_parallel_size)")

    def gather_tiles(self, x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """All-gather the tiles ``x[..., lat_local, lon_local]`` of the spatial group into the full (nlat, nlon) grid.

        Every spatial rank receives the full field (without a split: ``x`` itself). Not differentiable (for
        validation, tests and output).
        """
        nlat, nlon = (int(s) for s in shape)
        if tuple(x.shape[-2:]) != self.local_shape(shape):
            raise ValueError(f"tile of shape {tuple(x.shape[-2:])} does not match this rank's tile {self.local_shape(shape)} of {shape}")
        if self.sizes.model == 1:
            return x
        lat_shapes, lon_shapes = compute_split_shapes(nlat, self.sizes.h), compute_split_shapes(nlon, self.sizes.w)
        # all_gather needs equal sizes: pad every tile to the largest one
        padded = torch.zeros((*x.shape[:-2], lat_shapes[0], lon_shapes[0]), dtype=x.dtype, device=x.device)
        padded[..., : x.shape[-2], : x.shape[-1]] = x
        parts = [torch.empty_like(padded) for _ in range(self.sizes.model)]
        dist.all_gather(parts, padded.contiguous(), group=self.groups["spatial"])
        rows = []
        for hr in range(self.sizes.h):
            # group ranks follow global-rank order, i.e. model_rank = h_rank * w + w_rank
            cols = [parts[hr * self.sizes.w + wr][..., : lat_shapes[hr], : lon_shapes[wr]] for wr in range(self.sizes.w)]
            rows.append(torch.cat(cols, dim=-1))
        return torch.cat(rows, dim=-2)

    def destroy(self) -> None:
        """Release the process groups this layout created (none here)."""

    def __repr__(self) -> str:
        s, c = self.sizes, self.layout
        return (
            f"{type(self).__name__}(batch={s.batch}, ensemble={s.ensemble}, h={s.h}, w={s.w}; rank {c.rank}: batch_rank={c.batch_rank}, "
            f"ensemble_rank={c.ensemble_rank}, h_rank={c.h_rank}, w_rank={c.w_rank})"
        )


class ProcessMesh(Layout):
    """The layout of a (batch, ensemble, h, w) mesh over the default ``torch.distributed`` group, with its groups.

    Creating it is collective: every rank must construct it with the same sizes. It creates every group of every
    kind (also size-1 groups, so that e.g. DDP never falls back to the world group by receiving ``None``) and, with
    ``init_harmonics``, registers the h and w groups with ``torch_harmonics.distributed.init`` (``None`` for a size-1
    group, as the reference does). torch-harmonics keeps one global pair of groups: one mesh drives it at a time.
    """

    def __init__(
        self,
        *,
        h_parallel_size: int = 1,
        w_parallel_size: int = 1,
        ensemble_parallel_size: int = 1,
        batch_parallel_size: int | None = None,
        init_harmonics: bool = True,
    ):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ProcessMesh needs an initialised torch.distributed default process group (init_process_group)")
        self.sizes = mesh_sizes(
            dist.get_world_size(),
            h_parallel_size=h_parallel_size,
            w_parallel_size=w_parallel_size,
            ensemble_parallel_size=ensemble_parallel_size,
            batch_parallel_size=batch_parallel_size,
        )
        self.layout = rank_layout(dist.get_rank(), self.sizes)
        self.groups = {}
        self.group_members = {}
        for name, all_groups in group_ranks(self.sizes).items():
            for ranks in all_groups:
                group = dist.new_group(ranks)  # collective in creation order: every rank calls it for every group
                if self.layout.rank in ranks:
                    self.groups[name], self.group_members[name] = group, ranks
        self._owns_harmonics = False
        if init_harmonics:
            thd.init(self.polar_group, self.azimuth_group)
            self._owns_harmonics = True

    def destroy(self) -> None:
        """Release the groups (and torch-harmonics' registration of them, if this mesh made it)."""
        if self._owns_harmonics:
            thd.finalize()  # destroys the registered polar / azimuth groups
            self._owns_harmonics = False
            if self.sizes.h > 1:
                self.groups.pop("h")
            if self.sizes.w > 1:
                self.groups.pop("w")
        for group in self.groups.values():
            dist.destroy_process_group(group)
        self.groups.clear()
