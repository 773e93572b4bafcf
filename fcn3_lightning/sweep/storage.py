"""Where a study lives (``--storage``), and the file lock that serialises its workers' bookkeeping."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import optuna

DEFAULT_STORAGE = "sqlite:///sweep.db"


def make_storage(spec: str) -> optuna.storages.BaseStorage:
    """``sqlite:///PATH`` or any SQLAlchemy RDB URL (``postgresql://...``, ``mysql://...``), or ``journal:PATH``
    (Optuna's journal file: several workers on one machine or on a shared filesystem)."""
    if spec.startswith("journal:"):
        path = Path(spec[len("journal:") :])
        if not path.name:
            raise ValueError(f"--storage {spec!r}: a journal storage needs a file path (journal:PATH)")
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in spec:
        raise ValueError(f"--storage {spec!r}: expected sqlite:///PATH, journal:PATH or an RDB URL such as postgresql://host/db")
    kwargs = {}
    if spec.startswith("sqlite:///"):
        Path(spec[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        # several workers write to one file: wait for SQLite's lock instead of failing after 5 s
        kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}}}
    # get_storage adds Optuna's cache in front of an RDB, as create_study would
    return optuna.storages.get_storage(optuna.storages.RDBStorage(spec, **kwargs))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (and machines, on a filesystem whose flock is shared)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides: workers of other users may need to lock it
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if the holder is killed
        yield
    finally:
        os.close(fd)
