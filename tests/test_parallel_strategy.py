"""SpatialParallelStrategy: sizes, sampler split and module checks (no processes), then 2 optimizer steps under a
Trainer in 4 gloo processes == the single-process Trainer run.

The multi-process part reuses the tiny FCN3, the fixed per-member inputs (checked there to keep the members
apart: the CRPS near-tie caveat) and the loss settings of tests/test_parallel_step.py. A small LightningModule
opts into spatial parallelism (``supports_spatial_parallel``) and builds its network through the strategy's
``layers_factory``; ranks with data rank > 0 perturb their initial weights, so the strategy's broadcast must win.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from gloo_workers import gloo_worker, run_workers
from lightning.fabric.plugins.environments import LightningEnvironment
from test_parallel_step import CONFIG, LOSS_KW, LR, N_MEMBERS, N_SAMPLES, _inputs
from torch.utils.data import DataLoader

from fcn3_lightning.losses import EnsembleCRPSLoss
from fcn3_lightning.model import FCN3
from fcn3_lightning.parallel import DistributedEnsembleCRPSLoss, gather_state_dict, shard_state_dict, split_slice
from fcn3_lightning.parallel.strategy import SpatialParallelStrategy

WORLD = 4
#: (h, w, ensemble) parallel sizes; batch = the rest
LAYOUTS = [(2, 1, 1), (1, 2, 2)]
N_OPT_STEPS = 2
REL_TOL = 1e-5
TIME_LIMIT_S = 90.0
PRELOAD = ["torch", "torch.distributed", "lightning", "fcn3_lightning.parallel.strategy", "fcn3_lightning.model"]


def _strategy(world: int, rank: int, **sizes: int) -> SpatialParallelStrategy:
    env = LightningEnvironment()
    strategy = SpatialParallelStrategy(**sizes, parallel_devices=[torch.device("cpu")] * world, cluster_environment=env)
    env.set_world_size(world)
    env.set_global_rank(rank)
    return strategy


# --- no processes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "want"),
    [
        # rank -> batch rank: row-major (batch, ensemble, h, w)
        ({"h_parallel_size": 2}, [0, 0, 1, 1, 2, 2, 3, 3]),
        ({"h_parallel_size": 2, "w_parallel_size": 2}, [0, 0, 0, 0, 1, 1, 1, 1]),
        ({"ensemble_parallel_size": 2}, [0, 0, 1, 1, 2, 2, 3, 3]),
        ({"w_parallel_size": 2, "ensemble_parallel_size": 2}, [0, 0, 0, 0, 1, 1, 1, 1]),
        ({}, list(range(8))),
    ],
)
def test_sampler_splits_over_batch_ranks_only(sizes: dict, want: list[int]) -> None:
    for rank in range(8):
        kwargs = _strategy(8, rank, **sizes).distributed_sampler_kwargs
        assert kwargs == {"num_replicas": max(want) + 1, "rank": want[rank]}


def test_model_parallel_flag_and_mesh_sizes() -> None:
    assert not _strategy(4, 0).model_parallel
    assert _strategy(4, 0, h_parallel_size=2).model_parallel
    assert _strategy(4, 0, ensemble_parallel_size=4).model_parallel
    sizes = _strategy(8, 0, h_parallel_size=2, ensemble_parallel_size=2).mesh_sizes(8)
    assert (sizes.batch, sizes.ensemble, sizes.h, sizes.w) == (2, 2, 2, 1)


@pytest.mark.parametrize("option", ["h_parallel_size", "w_parallel_size", "ensemble_parallel_size"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_invalid_sizes_name_the_option(option: str, value) -> None:
    with pytest.raises(ValueError, match=option):
        SpatialParallelStrategy(**{option: value})


def test_world_size_must_divide() -> None:
    strategy = _strategy(6, 0, h_parallel_size=2, w_parallel_size=2)
    with pytest.raises(ValueError, match="not divisible by ensemble_parallel_size x h_parallel_size x w_parallel_size"):
        _ = strategy.distributed_sampler_kwargs


def test_ddp_wrapper_options_are_rejected() -> None:
    with pytest.raises(TypeError, match="find_unused_parameters"):
        SpatialParallelStrategy(find_unused_parameters=True)


def test_polar_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="polar_mode"):
        SpatialParallelStrategy(polar_mode="nope")


def test_layers_factory_needs_the_mesh() -> None:
    with pytest.raises(RuntimeError, match="process group"):
        _strategy(4, 0, h_parallel_size=2).layers_factory()


def test_class_path_resolves_for_the_cli() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=L.pytorch.strategies.Strategy | str)
    cfg = parser.parse_args(
        ["--strategy", "fcn3_lightning.parallel.strategy.SpatialParallelStrategy", "--strategy.init_args.h_parallel_size", "2"]
    )
    strategy = parser.instantiate(cfg).strategy
    assert isinstance(strategy, SpatialParallelStrategy) and strategy._sizes_args["h_parallel_size"] == 2


# --- 4 processes under a Trainer ------------------------------------------------------------------


class _TinyModule(L.LightningModule):
    """Trains the tiny FCN3 of tests/test_parallel_step.py; under the strategy on its tile and member shard."""

    supports_spatial_parallel = True

    def __init__(self, blob: dict):
        super().__init__()
        self.blob = blob
        self.net: FCN3 | None = None
        self.result: dict | None = None

    def configure_model(self) -> None:
        self.mesh = getattr(self.trainer.strategy, "mesh", None)
        layers = self.trainer.strategy.layers_factory() if self.mesh is not None else None
        net = FCN3(**CONFIG) if layers is None else FCN3(**CONFIG, layers=layers)
        net.load_state_dict(shard_state_dict(self.blob["state_dict"], net))
        if self.mesh is not None and self.mesh.layout.data_rank > 0:
            with torch.no_grad():  # the strategy must broadcast the weights of data rank 0
                for p in net.parameters():
                    p.add_(torch.randn_like(p))
        self.net = net
        weights = self.blob["channel_weights"]
        if self.mesh is None:
            self.loss_fn = EnsembleCRPSLoss(CONFIG["inp_shape"], weights, **LOSS_KW)
        else:
            self.loss_fn = DistributedEnsembleCRPSLoss(self.mesh, CONFIG["inp_shape"], weights, **LOSS_KW)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x, target = self.blob["input"][batch], self.blob["target"][batch]
        if self.mesh is not None:
            m = split_slice(N_MEMBERS, self.mesh.sizes.ensemble, self.mesh.layout.ensemble_rank)
            lat, lon = self.mesh.tile(CONFIG["inp_shape"])
            x, target = x[:, m][..., lat, lon].contiguous(), target[..., lat, lon].contiguous()
        pred = self.net(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        return self.loss_fn(pred, target)[0]

    def _serial_layout(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in (state if self.mesh is None else gather_state_dict(state, self.net)).items()}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        # Adam is nearly invariant to a uniform gradient scale: check the clipped gradients themselves
        if self.global_step == 0:
            self.clipped_grads = self._serial_layout({n: p.grad for n, p in self.net.named_parameters()})

    def on_train_end(self) -> None:
        # gather while the mesh (torch-harmonics' groups) still exists: the strategy's teardown destroys it
        self.result = {"weights": self._serial_layout(self.net.state_dict()), "grads": self.clipped_grads}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=LR, betas=(0.9, 0.95))


def _fit(blob: dict, clip: float, strategy: SpatialParallelStrategy | None, batch_size: int) -> dict:
    module = _TinyModule(blob)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD if strategy is not None else 1,
        strategy=strategy if strategy is not None else "auto",
        max_steps=N_OPT_STEPS,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(list(range(N_SAMPLES)), batch_size=batch_size))
    return module.result


def _worker(rank: int, port: int, workdir: str) -> None:
    workdir = Path(workdir)
    with gloo_worker(rank, port, WORLD, lightning=True):
        blob = torch.load(workdir / "inputs.pt")
        clip = float(torch.load(workdir / "clip.pt"))
        results = {}
        for h, w, ens in LAYOUTS:
            sizes = {"h_parallel_size": h, "w_parallel_size": w, "ensemble_parallel_size": ens}
            strategy = SpatialParallelStrategy(**sizes, process_group_backend="gloo")
            batch = WORLD // (h * w * ens)
            results[(h, w, ens)] = _fit(blob, clip, strategy, N_SAMPLES // batch)
            dist.barrier()
        torch.save(results, workdir / f"rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, list[dict]]:
    blob = _inputs()
    # clip at half the first gradient norm, so that the shard-aware clipping acts
    net = FCN3(**CONFIG)
    net.load_state_dict(blob["state_dict"])
    loss_fn = EnsembleCRPSLoss(CONFIG["inp_shape"], blob["channel_weights"], **LOSS_KW)
    loss_fn(net(blob["input"].flatten(0, 1)).unflatten(0, blob["input"].shape[:2]), blob["target"])[0].backward()
    clip = 0.5 * float(torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf")))
    serial = _fit(blob, clip, None, N_SAMPLES)
    workdir = tmp_path_factory.mktemp("parallel_strategy")
    torch.save(blob, workdir / "inputs.pt")
    torch.save(torch.tensor(clip), workdir / "clip.pt")
    elapsed = run_workers(_worker, workdir, WORLD, TIME_LIMIT_S, PRELOAD)
    print(f"\n[world={WORLD}] {len(LAYOUTS)} layouts x {N_OPT_STEPS} optimizer steps: {elapsed:.1f} s")
    return serial, [torch.load(workdir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_clipped_gradients_equal_single_process(layout, runs) -> None:
    serial, distributed = runs
    worst, worst_name = 0.0, ""
    for rank, per_rank in enumerate(distributed):
        got = per_rank[layout]["grads"]
        assert got.keys() == serial["grads"].keys()
        for name, g in serial["grads"].items():
            scale = float(g.abs().max())
            assert scale > 0, f"serial gradient of {name} is zero: the test would not check it"
            ratio = float((got[name] - g).abs().max()) / scale
            if ratio > worst:
                worst, worst_name = ratio, name
            assert ratio <= REL_TOL, f"{layout}, rank {rank}, {name}: clipped gradient differs by {ratio:.3g} x max |grad|"
    print(f"[{layout}] clipped grads: worst max|diff| / max|grad| = {worst:.3e} ({worst_name})")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_trainer_steps_equal_single_process(layout, runs) -> None:
    serial, distributed = runs
    start = _inputs()["state_dict"]
    want = serial["weights"]
    assert any(float((want[k] - start[k]).abs().max()) > 1e-4 for k in want), "the serial run should have moved the weights"
    worst, worst_name = 0.0, ""
    for rank, per_rank in enumerate(distributed):
        got = per_rank[layout]["weights"]
        assert got.keys() == want.keys()
        for name, v in want.items():
            diff = float((got[name] - v).abs().max())
            if diff > worst:
                worst, worst_name = diff, name
            assert diff <= REL_TOL, f"{layout}, rank {rank}, {name}: weights differ by {diff:.3g} after {N_OPT_STEPS} steps"
    print(f"[{layout}] weights: max |diff| {worst:.3e} ({worst_name})")
