"""The DISCO CUDA-kernel check (fcn3_lightning.kernels): its decision without a GPU, and a no-op on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch_harmonics

from fcn3_lightning.kernels import (
    ALLOW_SLOW_ENV,
    MissingCudaKernels,
    check_disco_kernels,
    cuda_kernels_available,
    disco_decision,
    disco_optimized_kernel,
    slow_path_allowed,
)


def test_the_decision_present_absent_allowed():
    assert disco_decision("cuda", cuda_kernels=True, allow_slow=False) == "cuda-kernels"
    assert disco_decision("cuda", cuda_kernels=True, allow_slow=True) == "cuda-kernels"
    assert disco_decision("cuda", cuda_kernels=False, allow_slow=True) == "slow-allowed"
    with pytest.raises(MissingCudaKernels) as e:
        disco_decision("cuda", cuda_kernels=False, allow_slow=False)
    msg = str(e.value)
    # what to do, in the message: uninstall the CPU build, install NVIDIA's CUDA build, or allow the slow path
    assert "pip uninstall -y torch-harmonics" in msg
    assert "--extra-index-url https://pypi.nvidia.com torch-harmonics-cu" in msg
    assert f"{ALLOW_SLOW_ENV}=1" in msg and torch_harmonics.__version__ in msg
    assert isinstance(e.value, ValueError)  # the command line prints it and exits 2
    for kernels in (False, True):
        for allow in (False, True):
            assert disco_decision("cpu", cuda_kernels=kernels, allow_slow=allow) == "cpu"


def test_the_environment_switch(monkeypatch):
    for value, allowed in (("1", True), ("true", True), ("YES", True), ("0", False), ("", False), ("no", False)):
        monkeypatch.setenv(ALLOW_SLOW_ENV, value)
        assert slow_path_allowed() is allowed, value
    monkeypatch.delenv(ALLOW_SLOW_ENV)
    assert slow_path_allowed() is False


def test_the_installed_build_and_a_cpu_run(monkeypatch):
    # the flag compiled into the installed build agrees with its version tag (PyPI's CPU build says "+...cpu")
    if "cpu" in torch_harmonics.__version__:
        assert cuda_kernels_available() is False
    monkeypatch.delenv(ALLOW_SLOW_ENV, raising=False)
    assert check_disco_kernels("cpu") == "cpu"  # no-op without CUDA, whatever the build
    assert check_disco_kernels(torch.device("cpu")) == "cpu"
    if not torch.cuda.is_available():
        assert disco_optimized_kernel() is True  # the CPU keeps torch-harmonics' compiled C++ kernels
        monkeypatch.setenv(ALLOW_SLOW_ENV, "1")
        assert disco_optimized_kernel() is True  # allowing the slow path changes nothing without a GPU
    else:
        decision = check_disco_kernels("cuda")  # a GPU machine: the real decision for its build
        assert decision in ("cuda-kernels", "slow-allowed")
