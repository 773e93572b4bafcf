"""Are torch-harmonics' compiled CUDA kernels for the DISCO convolution there? Checked where a run starts on a GPU.

PyPI's ``torch-harmonics`` is the CPU build: its DISCO convolution has C++ kernels only, and on a CUDA device the
network either fails in the dispatcher or (torch path) runs many times slower. The CUDA builds come from NVIDIA's
package index under other names (``torch-harmonics-cu12x`` ...) with the same import name ``torch_harmonics``; the
two overwrite each other. torch-harmonics 0.9.3 says which one is installed through
``torch_harmonics.disco.cuda_kernels_is_available()`` (a flag compiled into the build).

:func:`check_disco_kernels` runs at the start of ``fit`` / ``validate`` / ``test`` on a CUDA accelerator
(:mod:`fcn3_lightning.cli`) and of ``predict`` / :func:`fcn3_lightning.load_forecaster` on a CUDA device. Without the
kernels it stops with :class:`MissingCudaKernels`, which says how to install the CUDA build, unless the slow path is
allowed explicitly: ``FCN3_ALLOW_SLOW_DISCO=1`` in the environment. The slow path is torch-harmonics' sparse-matrix
(torch) implementation of the same convolution (:func:`disco_optimized_kernel`). On a machine without CUDA the check
is a no-op.
"""

from __future__ import annotations

import os
import sys

import torch

#: set to 1 to run the DISCO convolution on a GPU without torch-harmonics' CUDA kernels (much slower)
ALLOW_SLOW_ENV = "FCN3_ALLOW_SLOW_DISCO"

INSTALL_HINT = (
    "PyPI's torch-harmonics is the CPU build. Install the CUDA build from NVIDIA's package index, for the CUDA version of "
    "your torch (python -c 'import torch; print(torch.version.cuda)': 12.6 -> cu126; cu126, cu128, cu129, cu130, cu132 "
    "exist for 0.9.3). Same import name, and the two overwrite each other, so uninstall first:\n"
    "    pip uninstall -y torch-harmonics\n"
    "    pip install --extra-index-url https://pypi.nvidia.com torch-harmonics-cu130==0.9.3   # torch.version.cuda 13.0\n"
    f"(README, section 'GPU install'). Or allow the slow torch path explicitly: {ALLOW_SLOW_ENV}=1."
)


class MissingCudaKernels(ValueError):
    """A CUDA run without torch-harmonics' DISCO CUDA kernels (and the slow path not allowed); the command line prints
    the message and exits 2, as for other errors of the user's setup."""


def cuda_kernels_available() -> bool:
    """Whether the installed torch-harmonics was built with its DISCO CUDA kernels."""
    from torch_harmonics.disco import cuda_kernels_is_available

    return bool(cuda_kernels_is_available())


def slow_path_allowed() -> bool:
    """``FCN3_ALLOW_SLOW_DISCO`` is 1 / true / yes."""
    return os.environ.get(ALLOW_SLOW_ENV, "").strip().lower() in ("1", "true", "yes")


def disco_decision(device_type: str, cuda_kernels: bool, allow_slow: bool) -> str:
    """What a run on ``device_type`` does: ``"cpu"`` (no check), ``"cuda-kernels"``, or ``"slow-allowed"``.

    Raises :class:`MissingCudaKernels` (with the install commands) on CUDA without the kernels, unless allowed.
    """
    if device_type != "cuda":
        return "cpu"
    if cuda_kernels:
        return "cuda-kernels"
    if allow_slow:
        return "slow-allowed"
    import torch_harmonics

    raise MissingCudaKernels(
        f"the installed torch-harmonics {torch_harmonics.__version__} has no CUDA kernels for the DISCO convolution, "
        f"and this run is on a CUDA device. {INSTALL_HINT}"
    )


def check_disco_kernels(device: str | torch.device) -> str:
    """:func:`disco_decision` for ``device`` with the installed build and the environment; warns on the slow path."""
    device_type = torch.device(device).type
    if device_type != "cuda":
        return "cpu"  # no-op: the check only concerns CUDA runs
    decision = disco_decision(device_type, cuda_kernels_available(), slow_path_allowed())
    if decision == "slow-allowed":
        print(
            f"WARNING: torch-harmonics has no DISCO CUDA kernels; {ALLOW_SLOW_ENV}=1: the DISCO convolutions run on the slow torch path",
            file=sys.stderr,
            flush=True,
        )
    return decision


def disco_optimized_kernel() -> bool:
    """``optimized_kernel`` for the DISCO layers built now: False (the torch path, which runs on CUDA too) only when a
    GPU is present, the build has no CUDA kernels and the slow path is allowed; the compiled kernels otherwise."""
    if torch.cuda.is_available() and not cuda_kernels_available() and slow_path_allowed():
        return False
    return True
