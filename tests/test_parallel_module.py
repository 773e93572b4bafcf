"""FCN3Module + WB2DataModule (default world) under SpatialParallelStrategy == the same fit in one process.

4 gloo processes (h_parallel_size=2 x ensemble_parallel_size=2, so batch-parallel size 1: every rank reads every
sample, on its tile) fit 2 optimizer steps and validate once; the test process runs the same serially with a plain
Trainer. Both start from the same serial weights (the distributed layers draw other random numbers for their
shards, so every run loads them in ``on_fit_start``, after the strategy's broadcast). Compared: the weights after
the 2 steps (gathered to the serial layout in ``on_train_end``, while the mesh still exists) and the logged
validation metrics (loss, CRPS and the WB2 scores in physical units).

Sample order: for training Lightning wraps the datamodule's EpochShuffleSampler in a DistributedSamplerWrapper with
``shuffle=True`` (always, for the train loader), which permutes the sampler's order once more (seed PL_GLOBAL_SEED +
epoch), even with one batch rank. The serial twin is therefore fed the distributed run's samples, in its order, so
that the numerical comparison holds whatever the sampler does; ``test_train_order_equals_serial`` checks the order
itself against a serial run's.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from gloo_workers import gloo_worker, run_workers
from torch.utils.data import DataLoader

from fcn3_lightning.data.datamodule import WB2DataModule, collate_batch
from fcn3_lightning.parallel import gather_state_dict, shard_state_dict
from fcn3_lightning.parallel.strategy import SpatialParallelStrategy
from fcn3_lightning.training.module import FCN3Module

WORLD = 4
SIZES = {"h_parallel_size": 2, "ensemble_parallel_size": 2}  # batch-parallel size 1
NET = {"atmo_embed_dim": 8, "surf_embed_dim": 8, "aux_embed_dim": 4, "num_layers": 2, "sfno_block_frequency": 2}
MODULE_KW = {"net": NET, "ensemble_size": 4, "crps": "fair", "lr": 2e-3}
DATA_KW = {"batch_size": 2, "num_workers": 0, "train_rollout": 1, "valid_rollout": 2}
N_OPT_STEPS = 2
REL_TOL = 1e-5
TIME_LIMIT_S = 120.0
PRELOAD = ["torch", "torch.distributed", "lightning", "fcn3_lightning.parallel.strategy", "fcn3_lightning.training.module"]


class _PinnedOrder(WB2DataModule):
    """The datamodule with its training samples in a given order (the serial twin of the distributed run)."""

    order: list[int] = []

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("train"), batch_size=self.hparams.batch_size, sampler=self.order, collate_fn=collate_batch)


class _Probe(L.Callback):
    """Starts from the given serial weights, records the samples seen and the weights after training (serial layout)."""

    def __init__(self, initial: dict[str, torch.Tensor]):
        self.initial = initial
        self.record: dict = {"train_index": [], "val_index": []}

    def on_fit_start(self, trainer: L.Trainer, pl_module: FCN3Module) -> None:
        # after the strategy's broadcast, before the first step (in place: the optimizer keeps its parameters)
        net = pl_module.net
        net.load_state_dict(shard_state_dict(self.initial, net) if pl_module.layout.model_parallel else self.initial)
        # what each reader took from the strategy's layout (slices as (start, stop): the record is loaded weights-only)
        dm = trainer.datamodule
        members = pl_module.layout.members(MODULE_KW["ensemble_size"])
        self.record["layout"] = {
            "module_is_strategy_mesh": pl_module.layout is getattr(trainer.strategy, "mesh", None),
            "data": [(dm.lat.start, dm.lat.stop), (dm.lon.start, dm.lon.stop)],
            "static": list(pl_module.static.shape[-2:]),
            "scores": [[(t.start, t.stop) for t in m.tile] for m in pl_module.scores.metrics],
            "quadrature_rows": int(pl_module.quadrature.shape[0]),
            "members": (members.start, members.stop),
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record["train_index"].append(batch["index"].tolist())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.record["val_index"].append(batch["index"].tolist())

    def on_train_end(self, trainer: L.Trainer, pl_module: FCN3Module) -> None:
        state = pl_module.net.state_dict()
        if pl_module.layout.model_parallel:  # collective over the h group; the strategy destroys the mesh at teardown
            state = gather_state_dict(state, pl_module.net)
        self.record["weights"] = {k: v.detach().clone() for k, v in state.items()}


def _initial_weights() -> dict[str, torch.Tensor]:
    """The serial network's initial weights (as FCN3Module builds it for the default world under seed 0)."""
    L.seed_everything(0, verbose=False)
    dm, module = WB2DataModule(**DATA_KW), FCN3Module(**MODULE_KW)
    module.build(dm.channels, dm.aux_channels, dm.store.shape, dm.normalizer)
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


