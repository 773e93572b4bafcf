"""The three curriculum stages chain on the default world, weights only, in one command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from tiny_net import FIT_NET as TINY

REPO = Path(__file__).resolve().parents[1]


def test_curriculum_chains_stage1_stage2_finetune(tmp_path):
    # the default world is generated once into the user cache (about 1.5 min) and reused afterwards
    res = subprocess.run(
        [
            sys.executable, "-m", "fcn3_lightning", "curriculum",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--model.net", json.dumps(TINY), "--data.valid_rollout", "1",
            "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'mlruns.db'}",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    # one folder for the curriculum (runs/latest points at it), one subfolder per stage
    folder = (tmp_path / "runs" / "latest").resolve()
    assert folder.name.startswith("curriculum-")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(["latest", folder.name])
    ckpts = {s: folder / s / "checkpoints" / "best.ckpt" for s in ("stage1", "stage2", "finetune")}
    for stage, path in ckpts.items():
        assert path.is_file(), f"{stage}: {path} missing\n{res.stdout[-2000:]}"
    blobs = {s: torch.load(p, map_location="cpu", weights_only=False) for s, p in ckpts.items()}
    hp = {s: b["hyper_parameters"] for s, b in blobs.items()}
    # each stage starts from the previous one's best weights ...
    assert hp["stage1"]["init_from"] is None
    assert Path(hp["stage2"]["init_from"]).resolve() == ckpts["stage1"].resolve()
    assert Path(hp["finetune"]["init_from"]).resolve() == ckpts["stage2"].resolve()
    # ... with the stage's own recipe, and only the weights: counters start afresh in every stage
    assert (hp["stage1"]["crps"], hp["stage1"]["ensemble_size"]) == ("cdf", 16)
    assert (hp["stage2"]["crps"], hp["stage2"]["ensemble_size"]) == ("fair", 2)
    assert (hp["finetune"]["antithetic"], hp["finetune"]["ensemble_size"]) == (True, 4)
    assert all(b["global_step"] == 2 for b in blobs.values())
    assert blobs["stage2"]["datamodule_hyper_parameters"]["train_rollout"] == 4
    # one MLflow run per stage, named after the curriculum and the stage
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fcn3").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(f"{folder.name}/{s}" for s in ckpts), [r.info.run_name for r in runs]
    assert {blobs[s]["mlflow_run_id"] for s in ckpts} == {r.info.run_id for r in runs}
