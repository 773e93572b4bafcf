"""Shared plumbing of the multi-process gloo tests (every test that starts worker processes): a free port, one worker's
set-up and tear-down (:func:`gloo_worker`), and running ``world`` workers with a time limit so that a hung collective
fails the test instead of CI (:func:`run_workers`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: forkserver: workers start from a clean interpreter that has imported ``preload`` once (fork would copy the
#: parent's threads; spawn would import torch in every worker)
START_METHOD = "forkserver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, port: int, world: int, timeout_s: float = 60.0) -> None:
    """Join the test's gloo process group; a peer that never arrives fails after ``timeout_s``."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )


def lightning_env(rank: int, port: int, world: int) -> None:
    """The variables Lightning's environment reads the world from: the processes exist already (no launcher)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), NODE_RANK="0", LOCAL_RANK=str(rank))


@contextlib.contextmanager
def gloo_worker(rank: int, port: int, world: int, *, lightning: bool = False, timeout_s: float = 60.0) -> Iterator[None]:
    """One worker's set-up and tear-down, around its body: one thread (the workers share the suite's cores), the
    gloo process group (and Lightning's environment variables with ``lightning``), the group ended at the end; a
    failing worker prints its traceback (the parent may only see its exit code) and re-raises."""
    torch.set_num_threads(1)
    try:
        if lightning:
            lightning_env(rank, port, world)
        init_gloo(rank, port, world, timeout_s)
        yield
        if dist.is_initialized():  # a body may have ended the group itself (to start another world)
            dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        raise


def run_workers(
    worker: Callable[..., None],
    workdir: Path,
    world: int,
    time_limit_s: float,
    preload: Sequence[str],
    args: Sequence[object] = (),
) -> float:
    """Run ``worker(rank, port, workdir, *args)`` in ``world`` processes; fails the test on error or after the time limit.

    Returns the elapsed seconds. Workers still alive at the end (a timeout) are killed, by handle: only our own.
    """
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    mp.get_context(START_METHOD).set_forkserver_preload(list(preload))
    t0 = time.perf_counter()
    procs = mp.start_processes(worker, args=(free_port(), str(workdir), *args), nprocs=world, join=False, start_method=START_METHOD)
    try:
        while not procs.join(timeout=1.0):
            if time.perf_counter() - t0 > time_limit_s:
                pytest.fail(f"the {world} workers did not finish within {time_limit_s:.0f} s")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    return time.perf_counter() - t0
