"""Files on disk: atomic writing (a crash or kill never leaves a half-written file or folder where a good one stood) and
the one reader of checkpoints and model files (clear one-line errors, never unpickling objects).

Atomic publishing has one home here: :func:`atomic_path` for a file, :func:`publish_folder` for a folder (a Zarr store,
a model package) built beside its target."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import tempfile
import uuid
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


def publish_folder(tmp: str | Path, path: str | Path, *, replace: bool = True) -> None:
    """Move the finished folder ``tmp`` (built beside ``path``, on the same file system) to ``path`` by renames only.

    The one way this project publishes a folder (a Zarr store, a model package): ``path`` is never half-written.
    ``replace``: an existing ``path`` (folder, file or link) is first renamed aside to a hidden name, the new folder
    renamed into place (the old one is put back if that fails) and the old one removed. Without ``replace`` it is a
    single rename, which fails (``OSError``) where a non-empty folder or a file stands at ``path``.
    """
    tmp, path = Path(tmp), Path(path)
    if not replace or not (path.exists() or path.is_symlink()):
        os.replace(tmp, path)  # rename(2) cannot replace a non-empty directory: hence the move aside below
        return
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)  # put the previous one back rather than leave nothing at path
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class CheckpointError(ValueError):
    """A checkpoint or model file that cannot be read; the message is one line naming the file."""


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_PICKLE_MAGIC = b"\x80"  # a pickle (protocol >= 2): torch.save's legacy format, or a plain pickled state dict


def read_checkpoint(path: str | Path, what: str = "checkpoint", *, map_location: Any = "cpu", mmap: bool = True) -> Any:
    """Read a checkpoint or model file from disk: the one place that calls ``torch.load`` on a user's file.

    Only tensors and plain data are loaded (``weights_only=True``): unpickling arbitrary objects runs code from the
    file. A missing file raises ``FileNotFoundError``; a truncated or damaged file, a file that is not a PyTorch
    file (random bytes, text) or one that holds Python objects raises :class:`CheckpointError`, each with a one-line
    message naming ``what`` and the path. ``mmap`` maps the weights instead of reading them (zip-format files), so
    reading the metadata of a large checkpoint is cheap.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror}") from None
    is_zip = head == _ZIP_MAGIC
    if not is_zip and not head.startswith(_PICKLE_MAGIC):
        kind = "empty" if size == 0 else "not a PyTorch file (neither torch.save's zip format nor a pickle)"
        raise CheckpointError(f"{what} {path} is {kind}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=is_zip and mmap)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False: never do that for a file one did not write oneself
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(
                f"{what} {path} holds a Python object ({found[1]}) that is not loaded: only tensors and plain data are read "
                "from files (unpickling objects runs code from the file)"
            ) from None
        raise CheckpointError(f"{what} {path} is damaged or not a PyTorch file ({size} bytes)") from None
    except Exception:  # noqa: BLE001 - truncated archives, garbage pickles (IndexError, KeyError, EOFError, ...)
        if is_zip:
            raise CheckpointError(f"{what} {path} is truncated or damaged ({size} bytes; torch.save's zip archive is incomplete)") from None
        raise CheckpointError(f"{what} {path} is damaged or not a PyTorch file ({size} bytes)") from None
