"""Run folders: every run gets a folder and an MLflow run name of its own unless the user names one, one process at
a time writes a folder (an OS file lock), and ``runs/latest`` points at the last fit started.

A new name says what the run is and when it started (UTC): ``fit-20261205-171705``, ``fit-stage1-20261205-171705``
(``--config configs/stage1.yaml``), ``validate-<training run>-20261205-180102``. The folder is claimed by creating
it (``mkdir`` fails if it exists), so runs started in the same second get ``-2``, ``-3``, ... and never share one.

The processes of one launch agree on the name before any process group exists: global rank 0 claims the folder and
the others learn the name from the launcher (:func:`new_run_folder`): torchrun's agent store (a TCP store every
worker can reach at ``MASTER_ADDR:MASTER_PORT``), the environment that Lightning's own launcher copies into the
processes it starts, or, under ``srun``, the job and step id that every task sees.
"""

from __future__ import annotations

import datetime
import errno
import itertools
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

RUNS_ROOT = Path("runs")
LATEST = "latest"
LOCK_FILE = "run.lock"
_ENV_PREFIX = "FCN3_LIGHTNING_RUN_NAME_"  # how the parent hands names to the processes Lightning's launcher starts
_AGREE_TIMEOUT_S = 300.0


class RunError(ValueError):
    """A run folder or run name that cannot be used; the message is one line naming the folder."""


def utc_stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def slug(text: str) -> str:
    """``text`` as part of a folder name: letters, digits, ``_``, ``.`` and ``-`` only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "run"


def check_run_name(name: str) -> str:
    """A run name given by the user: a single folder name under ``runs/``."""
    if not name or name != slug(name) or name == LATEST:
        raise RunError(f"run name {name!r}: use letters, digits, '_', '.' and '-' only (it names the folder runs/{name}; not {LATEST!r})")
    return name


@dataclass
class Footprint:
    """What the start of a run made on disk (folders, its lock file, ``runs/latest``), so that a run that fails before
    it writes anything takes it back: a bad option leaves no empty folders behind and ``runs/latest`` where it was."""

    made: list[Path] = field(default_factory=list)  # in the order they were made
    latest: tuple[Path, str | None, str] | None = None  # the link, its previous target and the one it got

    def mkdir(self, folder: Path) -> None:
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        self.made += reversed(missing)

    def undo(self) -> None:
        """Remove what was made, newest first, folders only where empty: nothing the run wrote is ever removed.
        ``runs/latest`` goes back to where it was if the folder it was given is gone (and no run has moved it since)."""
        self._remove()
        if self.latest is not None:
            link, previous, ours = self.latest
            if link.is_symlink() and os.readlink(link) == ours and not (link.parent / ours).exists():
                if previous is None:
                    link.unlink(missing_ok=True)
                    self._remove()  # runs/ itself, if this run made it and the link was all that was left
                else:
                    _point(link, previous)
        self.made.clear()
        self.latest = None

    def _remove(self) -> None:
        for p in reversed(self.made):
            try:
                p.rmdir() if p.is_dir() else p.unlink(missing_ok=True)
            except OSError:  # not empty: the run wrote something there
                pass


def claim_new_folder(root: Path, prefix: str, stamp: str | None = None, footprint: Footprint | None = None) -> Path:
    """Create ``root/<prefix>-<stamp>`` (``-2``, ``-3``, ... when taken) and return it."""
    stamp = stamp or utc_stamp()
    footprint = footprint if footprint is not None else Footprint()
    try:
        footprint.mkdir(root)
    except OSError as e:
        raise RunError(f"cannot create the runs folder {root}: {e.strerror}") from None
    for i in itertools.count(1):
        folder = root / (f"{prefix}-{stamp}" + (f"-{i}" if i > 1 else ""))
        try:
            folder.mkdir()
            footprint.made.append(folder)
            return folder
        except FileExistsError:
            continue
        except OSError as e:
            raise RunError(f"cannot create the run folder {folder}: {e.strerror}") from None
    raise AssertionError("unreachable")


# --- the processes of one launch -----------------------------------------------------------------------------------


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 as its launcher's environment says (True for a single process)."""
    env = os.environ
    if "RANK" in env:  # torchrun, and most launchers
        return int(env["RANK"]) == 0
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:  # srun
        return int(env["SLURM_PROCID"]) == 0
    # Lightning's own launcher sets these in the processes it starts (and in the one that starts them)
    return int(env.get("NODE_RANK", "0")) == 0 and int(env.get("LOCAL_RANK", "0")) == 0


