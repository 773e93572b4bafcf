"""Acceptance: a rank that raises makes every rank exit non-zero within 60 s (no hang), with the error shown.

The real launcher and CLI: ``python -m torch.distributed.run --nproc_per_node 4 -m fcn3_lightning fit`` under
SpatialParallelStrategy (h 2 x ensemble 2, CPU gloo), with tests/parallel_fail_callback.py's RaiseOnRank appended to
the callbacks from the command line; global rank 2 raises at its first training batch while the others are inside
(or entering) collectives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

TESTS = Path(__file__).resolve().parent
WORLD, FAILING_RANK = 4, 2
MAX_AFTER_RAISE_S = 60.0
HANG_LIMIT_S = 300
TINY = [
    "--trainer.accelerator", "cpu",
    "--trainer.devices", str(WORLD),
    "--trainer.strategy", "fcn3_lightning.parallel.strategy.SpatialParallelStrategy",
    "--trainer.strategy.init_args.h_parallel_size", "2",
    "--trainer.strategy.init_args.ensemble_parallel_size", "2",
    "--trainer.max_steps", "3",
    "--trainer.max_epochs", "1",
    "--trainer.limit_val_batches", "1",
    "--trainer.num_sanity_val_steps", "0",
    "--trainer.enable_checkpointing", "false",
    # null, not false: fcn3_lightning/cli.py's before_instantiate_classes calls logger.get() on a bool today
    "--trainer.logger", "null",
    "--model.net.atmo_embed_dim", "4",
    "--model.net.surf_embed_dim", "4",
    "--model.net.aux_embed_dim", "2",
    "--model.net.num_layers", "2",
    "--model.ensemble_size", "2",
    "--data.batch_size", "1",
    "--data.train_rollout", "1",
    "--data.valid_rollout", "1",
]  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_failing_rank_stops_every_rank(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "-m", "fcn3_lightning", "fit", *TINY]
    argv += [
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.callbacks", "null",  # configs/base.yaml's callbacks (progress bar, checkpoints, lr monitor) are not needed
        "--trainer.callbacks+=parallel_fail_callback.RaiseOnRank",
        "--trainer.callbacks.rank", str(FAILING_RANK),
        "--trainer.callbacks.out_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), "COLUMNS": "200"}
    t0 = time.time()
    # own session: the launcher and its workers form one process group that a hang can be killed by
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=HANG_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"the launcher hung for {HANG_LIMIT_S} s after a rank raised:\n{output[-5000:]}") from None
    t_end = time.time()
    tail = output[-6000:]

    assert (out / "raised").is_file(), f"rank {FAILING_RANK} never reached its first training batch:\n{tail}"
    raised = float((out / "raised").read_text())
    after = t_end - raised
    print(f"\nlauncher exit code {proc.returncode}; total {t_end - t0:.1f} s, of which {after:.1f} s after rank {FAILING_RANK} raised")

    assert proc.returncode != 0, f"torchrun exited 0 although rank {FAILING_RANK} raised:\n{tail}"
    assert f"injected failure on rank {FAILING_RANK}" in output, f"the error is not shown:\n{tail}"
    assert after < MAX_AFTER_RAISE_S, f"the launcher returned {after:.1f} s after the raise (limit {MAX_AFTER_RAISE_S:.0f} s)"

    # every worker is gone: the pids they wrote at setup, and anything left in the launcher's process group
    pids = {int(p.read_text()) for p in out.glob("pid*")}
    assert len(pids) == WORLD, f"only {len(pids)} of {WORLD} workers reached setup:\n{tail}"
    time.sleep(0.5)
    survivors = [pid for pid in pids if _alive(pid)]
    group = [p.pid for p in psutil.process_iter() if p.pid != os.getpid() and _pgid(p.pid) == proc.pid and _alive(p.pid)]
    if survivors or group:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not survivors, f"workers {survivors} survived the launcher"
    assert not group, f"processes {group} of the launcher's group survived it"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