def _fit(strategy: SpatialParallelStrategy | None, initial: dict[str, torch.Tensor], order: list[int] | None = None) -> dict:
    L.seed_everything(0, verbose=False)
    probe = _Probe(initial)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD if strategy is not None else 1,
        strategy=strategy if strategy is not None else "auto",
        max_steps=N_OPT_STEPS,
        max_epochs=1,
        limit_train_batches=N_OPT_STEPS,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        gradient_clip_val=32.0,
        callbacks=[probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if order is None:
        dm = WB2DataModule(**DATA_KW)
    else:
        dm = _PinnedOrder(**DATA_KW)
        dm.order = order
    trainer.fit(FCN3Module(**MODULE_KW), datamodule=dm)
    assert trainer.global_step == N_OPT_STEPS
    probe.record["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return probe.record


def _worker(rank: int, port: int, workdir: str) -> None:
    workdir = Path(workdir)
    with gloo_worker(rank, port, WORLD, lightning=True):
        record = _fit(SpatialParallelStrategy(**SIZES, process_group_backend="gloo"), torch.load(workdir / "initial.pt"))
        torch.save(record, workdir / f"rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, list[dict], dict[str, torch.Tensor]]:
    workdir = tmp_path_factory.mktemp("parallel_module")
    initial = _initial_weights()
    torch.save(initial, workdir / "initial.pt")
    elapsed = run_workers(_worker, workdir, WORLD, TIME_LIMIT_S, PRELOAD)
    distributed = [torch.load(workdir / f"rank{r}.pt") for r in range(WORLD)]
    t0 = time.perf_counter()
    order = [i for batch in distributed[0]["train_index"] for i in batch]
    serial = _fit(None, initial, order)
    print(f"\n{WORLD} gloo processes ({SIZES}): {elapsed:.1f} s; serial twin: {time.perf_counter() - t0:.1f} s")
    return serial, distributed, initial


def test_weights_and_validation_metrics_equal_serial(runs) -> None:
    serial, distributed, start = runs
    assert len(serial["train_index"]) == N_OPT_STEPS and len(serial["val_index"]) == 1
    for rank, rec in enumerate(distributed):  # batch-parallel size 1: every rank saw every sample
        assert rec["train_index"] == serial["train_index"], f"rank {rank} trained on other samples than rank 0"
        assert rec["val_index"] == serial["val_index"], f"rank {rank} validated on other samples"

    # weights after the optimizer steps, in the serial layout
    want = serial["weights"]
    moved = max(float((want[k] - start[k]).abs().max()) for k in want)
    assert moved > 1e-4, f"the serial run barely moved the weights ({moved:.3g}): the comparison would be vacuous"
    worst, worst_name = 0.0, ""
    for rank, rec in enumerate(distributed):
        got = rec["weights"]
        assert got.keys() == want.keys()
        for name, v in want.items():
            assert got[name].shape == v.shape, f"rank {rank}, {name}: {tuple(got[name].shape)} vs serial {tuple(v.shape)}"
            scale = max(float(v.abs().max()), 1e-12)
            ratio = float((got[name] - v).abs().max()) / scale
            if ratio > worst:
                worst, worst_name = ratio, name
            assert ratio <= REL_TOL, f"rank {rank}, {name}: max|diff| = {ratio:.3g} x max|w| after {N_OPT_STEPS} steps"
    print(f"weights ({len(want)} tensors, largest move {moved:.3g}): worst max|diff| / max|w| = {worst:.3e} ({worst_name})")

    # logged validation metrics (every rank logs the synced values)
    metrics = serial["metrics"]
    wb2 = sorted(k for k in metrics if k.startswith(("val/crps/", "val/ensemble_mean_rmse/", "val/ensemble_spread/")))
    assert any(k.startswith("val/crps/") for k in wb2), f"no WB2 CRPS score logged: {sorted(metrics)}"
    keys = ["val/loss", "val/crps", "val/persistence_mae", *sorted(k for k in metrics if k.startswith("val/crps_lead")), *wb2]
    worst, worst_name = 0.0, ""
    for rank, rec in enumerate(distributed):
        missing = sorted(set(metrics) - set(rec["metrics"]))
        assert not missing, f"rank {rank} did not log {missing}"
        for k in keys:
            want_v, got_v = metrics[k], rec["metrics"][k]
            assert math.isfinite(want_v) and want_v != 0.0, f"serial {k} = {want_v}"
            rel = abs(got_v - want_v) / abs(want_v)
            if rel > worst:
                worst, worst_name = rel, k
            assert rel <= REL_TOL, f"rank {rank}, {k}: {got_v!r} vs serial {want_v!r} (relative {rel:.3g})"
    print(f"{len(keys)} validation metrics: worst relative diff {worst:.3e} ({worst_name})")
    crps_wb2 = next(k for k in wb2 if k.startswith("val/crps/"))
    print("  serial " + ", ".join(f"{k}={metrics[k]:.6g}" for k in ["val/loss", "val/crps", crps_wb2]))


def test_every_reader_takes_the_strategy_layout(runs) -> None:
    """The module, the data module and the scores read their tile and members from the strategy's one layout."""
    serial, distributed, _ = runs
    whole = [(0, 33), (0, 64)]  # the default world's grid
    assert serial["layout"] == {
        "module_is_strategy_mesh": False,
        "data": whole,
        "static": [33, 64],
        "scores": [whole] * len(serial["layout"]["scores"]),
        "quadrature_rows": 33,
        "members": (0, 4),
    }
    assert serial["layout"]["scores"]
    for rank, rec in enumerate(distributed):
        # ranks row-major over (batch, ensemble, h): h_rank = rank mod 2, ensemble_rank = rank div 2
        rows = [(0, 17), (17, 33)][rank % 2]
        tile = [rows, (0, 64)]
        e = rank // 2
        assert rec["layout"] == {
            "module_is_strategy_mesh": True,
            "data": tile,
            "static": [rows[1] - rows[0], 64],
            "scores": [tile] * len(serial["layout"]["scores"]),
            "quadrature_rows": rows[1] - rows[0],
            "members": (2 * e, 2 * e + 2),
        }, f"rank {rank}"


@pytest.mark.xfail(
    strict=True,
    reason="Lightning wraps the train sampler in DistributedSamplerWrapper(shuffle=True), which re-permutes the "
    "EpochShuffleSampler order even with batch-parallel size 1 (see the module docstring)",
)
def test_train_order_equals_serial(runs) -> None:
    _, distributed, _ = runs
    L.seed_everything(0, verbose=False)
    loader = WB2DataModule(**DATA_KW).train_dataloader()
    want = [batch["index"].tolist() for _, batch in zip(range(N_OPT_STEPS), loader, strict=False)]
    got = distributed[0]["train_index"]
    print(f"\ntrain batches: serial {want}, under the strategy {got}")
    assert got == want, "with one batch rank the strategy's run should read the serial run's samples in the same order"
