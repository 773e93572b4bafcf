"""Atomic file writing: a crash or kill never leaves a half-written file where a good one stood."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def _umask_from_proc() -> int | None:
    """The umask as Linux reports it (``Umask:`` in /proc/self/status, Linux >= 4.7), None where it does not."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_setting() -> int:
    # os.umask can only be read by setting it, process-wide: done once, at import, before this module's writers run
    # (plots are written from a background thread; it must never see a umask of 0 between the two calls)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_from_proc()
if _UMASK_AT_IMPORT is None:
    _UMASK_AT_IMPORT = _umask_by_setting()


def current_umask() -> int:
    """The process umask, read without changing it (where the system allows: else the umask at import)."""
    mask = _umask_from_proc()
    return _UMASK_AT_IMPORT if mask is None else mask


def default_mode(directory: bool = False) -> int:
    """The mode the umask gives a new file (``0o666 & ~umask``) or directory (``0o777 & ~umask``)."""
    return (0o777 if directory else 0o666) & ~current_umask()


def give_default_mode(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have: ``mkstemp``/``mkdtemp`` make it private (0600/0700),
    and that mode would survive the rename into place, so colleagues on a shared store could not read the output."""
    os.chmod(path, default_mode(directory=Path(path).is_dir()))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path`` atomically.

    The one way this project publishes a file: the file appears complete or not at all, with the mode the umask
    gives (as ``open`` would create it), whatever the writer did to the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        give_default_mode(tmp)  # whatever the writer did: mkstemp made it 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
