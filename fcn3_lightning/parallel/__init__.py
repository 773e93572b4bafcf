"""Spatial model parallelism: the layout (which tile and members a rank holds) and process mesh, distributed spherical
layers, sharded state_dicts, loss and gradients.

Plain torch (no Lightning): the strategy of issue 7 builds on these
(:mod:`fcn3_lightning.parallel.strategy`, imported on its own so that this package stays Lightning-free).
"""

from fcn3_lightning.parallel.comm import all_reduce_, all_reduce_coalesced_, gather_members, reduce_from_group
from fcn3_lightning.parallel.grads import GradTag, clip_grad_norm_, grad_norm, gradient_tags, reduce_gradients
from fcn3_lightning.parallel.layers import DistributedSphericalLayers, EagerDistributedSpectralConvS2
from fcn3_lightning.parallel.loss import DistributedEnsembleCRPSLoss
from fcn3_lightning.parallel.mesh import (
    GROUP_NAMES,
    Layout,
    MeshSizes,
    ProcessMesh,
    RankLayout,
    group_ranks,
    mesh_sizes,
    rank_layout,
    split_slice,
    tile_slices,
)
from fcn3_lightning.parallel.state import (
    ShardedDim,
    gather_optimizer_state,
    gather_state_dict,
    optimizer_param_names,
    shard_optimizer_state,
    shard_state_dict,
    sharded_entries,
)

__all__ = [
    "GROUP_NAMES",
    "DistributedEnsembleCRPSLoss",
    "DistributedSphericalLayers",
    "EagerDistributedSpectralConvS2",
    "GradTag",
    "Layout",
    "MeshSizes",
    "ProcessMesh",
    "RankLayout",
    "ShardedDim",
    "all_reduce_",
    "all_reduce_coalesced_",
    "clip_grad_norm_",
    "gather_members",
    "gather_optimizer_state",
    "gather_state_dict",
    "grad_norm",
    "gradient_tags",
    "group_ranks",
    "mesh_sizes",
    "optimizer_param_names",
    "rank_layout",
    "reduce_from_group",
    "reduce_gradients",
    "shard_optimizer_state",
    "shard_state_dict",
    "sharded_entries",
    "split_slice",
    "tile_slices",
]