def _srun_step() -> str | None:
    """``j<job>.<step>`` for a task started by ``srun`` with several tasks (None otherwise)."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env and "SLURM_STEP_ID" in env:
        return f"j{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}"
    return None


_calls = itertools.count()


def new_run_folder(prefix: str, root: Path = RUNS_ROOT, footprint: Footprint | None = None) -> Path:
    """A new folder ``root/<prefix>-<UTC time>`` (see :func:`claim_new_folder`), the same in every process of a launch.

    Global rank 0 creates it; the other ranks learn its name from rank 0 through torchrun's agent store or the
    environment Lightning's launcher copies; tasks of one ``srun`` step all use ``root/<prefix>-j<job>.<step>``.
    Every process must call this the same number of times in the same order (they run the same command).
    """
    key = f"{_ENV_PREFIX}{next(_calls)}"
    env = os.environ
    world = int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or "1")
    if not is_rank_zero() and key in env:  # started by Lightning's launcher, which copied the parent's environment
        return Path(env[key])
    if world > 1 and "TORCHELASTIC_RUN_ID" in env:
        folder = _agree_torchrun(key, lambda: claim_new_folder(root, prefix, footprint=footprint))
    elif world > 1 and (step := _srun_step()) is not None:
        folder = root / f"{prefix}-{step}"  # every task knows it: nothing to send
        if is_rank_zero():
            try:
                (footprint or Footprint()).mkdir(folder)  # exists after a requeue: the lock and the checks decide
            except OSError as e:
                raise RunError(f"cannot create the run folder {folder}: {e.strerror}") from None
    elif not is_rank_zero():
        raise RunError(
            "a process other than global rank 0, started by a launcher that gives no way to learn the run name rank 0 "
            "chose: name the run (--run_name NAME or --trainer.default_root_dir DIR)"
        )
    else:
        folder = claim_new_folder(root, prefix, footprint=footprint)
    env[key] = str(folder)  # for the processes Lightning's launcher may start from this one
    return folder


def _agree_torchrun(key: str, claim: Callable[[], Path]) -> Path:
    """Through torchrun's agent store, the TCP store at MASTER_ADDR:MASTER_PORT that exists before any worker starts."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        raise RunError(
            "torchrun without its agent store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): the ranks cannot agree on a run name; "
            "name the run (--run_name NAME or --trainer.default_root_dir DIR)"
        )
    import torch.distributed as dist

    client = dist.TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=datetime.timedelta(seconds=_AGREE_TIMEOUT_S)
    )
    store = dist.PrefixStore(f"/fcn3_lightning/{env['TORCHELASTIC_RUN_ID']}/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)
    if is_rank_zero():
        folder = claim()
        store.set(key, str(folder))
        return folder
    return Path(store.get(key).decode())  # waits for rank 0 (torchrun stops this worker if rank 0 fails)


# --- the lock ------------------------------------------------------------------------------------------------------

_held: dict[Path, IO[str]] = {}


def lock_folder(folder: Path, footprint: Footprint | None = None) -> None:
    """Hold ``folder/run.lock`` (``fcntl.flock``) until :func:`release_folder` or the end of the process.

    A second process that tries stops at once with :class:`RunError` naming the holder. The kernel releases the lock
    when the holder dies, however it dies, so a killed run never blocks its resume.
    """
    key = folder.resolve()
    if key in _held:  # this process holds it already (e.g. a second fit in one Python session)
        return
    path = folder / LOCK_FILE
    footprint = footprint if footprint is not None else Footprint()
    try:
        footprint.mkdir(folder)
        new = not path.exists()
        f = open(path, "a+")  # noqa: SIM115 - held open for the life of the run
        if new and folder in footprint.made:  # in a folder this run made, so nobody else waits on this file
            footprint.made.append(path)
    except OSError as e:
        raise RunError(f"cannot write to the run folder {folder}: {e.strerror}") from None
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): no lock
        _held[key] = f
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunError(
            f"run folder {folder} is in use by {holder} (lock {path}): wait until it ends, or name another run with --run_name"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC\n")
    f.flush()
    _held[key] = f


def release_folder(folder: Path) -> None:
    f = _held.pop(folder.resolve(), None)
    if f is not None:
        f.close()  # closing the file releases the lock


def check_writable(folder: Path, what: str, footprint: Footprint | None = None) -> None:
    """Create ``folder`` and write a file in it, so that a folder nobody can write fails now, not after an epoch."""
    try:
        (footprint if footprint is not None else Footprint()).mkdir(folder)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise RunError(f"cannot write to the {what} {folder}: {e.strerror}") from None


def update_latest(folder: Path, footprint: Footprint | None = None) -> Path | None:
    """Point ``<parent>/latest`` at ``folder`` (a relative symlink, replaced atomically). None where symlinks fail."""
    link = folder.parent / LATEST
    previous = os.readlink(link) if link.is_symlink() else None
    if not _point(link, folder.name):
        return None
    if footprint is not None:
        footprint.latest = (link, previous, folder.name)
    return link


def _point(link: Path, target: str) -> bool:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:  # e.g. Windows without the symlink privilege: the printed folder is all there is
        tmp.unlink(missing_ok=True)
        return False
    return True
