"""Spatial model parallelism foundations: process mesh, distributed spherical layers, sharded state_dicts.

Plain torch (no Lightning): the strategy of issue 7 builds on these.
"""

from fcn3_lightning.parallel.layers import DistributedSphericalLayers, EagerDistributedSpectralConvS2
from fcn3_lightning.parallel.mesh import (
    GROUP_NAMES,
    MeshSizes,
    ProcessMesh,
    RankLayout,
    group_ranks,
    mesh_sizes,
    rank_layout,
    split_slice,
    tile_slices,
)
from fcn3_lightning.parallel.state import ShardedDim, gather_state_dict, shard_state_dict, sharded_entries

__all__ = [
    "GROUP_NAMES",
    "DistributedSphericalLayers",
    "EagerDistributedSpectralConvS2",
    "MeshSizes",
    "ProcessMesh",
    "RankLayout",
    "ShardedDim",
    "gather_state_dict",
    "group_ranks",
    "mesh_sizes",
    "rank_layout",
    "shard_state_dict",
    "sharded_entries",
    "split_slice",
    "tile_slices",
]
