"""SpatialParallelStrategy checkpoints are layout-independent: saved under (h, w, ensemble, batch) = (2, 2, 1, 1),
they resume under (1, 1, 1, 1) and (2, 1, 1, 1) and continue as an uninterrupted single-process run does.

Reuses the tiny FCN3 module, inputs and plumbing of tests/test_parallel_strategy.py. The run:

1. test process: an uninterrupted 4-step plain Trainer run (the reference), and a 2-step plain run that writes a
   checkpoint (the serial layout by definition);
2. 4 gloo workers: 2 steps under (2, 2, 1, 1), a ModelCheckpoint writes the checkpoint after step 2; then the
   4-process world ends and 2 of the workers form a new one: resume that checkpoint, and the plain run's, under
   (2, 1, 1, 1) for 2 more steps each;
3. test process: resume the (2, 2, 1, 1) checkpoint in a plain single-process Trainer for 2 more steps.

Every resume goes through ``trainer.fit(..., ckpt_path=...)``, so weights, Adam moments and the global step come from
the file. The final weights must equal the reference's to REL_TOL x max |w| per tensor; the file itself must hold
exactly the serial keys and shapes (optimizer moments included) and the plain run's values.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from gloo_workers import free_port, gloo_worker, init_gloo, lightning_env, run_workers
from lightning.pytorch.callbacks import ModelCheckpoint
from test_parallel_step import CONFIG, LOSS_KW, N_SAMPLES, _inputs
from test_parallel_strategy import _TinyModule
from torch.utils.data import DataLoader

from fcn3_lightning.losses import EnsembleCRPSLoss
from fcn3_lightning.model import FCN3
from fcn3_lightning.parallel.strategy import SpatialParallelStrategy
from fcn3_lightning.training.checkpoint_io import AtomicCheckpointIO

WORLD = 4
#: (h, w, ensemble) of the saving run (batch = 1 with WORLD processes) and of the resuming one (batch = 1 with 2)
SAVE_LAYOUT, RESUME_LAYOUT, RESUME_WORLD = (2, 2, 1), (2, 1, 1), 2
N_FIRST, N_TOTAL = 2, 4
CKPT_NAME = f"step{N_FIRST}"
REL_TOL = 1e-5
TIME_LIMIT_S = 150.0
PRELOAD = ["torch", "torch.distributed", "lightning", "fcn3_lightning.parallel.strategy", "fcn3_lightning.model"]


class _ResumableModule(_TinyModule):
    """The tiny module, reporting the step it started from and its final weights (serial layout)."""

    def on_train_start(self) -> None:
        self.start_step = self.global_step

    def on_train_end(self) -> None:
        # gathered while the mesh exists (the strategy's teardown destroys it)
        self.result = {
            "weights": self._serial_layout(self.net.state_dict()),
            "start_step": self.start_step,
            "global_step": self.global_step,
            "param_shapes": [(n, p.shape) for n, p in self.named_parameters()],
            "state_shapes": {k: v.shape for k, v in self.state_dict().items()},
        }


class _RecordingIO(AtomicCheckpointIO):
    """The atomic checkpoint IO, recording where it wrote: the strategy must write through the trainer's plugin."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: list[str] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.saved.append(str(path))
        super().save_checkpoint(checkpoint, path, storage_options)


def _fit(
    blob: dict,
    clip: float,
    max_steps: int,
    strategy: SpatialParallelStrategy | None = None,
    devices: int = 1,
    save_dir: Path | None = None,
    ckpt_path: Path | None = None,
) -> dict:
    module = _ResumableModule(blob)
    io = _RecordingIO()
    callbacks = [ModelCheckpoint(dirpath=save_dir, filename=CKPT_NAME, every_n_train_steps=N_FIRST)] if save_dir else []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy if strategy is not None else "auto",
        plugins=[io],
        max_steps=max_steps,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=save_dir is not None,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    assert trainer.strategy.checkpoint_io is io
    # every layout here has batch-parallel size 1: each rank sees the whole batch
    trainer.fit(module, train_dataloaders=DataLoader(list(range(N_SAMPLES)), batch_size=N_SAMPLES), ckpt_path=ckpt_path)
    return {**module.result, "saved": io.saved}


