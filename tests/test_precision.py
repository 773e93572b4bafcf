"""Mixed precision (``--trainer.precision bf16-mixed``): a training step runs, its loss is fp32's within 2%, and the
parts that :mod:`fcn3_lightning.precision` keeps in float32 (spherical transforms, losses, metrics) ran in float32."""

from __future__ import annotations

from collections import defaultdict

import lightning as L
import pytest
import torch
from wb2_synthetic import make_store

from fcn3_lightning.data import WB2DataModule, WB2Store, compute_stats
from fcn3_lightning.losses import EnsembleCRPSLoss, crps_ensemble
from fcn3_lightning.training.module import FCN3Module

CHANNELS = ["tcwv", "u500", "v500", "z500"]
TRAIN = ("2000-01-01", "2000-01-05T18")
VALID = ("2000-01-06", "2000-01-08T18")
NET = {"atmo_embed_dim": 8, "surf_embed_dim": 8, "aux_embed_dim": 4, "num_layers": 2, "sfno_block_frequency": 2}
SHAPE = (17, 32)


class _Record(L.Callback):
    """Forward hooks on the float32 parts (and one bf16 part), and the first training step's loss and batch."""

    def __init__(self) -> None:
        self.seen: dict[str, set[tuple[str, bool]]] = defaultdict(set)
        self.loss: float | None = None
        self.index: list[int] | None = None
        self.val: list[dict[str, torch.Tensor]] = []

    def _hook(self, name: str, module: torch.nn.Module) -> None:
        def record(mod, args, out):
            # the hook runs in the caller's context: autocast as the module's forward saw it
            x = args[0]
            self.seen[name].add((f"{x.dtype}->{out.dtype}", torch.is_autocast_enabled("cpu")))

        module.register_forward_hook(record)

    def setup(self, trainer: L.Trainer, pl_module: FCN3Module, stage: str) -> None:
        pl_module.configure_model()  # Lightning calls it too; it builds once
        net = pl_module.net
        for name in ("atmo_encoder", "surf_encoder", "aux_encoder", "atmo_decoder", "surf_decoder"):
            self._hook(f"{name}.conv", getattr(net, name).conv)
        self._hook("atmo_decoder.resample", net.atmo_decoder.resample)
        self._hook("blocks.0.filter.sht", net.blocks[0].filter.sht)  # the spectral block (frequency 2: block 0)
        self._hook("blocks.0.filter.isht", net.blocks[0].filter.isht)
        self._hook("noise.isht", pl_module.forecaster.noise.isht)
        self._hook("loss.spectral.sht", pl_module.loss_fn.spectral.sht)
        self._hook("blocks.1.mlp.fc1", net.blocks[1].mlp.fc1)  # a reduced-precision part: autocast was on

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.loss is None:
            self.loss = float(outputs["loss"])
            self.index = batch["index"].tolist()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val.append({k: outputs[k].detach().clone() for k in ("prediction", "target")})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path, _ = make_store(tmp_path_factory.mktemp("precision") / "era.zarr", CHANNELS, n_times=36, nlat=SHAPE[0], nlon=SHAPE[1])
    compute_stats(WB2Store(path, CHANNELS), *TRAIN, progress=False).save(f"{path}.stats.json")
    return path


def _step(store, precision: str) -> tuple[_Record, dict[str, float]]:
    L.seed_everything(0)
    dm = WB2DataModule(str(store), channels=CHANNELS, train_range=TRAIN, valid_range=VALID, valid_rollout=2, batch_size=2)
    module = FCN3Module(net=NET, ensemble_size=2, valid_ensemble_size=3)
    rec = _Record()
    trainer = L.Trainer(
        precision=precision,
        max_steps=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        val_check_interval=1,
        callbacks=[rec],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    return rec, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_a_bf16_mixed_training_step_runs_with_fp32_loss_and_transforms(store):
    fp32, _ = _step(store, "32-true")
    bf16, metrics = _step(store, "bf16-mixed")
    print(f"loss of the first step: fp32 {fp32.loss:.6f}, bf16-mixed {bf16.loss:.6f}")
    assert bf16.index == fp32.index  # the same batch (and the same initial weights: same seed)
    assert abs(bf16.loss - fp32.loss) <= 0.02 * abs(fp32.loss), (bf16.loss, fp32.loss)
    assert bf16.loss != fp32.loss  # reduced precision did run somewhere (else the comparison says nothing)

    # autocast was on, and the processor's MLP ran in bf16 under it
    mlp = bf16.seen["blocks.1.mlp.fc1"]
    assert mlp and all(d.endswith("->torch.bfloat16") and on for d, on in mlp), mlp
    # the float32 parts: float32 in and out, with autocast off where they ran
    for name in ("atmo_encoder.conv", "surf_encoder.conv", "aux_encoder.conv", "atmo_decoder.conv", "surf_decoder.conv"):
        assert bf16.seen[name] == {("torch.float32->torch.float32", False)}, (name, bf16.seen[name])
    assert bf16.seen["atmo_decoder.resample"] == {("torch.float32->torch.float32", False)}
    assert bf16.seen["blocks.0.filter.sht"] == {("torch.float32->torch.complex64", False)}
    assert bf16.seen["blocks.0.filter.isht"] == {("torch.complex64->torch.float32", False)}
    assert bf16.seen["noise.isht"] == {("torch.complex64->torch.float32", False)}
    assert bf16.seen["loss.spectral.sht"] == {("torch.float32->torch.complex64", False)}

    # validation metrics: the logged CRPS is the float64 value of what validation returned, to float32 rounding
    (out,) = bf16.val
    pred, target = out["prediction"].double(), out["target"].double()
    assert pred.dtype == torch.float64 and out["prediction"].dtype == torch.float32
    q = torch.sin(torch.pi * torch.arange(SHAPE[0], dtype=torch.float64) / (SHAPE[0] - 1))
    q = (q / (q.sum() * SHAPE[1]))[:, None]
    crps = (crps_ensemble(pred, target, member_dim=1, kind="fair") * q).sum((-2, -1)).mean(0)[0].mean()
    assert metrics["val/crps"] == pytest.approx(float(crps), rel=1e-5)


def test_the_loss_scores_bf16_inputs_in_fp32():
    torch.manual_seed(0)
    loss_fn = EnsembleCRPSLoss(SHAPE, torch.rand(3), kind="fair")
    pred, obs = torch.randn(2, 3, 2, 3, *SHAPE), torch.randn(2, 2, 3, *SHAPE)
    pred16, obs16 = pred.bfloat16(), obs.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, details = loss_fn(pred16, obs16)
    assert loss.dtype == torch.float32 and details["spatial_crps"].dtype == torch.float32
    # exactly the fp32 loss of the (bf16-rounded) inputs: nothing inside ran in bf16
    ref, ref_details = loss_fn(pred16.float(), obs16.float())
    assert loss.item() == ref.item()
    torch.testing.assert_close(details["spectral_crps"], ref_details["spectral_crps"], rtol=0, atol=0)
