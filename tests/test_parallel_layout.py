"""The layout a strategy hands out (:class:`~fcn3_lightning.parallel.mesh.Layout`) without a split: one process, or
data-parallel replicas. Every reader (module, data module, metrics, callbacks) takes the tile, the member share and
the groups from it; its groups of one are ``None`` and the collectives do nothing on them, so no caller branches.

The split layout (:class:`~fcn3_lightning.parallel.mesh.ProcessMesh` under ``SpatialParallelStrategy``) is checked
where it is used: ``tests/test_parallel_module.py`` records what the module, the data module and the metrics read
on every rank of a real 4-process fit.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import SingleDeviceStrategy

from fcn3_lightning.data.datamodule import WB2DataModule
from fcn3_lightning.parallel import GROUP_NAMES, Layout, all_reduce_, all_reduce_coalesced_, gather_members, reduce_from_group
from fcn3_lightning.parallel.strategy import layout_of
from fcn3_lightning.training.module import FCN3Module

NET = {"atmo_embed_dim": 4, "surf_embed_dim": 4, "aux_embed_dim": 2, "num_layers": 2, "sfno_block_frequency": 2}


def test_serial_layout_holds_everything() -> None:
    layout = Layout()
    assert (layout.sizes.batch, layout.sizes.ensemble, layout.sizes.h, layout.sizes.w) == (1, 1, 1, 1)
    assert layout.tile((19, 32)) == (slice(0, 19), slice(0, 32))
    assert layout.local_shape((19, 32)) == (19, 32)
    assert layout.members(6) == slice(0, 6)
    assert not layout.tiled and not layout.model_parallel
    assert all(layout.group(name) is None for name in GROUP_NAMES)
    assert layout.spatial_group is None and layout.polar_group is None and layout.azimuth_group is None
    with pytest.raises(KeyError, match="unknown group 'polar'"):
        layout.group("polar")


def test_data_parallel_layout_splits_only_the_samples() -> None:
    layout = Layout(world_size=3, rank=2)
    assert (layout.sizes.batch, layout.sizes.ensemble, layout.sizes.model) == (3, 1, 1)
    assert (layout.layout.batch_rank, layout.layout.ensemble_rank, layout.layout.h_rank, layout.layout.w_rank) == (2, 0, 0, 0)
    assert layout.tile((33, 64)) == (slice(0, 33), slice(0, 64))
    assert layout.members(4) == slice(0, 4)
    assert not layout.model_parallel
    assert layout.group_members["batch"] == [0, 1, 2] and layout.group_members["spatial"] == [2]
    for name in ("spatial", "h", "w", "ensemble"):
        assert layout.group(name) is None
    assert layout.group("batch") is dist.group.WORLD and layout.group("data") is dist.group.WORLD  # the replicas' group
    with pytest.raises(ValueError, match="rank 3 is outside the mesh of 3 ranks"):
        Layout(world_size=3, rank=3)


def test_collectives_do_nothing_on_a_serial_layout() -> None:
    """No process group exists here: a collective that tried to communicate would raise."""
    assert not dist.is_initialized()
    layout = Layout()
    x = torch.arange(6.0).reshape(1, 2, 3)
    assert all_reduce_(x, layout.group("spatial")) is x
    assert gather_members(x, layout.group("ensemble"), dim=1) is x
    assert reduce_from_group(x, layout.group("spatial")) is x
    y = x.clone()
    all_reduce_coalesced_([y], layout.group("spatial"))
    torch.testing.assert_close(y, torch.arange(6.0).reshape(1, 2, 3), rtol=0, atol=0)
    assert layout.gather_tiles(x, (2, 3)) is x
    with pytest.raises(ValueError, match=r"does not match this rank's tile \(4, 3\)"):
        layout.gather_tiles(x, (4, 3))


def test_strategies_hand_out_the_layout(tmp_path) -> None:
    """Without SpatialParallelStrategy the module, the data module and the scores read the serial layout."""
    strategy = SingleDeviceStrategy(device=torch.device("cpu"))
    assert repr(layout_of(strategy)) == repr(Layout())

    class _Seen(L.Callback):
        def on_fit_start(self, trainer: L.Trainer, pl_module: FCN3Module) -> None:
            dm = trainer.datamodule
            self.seen = {
                "module": repr(pl_module.layout),
                "data": (dm.lat, dm.lon),
                "scores": [m.tile for m in pl_module.scores.metrics],
                "groups": [m.spatial_group for m in pl_module.scores.metrics],
                "quadrature": tuple(pl_module.quadrature.shape),
            }

    seen = _Seen()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        limit_train_batches=1,
        limit_val_batches=0,
        callbacks=[seen],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(FCN3Module(net=NET, ensemble_size=2), datamodule=WB2DataModule(batch_size=1, num_workers=0, train_rollout=1))
    whole = (slice(0, 33), slice(0, 64))  # the default world's grid
    assert seen.seen["module"] == repr(Layout())
    assert seen.seen["data"] == whole
    assert seen.seen["scores"] and all(t == whole for t in seen.seen["scores"])
    assert all(g is None for g in seen.seen["groups"])
    assert seen.seen["quadrature"][0] == 33
