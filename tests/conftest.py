"""Shared test fixtures: where the reference tensors live, small model configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIRS = [REPO / "tests" / "data" / "fcn3_reference_small", REPO.parent / "shared" / "golden" / "fcn3_reference_small"]


@pytest.fixture(autouse=True)
def _few_threads():
    # the suite runs on 2 cores; more threads than cores only adds contention
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    for d in GOLDEN_DIRS:
        if (d / "manifest.json").is_file() and (d / "state_dict.pt").is_file() and (d / "tensors.pt").is_file():
            return d
    pytest.skip("FCN3 reference tensors not found (tests/data/fcn3_reference_small or ../shared/golden)")


@pytest.fixture(scope="session")
def manifest(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "manifest.json").read_text())