def _strategy(h: int, w: int, ens: int) -> SpatialParallelStrategy:
    return SpatialParallelStrategy(h_parallel_size=h, w_parallel_size=w, ensemble_parallel_size=ens, process_group_backend="gloo")


def _worker(rank: int, port: int, workdir: str) -> None:
    workdir = Path(workdir)
    with gloo_worker(rank, port, WORLD, lightning=True):
        blob = torch.load(workdir / "inputs.pt")
        clip = float(torch.load(workdir / "clip.pt"))
        results = {"save": _fit(blob, clip, N_FIRST, _strategy(*SAVE_LAYOUT), WORLD, save_dir=workdir / "parallel")}
        # a fresh 2-process world for (2, 1, 1, 1): rank 0 picks its port, the 4-process world ends
        ports = [free_port() if rank == 0 else None]
        dist.broadcast_object_list(ports, src=0)
        dist.barrier()
        dist.destroy_process_group()
        if rank < RESUME_WORLD:
            lightning_env(rank, ports[0], RESUME_WORLD)
            init_gloo(rank, ports[0], RESUME_WORLD)
            for key, ckpt_dir in (("resume", "parallel"), ("resume_plain", "plain")):
                ckpt = workdir / ckpt_dir / f"{CKPT_NAME}.ckpt"
                results[key] = _fit(blob, clip, N_TOTAL, _strategy(*RESUME_LAYOUT), RESUME_WORLD, ckpt_path=ckpt)
                dist.barrier()
            dist.destroy_process_group()
        torch.save(results, workdir / f"rank{rank}.pt")


