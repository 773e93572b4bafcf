"""Checkpoints written atomically (a crash or kill never leaves a half-written file where a good one stood) and read
through :func:`fcn3_lightning.io.read_checkpoint` (one-line errors for missing, truncated or foreign files)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from fcn3_lightning.io import atomic_torch_save, read_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the target folder, then an atomic rename onto the checkpoint path;
    loading reads tensors and plain data only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: str | Path, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # weights_only=False is never honoured: this project's checkpoints hold tensors and plain data only
        return read_checkpoint(path, "checkpoint", map_location=map_location, mmap=False)
