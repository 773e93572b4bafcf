"""Atomic writes: a failure mid-write leaves the previous file intact and no temporary behind."""

from __future__ import annotations

import pytest
import torch

from fcn3_lightning.io import atomic_torch_save
from fcn3_lightning.training.checkpoint_io import AtomicCheckpointIO


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom mid-write")


def test_failed_save_keeps_the_good_file(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="boom mid-write"):
        atomic_torch_save({"w": torch.zeros(1000), "bad": _Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_checkpoint_io_saves_atomically(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "best.ckpt"
    io.save_checkpoint({"state_dict": {"a": torch.arange(3)}}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["a"], torch.arange(3))
    with pytest.raises(RuntimeError):
        io.save_checkpoint({"state_dict": {"a": torch.zeros(2)}, "bad": _Unpicklable()}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["a"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["best.ckpt"]