def _clip(blob: dict) -> float:
    """Half the first gradient norm, so that the shard-aware clipping acts (as in tests/test_parallel_strategy.py)."""
    net = FCN3(**CONFIG)
    net.load_state_dict(blob["state_dict"])
    loss_fn = EnsembleCRPSLoss(CONFIG["inp_shape"], blob["channel_weights"], **LOSS_KW)
    loss_fn(net(blob["input"].flatten(0, 1)).unflatten(0, blob["input"].shape[:2]), blob["target"])[0].backward()
    return 0.5 * float(torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    t0 = time.perf_counter()
    blob = _inputs()
    clip = _clip(blob)
    workdir = tmp_path_factory.mktemp("parallel_checkpoint")
    reference = _fit(blob, clip, N_TOTAL)
    plain_first = _fit(blob, clip, N_FIRST, save_dir=workdir / "plain")
    torch.save(blob, workdir / "inputs.pt")
    torch.save(torch.tensor(clip), workdir / "clip.pt")
    elapsed = run_workers(_worker, workdir, WORLD, TIME_LIMIT_S, PRELOAD)
    workers = [torch.load(workdir / f"rank{r}.pt") for r in range(WORLD)]
    ckpt = workdir / "parallel" / f"{CKPT_NAME}.ckpt"
    serial_resume = _fit(blob, clip, N_TOTAL, ckpt_path=ckpt)
    print(f"\n[checkpoint] workers (4-process save + 2-process resumes): {elapsed:.1f} s; fixture total {time.perf_counter() - t0:.1f} s")
    return {
        "reference": reference,
        "plain_first": plain_first,
        "workers": workers,
        "serial_resume": serial_resume,
        "ckpt": torch.load(ckpt, weights_only=False),
        "plain_ckpt": torch.load(workdir / "plain" / f"{CKPT_NAME}.ckpt", weights_only=False),
        "ckpt_path": str(ckpt),
    }


def _worst_relative(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> tuple[float, str]:
    """Largest max |diff| / max |want| over the tensors; asserts each <= REL_TOL."""
    assert got.keys() == want.keys()
    worst, worst_name = 0.0, ""
    for name, v in want.items():
        assert got[name].shape == v.shape and got[name].dtype == v.dtype, f"{what}, {name}: {got[name].shape} vs {v.shape}"
        scale = float(v.abs().max())
        assert scale > 0, f"{what}, {name}: all zero, the test would not check it"
        ratio = float((got[name] - v).abs().max()) / scale
        if ratio > worst:
            worst, worst_name = ratio, name
        assert ratio <= REL_TOL, f"{what}, {name}: max |diff| = {ratio:.3g} x max |w|"
    return worst, worst_name


def test_strategy_writes_once_through_the_trainers_checkpoint_io(runs) -> None:
    saved = [r["save"]["saved"] for r in runs["workers"]]
    assert [Path(p).resolve() for p in saved[0]] == [Path(runs["ckpt_path"]).resolve()], saved
    assert all(s == [] for s in saved[1:]), f"only global rank 0 writes: {saved}"


def test_checkpoint_has_the_serial_layout(runs) -> None:
    ckpt, ref = runs["ckpt"], runs["reference"]
    assert ckpt["global_step"] == N_FIRST
    got = {k: v.shape for k, v in ckpt["state_dict"].items()}
    assert got == ref["state_shapes"], "the checkpoint's state_dict must have exactly the serial keys and shapes"
    assert got == {f"net.{k}": v.shape for k, v in FCN3(**CONFIG).state_dict().items()}
    (opt,) = ckpt["optimizer_states"]
    (plain_opt,) = runs["plain_ckpt"]["optimizer_states"]
    assert opt["param_groups"] == plain_opt["param_groups"]
    assert sorted(opt["state"]) == list(range(len(ref["param_shapes"])))
    for idx, (name, shape) in enumerate(ref["param_shapes"]):
        state = opt["state"][idx]
        assert state["exp_avg"].shape == shape and state["exp_avg_sq"].shape == shape, (name, state["exp_avg"].shape, shape)
        assert int(state["step"]) == N_FIRST


def test_checkpoint_equals_the_plain_runs(runs) -> None:
    ckpt, plain = runs["ckpt"], runs["plain_ckpt"]
    worst_w, name_w = _worst_relative(ckpt["state_dict"], plain["state_dict"], "state_dict")
    (opt,), (plain_opt,) = ckpt["optimizer_states"], plain["optimizer_states"]
    names = [n for n, _ in runs["reference"]["param_shapes"]]
    moments = {f"{names[i]}.{k}": opt["state"][i][k] for i in opt["state"] for k in ("exp_avg", "exp_avg_sq")}
    plain_moments = {f"{names[i]}.{k}": plain_opt["state"][i][k] for i in plain_opt["state"] for k in ("exp_avg", "exp_avg_sq")}
    worst_m, name_m = _worst_relative(moments, plain_moments, "Adam moments")
    print(f"[checkpoint (2,2,1,1) vs plain 2-step] weights: max rel diff {worst_w:.3e} ({name_w}); Adam moments {worst_m:.3e} ({name_m})")


@pytest.mark.parametrize(
    ("run", "label"),
    [
        ("serial_resume", "(2,2,1,1) checkpoint -> (1,1,1,1)"),
        ("resume", "(2,2,1,1) checkpoint -> (2,1,1,1)"),
        ("resume_plain", "plain (1,1,1,1) checkpoint -> (2,1,1,1)"),
    ],
)
def test_resumed_run_continues_identically(runs, run: str, label: str) -> None:
    want = runs["reference"]["weights"]
    start = _inputs()["state_dict"]
    assert any(float((want[k] - start[k]).abs().max()) > 1e-4 for k in want), "the reference run should have moved the weights"
    results = [runs[run]] if run == "serial_resume" else [w[run] for w in runs["workers"][:RESUME_WORLD]]
    worst, worst_name = 0.0, ""
    for rank, result in enumerate(results):
        # restored from the file (global step 2), then 2 more steps
        assert (result["start_step"], result["global_step"]) == (N_FIRST, N_TOTAL), (rank, result["start_step"], result["global_step"])
        ratio, name = _worst_relative(result["weights"], want, f"{label}, rank {rank}")
        if ratio > worst:
            worst, worst_name = ratio, name
    print(f"[{label}] final weights vs uninterrupted {N_TOTAL}-step run: max |diff| / max |w| = {worst:.3e} ({worst_name})")
