"""Shared test fixtures: where the reference tensors live, small model configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


def _tracked(folder: Path, *files: str) -> Path:
    """A reference folder committed under tests/data (provenance in its PROVENANCE.md): a missing file is a broken
    checkout, so the tests that need it fail rather than skip."""
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        pytest.fail(f"{folder} lacks {missing}: these reference files are part of the repository; restore them (git checkout)")
    return folder


@pytest.fixture(autouse=True)
def _few_threads():
    # the suite runs on 2 cores; more threads than cores only adds contention
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The reference network's weights, input, output and activations."""
    return _tracked(DATA / "fcn3_reference_small", "manifest.json", "state_dict.pt", "tensors.pt")


@pytest.fixture(scope="session")
def golden_package_dir() -> Path:
    """A model package written by the reference code and one step of its own package inference."""
    return _tracked(DATA / "fcn3_package_small", "package/config.json", "reference_step.pt")


@pytest.fixture(scope="session")
def manifest(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "manifest.json").read_text())
